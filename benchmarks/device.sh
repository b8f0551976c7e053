#!/usr/bin/env bash
# The checks that need a CUDA device, in one run that fits a 10-minute device lease:
# the GPU tests, then the optimizer benchmark's GPU variant. Results land in $OUT (or out/).
#   bash benchmarks/device.sh
# Packages the device image lacks travel as wheels in .whl (see docs/optimizers.md).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 \
    | tee "$OUT/test_gpu.txt"
timeout 300 python3 benchmarks/optim.py --device cuda --reps 20 --out "$OUT/optim_gpu.md" 2>&1 \
    | tee "$OUT/optim_gpu.log"
