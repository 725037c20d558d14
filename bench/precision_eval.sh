#!/usr/bin/env bash
# Does bf16 (`--precision bf16`, or `auto` on CPUs with native bf16; fp32 is the default) retrieve and localise like fp32? docs/DESIGN.md §13 allows a
# faster arithmetic only if Recall on clipart-composites stays within 1 point. Runs `famsearch eval`
# once per precision in fresh homes and prints both reports.
#   bash bench/precision_eval.sh [DATASET] > bench/results/precision.txt
set -euo pipefail
DATASET=${1:-/work/shared/data/clipart-composites}
FAMSEARCH=${FAMSEARCH:-.venv/bin/famsearch}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for precision in fp32 bf16; do
  echo "## --precision $precision ($(cut -d' ' -f1-3 /proc/loadavg) load)"
  start=$(date +%s)
  "$FAMSEARCH" eval "$DATASET" --precision "$precision" --home "$WORK/$precision" --curve-pairs 20 --no-progress
  echo "($(( $(date +%s) - start )) s)"
  echo
done
