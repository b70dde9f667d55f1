#!/usr/bin/env bash
# The README's main job, on the built-in demo (no download, CPU):
#   1. set up .venv (tools/setup_env.sh; quick when already done),
#   2. render the synthetic road scenes into data/demo (skipped when up to date),
#   3. train a tiny EoMT with LoRA (configs/eomt_lora_demo.py), logging the parameter summary,
#   4. evaluate mIoU on the validation frames and paint the predictions,
#   5. score the held-out anomaly split and print the anomaly table.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="${WORK_DIR:-work_dirs/demo}"
CONFIG=configs/eomt_lora_demo.py

bash tools/setup_env.sh
PY=.venv/bin/python

$PY tools/make_demo_data.py --out data/demo
$PY tools/train.py "$CONFIG" --work-dir "$WORK" "$@"
CKPT="$(cat "$WORK/last_checkpoint")"
$PY tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK/test" --show-dir "$WORK/predictions"
$PY tools/eval_anomaly.py "$CONFIG" "$CKPT" --datasets demo_roads \
    --out-dir "$WORK/anomaly" --show-dir "$WORK/anomaly/pictures"

cat <<MSG

Demo finished. Where to look:
  training log, parameter summary, mIoU   $WORK/<timestamp>/<timestamp>.log
  checkpoint                              $CKPT
  painted predictions (val frames)        $WORK/predictions/
  anomaly table (CSV / JSON)              $WORK/anomaly/anomaly.csv, anomaly.json
  image | anomaly heat map | ground truth $WORK/anomaly/pictures/demo_roads/
MSG
