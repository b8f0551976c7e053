"""The Titans chunk update of a 2-layer MLP memory as a Triton kernel: reference.py's math,
fused over a whole sequence per program.

Layout [N, H, T, d] (q, k, v), [N, H, T] (lr, retain, beta), weights A [N, H, d, h],
B [N, H, h, d] and momenta SA, SB like them. One chunk of C tokens at weights A, B and momenta
SA, SB (everything taken at the chunk's first weights, masked past T):

    z = k A, hk = act(z), e = hk B - v, delta = (e B^T) * act'(z)      the chunk's gradients
    lr_s <- lr_s clip / max(clip, |g_s|), |g_s|^2 = |k_s|^2 |delta_s|^2 + |hk_s|^2 |e_s|^2
    D_r[t, s], D_b[t, s]    the products of retain and beta over s < j <= t (0 above the
                            diagonal), from running sums of their logs
    W = (D_r D_b) * -lr_s   (D_r * -lr_s without momentum), c = the running product of
                            retain, m = D_r (running product of beta)
    zq = c (q A) + m (q SA) + (W * q k^T) delta, hq = act(zq)
    y  = c (hq B) + m (hq SB) + (W * hq hk^T) e
with W, c, m shifted down one row for read_before (row 0: W = 0, c = 1, m = 0), and
v += act(x A) B for self-generated values (v_self: x; no gradient flows through it). The next
state is the same sums at the chunk's last valid token (row w of W, c_w, m_w):
    A' = c_w A + m_w SA + k^T (W[w] * delta), B' likewise with hk, e, B, SB,
    SA' = (prod beta) SA + k^T (D_b[w] * -lr * delta), SB' likewise.
A sequence that starts OFF tokens into a chunk (a piece of a longer one) gives its first chunk
OFF rows of padding (lr 0, retain and beta 1, and left out of m: a padding row applies no
momentum) and takes that chunk's z, e, delta and generated values at G = (GA, GB), the
weights the chunk started with, instead of A, B; for that chunk the backward sends what
those terms give the weights (k^T dz to A, dP^T e + hk^T de to B, below) to dG instead.

Forward: mlp_memory_fwd_kernel, grid (N * H,): a loop over the chunks carrying A, B, SA, SB in
registers, storing the reads, the final state and the state entering each chunk (the four
"starts" buffers, [N, H, NC, ...]; the momenta only with beta).
Backward: mlp_memory_bwd_kernel, grid (N * H,): the chunks in reverse, carrying dA, dB, dSA,
dSB (the gradients of the state leaving the chunk; at first those of the final state). Each
chunk is recomputed from its stored start (z, hk, e, P = e B^T, delta, the clip factor f, the
decays, W, zq, hq: nothing chunk-local is stored), then, with X' for the state leaving it,
x_w the row or entry at the last valid token w, [w] a one-hot at w, rowsum/colsum over the
(C, C) matrices and the read's c, m, W already shifted for read_before:
  reads    dGh = dy e^T; dhq = c (dy B^T) + m (dy SB^T) + (W * dGh) hk
           de = (W * hq hk^T)^T dy, dhk = (W * dGh)^T hq
           dzq = dhq * act'(zq), dGq = dzq delta^T
           dq = c (dzq A^T) + m (dzq SA^T) + (W * dGq) k, dk = (W * dGq)^T q
           ddelta = (W * q k^T)^T dzq
           dW = dGh * (hq hk^T) + dGq * (q k^T), dc = rowsum((hq B) * dy) + rowsum((q A) * dzq),
           dm likewise with SB, SA; dA = q^T (c dzq), dB = hq^T (c dy), dSA, dSB with m
  state    with bl = D_b[w] * -lr (momentum's row): dk += wl delta dA'^T + bl delta dSA'^T,
           ddelta += wl (k dA') + bl (k dSA'), dhk += wl e dB'^T + bl e dSB'^T,
           de += wl (hk dB') + bl (hk dSB'), dW[w] += rowsum((k dA') * delta + (hk dB') * e),
           dbl likewise with dSA', dSB'; dc_w += <A, dA'> + <B, dB'>,
           dm_w += <SA, dA'> + <SB, dB'>, d(prod beta) = <SA, dSA'> + <SB, dSB'>;
           dA += c_w dA', dB += c_w dB', dSA = m_w dA' + (prod beta) dSA' + the reads', dSB
           likewise (without momentum dSA, dSB pass through: handed on outside the kernel)
  decays   read_before first: dW, dc, dm <- S^T of the read's (S the shift). With r, b the
           running products of retain and beta (c = r, m = D_r b, prod beta = b_w; without
           momentum D_b = I and no m):
           dlr_s = -colsum(dW * D_r D_b)_s - D_b[w, s] dbl_s         (the clipped lr's)
           dD_b = D_r^T (dW * -lr) + [w] (dbl * -lr)^T, db = D_r^T dm + [w] d(prod beta)
           dD_r = (dW * -lr) D_b^T + dm b^T
           dlog beta_j = sum_{t >= j, s < j} (dD_b * D_b)[t, s] + sum_{t >= j} db_t b_t (the
           spans holding beta_j: no difference of running sums), dbeta = dlog beta /
           max(beta, 1e-30); retain likewise, with dc * r
  clip     f = clip / sqrt(max(sq, clip^2)): dlr <- dlr f, dsq = -dlr_clipped lr f / (2 sq)
           where sq >= clip^2 (else 0), dk += 2 dsq |delta|^2 k, ddelta += 2 dsq |k|^2 delta,
           dhk += 2 dsq |e|^2 hk, de += 2 dsq |hk|^2 e
  chunk    dP = ddelta * act'(z), dz = ddelta * P * act''(z) (gelu: phi(z) (2 - z^2);
           silu: s (1 - s) (2 + z (1 - 2 s))), de += dP B, dB += dP^T e, dhk += de B^T,
           dB += hk^T de, dv = -de, dz += dhk * act'(z), dk += dz A^T, dA += k^T dz
The PyTorch per-chunk vjp of `mlp_memory_chunk` (`_backward_reference`) is what the tests
hold the kernel to.
Both directions are torch.library custom ops (nestc::mlp_memory_fwd / _bwd, with fake
implementations), the backward registered as the forward's autograd formula.

Block sizes: C = chunk (16, 32 or 64), BD and BH = d and h rounded up to powers of two >= 16,
8 warps, 1 stage. The whole state (4 d h floats; the backward also its gradients, 8 d h) stays
in one program, in registers and shared memory. Compiled for sm_90
(benchmarks/triton_resources.py), the backward nears or outgrows an H100's shared memory at
chunk 64 (16-bit inputs already at d 32, h 64; float32 at d = h = 64) and at chunk 16 with
d = h = 128; `mlp_kernel_fits` says where the compiler uses the kernels, and it runs the
chunked tier elsewhere. Tiling over h or over the chunk is not done. A launch that does not
fit (triton's OutOfResources) falls back to the same math in PyTorch, with a warning. Neither
kernel has run on a GPU yet. float32 matmuls use TF32x3 (about float32's precision on tensor
cores; IEEE float32 dots compile to FMA loops that spill tens of kilobytes a thread on sm_90),
16-bit inputs TF32.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from nestc.ops.delta_rule.triton import span_grad
from nestc.ops.mlp_memory.reference import ACTS, chunk_mlp_memory, mlp_memory_chunk
from nestc.ops.utils import dot_precision, mend_interpreter, recomputed_vjp

MAX_DIM = 128
CHUNKS = (16, 32, 64)
# set by tests: fill every buffer a kernel writes with NaN first, so a missed store shows up
POISON_BUFFERS = False
# both kernels run with 8 warps (a thread then holds half as much of the state as with 4, and
# spills less) and one stage (no software pipelining of the chunk loop's loads: at chunk 64,
# d 32, h 64 that alone takes the float32 backward from 248 KB of shared memory to 164 KB; a
# chunk's arithmetic should dwarf its loads, but that is not timed yet).
# benchmarks/triton_resources.py, docs/triton.md.
NUM_WARPS = 8
NUM_STAGES = 1
# Triton compiles an integer argument again when it is 1 (and when it divides by 16). For the
# chunk count that made a kernel for one-chunk calls (T up to the chunk), and that kernel
# needs twice the shared memory (bf16, d 64, h 128, chunk 16: 256,000 bytes at T = 16, more
# than an H100 has; 124,928 at T = 17): one kernel for every chunk count instead
# (benchmarks/triton_resources.py --sweep). T stays specialized, as in the delta rules,
# where unspecializing it cost registers (docs/triton.md).
UNSPECIALIZED = ["NC", "OFF"]


def mlp_kernel_fits(d: int, h: int, chunk: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether both kernels fit in an H100's shared memory (227 KiB a block) at these sizes
    and input dtype, with room to spare, so that the compiler picks them. Their need grows
    with chunk * d * h. Measured by benchmarks/triton_resources.py (Triton 3.9, sm_90, bytes,
    the backward's): float32 inputs (TF32x3 products; what MLPMemory passes) need 25K at
    d 32, h 64, chunk 16, 164K at chunk 64, 229K at d = h = 64, chunk 64; 16-bit inputs need
    39K, 254K and 393K there, and 125K at d 64, h 128, chunk 16. The tables are in
    docs/triton.md. Triton 3.6 asks more of the backward (up to 1.7x, at d = h = 64, chunk
    32, float32: 82K): the admitted shapes measured fit there too but float32 at d 32, h 64,
    chunk 64 without retention (246K), whose refused launch is retried with a retention of
    ones (213K)."""
    if max(d, h) > MAX_DIM or chunk * d * h > 16 * 64 * 128:
        return False
    return dtype == torch.float32 or chunk <= 32


