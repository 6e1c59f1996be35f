#!/usr/bin/env bash
# Every GPU figure and CUDA check of docs/performance.md in one run, sized for a lent H200 (about 8 minutes).
# Each stage has its own time limit and writes its table to $OUT/STAGE.txt; a stage that fails or runs out of
# time does not stop the others. Usage: OUT=bench_out bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to the console and $OUT/NAME.txt
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
stage bench-b2 150 "$PY" benchmarks/bench.py --preset sit-b2-reglue --batch 32
stage bench-xl2 190 "$PY" benchmarks/bench.py --preset sit-xl2-reglue --batch 32
stage train-loop-b2 80 "$PY" benchmarks/train_loop.py --preset sit-b2 --batch 32 --workers 4
stage cuda-checks 80 bash benchmarks/cuda_checks.sh "$OUT/cuda"
