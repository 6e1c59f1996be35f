#!/usr/bin/env bash
# The pipeline on a generated toy dataset with tiny random-weight stand-ins (VAE, DINOv2), printed command by
# command so that it doubles as the tutorial. Run it again: finished stages are reused or resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REGLUE=${REGLUE:-.venv/bin/reglue}
OUT=${DEMO_OUT:-demo_out}
PER_CLASS=${DEMO_PER_CLASS:-40}      # toy images per class (10 classes)
STEPS=${DEMO_STEPS:-200}             # tiny-reglue training steps; checkpoints at half-way and at the end
SAMPLES=${DEMO_SAMPLES:-100}         # samples per checkpoint
HALF=$((STEPS / 2))
CKPTS="$(printf '%07d' "$HALF") $(printf '%07d' "$STEPS")"
export HF_HUB_OFFLINE=1

step() { printf '\n$ %s\n' "$*"; "$@"; }
# `reglue eval` always scores afresh; the demo reuses a finished result (delete the file to recompute).
step_unless() { if [ -e "$1" ]; then shift; printf '\n$ %s\n(reused: its output exists)\n' "$*"; else shift; step "$@"; fi; }

echo "reglue demo: tiny random-weight stand-ins; no number printed here is comparable to a paper."
mkdir -p "$OUT/reglue/eval"
step "$PY" scripts/toy_dataset.py "$OUT/images" --per-class "$PER_CLASS"
step "$REGLUE" encode "$OUT/images" --out "$OUT/data.h5" --resolution 64 --vae tiny --workers 2 --quiet
step "$REGLUE" train --preset compressor-tiny --data "$OUT/data.h5" --outdir "$OUT/compressor" --workers 0 --quiet
step "$REGLUE" train --preset tiny-reglue --data "$OUT/data.h5" --outdir "$OUT/reglue" \
    --compressor "$OUT/compressor/compressor.pt" --max-steps "$STEPS" --ckpt-every "$HALF" --sample-every "$HALF" \
    --workers 0 --quiet --log-every "$HALF"
for STEP in $CKPTS; do
  step "$REGLUE" sample --ckpt "$OUT/reglue/checkpoints/$STEP.pt" --out "$OUT/samples-$STEP" --n "$SAMPLES" \
      --steps 50 --cfg 2.0 --vae tiny --batch-size 50 --grid "$OUT/samples-$STEP/grid.png" --quiet
done
step_unless "$OUT/reference.npz" "$REGLUE" make-ref "$OUT/data.h5" --out "$OUT/reference.npz" \
    --inception-weights random --quiet
for STEP in $CKPTS; do
  step_unless "$OUT/reglue/eval/$STEP.json" "$REGLUE" eval "$OUT/samples-$STEP/samples.npz" \
      --ref "$OUT/reference.npz" --inception-weights random --json "$OUT/reglue/eval/$STEP.json" --quiet
done
step "$REGLUE" compare "$OUT/reglue" --baselines ablation --plot "$OUT/fid.png"
echo
echo "Every number above was computed with random-weight stand-ins (VAE, DINOv2, Inception): not comparable to papers."
echo "Plot: $OUT/fid.png   Sample grids: $OUT/samples-*/grid.png"