def _no_room(error: OutOfResources, what: str) -> None:
    warnings.warn(f"nestc: the MLP-memory {what} kernel needs more of this GPU than it has "
                  f"({error}); computing it in PyTorch instead", RuntimeWarning, stacklevel=3)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # gelu, exact
        return 0.5 * z * (1. + tl.math.erf(z * 0.7071067811865476))
    return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return (0.5 * (1. + tl.math.erf(z * 0.7071067811865476))
                + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)
    s = tl.sigmoid(z)
    return s * (1. + z * (1. - s))


@triton.jit
def _row(x, o_c, i):
    """Row i of a (C, C) matrix, as a vector."""
    return tl.sum(tl.where((o_c == i)[:, None], x, 0.), 0)


@triton.jit
def _at(x, o_c, i):
    """Entry i of a (C,) vector, as a scalar."""
    return tl.sum(tl.where(o_c == i, x, 0.), 0)


@triton.jit
def _decay(x, causal):
    """Per-token factors x (C,) -> their running products and D[t, s], the product of x over
    s < j <= t for s <= t (0 above the diagonal), from running sums of their logs (a factor
    below 1e-30 counts as 1e-30)."""
    L = tl.cumsum(tl.log(tl.maximum(x, 1e-30)), 0)
    return tl.exp(L), tl.where(causal, tl.exp(tl.where(causal, L[:, None] - L[None, :], 0.)), 0.)


@triton.jit
def _self_values(vs, p_td, m_td, b_A, b_B, ACT: tl.constexpr, PRECISION: tl.constexpr):
    """The values a memory generates for a chunk: its reading of the inputs vs at the chunk's
    first weights, act(x A) B (padding rows 0)."""
    b_x = tl.load(vs + p_td, mask=m_td, other=0.).to(tl.float32)
    return tl.dot(_act(tl.dot(b_x, b_A, input_precision=PRECISION), ACT), b_B,
                  input_precision=PRECISION)


@triton.jit
def _grad_point(b_A, b_B, b_GA, b_GB, i_n):
    """The weights a chunk's gradients are taken at: its first weights, or for the first
    chunk of a piece that starts inside one, the weights that chunk started with (G)."""
    first = i_n == 0
    return tl.where(first, b_GA, b_A), tl.where(first, b_GB, b_B)


@triton.jit
def _shifted(shift, W, c, m, o_c, PRECISION: tl.constexpr):
    """W, c and m moved down one row (S X, with S[t, t - 1] = 1); row 0 reads the chunk's
    start: W 0, c 1, m 0."""
    return (tl.dot(shift, W, input_precision=PRECISION),
            tl.sum(shift * c[None, :], 1) + tl.where(o_c == 0, 1., 0.),
            tl.sum(shift * m[None, :], 1))


