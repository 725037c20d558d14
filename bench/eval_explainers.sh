#!/usr/bin/env bash
# The explainers' tables (localisation, faithfulness on both sides, randomisation, time per map) with every default,
# on clipart-composites and on the unseen object styles; each run's table into bench/results/ and its report folder
# (report.json, per_pair.npz, curves.png, examples) under $OUT (default: a scratch folder removed on exit).
#   bash bench/eval_explainers.sh            # ~6 min each on a quiet 2-core machine
source "$(dirname "$0")/composites_env.sh"
OUT=${OUT:-$WORK}
for set in composites other; do
  dataset=$([ $set = composites ] && echo "$DATA/clipart-composites" || echo "$OTHER")
  result=bench/results/eval-$set-default.txt
  {
    echo "# $(date +%F) famsearch eval $dataset --no-progress (every default), load $(cut -d' ' -f1-3 /proc/loadavg)"
    /usr/bin/time -f "%e s wall, %M KiB peak RSS" "$FAMSEARCH" eval "$dataset" --no-progress --out "$OUT/$set" 2>&1
  } > "$result.tmp"
  mv "$result.tmp" "$result"
  echo "wrote $result"
done
