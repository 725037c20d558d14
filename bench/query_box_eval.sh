#!/usr/bin/env bash
# Searching for part of the query (`famsearch search --box`, `famsearch eval --query-box/--query-auto`):
# each query whole, pooled over the cells the automatic focus picks (`--box auto`, no annotation), and
# pooled over its annotated bbox (the box a user would draw around the object), side by side, for the
# untrained default (GAP, no head, 224 px), GAP with gallery PCA-whitening (untrained), both also at
# 320 px, and the trained attn + MS head at 320 px (trained here on clipart-train, as
# bench/heads_eval.sh does). On clipart-composites and on the unseen-style composites.
#   bash bench/query_box_eval.sh > bench/results/query-box.txt
source bench/composites_env.sh
echo "# $(date -u +%F), load $(cut -d' ' -f1-3 /proc/loadavg); famsearch eval whole, --query-auto and --query-box"
"$FAMSEARCH" train "$DATA/clipart-train" --pooling attn --input-size 320 --no-finetune --out "$WORK/head.pt" \
  --home "$WORK/train-home" --no-progress > /dev/null
row() {  # config, query kind; the JSON report on stdin -> one Markdown row
  .venv/bin/python -c '
import json, sys
r = json.load(sys.stdin)
pct = lambda v: "—" if v is None else "%.1f" % (100 * v)
match = lambda name: r["explainers"][name]["a"]["match"]
cells = [pct(r["recall"][k]) for k in ("1", "5", "10")] + [pct(r["map"]), str(r["pairs"]["a"])]
cells += ["%s / %s" % (pct(match(n)["proportion"]), pct(match(n)["iou"])) for n in ("fam", "gradcam")]
print("| " + " | ".join(sys.argv[1:3] + cells) + " |")
' "$1" "$2"
}
for dataset in "$DATA/clipart-composites" "$OTHER"; do
  name=$(basename "$dataset")
  echo; echo "## $name ($(grep -c '"query"' "$dataset/annotations.jsonl") queries)"; echo
  echo "| config | query | R@1 | R@5 | R@10 | mAP | (a) pairs | fam (a) match Prop / IoU | gradcam (a) match Prop / IoU |"
  echo "|---|---|---:|---:|---:|---:|---:|---|---|"
  while IFS='|' read -r config args; do
    for box in "" --query-auto --query-box; do
      # shellcheck disable=SC2086
      "$FAMSEARCH" eval "$dataset" $args --home "$WORK/$name-${config// /_}" --explain fam,gradcam \
        --curve-pairs 5 --examples 0 --no-progress --json $box | row "$config" "$(case $box in --query-box) echo "boxed";; --query-auto) echo "auto";; *) echo "whole";; esac)"
    done
  done <<CONFIGS
untrained: gap, no head, 224 px|--head none
untrained: gap + gallery pcaw, 224 px|--head pcaw
untrained: gap, no head, 320 px|--head none --input-size 320
untrained: gap + gallery pcaw, 320 px|--head pcaw --input-size 320
trained: attn + MS head, 320 px|--pooling attn:$WORK/head.objectness.pt --head $WORK/head.pt --input-size 320
CONFIGS
done