@triton.jit(do_not_specialize=UNSPECIALIZED)
def mlp_memory_fwd_kernel(q, k, v, vs, lr, retain, beta, A0, B0, GA, GB, SA0, SB0, y, At, Bt,
                          SAt, SBt, sA, sB, sSA, sSB, clip, T, OFF, NC, D: tl.constexpr,
                          HID: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
                          BH: tl.constexpr, ACT: tl.constexpr, USE_R: tl.constexpr,
                          USE_BETA: tl.constexpr, USE_VS: tl.constexpr, USE_G: tl.constexpr,
                          USE_S0: tl.constexpr, USE_CLIP: tl.constexpr,
                          READ_BEFORE: tl.constexpr, STORE_STARTS: tl.constexpr,
                          PRECISION: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, C)
    o_d = tl.arange(0, BD)
    o_h = tl.arange(0, BH)
    m_d, m_h = o_d < D, o_h < HID
    m_dh = m_d[:, None] & m_h[None, :]
    m_hd = m_h[:, None] & m_d[None, :]
    p_dh = o_d[:, None] * HID + o_h[None, :]  # A (d, h)
    p_hd = o_h[:, None] * D + o_d[None, :]  # B (h, d)
    p_w = i_bh * D * HID
    b_A = tl.load(A0 + p_w + p_dh, mask=m_dh, other=0.).to(tl.float32)
    b_B = tl.load(B0 + p_w + p_hd, mask=m_hd, other=0.).to(tl.float32)
    if USE_G:  # the first chunk's gradients are taken at these weights
        b_GA = tl.load(GA + p_w + p_dh, mask=m_dh, other=0.).to(tl.float32)
        b_GB = tl.load(GB + p_w + p_hd, mask=m_hd, other=0.).to(tl.float32)
    if USE_S0:
        b_SA = tl.load(SA0 + p_w + p_dh, mask=m_dh, other=0.).to(tl.float32)
        b_SB = tl.load(SB0 + p_w + p_hd, mask=m_hd, other=0.).to(tl.float32)
    else:
        b_SA = tl.zeros([BD, BH], dtype=tl.float32)
        b_SB = tl.zeros([BH, BD], dtype=tl.float32)
    causal = o_c[:, None] >= o_c[None, :]
    # S[t, t - 1] = 1: S X is X shifted down a row, exactly
    shift = tl.where(o_c[:, None] == o_c[None, :] + 1, 1., 0.)
    for i_n in range(NC):
        if STORE_STARTS:
            p_s = (i_bh * NC + i_n) * D * HID
            tl.store(sA + p_s + p_dh, b_A, mask=m_dh)
            tl.store(sB + p_s + p_hd, b_B, mask=m_hd)
            if USE_BETA:
                tl.store(sSA + p_s + p_dh, b_SA, mask=m_dh)
                tl.store(sSB + p_s + p_hd, b_SB, mask=m_hd)
        t = i_n * C + o_c - OFF  # the first chunk's first OFF rows are padding
        m_t = (t >= 0) & (t < T)
        i_last = tl.minimum(C, T + OFF - i_n * C) - 1
        r = i_bh * T + t  # rows of [N, H, T, *]
        m_td = m_t[:, None] & m_d[None, :]
        p_td = r[:, None] * D + o_d[None, :]
        if USE_G:
            b_Ag, b_Bg = _grad_point(b_A, b_B, b_GA, b_GB, i_n)
        else:
            b_Ag, b_Bg = b_A, b_B
        b_k = tl.load(k + p_td, mask=m_td, other=0.).to(tl.float32)
        b_v = tl.load(v + p_td, mask=m_td, other=0.).to(tl.float32)
        if USE_VS:
            b_v += _self_values(vs, p_td, m_td, b_Ag, b_Bg, ACT, PRECISION)
        b_q = tl.load(q + p_td, mask=m_td, other=0.).to(tl.float32)
        b_lr = tl.load(lr + r, mask=m_t, other=0.).to(tl.float32)

        # the chunk's gradients at its first weights; padding rows stay 0 (act(0) = 0)
        b_z = tl.dot(b_k, b_Ag, input_precision=PRECISION)  # (C, BH)
        b_hk = _act(b_z, ACT)
        b_e = tl.dot(b_hk, b_Bg, input_precision=PRECISION) - b_v  # (C, BD)
        b_delta = tl.dot(b_e, tl.trans(b_Bg), input_precision=PRECISION) * _act_grad(b_z, ACT)
        if USE_CLIP:
            b_sq = (tl.sum(b_k * b_k, 1) * tl.sum(b_delta * b_delta, 1)
                    + tl.sum(b_hk * b_hk, 1) * tl.sum(b_e * b_e, 1))
            b_lr = b_lr * clip / tl.sqrt(tl.maximum(b_sq, clip * clip))

        if USE_R:
            b_rt = tl.load(retain + r, mask=m_t, other=1.).to(tl.float32)
            b_c, b_Dr = _decay(b_rt, causal)
        else:
            b_c = tl.full([C], 1., dtype=tl.float32)
            b_Dr = tl.where(causal, 1., 0.)
        if USE_BETA:
            b_bt = tl.load(beta + r, mask=m_t, other=1.).to(tl.float32)
            b_runb, b_Db = _decay(b_bt, causal)
            b_W = tl.dot(b_Dr, b_Db, input_precision=PRECISION)
            # a padding row before the piece is no token: it adds no momentum to the weights
            b_m = tl.sum(b_Dr * tl.where(t >= 0, b_runb, 0.)[None, :], 1)
        else:
            b_W = b_Dr
            b_m = tl.zeros([C], dtype=tl.float32)
        b_W = b_W * -b_lr[None, :]  # (C, C): W[t, s]

        if READ_BEFORE:  # row t reads the weights after token t - 1 (row 0: the start)
            b_Wr, b_cr, b_mr = _shifted(shift, b_W, b_c, b_m, o_c, PRECISION)
        else:
            b_Wr, b_cr, b_mr = b_W, b_c, b_m
        b_zq = (b_cr[:, None] * tl.dot(b_q, b_A, input_precision=PRECISION)
                + tl.dot(b_Wr * tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION),
                         b_delta, input_precision=PRECISION))
        if USE_BETA:
            b_zq += b_mr[:, None] * tl.dot(b_q, b_SA, input_precision=PRECISION)
        b_hq = _act(b_zq, ACT)
        b_y = (b_cr[:, None] * tl.dot(b_hq, b_B, input_precision=PRECISION)
               + tl.dot(b_Wr * tl.dot(b_hq, tl.trans(b_hk), input_precision=PRECISION),
                        b_e, input_precision=PRECISION))
        if USE_BETA:
            b_y += b_mr[:, None] * tl.dot(b_hq, b_SB, input_precision=PRECISION)
        tl.store(y + p_td, b_y.to(y.dtype.element_ty), mask=m_td)

        # the state after the chunk's last valid token: that row of the same sums
        b_wl = _row(b_W, o_c, i_last)  # (C,)
        b_cl = _at(b_c, o_c, i_last)
        b_An = b_cl * b_A + tl.dot(tl.trans(b_k * b_wl[:, None]), b_delta,
                                   input_precision=PRECISION)
        b_Bn = b_cl * b_B + tl.dot(tl.trans(b_hk * b_wl[:, None]), b_e,
                                   input_precision=PRECISION)
        if USE_BETA:
            b_ml = _at(b_m, o_c, i_last)
            b_An += b_ml * b_SA
            b_Bn += b_ml * b_SB
            b_bl = _row(b_Db, o_c, i_last) * -b_lr
            b_keep = _at(b_runb, o_c, i_last)
            b_SA = b_keep * b_SA + tl.dot(tl.trans(b_k * b_bl[:, None]), b_delta,
                                          input_precision=PRECISION)
            b_SB = b_keep * b_SB + tl.dot(tl.trans(b_hk * b_bl[:, None]), b_e,
                                          input_precision=PRECISION)
        b_A, b_B = b_An, b_Bn
    tl.store(At + p_w + p_dh, b_A, mask=m_dh)
    tl.store(Bt + p_w + p_hd, b_B, mask=m_hd)
    tl.store(SAt + p_w + p_dh, b_SA, mask=m_dh)
    tl.store(SBt + p_w + p_hd, b_SB, mask=m_hd)


@triton.jit
def _act_grad2(z, ACT: tl.constexpr):
    """act''(z): delta's act'(z) is differentiated too."""
    if ACT == 0:  # phi(z) (2 - z^2)
        return tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2. - z * z)
    s = tl.sigmoid(z)
    return s * (1. - s) * (2. + z * (1. - 2. * s))


@triton.jit
def _sum2(x):
    """The sum of a 2-D block, as a scalar."""
    return tl.sum(tl.sum(x, 1), 0)


