#!/usr/bin/env bash
# The GPU checks of issue #16 item 6, as one prepared script for a session that has a GPU (the `device`
# tool's `run`, or any CUDA machine): the GPU tests and the four CUDA benchmarks, each under its own time
# limit, every output written to one file in OUT (default benchmarks/gpu_out/), at most 6 files. Sized to
# finish in about 10 minutes on one H100/H200; copy the tables into benchmarks/RESULTS.md afterwards with
# the machine, the date and the command.
#
#   bash scripts/gpu_checks.sh            # or: OUT=/some/dir bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu_out}"
mkdir -p "$OUT"

python - <<'EOF' > "$OUT/00_machine.txt" 2>&1
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
if ! python -c "import kdrun" 2>/dev/null; then
  pip install -e . --no-deps >> "$OUT/00_machine.txt" 2>&1  # the tree is there; its dependencies must be too
fi

step() {  # step NAME SECONDS COMMAND...: run one check, its output and exit status in OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "\$ $*" > "$OUT/$name.txt"
  timeout "$limit" "$@" >> "$OUT/$name.txt" 2>&1
  echo "exit status $?" >> "$OUT/$name.txt"
}

step 01_test_gpu 120 python -m pytest -q tests/test_gpu.py
step 02_bench_balancers_deit 180 python scripts/bench_balancers.py --pair deit --device cuda --precision bf16 \
  --image-size 224 --steps 15 --rounds 1
step 03_bench_detection 120 python scripts/bench_detection.py --device cuda --precision bf16 --steps 15
# The cache fill at a GPU-sized batch (the issue's ~34 teacher-forward epochs), the cached step, channels_last.
step 04_bench_overhead 180 python scripts/bench_overhead.py --device cuda --rounds 3 --steps 20 --warmup 5 \
  --cached --cache-images 512 --fill-batch 4096 --channels-last compare
ls -l "$OUT"
