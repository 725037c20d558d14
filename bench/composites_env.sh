# Sourced by bench/heads_eval.sh and bench/query_box_eval.sh: where the data and famsearch are, a scratch
# folder WORK removed on exit, and the unseen-style composites OTHER (signs and symbols, shapes, logos:
# no clipart-train category), made once with make_composites.py.
set -euo pipefail
DATA=${FAMSEARCH_DATA:-/work/shared/data}
OTHER=${FAMSEARCH_OTHER:-/tmp/composites-other}
FAMSEARCH=${FAMSEARCH:-.venv/bin/famsearch}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ ! -f "$OTHER/annotations.jsonl" ]; then
  .venv/bin/python "$DATA/../tools/make_composites.py" \
    --objects '/usr/share/openclipart/png/signs_and_symbols/**/*.png' \
              '/usr/share/openclipart/png/shapes/**/*.png' '/usr/share/openclipart/png/logos/**/*.png' \
    --backgrounds '/usr/share/doc/opencv-doc/examples/data/*.jpg' \
                  '/usr/share/doc/opencv-doc/examples/data/*.png' '/usr/share/backgrounds/mate/nature/*.jpg' \
    --distractors 120 --seed 7 --out "$OTHER" > /dev/null
fi