@triton.jit(do_not_specialize=UNSPECIALIZED)
def mlp_memory_bwd_kernel(q, k, v, vs, lr, retain, beta, sA, sB, sSA, sSB, GA, GB, dy, dAt,
                          dBt, dSAt, dSBt, dq, dk, dv, dlr, dretain, dbeta, dA0, dB0, dSA0,
                          dSB0, dGA, dGB, clip, T, OFF, NC, D: tl.constexpr, HID: tl.constexpr,
                          C: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                          ACT: tl.constexpr, USE_R: tl.constexpr, USE_BETA: tl.constexpr,
                          USE_VS: tl.constexpr, USE_G: tl.constexpr, USE_CLIP: tl.constexpr,
                          READ_BEFORE: tl.constexpr, PRECISION: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, C)
    o_d = tl.arange(0, BD)
    o_h = tl.arange(0, BH)
    m_d, m_h = o_d < D, o_h < HID
    m_dh = m_d[:, None] & m_h[None, :]
    m_hd = m_h[:, None] & m_d[None, :]
    p_dh = o_d[:, None] * HID + o_h[None, :]  # A (d, h)
    p_hd = o_h[:, None] * D + o_d[None, :]  # B (h, d)
    p_w = i_bh * D * HID
    # the gradients of the state leaving the current chunk, carried backwards
    b_dA = tl.load(dAt + p_w + p_dh, mask=m_dh, other=0.).to(tl.float32)
    b_dB = tl.load(dBt + p_w + p_hd, mask=m_hd, other=0.).to(tl.float32)
    if USE_BETA:
        b_dSA = tl.load(dSAt + p_w + p_dh, mask=m_dh, other=0.).to(tl.float32)
        b_dSB = tl.load(dSBt + p_w + p_hd, mask=m_hd, other=0.).to(tl.float32)
    else:  # the momenta pass through: their gradients are handed on outside
        b_dSA = tl.zeros([BD, BH], dtype=tl.float32)
        b_dSB = tl.zeros([BH, BD], dtype=tl.float32)
    if USE_G:
        b_GA = tl.load(GA + p_w + p_dh, mask=m_dh, other=0.).to(tl.float32)
        b_GB = tl.load(GB + p_w + p_hd, mask=m_hd, other=0.).to(tl.float32)
    causal = o_c[:, None] >= o_c[None, :]
    shift = tl.where(o_c[:, None] == o_c[None, :] + 1, 1., 0.)
    for i_r in range(NC):
        i_n = NC - 1 - i_r
        p_s = (i_bh * NC + i_n) * D * HID
        b_A = tl.load(sA + p_s + p_dh, mask=m_dh, other=0.)
        b_B = tl.load(sB + p_s + p_hd, mask=m_hd, other=0.)
        t = i_n * C + o_c - OFF
        m_t = (t >= 0) & (t < T)
        i_last = tl.minimum(C, T + OFF - i_n * C) - 1
        last = o_c == i_last
        r = i_bh * T + t
        m_td = m_t[:, None] & m_d[None, :]
        p_td = r[:, None] * D + o_d[None, :]
        if USE_G:
            b_Ag, b_Bg = _grad_point(b_A, b_B, b_GA, b_GB, i_n)
        else:
            b_Ag, b_Bg = b_A, b_B
        b_k = tl.load(k + p_td, mask=m_td, other=0.).to(tl.float32)
        b_v = tl.load(v + p_td, mask=m_td, other=0.).to(tl.float32)
        if USE_VS:  # no gradient flows back through them
            b_v += _self_values(vs, p_td, m_td, b_Ag, b_Bg, ACT, PRECISION)
        b_q = tl.load(q + p_td, mask=m_td, other=0.).to(tl.float32)
        b_dy = tl.load(dy + p_td, mask=m_td, other=0.).to(tl.float32)
        b_lr = tl.load(lr + r, mask=m_t, other=0.).to(tl.float32)

        # the chunk's forward again, from its start state
        b_z = tl.dot(b_k, b_Ag, input_precision=PRECISION)  # (C, BH)
        b_hk = _act(b_z, ACT)
        b_g1 = _act_grad(b_z, ACT)
        b_e = tl.dot(b_hk, b_Bg, input_precision=PRECISION) - b_v  # (C, BD)
        b_P = tl.dot(b_e, tl.trans(b_Bg), input_precision=PRECISION)  # (C, BH)
        b_delta = b_P * b_g1
        if USE_CLIP:
            b_kk, b_dd = tl.sum(b_k * b_k, 1), tl.sum(b_delta * b_delta, 1)
            b_hh, b_ee = tl.sum(b_hk * b_hk, 1), tl.sum(b_e * b_e, 1)
            b_sq = b_kk * b_dd + b_hh * b_ee
            b_f = clip / tl.sqrt(tl.maximum(b_sq, clip * clip))
            b_lre = b_lr * b_f
        else:
            b_lre = b_lr
        if USE_R:
            b_rt = tl.load(retain + r, mask=m_t, other=1.).to(tl.float32)
            b_c, b_Dr = _decay(b_rt, causal)
        else:
            b_c = tl.full([C], 1., dtype=tl.float32)
            b_Dr = tl.where(causal, 1., 0.)
        if USE_BETA:
            b_SA = tl.load(sSA + p_s + p_dh, mask=m_dh, other=0.)
            b_SB = tl.load(sSB + p_s + p_hd, mask=m_hd, other=0.)
            b_bt = tl.load(beta + r, mask=m_t, other=1.).to(tl.float32)
            b_runb, b_Db = _decay(b_bt, causal)
            b_M = tl.dot(b_Dr, b_Db, input_precision=PRECISION)
            b_runv = tl.where(t >= 0, b_runb, 0.)  # padding before the piece: no momentum
            b_m = tl.sum(b_Dr * b_runv[None, :], 1)
        else:
            b_M = b_Dr
            b_m = tl.zeros([C], dtype=tl.float32)
        b_W = b_M * -b_lre[None, :]
        if READ_BEFORE:  # row t reads the weights after token t - 1 (row 0: the start)
            b_Wr, b_cr, b_mr = _shifted(shift, b_W, b_c, b_m, o_c, PRECISION)
        else:
            b_Wr, b_cr, b_mr = b_W, b_c, b_m
        b_Kq = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # (C, C)
        b_qA = tl.dot(b_q, b_A, input_precision=PRECISION)
        b_zq = b_cr[:, None] * b_qA + tl.dot(b_Wr * b_Kq, b_delta, input_precision=PRECISION)
        if USE_BETA:
            b_qSA = tl.dot(b_q, b_SA, input_precision=PRECISION)
            b_zq += b_mr[:, None] * b_qSA
        b_hq = _act(b_zq, ACT)
        b_Hq = tl.dot(b_hq, tl.trans(b_hk), input_precision=PRECISION)  # (C, C)

        # y = cr (hq B) + mr (hq SB) + (Wr * hq hk^T) e
        b_dGh = tl.dot(b_dy, tl.trans(b_e), input_precision=PRECISION)  # (C, C)
        b_dWr = b_dGh * b_Hq
        b_dhq = (b_cr[:, None] * tl.dot(b_dy, tl.trans(b_B), input_precision=PRECISION)
                 + tl.dot(b_Wr * b_dGh, b_hk, input_precision=PRECISION))
        b_dhk = tl.dot(tl.trans(b_Wr * b_dGh), b_hq, input_precision=PRECISION)
        b_de = tl.dot(tl.trans(b_Wr * b_Hq), b_dy, input_precision=PRECISION)
        b_dcr = tl.sum(tl.dot(b_hq, b_B, input_precision=PRECISION) * b_dy, 1)
        b_dAi = tl.zeros([BD, BH], dtype=tl.float32)
        b_dBi = tl.dot(tl.trans(b_hq), b_cr[:, None] * b_dy, input_precision=PRECISION)
        if USE_BETA:
            b_dhq += b_mr[:, None] * tl.dot(b_dy, tl.trans(b_SB), input_precision=PRECISION)
            b_dmr = tl.sum(tl.dot(b_hq, b_SB, input_precision=PRECISION) * b_dy, 1)
            b_dSBi = tl.dot(tl.trans(b_hq), b_mr[:, None] * b_dy, input_precision=PRECISION)
        # zq = cr (q A) + mr (q SA) + (Wr * q k^T) delta
        b_dzq = b_dhq * _act_grad(b_zq, ACT)
        b_dGq = tl.dot(b_dzq, tl.trans(b_delta), input_precision=PRECISION)  # (C, C)
        b_dWr += b_dGq * b_Kq
        b_dq = (b_cr[:, None] * tl.dot(b_dzq, tl.trans(b_A), input_precision=PRECISION)
                + tl.dot(b_Wr * b_dGq, b_k, input_precision=PRECISION))
        b_dk = tl.dot(tl.trans(b_Wr * b_dGq), b_q, input_precision=PRECISION)
        b_ddelta = tl.dot(tl.trans(b_Wr * b_Kq), b_dzq, input_precision=PRECISION)
        b_dcr += tl.sum(b_qA * b_dzq, 1)
        b_dAi += tl.dot(tl.trans(b_q), b_cr[:, None] * b_dzq, input_precision=PRECISION)
        if USE_BETA:
            b_dq += b_mr[:, None] * tl.dot(b_dzq, tl.trans(b_SA), input_precision=PRECISION)
            b_dmr += tl.sum(b_qSA * b_dzq, 1)
            b_dSAi = tl.dot(tl.trans(b_q), b_mr[:, None] * b_dzq, input_precision=PRECISION)

        # A' = cl A + ml SA + k^T (wl * delta), B' = cl B + ml SB + hk^T (wl * e)
        b_wl = _row(b_W, o_c, i_last)
        b_kdA = tl.dot(b_k, b_dA, input_precision=PRECISION)  # (C, BH)
        b_hdB = tl.dot(b_hk, b_dB, input_precision=PRECISION)  # (C, BD)
        b_dwl = tl.sum(b_kdA * b_delta, 1) + tl.sum(b_hdB * b_e, 1)
        b_dk += b_wl[:, None] * tl.dot(b_delta, tl.trans(b_dA), input_precision=PRECISION)
        b_ddelta += b_wl[:, None] * b_kdA
        b_dhk += b_wl[:, None] * tl.dot(b_e, tl.trans(b_dB), input_precision=PRECISION)
        b_de += b_wl[:, None] * b_hdB
        b_cl = _at(b_c, o_c, i_last)
        b_dcl = _sum2(b_A * b_dA) + _sum2(b_B * b_dB)
        b_dAi += b_cl * b_dA
        b_dBi += b_cl * b_dB
        if USE_BETA:
            # SA' = keep SA + k^T (bl * delta), SB' = keep SB + hk^T (bl * e)
            b_ml = _at(b_m, o_c, i_last)
            b_dml = _sum2(b_SA * b_dA) + _sum2(b_SB * b_dB)
            b_keep = _at(b_runb, o_c, i_last)
            b_dkeep = _sum2(b_SA * b_dSA) + _sum2(b_SB * b_dSB)
            b_bD = _row(b_Db, o_c, i_last)
            b_bl = b_bD * -b_lre
            b_kdS = tl.dot(b_k, b_dSA, input_precision=PRECISION)  # (C, BH)
            b_hdS = tl.dot(b_hk, b_dSB, input_precision=PRECISION)  # (C, BD)
            b_dbl = tl.sum(b_kdS * b_delta, 1) + tl.sum(b_hdS * b_e, 1)
            b_dk += b_bl[:, None] * tl.dot(b_delta, tl.trans(b_dSA), input_precision=PRECISION)
            b_ddelta += b_bl[:, None] * b_kdS
            b_dhk += b_bl[:, None] * tl.dot(b_e, tl.trans(b_dSB), input_precision=PRECISION)
            b_de += b_bl[:, None] * b_hdS
            b_dSAi += b_ml * b_dA + b_keep * b_dSA
            b_dSBi += b_ml * b_dB + b_keep * b_dSB

        # W = M * -lre, c, m (shifted for read_before) -> lre and the log decays
        if READ_BEFORE:
            b_dW = tl.dot(tl.trans(shift), b_dWr, input_precision=PRECISION)
            b_dc = tl.sum(shift * b_dcr[:, None], 0)
        else:
            b_dW, b_dc = b_dWr, b_dcr
        b_dW += tl.where(last[:, None], b_dwl[None, :], 0.)
        b_dc += tl.where(last, b_dcl, 0.)
        b_dlre = -tl.sum(b_dW * b_M, 0)
        b_dM = b_dW * -b_lre[None, :]
        if USE_BETA:
            if READ_BEFORE:
                b_dm = tl.sum(shift * b_dmr[:, None], 0)
            else:
                b_dm = b_dmr
            b_dm += tl.where(last, b_dml, 0.)
            b_dlre -= b_bD * b_dbl
            b_dDb = (tl.dot(tl.trans(b_Dr), b_dM, input_precision=PRECISION)
                     + tl.where(last[:, None], (b_dbl * -b_lre)[None, :], 0.))
            b_dDb *= b_Db
            b_dlog = span_grad(b_dDb, o_c) + tl.cumsum(
                (tl.where(t >= 0, tl.sum(b_Dr * b_dm[:, None], 0), 0.)
                 + tl.where(last, b_dkeep, 0.)) * b_runb, 0, reverse=True)
            tl.store(dbeta + r, b_dlog / tl.maximum(b_bt, 1e-30), mask=m_t)
        if USE_R:
            if USE_BETA:
                b_dDr = (tl.dot(b_dM, tl.trans(b_Db), input_precision=PRECISION)
                         + b_dm[:, None] * b_runv[None, :])
            else:
                b_dDr = b_dM
            b_dDr *= b_Dr
            b_dlog = span_grad(b_dDr, o_c) + tl.cumsum(b_dc * b_c, 0, reverse=True)
            tl.store(dretain + r, b_dlog / tl.maximum(b_rt, 1e-30), mask=m_t)

        # lre = lr clip / sqrt(max(sq, clip^2)), sq = |k|^2 |delta|^2 + |hk|^2 |e|^2
        if USE_CLIP:
            tl.store(dlr + r, b_dlre * b_f, mask=m_t)
            b_dsq = tl.where(b_sq >= clip * clip,
                             -0.5 * b_dlre * b_lr * b_f / tl.maximum(b_sq, clip * clip), 0.)
            b_dk += (2. * b_dsq * b_dd)[:, None] * b_k
            b_ddelta += (2. * b_dsq * b_kk)[:, None] * b_delta
            b_dhk += (2. * b_dsq * b_ee)[:, None] * b_hk
            b_de += (2. * b_dsq * b_hh)[:, None] * b_e
        else:
            tl.store(dlr + r, b_dlre, mask=m_t)

        # delta = P * act'(z), P = e B^T, e = hk B - v, hk = act(z), z = k A, at the grad point
        b_dP = b_ddelta * b_g1
        b_dz = b_ddelta * b_P * _act_grad2(b_z, ACT)
        b_de += tl.dot(b_dP, b_Bg, input_precision=PRECISION)
        b_dBg = tl.dot(tl.trans(b_dP), b_e, input_precision=PRECISION)
        b_dhk += tl.dot(b_de, tl.trans(b_Bg), input_precision=PRECISION)
        b_dBg += tl.dot(tl.trans(b_hk), b_de, input_precision=PRECISION)
        b_dz += b_dhk * b_g1
        b_dk += tl.dot(b_dz, tl.trans(b_Ag), input_precision=PRECISION)
        b_dAg = tl.dot(tl.trans(b_k), b_dz, input_precision=PRECISION)
        if USE_G and i_n == 0:  # the first chunk's point is G, not its start state
            tl.store(dGA + p_w + p_dh, b_dAg, mask=m_dh)
            tl.store(dGB + p_w + p_hd, b_dBg, mask=m_hd)
        else:
            b_dAi += b_dAg
            b_dBi += b_dBg
        tl.store(dq + p_td, b_dq, mask=m_td)
        tl.store(dk + p_td, b_dk, mask=m_td)
        tl.store(dv + p_td, -b_de, mask=m_td)
        b_dA, b_dB = b_dAi, b_dBi
        if USE_BETA:
            b_dSA, b_dSB = b_dSAi, b_dSBi
    tl.store(dA0 + p_w + p_dh, b_dA, mask=m_dh)
    tl.store(dB0 + p_w + p_hd, b_dB, mask=m_hd)
    if USE_BETA:
        tl.store(dSA0 + p_w + p_dh, b_dSA, mask=m_dh)
        tl.store(dSB0 + p_w + p_hd, b_dSB, mask=m_hd)


