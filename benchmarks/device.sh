#!/usr/bin/env bash
# The checks that need a CUDA device. Parts
# (PARTS, default all): tests (the GPU tests and the delta-rule kernels' tests, compiled),
# mlptests (the MLP-memory kernel's tests, compiled), memory
# (benchmarks/gpu_memory.py --lm: nestc's Triton delta rules against fla-core's kernels and the
# chunked tier, the MLP memory kernel, the language models' tokens/s with the triton back
# end), lm (language models' training tokens/s on the GPU), train (`nestc train` of a small
# HopeLM on MQAR on the GPU), optim (the optimizer benchmark's GPU variant and its Triton
# block-size sweep), and, only when named, mlpbench (memory without the delta rules' table,
# which a 2026-11-29 run measured: docs/results.md), fusion (benchmarks/fusion.py: the stdlib
# language models' steps on the chunked and triton back ends) and tiles (the delta-rule
# kernels at T=4K with other launch settings than docs/triton.md's, one run each). Results land in $OUT (or
# out/).
#   PARTS="tests lm" bash benchmarks/device.sh
# A device command may run 10 minutes: `tests` and `mlptests` may each take most of that from
# an empty Triton cache (the compiles), so run `PARTS=memory`, `PARTS=tests` and
# `PARTS=mlptests` as separate calls, in that order where device time is short (15 minutes a
# session, start-up included: `memory` is what issue 6 asks for, and it checks the Triton
# tier against the chunked one itself).
# Packages the device image (Python 3.12, torch, triton) lacks travel as wheels in .whl, an
# ignored folder made here with `pip download --no-deps --only-binary=:all: --python-version
# 3.12 --platform manylinux2014_x86_64 -d .whl lark tqdm pydantic pydantic-core
# annotated-types typing-extensions typing-inspection fla-core einops pytest pluggy iniconfig
# packaging pygments pytest-xdist execnet` (the tests need pytest, the image may not have it;
# pytest-xdist spreads the kernel modules' compiles over the host's cores), and installed
# there first:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site && PARTS="tests memory" bash benchmarks/device.sh
set -u
OUT=${OUT:-out}
PARTS=${PARTS:-tests mlptests memory lm train optim}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
has() { [[ " $PARTS " == *" $1 "* ]]; }
# with pytest-xdist, a kernel module's cases (each compiling its own specializations) spread
# over 8 workers (tests/interpreted.py runs each case in its own test on CUDA)
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8 --dist load")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
if has tests; then
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 \
        | tee "$OUT/test_gpu.txt"
    # the Triton kernels, compiled (on CPU the same checks run under the interpreter). From an
    # empty Triton cache compiling dominates: each case's flags are a new specialization, and
    # on the CPU here an MLP backward takes 9 to 19 s to compile at the tests' tiny sizes
    # (benchmarks/triton_resources.py), so each module gets its own limit
    timeout 240 python3 -m pytest -q -p no:cacheprovider $XDIST tests/test_triton_delta.py 2>&1 \
        | tee -a "$OUT/test_gpu.txt"
fi
if has mlptests; then
    # the MLP-memory kernel's cases: 37 forward and 32 backward kernels of distinct flags and
    # sizes to compile (counted under the interpreter; Triton's own specializations on
    # divisibility may add more), so a call of its own
    timeout 560 python3 -m pytest -q -p no:cacheprovider $XDIST \
        tests/test_triton_mlp_memory.py 2>&1 | tee "$OUT/test_gpu_mlp.txt"
fi
if has memory; then
    # the table is written row by row: a run stopped at its limit keeps what it measured
    timeout ${MEMORY_TIMEOUT:-420} python3 benchmarks/gpu_memory.py --lm --out "$OUT/gpu_memory.md" 2>&1 \
        | tee "$OUT/gpu_memory.log"
fi
if has mlpbench; then
    # the MLP memory's table and the language models' tokens/s alone (the 2026-11-29 run of
    # `memory` spent its limit on the delta rules' table first)
    timeout ${MEMORY_TIMEOUT:-420} python3 benchmarks/gpu_memory.py --no-delta --lm \
        --out "$OUT/gpu_mlp_lm.md" 2>&1 | tee "$OUT/gpu_mlp_lm.log"
fi
if has fusion; then
    # aten operations and milliseconds per training step, chunked against triton back end
    timeout 300 python3 benchmarks/fusion.py --device cuda --dim 128 --depth 4 --batch 8 \
        --T 512 2>&1 | tee "$OUT/fusion.md"
fi
if has tiles; then
    for tiles in dqkvbg=32,4,2 dqkvbg=64,8,2 dhu=64,4,2 state=64,4,2; do
        timeout 120 python3 benchmarks/gpu_memory.py --T 4096 --D 64 128 --no-mlp \
            --tiles "$tiles" --out "$OUT/tiles_${tiles//[=,]/_}.md" 2>&1 | tail -8
    done
fi
if has lm; then
    timeout 120 python3 benchmarks/memory.py --lm-only --hope --device cuda --lm-batch 16 \
        --lm-T 512 --warmup 3 --reps 5 2>&1 | tee "$OUT/lm_gpu.md"
    timeout 60 python3 benchmarks/memory.py --lm-only --device cuda --backend triton \
        --lm-batch 16 --lm-T 512 --warmup 3 --reps 5 2>&1 | tee -a "$OUT/lm_gpu.md"
fi
if has train; then
    timeout 120 python3 -m nestc.cli train std/models/hope.nest HopeLM --task mqar \
        -k seq_len=256 -k pairs=16 -p dim=128 -p depth=2 --lr 3e-3 --batch 64 --steps 300 \
        --eval-every 50 --device cuda --quiet --out "$OUT/train_hope_mqar" 2>&1 | tail -20
fi
if has optim; then
    for block in 1024 4096 16384; do
        NESTC_TRITON_BLOCK=$block timeout 60 python3 benchmarks/optim.py --device cuda \
            --reps 10 --only triton --out "$OUT/optim_triton_block_$block.md" 2>&1 | tail -5
    done
    timeout 240 python3 benchmarks/optim.py --device cuda --reps 20 --out "$OUT/optim_gpu.md" 2>&1
fi
