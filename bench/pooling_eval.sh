#!/usr/bin/env bash
# Pooling, measured with `famsearch eval` (no training): GAP (the paper's) against focus (every photo, query
# and gallery, pooled over the cells the automatic focus picks), without and with gallery PCA-whitening, at
# 224 and 320 px, on clipart-composites and on the unseen-style composites; with recall, the match-side
# localisation of the correct top-1 pairs (a) and the query-side localisation over every ground-truth pair (b),
# for paper FAM and closed-form Grad-CAM. Optional trained rows: TRAINED=1 adds MS heads trained on
# clipart-train (attn pooling and focus pooling, 320 px; FINETUNE=1 adds focus with --finetune); ONLY_TRAINED=1
# runs those rows alone.
#   bash bench/pooling_eval.sh > bench/results/pooling.txt
#   TRAINED=1 ONLY_TRAINED=1 bash bench/pooling_eval.sh > bench/results/pooling-trained.txt
source bench/composites_env.sh
echo "# $(date -u +%F), load $(cut -d' ' -f1-3 /proc/loadavg); famsearch eval, whole query photos"
row() {  # config; the JSON report on stdin -> one Markdown row
  .venv/bin/python -c '
import json, sys
r = json.load(sys.stdin)
pct = lambda v: "—" if v is None else "%.1f" % (100 * v)
side = lambda name, pairs, where: r["explainers"][name][pairs][where]
cells = [pct(r["recall"][k]) for k in ("1", "5", "10")] + [pct(r["map"]), str(r["pairs"]["a"])]
cells += ["%s / %s" % (pct(side(n, p, w)["proportion"]), pct(side(n, p, w)["iou"]))
          for p, w in (("a", "match"), ("b", "query")) for n in ("fam", "gradcam")]
print("| " + " | ".join(sys.argv[1:2] + cells) + " |")
' "$1"
}
CONFIGS="gap, no head, 224 px|--pooling gap --head none
focus, no head, 224 px|--pooling focus --head none
focus + gallery pcaw, 224 px|--pooling focus --head pcaw
gap + gallery pcaw, 224 px|--pooling gap --head pcaw
gap, no head, 320 px|--pooling gap --head none --input-size 320
focus, no head, 320 px|--pooling focus --head none --input-size 320
focus + gallery pcaw, 320 px|--pooling focus --head pcaw --input-size 320"
if [ "${TRAINED:-0}" = 1 ]; then
  for pooling in attn focus; do
    "$FAMSEARCH" train "$DATA/clipart-train" --pooling $pooling --input-size 320 --no-finetune --out "$WORK/$pooling.pt" \
      --home "$WORK/train-home" --no-progress > /dev/null
  done
  [ "${ONLY_TRAINED:-0}" = 1 ] && CONFIGS="" || CONFIGS="$CONFIGS
"
  CONFIGS="${CONFIGS}trained: attn + MS head, 320 px|--pooling attn:$WORK/attn.objectness.pt --head $WORK/attn.pt --input-size 320
trained: focus + MS head, 320 px|--pooling focus --head $WORK/focus.pt --input-size 320"
  if [ "${FINETUNE:-0}" = 1 ]; then  # FINETUNE=1: also the last stage tuned with the focus head
    "$FAMSEARCH" train "$DATA/clipart-train" --pooling focus --input-size 320 --finetune --out "$WORK/focus-ft.pt" \
      --home "$WORK/train-home" --no-progress > /dev/null
    CONFIGS="$CONFIGS
trained: focus + MS head + last stage tuned, 320 px|--pooling focus --head $WORK/focus-ft.pt --weights $WORK/focus-ft.backbone.pth --input-size 320"
  fi
fi
for dataset in "$DATA/clipart-composites" "$OTHER"; do
  name=$(basename "$dataset")
  echo; echo "## $name ($(grep -c '"query"' "$dataset/annotations.jsonl") queries)"; echo
  echo "| config | R@1 | R@5 | R@10 | mAP | (a) pairs | fam (a) match Prop / IoU | gradcam (a) match Prop / IoU | fam (b) query Prop / IoU | gradcam (b) query Prop / IoU |"
  echo "|---|---:|---:|---:|---:|---:|---|---|---|---|"
  while IFS='|' read -r config args; do
    # shellcheck disable=SC2086
    "$FAMSEARCH" eval "$dataset" $args --home "$WORK/$name-${config//[ ,:+]/_}" --explain fam,gradcam \
      --curve-pairs 5 --examples 0 --no-progress --json | row "$config"
  done <<< "$CONFIGS"
done
