#!/usr/bin/env bash
# Two promises checked on the device at hand (default cuda), with the CLI a user runs:
#  1. FID while training (`train --eval-every`) equals `reglue eval --ckpt` on the saved checkpoint (docs/scoring.md);
#  2. a run stopped at step 4 and resumed ends with the same weights as a run that went straight to step 8.
# Tiny stand-ins, about a minute. Usage: bash benchmarks/cuda_checks.sh WORKDIR [DEVICE]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:?usage: cuda_checks.sh WORKDIR [DEVICE]}
DEVICE=${2:-cuda}
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
R() { local t=$SECONDS; "$PY" -m reglue_cli "$@"; echo "(reglue $1: $((SECONDS - t)) s)"; }
mkdir -p "$W"
"$PY" scripts/toy_dataset.py "$W/images" --per-class 8 > /dev/null
R encode "$W/images" --out "$W/data.h5" --resolution 64 --vae tiny --workers 0 --quiet --device "$DEVICE"
R make-ref "$W/data.h5" --out "$W/ref.npz" --inception-weights random --device "$DEVICE" --quiet
common=(--preset tiny-sit --data "$W/data.h5" --global-batch 16 --workers 0 --quiet --device "$DEVICE")
R train "${common[@]}" --outdir "$W/straight" --max-steps 8 --ckpt-every 8 --eval-every 8 --eval-n 32 \
    --eval-ref "$W/ref.npz" --inception-weights random
R eval --ckpt "$W/straight/checkpoints/0000008.pt" --n 32 --ref "$W/ref.npz" --inception-weights random \
    --device "$DEVICE" --json "$W/offline.json" --quiet
R train "${common[@]}" --outdir "$W/resumed" --max-steps 4 --ckpt-every 4
R train "${common[@]}" --outdir "$W/resumed" --max-steps 8 --ckpt-every 4
"$PY" - "$W" <<'EOF'
import json, sys
from pathlib import Path
import torch

w = Path(sys.argv[1])
during = json.loads((w / "straight/eval/0000008.json").read_text())
offline = json.loads((w / "offline.json").read_text())
print(f"FID during training {during['fid']!r}, eval --ckpt {offline['fid']!r}:",
      "EQUAL" if during["fid"] == offline["fid"] else "DIFFERENT")
a = torch.load(w / "straight/checkpoints/0000008.pt", map_location="cpu", weights_only=False)
b = torch.load(w / "resumed/checkpoints/0000008.pt", map_location="cpu", weights_only=False)
same = all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])
print("weights after 8 steps, straight vs stopped at 4 and resumed:", "BIT-IDENTICAL" if same else "DIFFERENT")
env = during.get("environment") or {}
print("evaluator environment:", {k: env[k] for k in sorted(env)[:12]})
sys.exit(0 if same and during["fid"] == offline["fid"] else 1)
EOF