def _buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A float32 buffer that a kernel fills (NaN-filled first when POISON_BUFFERS is set)."""
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=like.device)
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _options(q: torch.Tensor, d: int, h: int, chunk: int, act: str,
             retain: torch.Tensor | None, beta: torch.Tensor | None, clip: float | None,
             read_before: bool, v_self: torch.Tensor | None,
             grad_at: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    """The sizes, flags and launch settings both kernels take."""
    return {"D": d, "HID": h, "C": chunk, "BD": max(16, triton.next_power_of_2(d)),
            "BH": max(16, triton.next_power_of_2(h)), "ACT": ACTS.index(act),
            "USE_R": retain is not None, "USE_BETA": beta is not None,
            "USE_VS": v_self is not None, "USE_G": grad_at is not None,
            "USE_CLIP": clip is not None, "READ_BEFORE": read_before,
            "PRECISION": dot_precision(q.dtype), "num_warps": NUM_WARPS,
            "num_stages": NUM_STAGES}


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
             retain: torch.Tensor | None, beta: torch.Tensor | None, A0: torch.Tensor,
             B0: torch.Tensor, SA0: torch.Tensor | None, SB0: torch.Tensor | None, act: str,
             clip: float | None, read_before: bool, chunk: int, store_starts: bool,
             v_self: torch.Tensor | None = None,
             grad_at: tuple[torch.Tensor, torch.Tensor] | None = None, offset: int = 0
             ) -> tuple[torch.Tensor, ...]:
    """y, the final A, B, SA, SB (float32) and the starts sA, sB, sSA, sSB ([N, H, NC, ...];
    empty unless store_starts, the momenta also without beta)."""
    q, k, v, lr, A0, B0 = (x.contiguous() for x in (q, k, v, lr, A0, B0))
    retain, beta, SA0, SB0, v_self = (None if x is None else x.contiguous()
                                      for x in (retain, beta, SA0, SB0, v_self))
    GA, GB = (None, None) if grad_at is None else (x.contiguous() for x in grad_at)
    N, H, T, d = q.shape
    h = A0.shape[-1]
    NC = -(-(T + offset) // chunk)
    y = torch.empty_like(q)
    if POISON_BUFFERS:
        y.fill_(float("nan"))
    At, Bt = _buffer((N, H, d, h), q), _buffer((N, H, h, d), q)
    SAt, SBt = _buffer((N, H, d, h), q), _buffer((N, H, h, d), q)
    momenta = store_starts and beta is not None
    sA, sB, sSA, sSB = (_buffer((N, H, NC, *shape), q) if store else
                        q.new_empty((0,), dtype=torch.float32)
                        for shape, store in (((d, h), store_starts), ((h, d), store_starts),
                                             ((d, h), momenta), ((h, d), momenta)))
    try:
        mlp_memory_fwd_kernel[(N * H,)](
            q, k, v, v_self, lr, retain, beta, A0, B0, GA, GB, SA0, SB0, y, At, Bt, SAt, SBt,
            sA, sB, sSA, sSB, 1.0 if clip is None else float(clip), T, offset, NC,
            USE_S0=SA0 is not None, STORE_STARTS=store_starts,
            **_options(q, d, h, chunk, act, retain, beta, clip, read_before, v_self, grad_at))
    except OutOfResources as error:  # raised at the launch, before anything runs
        # without retention, try a retention of ones: the same values (every product of
        # retentions is 1), in a specialization that may ask less (Triton 3.6, the backward
        # at d 32, h 64, chunk 64, float32: 245,760 bytes without, 212,992 with; docs/triton.md)
        if retain is None:
            return _forward(q, k, v, lr, torch.ones_like(lr), beta, A0, B0, SA0, SB0, act,
                            clip, read_before, chunk, store_starts, v_self, grad_at, offset)
        _no_room(error, "forward")
        return _forward_reference(q, k, v, lr, retain, beta, A0, B0, SA0, SB0, act, clip,
                                  read_before, chunk, store_starts, v_self, grad_at, offset)
    return y, At, Bt, SAt, SBt, sA, sB, sSA, sSB


def _forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                       retain: torch.Tensor | None, beta: torch.Tensor | None,
                       A0: torch.Tensor, B0: torch.Tensor, SA0: torch.Tensor | None,
                       SB0: torch.Tensor | None, act: str, clip: float | None,
                       read_before: bool, chunk: int, store_starts: bool,
                       v_self: torch.Tensor | None = None,
                       grad_at: tuple[torch.Tensor, torch.Tensor] | None = None,
                       offset: int = 0) -> tuple[torch.Tensor, ...]:
    """`_forward`'s results by the PyTorch chunk function, for a GPU the kernel does not fit."""
    starts: list[tuple[torch.Tensor, ...]] = []
    y, final = chunk_mlp_memory(q, k, v, lr, retain, beta, A0, B0, SA0, SB0, act=act,
                                clip=clip, read_before=read_before, chunk=chunk, v_self=v_self,
                                grad_at=grad_at, offset=offset, starts=starts)
    stacked = [torch.stack([s[i] for s in starts], 2).float().contiguous()
               if store_starts and (i < 2 or beta is not None)
               else q.new_empty((0,), dtype=torch.float32) for i in range(4)]
    # without momentum SA, SB come back as given: a custom op may not return its inputs
    return (y, *(x.float().clone() for x in final), *stacked)


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
              retain: torch.Tensor | None, beta: torch.Tensor | None, sA: torch.Tensor,
              sB: torch.Tensor, sSA: torch.Tensor, sSB: torch.Tensor, act: str,
              clip: float | None, read_before: bool, chunk: int, dy: torch.Tensor,
              dA: torch.Tensor, dB: torch.Tensor, dSA: torch.Tensor, dSB: torch.Tensor,
              v_self: torch.Tensor | None = None,
              grad_at: tuple[torch.Tensor, torch.Tensor] | None = None, offset: int = 0
              ) -> tuple[torch.Tensor | None, ...]:
    """dq, dk, dv, dlr, dretain, dbeta (None without them), the gradients of the initial
    A, B, SA, SB and of grad_at's two (None without it), in float32, by mlp_memory_bwd_kernel
    from the stored starts (v_self gets none: the values it generates are under
    stop-gradient)."""
    q, k, v, lr, dy, sA, sB = (x.contiguous() for x in (q, k, v, lr, dy, sA, sB))
    retain, beta, v_self = (None if x is None else x.contiguous()
                            for x in (retain, beta, v_self))
    GA, GB = (None, None) if grad_at is None else (x.contiguous() for x in grad_at)
    dA, dB, dSA, dSB = (x.float().contiguous() for x in (dA, dB, dSA, dSB))
    N, H, T, d = q.shape
    h = sA.shape[-1]
    dq, dk, dv = (_buffer((N, H, T, d), q) for _ in range(3))
    dlr = _buffer((N, H, T), q)
    dretain, dbeta = (None if x is None else _buffer((N, H, T), q) for x in (retain, beta))
    dA0, dB0 = _buffer((N, H, d, h), q), _buffer((N, H, h, d), q)
    # without momentum SA, SB pass through the sequence unchanged, and so do their gradients
    dSA0, dSB0 = ((_buffer((N, H, d, h), q), _buffer((N, H, h, d), q)) if beta is not None
                  else (dSA.clone(), dSB.clone()))
    dGA, dGB = ((None, None) if grad_at is None
                else (_buffer((N, H, d, h), q), _buffer((N, H, h, d), q)))
    try:
        mlp_memory_bwd_kernel[(N * H,)](
            q, k, v, v_self, lr, retain, beta, sA, sB, sSA.contiguous(), sSB.contiguous(), GA,
            GB, dy, dA, dB, dSA, dSB, dq, dk, dv, dlr, dretain, dbeta, dA0, dB0, dSA0, dSB0,
            dGA, dGB, 1.0 if clip is None else float(clip), T, offset, sA.shape[2],
            **_options(q, d, h, chunk, act, retain, beta, clip, read_before, v_self, grad_at))
    except OutOfResources as error:  # raised at the launch, before anything runs
        if retain is None:  # as in _forward; the retention's gradient is not asked for
            out = _backward(q, k, v, lr, torch.ones_like(lr), beta, sA, sB, sSA, sSB, act,
                            clip, read_before, chunk, dy, dA, dB, dSA, dSB, v_self, grad_at,
                            offset)
            return (*out[:4], None, *out[5:])
        _no_room(error, "backward")
        out = _backward_reference(q, k, v, lr, retain, beta, sA, sB, sSA, sSB, act, clip,
                                  read_before, chunk, dy, dA, dB, dSA, dSB, v_self, grad_at,
                                  offset)
        # without momentum dSA, dSB come back as given: a custom op may not return its inputs
        return (*out[:6], *(None if g is None else g.clone() for g in out[6:]))
    return dq, dk, dv, dlr, dretain, dbeta, dA0, dB0, dSA0, dSB0, dGA, dGB


