#!/usr/bin/env bash
# GPU kernel benchmark for a lent GPU machine: installs nothing, uses the
# machine's python3 (JAX with CUDA), checks correctness, then times.
#   bash benchmarks/kernel_gpu.sh              # full run (about 5-7 minutes)
#   bash benchmarks/kernel_gpu.sh --no-tune    # skip the knob sweep
# Output: a table on stdout, JSON in $OUT (if set) or benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
  --format=csv 2>&1 | tee "$DEST/kernel_gpu_env.txt"
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" \
  2>&1 | tee -a "$DEST/kernel_gpu_env.txt"
timeout 540 "$PY" benchmarks/kernel_gpu.py --budget-s 400 "$@" 2>&1 \
  | tee "$DEST/kernel_gpu.log"
rc=${PIPESTATUS[0]}
echo "kernel_gpu.py exit code: $rc"
exit "$rc"
