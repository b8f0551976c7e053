#!/usr/bin/env bash
# HopeLM's knobs on MQAR (T=64, 8 pairs unless a row says otherwise; docs/hope_mqar.md):
# every configuration of one set trains at once, one CPU thread each, for SECS seconds of wall
# clock (or STEPS steps), evaluated every 100 steps; then one line per run: the steps done,
# the median tokens/s and the eval accuracy by step. Made for a 16-core machine (set 1 runs
# 15 configurations, set 2 runs 12).
#   SET=1 SECS=470 OUT=out/sweep bash benchmarks/mqar_sweep.sh
# The model is HopeKnobsLM (benchmarks/specs/mqar_ablations.nest): HopeLM with the knobs of its
# blocks exposed, which builds the same weights and function as HopeLM from the same seed.
set -u
OUT=${OUT:-out/sweep}; SECS=${SECS:-470}; STEPS=${STEPS:-3000}; SET=${SET:-1}
PY=${PY:-python3}
mkdir -p "$OUT/runs"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" OMP_NUM_THREADS=1
go() {  # name, seq_len, pairs, then nestc train's arguments
    local name=$1 T=$2 pairs=$3; shift 3
    timeout "$SECS" "$PY" -m nestc.cli train benchmarks/specs/mqar_ablations.nest HopeKnobsLM \
        --task mqar -k seq_len="$T" -k pairs="$pairs" --steps "$STEPS" --eval-every 100 \
        --device cpu --threads 1 --quiet --out "$OUT/runs/$name" "$@" \
        > "$OUT/runs/$name.log" 2>&1 &
}
if [ "$SET" = 1 ]; then
    go base 64 8 --batch 32 --lr 3e-3
    go d1 64 8 --batch 32 --lr 3e-3 -p depth=1
    go d1w128 64 8 --batch 32 --lr 3e-3 -p depth=1 -p dim=128
    go lr1e2w 64 8 --batch 32 --lr 1e-2 --warmup 50
    go lr6e3 64 8 --batch 32 --lr 6e-3
    go b16 64 8 --batch 16 --lr 3e-3
    go h2 64 8 --batch 32 --lr 3e-3 -p heads=2
    go h1 64 8 --batch 32 --lr 3e-3 -p heads=1
    go mc16 64 8 --batch 32 --lr 3e-3 -p memory_chunk=16
    go mlr1 64 8 --batch 32 --lr 3e-3 -p memory_lr=1.0
    go cms0 64 8 --batch 32 --lr 3e-3 -p cms_lr=0.0
    go c64 64 8 --batch 32 --lr 3e-3 -p "chunks=[64,256]"
    go d1c64 64 8 --batch 32 --lr 3e-3 -p depth=1 -p "chunks=[64,256]"
    go d1h2 64 8 --batch 32 --lr 3e-3 -p depth=1 -p heads=2
    go d1lr6 64 8 --batch 32 --lr 6e-3 -p depth=1
else
    go d1h1 64 8 --batch 32 --lr 3e-3 -p depth=1 -p heads=1
    go d1h2T256 256 16 --batch 32 --lr 3e-3 -p depth=1 -p heads=2
    go d1h1T256 256 16 --batch 32 --lr 3e-3 -p depth=1 -p heads=1
    go d1h2c64 64 8 --batch 32 --lr 3e-3 -p depth=1 -p heads=2 -p "chunks=[64,256]"
    go d1h2b16 64 8 --batch 16 --lr 3e-3 -p depth=1 -p heads=2
    go d1h2lr6 64 8 --batch 32 --lr 6e-3 -p depth=1 -p heads=2
    go d1h2cms0 64 8 --batch 32 --lr 3e-3 -p depth=1 -p heads=2 -p cms_lr=0.0
    go d2h1c64 64 8 --batch 32 --lr 3e-3 -p heads=1 -p "chunks=[64,256]"
    go d2h2c64 64 8 --batch 32 --lr 3e-3 -p heads=2 -p "chunks=[64,256]"
    go d1h2T256b16 256 16 --batch 16 --lr 3e-3 -p depth=1 -p heads=2
    go d1h1T256c64 256 16 --batch 32 --lr 3e-3 -p depth=1 -p heads=1 -p "chunks=[64,256]"
    go d1h2mc16 64 8 --batch 32 --lr 3e-3 -p depth=1 -p heads=2 -p memory_chunk=16
fi
wait
"$PY" - "$OUT/runs" <<'PYEOF' | tee "$OUT/sweep.txt"
import json, sys
from pathlib import Path
for d in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    f = d / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []
    evals = " ".join(f"{r['step']}:{r['eval_acc']:.2f}" for r in rows if "eval_acc" in r)
    tps = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    print(f"{d.name}: steps {rows[-1]['step'] if rows else 0}, median tok/s "
          f"{tps[len(tps) // 2] if tps else 0:.0f}; {evals}")
PYEOF