def _backward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                        retain: torch.Tensor | None, beta: torch.Tensor | None,
                        sA: torch.Tensor, sB: torch.Tensor, sSA: torch.Tensor,
                        sSB: torch.Tensor, act: str, clip: float | None, read_before: bool,
                        chunk: int, dy: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
                        dSA: torch.Tensor, dSB: torch.Tensor, v_self: torch.Tensor | None = None,
                        grad_at: tuple[torch.Tensor, torch.Tensor] | None = None,
                        offset: int = 0) -> tuple[torch.Tensor | None, ...]:
    """`_backward`'s results in PyTorch, what the tests hold the kernel to: chunks in reverse,
    each recomputed by `mlp_memory_chunk` at its stored start state and differentiated by
    torch.func.vjp."""
    T = q.shape[2]
    dG: tuple[torch.Tensor | None, ...] = (None, None)
    f32 = torch.float32
    seq = [None if x is None else x.to(f32) for x in (q, k, v, lr, retain, beta)]
    grads: list[list[torch.Tensor]] = [[] for _ in seq]
    dA, dB, dSA, dSB = (x.to(f32) for x in (dA, dB, dSA, dSB))
    dy = dy.to(f32)
    options = act, clip, read_before
    for i_n in reversed(range(sA.shape[2])):
        a, b = max(0, i_n * chunk - offset), min(T, i_n * chunk + chunk - offset)
        cut = [None if x is None else x[:, :, a:b] for x in seq]
        # without momentum SA, SB pass through unchanged: any value stands for them
        start = (sA[:, :, i_n], sB[:, :, i_n],
                 sSA[:, :, i_n] if beta is not None else torch.zeros_like(dSA),
                 sSB[:, :, i_n] if beta is not None else torch.zeros_like(dSB))
        point = None if i_n > 0 or grad_at is None else tuple(x.to(f32) for x in grad_at)
        out = _chunk_vjp(cut, start, options, (dy[:, :, a:b], dA, dB, dSA, dSB),
                         None if v_self is None else v_self[:, :, a:b].to(f32), point)
        dA, dB, dSA, dSB = out[4:8]
        if point is not None:
            dG, out = out[-2:], out[:-2]
        rest = iter(out[8:])
        for i, x in enumerate(cut):
            if x is not None:
                grads[i].append(out[i] if i < 4 else next(rest))
    dseq = [torch.cat(g[::-1], 2) if seq[i] is not None else None for i, g in enumerate(grads)]
    return (*dseq, dA, dB, dSA, dSB, *dG)


