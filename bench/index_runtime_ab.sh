#!/usr/bin/env bash
# `famsearch index --full` on bench_index.py's 150 12 MP JPEGs (make them first: bench/bench_index.py --photos 150
# --tiny 0 --repeats 1 --also "--runtime torch" --also "--input-size 320", which also builds the three homes), the
# default against --runtime torch and --input-size 320, alternated ROUNDS times; images/s as --json reports it and
# the whole command's wall time. Without bench_index.py's naive pipeline, for a machine too loaded to run it.
#   bash bench/index_runtime_ab.sh > bench/results/index-runtime.txt
set -euo pipefail
export PYTHONPATH=$PWD
CACHE=${FAMSEARCH_BENCH_INDEX_CACHE:-/tmp/famsearch-bench-index}
PHOTOS=$CACHE/set-150
echo "# $(date -u +%F), load $(cut -d' ' -f1-3 /proc/loadavg); famsearch index --full, $(ls "$PHOTOS" | wc -l) JPEGs of 4000x3000"
for round in $(seq "${ROUNDS:-2}"); do
  for variant in "defaults|home-set-150-focus|" "--runtime torch|home-set-150-runtime_torch|--runtime torch" \
                 "--input-size 320|home-set-150-input_size_320|--input-size 320"; do
    IFS='|' read -r name home flags <<< "$variant"
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    out=$(.venv/bin/python -m indexer.cli index "$PHOTOS" --home "$CACHE/$home" --json --no-progress --full $flags)
    wall=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
    rate=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["images_per_s"])' "$out")
    echo "round $round, $name: $rate images/s (--json); whole command $wall s; load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
