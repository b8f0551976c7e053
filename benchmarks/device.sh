#!/usr/bin/env bash
# The checks that need a CUDA device, in one run that fits a 10-minute device lease: the GPU
# tests, the optimizer benchmark's GPU variant (and its Triton block-size sweep), and the delta
# rules against fla-core's Triton kernels. Results land in $OUT (or out/).
#   bash benchmarks/device.sh
# Packages the device image lacks travel as wheels in .whl (see README.md, "GPU checks").
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 \
    | tee "$OUT/test_gpu.txt"
timeout 150 python3 benchmarks/gpu_memory.py --out "$OUT/gpu_memory.md" 2>&1
for block in 1024 4096 16384; do
    NESTC_TRITON_BLOCK=$block timeout 60 python3 benchmarks/optim.py --device cuda --reps 10 \
        --only triton --out "$OUT/optim_triton_block_$block.md" 2>&1 | tail -5
done
timeout 240 python3 benchmarks/optim.py --device cuda --reps 20 --out "$OUT/optim_gpu.md" 2>&1