def _chunk_vjp(cut: list[torch.Tensor | None], start: tuple[torch.Tensor, ...],
               options: tuple[Any, ...], grads: tuple[torch.Tensor, ...],
               v_self: torch.Tensor | None,
               grad_at: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """The vjp of one chunk's `mlp_memory_chunk` at its inputs `cut` (q, k, v, lr, retain,
    beta) and start state: the gradients of q, k, v, lr, A, B, SA, SB, then of retain and
    beta where given, then of grad_at's two where given."""
    use_r, use_b = cut[4] is not None, cut[5] is not None

    def chunk_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                 A: torch.Tensor, B: torch.Tensor, SA: torch.Tensor, SB: torch.Tensor,
                 *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(rest)
        retain = next(it) if use_r else None
        beta = next(it) if use_b else None
        point = (next(it), next(it)) if grad_at is not None else None
        y, *state = mlp_memory_chunk(q, k, v, lr, retain, beta, A, B, SA, SB, *options,
                                     v_self=v_self, grad_at=point)
        assert y is not None  # (a query is given)
        return (y, *state)

    wrt = [*cut[:4], *start, *(x for x in cut[4:] if x is not None), *(grad_at or ())]
    vjp = torch.func.vjp(chunk_fn, *wrt)[1]
    return tuple(vjp(grads))


# The kernel and the backward as torch.library custom ops (nestc::mlp_memory_fwd / _bwd), so
# that torch.compile traces around them. A custom op cannot return None: "no starts" and "no
# gradient" travel as empty tensors (NONE) and become None again outside.

def _or_none(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None or x.numel() == 0 and x.dim() == 1 else x


@torch.library.custom_op("nestc::mlp_memory_fwd", mutates_args=())
def mlp_memory_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                   retain: torch.Tensor | None, beta: torch.Tensor | None, A0: torch.Tensor,
                   B0: torch.Tensor, SA0: torch.Tensor | None, SB0: torch.Tensor | None,
                   act: str, clip: float | None, read_before: bool, chunk: int,
                   v_self: torch.Tensor | None = None, GA: torch.Tensor | None = None,
                   GB: torch.Tensor | None = None, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor]:
    """y, the final A, B, SA, SB and the states entering each chunk sA, sB, sSA, sSB (the
    momenta empty without beta), for the backward."""
    return _forward(q, k, v, lr, retain, beta, A0, B0, SA0, SB0, act, clip, read_before, chunk,
                    True, v_self, _pair(GA, GB), offset)  # type: ignore[return-value]


def _pair(GA: torch.Tensor | None, GB: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if GA is None or GB is None else (GA, GB)


@mlp_memory_fwd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
      retain: torch.Tensor | None, beta: torch.Tensor | None, A0: torch.Tensor, B0: torch.Tensor,
      SA0: torch.Tensor | None, SB0: torch.Tensor | None, act: str, clip: float | None,
      read_before: bool, chunk: int, v_self: torch.Tensor | None = None,
      GA: torch.Tensor | None = None, GB: torch.Tensor | None = None, offset: int = 0
      ) -> tuple[torch.Tensor, ...]:
    N, H, T, d = q.shape
    h = A0.shape[-1]
    NC = -(-(T + offset) // chunk)
    f32 = torch.float32
    new = q.new_empty
    momenta = (N, H, NC) if beta is not None else (0,)
    return (new(q.shape), new((N, H, d, h), dtype=f32), new((N, H, h, d), dtype=f32),
            new((N, H, d, h), dtype=f32), new((N, H, h, d), dtype=f32),
            new((N, H, NC, d, h), dtype=f32), new((N, H, NC, h, d), dtype=f32),
            new((*momenta, d, h) if beta is not None else (0,), dtype=f32),
            new((*momenta, h, d) if beta is not None else (0,), dtype=f32))


@torch.library.custom_op("nestc::mlp_memory_bwd", mutates_args=())
def mlp_memory_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                   retain: torch.Tensor | None, beta: torch.Tensor | None, sA: torch.Tensor,
                   sB: torch.Tensor, sSA: torch.Tensor, sSB: torch.Tensor, act: str,
                   clip: float | None, read_before: bool, chunk: int, dy: torch.Tensor,
                   dA: torch.Tensor, dB: torch.Tensor, dSA: torch.Tensor, dSB: torch.Tensor,
                   v_self: torch.Tensor | None = None, GA: torch.Tensor | None = None,
                   GB: torch.Tensor | None = None, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, dlr, dretain, dbeta (empty without them), dA0, dB0, dSA0, dSB0, dGA, dGB
    (empty without GA, GB), each in its input's dtype (the weights' gradients in float32)."""
    out = _backward(q, k, v, lr, retain, beta, sA, sB, sSA, sSB, act, clip, read_before, chunk,
                    dy, dA, dB, dSA, dSB, v_self, _pair(GA, GB), offset)
    like = (q, k, v, lr, retain, beta)
    seq = [q.new_empty((0,)) if g is None or x is None else g.to(x.dtype)
           for g, x in zip(out[:6], like)]
    dG = [q.new_empty((0,), dtype=torch.float32) if g is None else g for g in out[10:]]
    return (*seq, *out[6:10], *dG)  # type: ignore[return-value]


@mlp_memory_bwd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
      retain: torch.Tensor | None, beta: torch.Tensor | None, sA: torch.Tensor,
      sB: torch.Tensor, sSA: torch.Tensor, sSB: torch.Tensor, act: str, clip: float | None,
      read_before: bool, chunk: int, dy: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
      dSA: torch.Tensor, dSB: torch.Tensor, v_self: torch.Tensor | None = None,
      GA: torch.Tensor | None = None, GB: torch.Tensor | None = None, offset: int = 0
      ) -> tuple[torch.Tensor, ...]:
    # contiguous, as the kernels' are (empty_like kept an input's strides), and a fresh
    # empty tensor for each absent gradient (one object for both read as aliases)
    def like(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape)

    def none() -> torch.Tensor:
        return q.new_empty((0,), dtype=torch.float32)

    return (like(q), like(k), like(v), like(lr),
            like(retain) if retain is not None else q.new_empty((0,)),
            like(beta) if beta is not None else q.new_empty((0,)),
            like(dA), like(dB), like(dSA), like(dSB), none() if GA is None else like(dA),
            none() if GB is None else like(dB))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    (q, k, v, lr, retain, beta, A0, B0, SA0, SB0, act, clip, read_before, chunk, v_self, GA, GB,
     offset) = inputs
    ctx.save_for_backward(q, k, v, lr, retain, beta, *output[5:], A0, B0, SA0, SB0, v_self, GA,
                          GB)
    ctx.options = act, clip, read_before, chunk
    ctx.offset = offset
    ctx.dtypes = A0.dtype, B0.dtype
    ctx.given = SA0 is not None, SB0 is not None


def _autograd_backward(ctx: Any, dy: torch.Tensor, dA: torch.Tensor | None,
                       dB: torch.Tensor | None, dSA: torch.Tensor | None,
                       dSB: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
    (q, k, v, lr, retain, beta, sA, sB, sSA, sSB, A0, B0, SA0, SB0, v_self, GA,
     GB) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: this backward is differentiated again
        act, clip, read_before, chunk = ctx.options

        def forward(*inputs: Any) -> tuple[torch.Tensor | None, ...]:
            y, state = chunk_mlp_memory(*inputs[:10], act=act, clip=clip,
                                        read_before=read_before, chunk=chunk, v_self=v_self,
                                        grad_at=_pair(*inputs[10:]), offset=ctx.offset)
            return (y, *state)

        grads = recomputed_vjp(forward, (q, k, v, lr, retain, beta, A0, B0, SA0, SB0, GA, GB),
                               (dy, dA, dB, dSA, dSB))
        return (*grads[:10], None, None, None, None, None, *grads[10:], None)
    # an output that the loss does not use has no gradient: zeros
    dA, dB, dSA, dSB = (torch.zeros_like(s[:, :, 0]) if g is None else g
                        for g, s in zip((dA, dB, dSA, dSB), (sA, sB, sA, sB)))
    dq, dk, dv, dlr, dretain, dbeta, dA0, dB0, dSA0, dSB0, dGA, dGB = mlp_memory_bwd(
        q, k, v, lr, retain, beta, sA, sB, sSA, sSB, *ctx.options, dy, dA, dB, dSA, dSB, v_self,
        GA, GB, ctx.offset)
    return (dq, dk, dv, dlr, _or_none(dretain) if retain is not None else None,
            _or_none(dbeta) if beta is not None else None, dA0.to(ctx.dtypes[0]),
            dB0.to(ctx.dtypes[1]), dSA0 if ctx.given[0] else None,
            dSB0 if ctx.given[1] else None, None, None, None, None, None,
            None if GA is None else dGA.to(GA.dtype), None if GB is None else dGB.to(GB.dtype),
            None)


mlp_memory_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# triton.jit picks the interpreter when a kernel is defined (TRITON_INTERPRET=1 at import)
INTERPRETED = not isinstance(mlp_memory_fwd_kernel, triton.runtime.jit.JITFunction)
if INTERPRETED:
    mend_interpreter()


def triton_mlp_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                      retain: torch.Tensor | None, beta: torch.Tensor | None, A0: torch.Tensor,
                      B0: torch.Tensor, SA0: torch.Tensor | None = None,
                      SB0: torch.Tensor | None = None, *, act: str = "gelu",
                      clip: float | None = None, read_before: bool = False, chunk: int = 64,
                      v_self: torch.Tensor | None = None,
                      grad_at: tuple[torch.Tensor, torch.Tensor] | None = None,
                      offset: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Same arguments and results as `chunk_mlp_memory` (float32 or 16-bit inputs, d and
    h <= 128, chunk 16, 32 or 64), on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1."""
    op = "triton_mlp_memory"
    if q.dtype == torch.float64:
        raise ValueError(f"{op}: the Triton kernel computes in float32; use the chunked back "
                         "end for float64 inputs")
    d, h = A0.shape[-2:]
    if max(d, h) > MAX_DIM:
        raise ValueError(f"{op}: the Triton kernel holds the weights in registers, so d and h "
                         f"must be at most {MAX_DIM}, got d = {d}, h = {h}")
    if chunk not in CHUNKS:
        raise ValueError(f"{op}: chunk must be one of {CHUNKS}, got {chunk!r}")
    if act not in ACTS:
        raise ValueError(f"{op}: act must be one of {ACTS}, got {act!r}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{op}: the Triton kernel needs CUDA tensors, got {q.device}; set "
                         "TRITON_INTERPRET=1 before triton is imported to run it on the CPU")
    if (SA0 is None) != (SB0 is None):
        raise ValueError(f"{op}: give both SA0 and SB0 or neither")
    if not 0 <= offset < chunk:
        raise ValueError(f"{op}: offset must be in [0, chunk) = [0, {chunk}), got {offset!r}")
    if q.shape[2] == 0:
        SA = torch.zeros_like(A0, dtype=torch.float32) if SA0 is None else SA0.float().clone()
        SB = torch.zeros_like(B0, dtype=torch.float32) if SB0 is None else SB0.float().clone()
        return q.new_zeros(q.shape), (A0.float().clone(), B0.float().clone(), SA, SB)
    GA, GB = (None, None) if grad_at is None else grad_at
    y, A, B, SA, SB, *_ = mlp_memory_fwd(q, k, v, lr, retain, beta, A0, B0, SA0, SB0, act,
                                         None if clip is None else float(clip), read_before,
                                         chunk, v_self, GA, GB, offset)
    return y, (A, B, SA, SB)
