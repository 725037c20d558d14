#!/usr/bin/env bash
# Re-ranking by matched parts and query expansion, measured with `famsearch eval` (no training, the default index:
# focus pooling, 224 px) on clipart-composites and on the unseen-style composites: Recall@1/5/10 and mAP with
# --rerank N (and --expand n) against the default ranking. Explainers are cut to paper FAM and the
# deletion/insertion curves to one pair: only the ranking is read here.
#   bash bench/rerank_eval.sh > bench/results/rerank-eval.txt
#   CONFIGS='--rerank 50|--rerank 50 --expand 1' bash bench/rerank_eval.sh   (some rows only)
source bench/composites_env.sh
echo "# $(date -u +%F), load $(cut -d' ' -f1-3 /proc/loadavg); famsearch eval, whole query photos, default index"
CONFIGS=${CONFIGS:-"|--rerank 20|--rerank 50|--rerank 100|--expand 1|--rerank 50 --expand 1|--rerank 50 --expand 2"}
for dataset in "$DATA/clipart-composites" "$OTHER"; do
  echo
  echo "## $(basename "$dataset")"
  echo
  echo "| flags | R@1 | R@5 | R@10 | mAP |"
  echo "|---|---:|---:|---:|---:|"
  IFS='|' read -ra rows <<< "$CONFIGS"
  for flags in "${rows[@]}"; do
    # one home per dataset: indexed once, each row re-ranks the same gallery
    # shellcheck disable=SC2086
    $FAMSEARCH eval "$dataset" --home "$WORK/$(basename "$dataset")" $flags --explain fam --curve-pairs 1 --steps 2 \
      --no-progress --json | .venv/bin/python -c '
import json, sys
r = json.load(sys.stdin)
pct = lambda v: "%.1f" % (100 * v)
cells = [pct(r["recall"][k]) for k in ("1", "5", "10")] + [pct(r["map"])]
print("| " + " | ".join([sys.argv[1] or "(default)"] + cells) + " |")
' "$flags"
  done
done
