#!/usr/bin/env bash
# The pipeline on a generated toy dataset, printed command by command so that it doubles as the tutorial: trains
# small stand-ins for SD-VAE and DINOv2 on the toy images, then REGLUE and plain SiT side by side on the same data,
# seeds and steps, samples both at two checkpoints with the same seeds, scores them and plots the result.
# Run it again: finished stages are reused or resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REGLUE=${REGLUE:-.venv/bin/reglue}
OUT=${DEMO_OUT:-demo_out}
PER_CLASS=${DEMO_PER_CLASS:-40}      # toy images per class (10 classes)
STEPS=${DEMO_STEPS:-}                # training steps of each model (default: the demo presets' train.max_steps)
SAMPLES=${DEMO_SAMPLES:-100}         # samples per checkpoint (10 per class)
STAND_IN_STEPS=${DEMO_STAND_IN_STEPS:-}  # training steps of the toy VAE and VFM (default: their scripts' own)
export HF_HUB_OFFLINE=1

step() { printf '\n$ %s\n' "$*"; "$@"; }
# `reglue eval` always scores afresh; the demo reuses a finished result (delete the file to recompute).
step_unless() { if [ -e "$1" ]; then shift; printf '\n$ %s\n(reused: its output exists)\n' "$*"; else shift; step "$@"; fi; }

echo "reglue demo: toy shapes, stand-in VAE, VFM and Inception trained or built here; no number is comparable to a paper."
step "$PY" scripts/toy_dataset.py "$OUT/images" --per-class "$PER_CLASS"
# The stand-ins: an autoencoder with SD-VAE's layout and a ViT with DINOv2's, each trained on the toy images.
SHORT=()
if [ -n "$STAND_IN_STEPS" ]; then SHORT=(--steps "$STAND_IN_STEPS"); fi
step "$PY" scripts/toy_vae.py "$OUT/images" "$OUT/vae" "${SHORT[@]}"
step "$PY" scripts/toy_vfm.py "$OUT/images" "$OUT/vfm.safetensors" "${SHORT[@]}"
step "$REGLUE" encode "$OUT/images" --out "$OUT/data.h5" --resolution 64 --vae "$OUT/vae" --workers 2 --quiet
SCALE=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['scaling_factor'])" "$OUT/vae/config.json")
STAND_IN=(--set "data.vae=$OUT/vae" --set "data.vae_decoder=$OUT/vae" --set "data.latent_scale=$SCALE")
VFM=(--vfm-weights "$OUT/vfm.safetensors")
LENGTH=()
if [ -n "$STEPS" ]; then LENGTH=(--max-steps "$STEPS" --ckpt-every "$((STEPS / 2))"); fi
step "$REGLUE" train --preset compressor-tiny --data "$OUT/data.h5" --outdir "$OUT/compressor" "${VFM[@]}" \
    --workers 0 --quiet
step "$REGLUE" train --preset demo-reglue --data "$OUT/data.h5" --outdir "$OUT/reglue" "${STAND_IN[@]}" "${VFM[@]}" \
    --compressor "$OUT/compressor/compressor.pt" "${LENGTH[@]}" --workers 0 --quiet
step "$REGLUE" train --preset demo-sit --data "$OUT/data.h5" --outdir "$OUT/sit" "${STAND_IN[@]}" "${LENGTH[@]}" \
    --workers 0 --quiet
step_unless "$OUT/reference.npz" "$REGLUE" make-ref "$OUT/data.h5" --out "$OUT/reference.npz" \
    --inception-weights random --quiet
for RUN in reglue sit; do
  mkdir -p "$OUT/$RUN/eval"
  for CKPT in "$OUT/$RUN"/checkpoints/*.pt; do
    NAME=$(basename "$CKPT" .pt)
    SAMPLED="$OUT/$RUN/samples-$NAME"
    # The same seeds for every checkpoint and both methods: 10 samples of each class, class by class.
    step "$REGLUE" sample --ckpt "$CKPT" --out "$SAMPLED" --n "$SAMPLES" --balanced \
        --grid "$SAMPLED/grid.png" --quiet
    step_unless "$OUT/$RUN/eval/$NAME.json" "$REGLUE" eval "$SAMPLED/samples.npz" --ref "$OUT/reference.npz" \
        --inception-weights random --json "$OUT/$RUN/eval/$NAME.json" --quiet
  done
done
step "$PY" scripts/grid_panel.py "$OUT/grids.png" "$OUT/reglue" "$OUT/sit"
step "$REGLUE" compare "$OUT/reglue" "$OUT/sit" --baselines ablation --plot "$OUT/fid.png"
echo
echo "Stand-ins throughout (toy VAE, toy VFM, random-weight Inception): compare the two methods and the checkpoints"
echo "with each other, never with a paper. Plot: $OUT/fid.png   Sample grids, side by side: $OUT/grids.png"
