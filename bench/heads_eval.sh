#!/usr/bin/env bash
# The trained-retrieval target (docs/DESIGN.md §13) through the product's own commands: train the objectness probe + Multi-Similarity
# head on clipart-train at SIZE px, then `famsearch eval` it on clipart-composites and on composites
# of object styles it never saw (made with make_composites.py, as in bench/bench_heads.py), next to
# the untrained default (every default; GAP, no head, 224 px when the recorded results were made).
#   bash bench/heads_eval.sh [SIZE] > bench/results/heads-eval-attn320.txt
# TRAIN_ARGS: train flags, --no-finetune unless given (the head alone; TRAIN_ARGS=--finetune also tunes the last
# stage and evaluates with the tuned --weights); SKIP_DEFAULT=1 leaves out the untrained default's runs.
SIZE=${1:-320}
source bench/composites_env.sh
EVAL=(eval --explain fam,fam-exact,gradcam --curve-pairs 5 --examples 0 --no-progress)
echo "# $(date -u +%F), load $(cut -d' ' -f1-3 /proc/loadavg); famsearch train + famsearch eval, head trained at $SIZE px"
"$FAMSEARCH" train "$DATA/clipart-train" --pooling attn --input-size "$SIZE" --out "$WORK/head.pt" \
  --home "$WORK/train-home" --no-progress ${TRAIN_ARGS:---no-finetune} | tail -3
TRAINED=(--pooling "attn:$WORK/head.objectness.pt" --head "$WORK/head.pt" --input-size "$SIZE")
if [ -f "$WORK/head.backbone.pth" ]; then TRAINED+=(--weights "$WORK/head.backbone.pth"); fi
for dataset in "$DATA/clipart-composites" "$OTHER"; do
  name=$(basename "$dataset")
  if [ -z "${SKIP_DEFAULT:-}" ]; then
    echo; echo "## $name: untrained default (no flags; its model line says the pooling)"
    "$FAMSEARCH" "${EVAL[@]}" "$dataset" --home "$WORK/$name-default" | sed -n '1,/^Faithfulness/p' | head -n -1
  fi
  echo "## $name: attn pooling + trained head${TRAIN_ARGS:+ ($TRAIN_ARGS)}, $SIZE px"
  "$FAMSEARCH" "${EVAL[@]}" "$dataset" "${TRAINED[@]}" --home "$WORK/$name-trained" | sed -n '1,/^Faithfulness/p' | head -n -1
done
