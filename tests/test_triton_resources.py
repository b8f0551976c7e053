"""benchmarks/triton_resources.py: nestc's Triton kernels compiled for a GPU on this CPU (the
ptxas that ships with triton, no device), so that a kernel which would not launch on an H100
(more shared memory than a block may have) fails here instead of on the device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_resources.py"


def has_cuda_tools() -> bool:
    try:
        from triton import knobs

        return all(Path(tool.path).exists() for tool in
                   (knobs.nvidia.ptxas, knobs.nvidia.ptxas_blackwell, knobs.nvidia.cuobjdump))
    except Exception:  # no triton, or a triton without its CUDA tools
        return False


# one worker runs them in order, so the limit's test finds the float32 kernels compiled
pytestmark = [pytest.mark.skipif(not has_cuda_tools(),
                                 reason="triton's ptxas and cuobjdump are not installed"),
              pytest.mark.xdist_group("triton_resources")]


def compile_for(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_the_kernels_the_ops_launch_fit_an_h100(tmp_path: Path, dtype: str) -> None:
    """Every delta-rule kernel at K = 128 (the widest the ops take; in float32 the tightest
    fit) and the MLP-memory kernels at the stdlib TitansLM's sizes (for bf16 also on a piece
    that starts inside a chunk) compile for sm_90 within its shared memory, at their launch
    settings or at the ops' retry with one stage."""
    out = tmp_path / "resources.md"
    # a piece inside a chunk needs more shared memory with 16-bit inputs (docs/triton.md);
    # self-generated values change none
    variants = ["given", "inside"] if dtype == "bf16" else ["given"]
    done = compile_for("--arch", "90", "--K", "128", "--mlp", "32,64,16", "--dtype", dtype,
                       "--variants", *variants, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| case", "| ---"))]
    kernels = {(r[0].strip(), r[1].strip()) for r in rows}
    for case in (f"delta K=128 {dtype}", f"gated delta K=128 {dtype}"):
        for name in ("prepare", "state", "o", "dhu", "dqkvbg"):
            kind = "bwd" if name in ("dhu", "dqkvbg") else "fwd"
            assert (case, f"delta_rule_{kind}_kernel_{name}") in kernels, (case, name)
    for kind in ("fwd", "bwd"):
        for variant in ("", " inside a chunk") if dtype == "bf16" else ("",):
            assert (f"mlp d=32 h=64 chunk=16 {dtype}{variant}",
                    f"mlp_memory_{kind}_kernel") in kernels
    # a launch over the limit is refused and retried with one stage, which must fit (Triton
    # 3.6 and dqkvbg at K = 128, bf16: 286,720 bytes, then 200,704 and gated 229,376)
    fits = {(r[0].strip(), r[1].strip()): r[7].strip() for r in rows}
    for (case, kernel), fit in fits.items():
        assert fit == "yes" or (fit == "no: retried"
                                and fits.get((case, kernel + " (retried)")) == "yes"), \
            out.read_text()
    assert all(r[8].strip() == "yes" for r in rows), out.read_text()
    assert all(int(r[4]) > 0 for r in rows)  # cuobjdump read every kernel's registers


def test_a_launch_over_the_limit_is_retried_with_one_stage_and_fails_if_that_does_not_fit(
        ) -> None:
    """With a block allowed 200,000 bytes (Triton 3.9, sm_90, K = 128, float32): the gated
    rule's dhu (221,956 bytes) is refused as a GPU refuses it, and the ops' retry with one
    stage fits (114,688); dqkvbg (229,376) is refused, and its retry too (one stage asks as
    much): exit 1, that kernel named (the ops would compute it in PyTorch)."""
    done = compile_for("--arch", "90", "--K", "128", "--dtype", "f32", "--mlp",
                       "--limit", "200000")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {(r[0].strip(), r[1].strip()): [x.strip() for x in r[2:]]
            for r in (line.split("|")[1:-1] for line in done.stdout.splitlines()
                      if line.startswith("| ") and not line.startswith(("| case", "| ---")))}
    dhu = rows[("gated delta K=128 f32", "delta_rule_bwd_kernel_dhu")]
    retried = rows[("gated delta K=128 f32", "delta_rule_bwd_kernel_dhu (retried)")]
    assert dhu[1] == "2" and int(dhu[4]) > 200000 and dhu[5] == "no: retried"
    assert retried[1] == "1" and int(retried[4]) <= 200000 and retried[5] == "yes"
    for case in ("delta K=128 f32", "gated delta K=128 f32"):
        assert rows[(case, "delta_rule_bwd_kernel_dqkvbg (retried)")][5] == "**no**"
        assert (f"error: {case}: delta_rule_bwd_kernel_dqkvbg (retried) needs"
                in done.stderr), done.stderr
    assert "200000 are allowed" in done.stderr
    assert "dhu (retried) needs" not in done.stderr


def test_the_sweep_compiles_every_case_and_fails_the_ones_over_the_limit(tmp_path: Path) -> None:
    """--sweep, cut down to the chunk-16 bf16 cases at K = 16 and a d 8, h 8 MLP memory: one
    row a case, and with a block allowed 9,000 bytes exit 1, the cases that need more (the
    200-wide values, several MLP flags) named as over the limit (their launches refused as
    a GPU refuses them, the delta rules' retries with one stage too), the others ok."""
    out = tmp_path / "sweep.md"
    done = compile_for("--sweep", "--K", "16", "--mlp", "8,8,16", "--dtype", "bf16",
                       "--only", "chunk=16 bf16", "--limit", "9000", "--jobs", "2",
                       "--out", str(out))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [[x.strip() for x in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if line.startswith(("| delta", "| mlp"))]
    assert len(rows) == 6 + 12, rows  # value widths 16, 24, 200, plain and gated; 12 MLP cases
    for name, outcome, launches, shared, _ in rows:
        assert "chunk=16 bf16" in name
        if int(shared) <= 9000:
            assert outcome == "ok", name
            assert int(launches) == (7 if name.startswith("delta") else 2), name
        else:  # refused; the delta rules' retry with one stage may fit (not at these sizes)
            assert outcome in ("**over the limit**", "ok (retried)"), name
    outcomes = {name: outcome for name, outcome, *_ in rows}
    assert outcomes["delta K=16 V=16 chunk=16 bf16 T=100"] == "ok"
    assert "error: delta K=16 V=200 chunk=16 bf16 T=100: **over the limit**" in done.stderr
    assert sum(o == "ok" for o in outcomes.values()) >= 3
