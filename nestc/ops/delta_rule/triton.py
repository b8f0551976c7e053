"""The delta rule and the gated delta rule as Triton kernels: chunk.py's UT form, fused per chunk.

Same arguments, layout ([B, T, H, D]) and results as `chunk_delta_rule` and
`chunk_gated_delta_rule`; README.md beside this file derives the forward. `g` is the per-token
log retention of the gated rule and None for the plain one (then no decay is computed at all).
Within a chunk, G is the running sum of g (restarting at each chunk), D[t, s] = exp(G_t - G_s)
for s <= t, and M = (I + strict_tril(diag(beta) (K K^T * D)))^{-1} diag(beta).

Forward, three kernels after G = chunk_local_cumsum(g) in torch:
  fwd_kernel_prepare           grid (N, B*H): A, Ai = (I + A)^{-1} in registers (forward
                               substitution in 16 x 16 blocks, then their products),
                               u = M V, w = M diag(e^G) K
  fwd_kernel_state             grid (V / BV, B*H), a loop over the N chunks: stores the state S_n
                               entering each chunk, the writes U = u - w S_n, then
                               S <- e^{G_C} S + K_d^T U (K_d: keys decayed to the chunk's end)
  fwd_kernel_o                 grid (V / BV, N, B*H): O = scale (diag(e^G) Q S_n + (Q K^T * D) U)

Backward: nothing but the inputs is saved. The prepare and state kernels run again (u, w, Ai,
S_n, U), then, with dS_{n+1} the gradient of the state leaving chunk n:
  bwd_kernel_dhu               grid (V / BV, B*H), chunks in reverse:
                               dU  = scale (Q K^T * D)^T dO + K_d dS_{n+1}
                               dS_n = e^{G_C} dS_{n+1} + scale (diag(e^G) Q)^T dO - w^T dU
  bwd_kernel_dqkvbg            grid (N, B*H): everything chunk-local, by the chain rule through
                               U = u - w S_n, u = M V, w = M diag(e^G) K, M = Ai diag(beta),
                               dA = -Ai^T dAi Ai^T (strictly lower), A and the outputs;
                               dg sums, for each token, every exp(G) factor and every span of
                               the decays that holds its g.
The forward and the backward are the torch.library custom ops nestc::delta_rule_fwd and
nestc::delta_rule_bwd (with fake implementations and the backward registered as the forward's
autograd formula), so torch.compile traces around them in one graph.
Operands are loaded in their dtype and everything is computed in float32; matmuls of float32
inputs use TF32x3 (three TF32 tensor-core products per product, about float32's precision:
IEEE float32 dots compile to FMA loops that ptxas fits into 32 registers with kilobytes of
spills on sm_90). Under the interpreter, with tl.dot rounding as tensor cores do
(tests/interpreted.py), float32 inputs match the chunked tier to about 1e-6; on a GPU that is
not measured yet.
Block sizes: C = chunk_size (at most 64), BK = K rounded up to a power of two >= 16 (K <= 128:
a whole key row stays in registers), V in tiles of 16 to 64 per kernel and BK (_TILES).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from nestc.ops.utils import dot_precision, mend_interpreter, recomputed_vjp

# beyond these the kernels' tiles outgrow an H100's shared memory (K = 256: dqkvbg asks for
# 360 KB; benchmarks/triton_resources.py)
MAX_K = 128
MAX_CHUNK = 64
# set by tests: fill every buffer a kernel writes with NaN first, so a missed store shows up
POISON_BUFFERS = False


@triton.jit
def delta_rule_fwd_kernel_prepare(k, v, beta, G, u, w, Ai, T, H: tl.constexpr, K: tl.constexpr,
                                  V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                                  BV: tl.constexpr, USE_G: tl.constexpr,
                                  STORE_AI: tl.constexpr, PRECISION: tl.constexpr):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    m_t = i_n * C + o_c < T
    m_k = o_k < K
    r = ((i_b * T + i_n * C + o_c) * H + i_h).to(tl.int64)  # rows of [B, T, H, *]
    m_tk = m_t[:, None] & m_k[None, :]

    b_k = tl.load(k + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_beta = tl.load(beta + r, mask=m_t, other=0.).to(tl.float32)
    strict = o_c[:, None] > o_c[None, :]
    b_A = tl.dot(b_k * b_beta[:, None], tl.trans(b_k), input_precision=PRECISION)  # (C, C)
    if USE_G:
        b_G = tl.load(G + r, mask=m_t, other=0.)
        # masked before exp: above the diagonal, and from the padding rows past T (G = 0
        # there), the differences can be large and positive
        b_A *= tl.exp(tl.where(strict & m_t[:, None], b_G[:, None] - b_G[None, :], 0.))
        b_kg = b_k * tl.exp(b_G)[:, None]
    else:
        b_kg = b_k
    # (I + A)^{-1} in two parts, so that 14 dependent steps lead to it, not C - 2. First the
    # 16 x 16 blocks on the diagonal, all at once, by forward substitution: their inverse is
    # I + X, X strictly lower, row i of X is -A_i - sum_{j<i} A_ij X_j, and the rows not
    # reached yet still hold -A, whose entries at j >= i are zero, so step i computes the
    # rows i, 16 + i, ... as R + R X with R those rows. Then, with X_d = I + X and A_o the
    # blocks below the diagonal, I + A = X_d^{-1} (I + N) for N = X_d A_o, strictly
    # block-lower (N^(C/16) = 0): (I + A)^{-1} = (I - N)(I + N^2) X_d. Every product here is
    # TF32x3 (about float32), whatever the inputs: the inverse feeds every output.
    eye = (o_c[:, None] == o_c[None, :]).to(tl.float32)
    block = o_c[:, None] // 16 == o_c[None, :] // 16
    b_X = tl.where(strict & block, -b_A, 0.)
    for i in range(2, 16):
        b_R = tl.where((o_c % 16 == i)[:, None], b_X, 0.)
        b_X += tl.dot(b_R, b_X, input_precision="tf32x3")
    b_Ai = b_X + eye
    if C > 16:
        below = o_c[:, None] // 16 > o_c[None, :] // 16
        b_N = tl.dot(b_Ai, tl.where(below, b_A, 0.), input_precision="tf32x3")
        b_Y = eye - b_N
        if C > 32:
            b_Y = tl.dot(b_Y, eye + tl.dot(b_N, b_N, input_precision="tf32x3"),
                         input_precision="tf32x3")
        b_Ai = tl.dot(b_Y, b_Ai, input_precision="tf32x3")
    b_M = b_Ai * b_beta[None, :]

    b_w = tl.dot(b_M, b_kg, input_precision=PRECISION)  # (C, BK)
    tl.store(w + r[:, None] * K + o_k[None, :], b_w, mask=m_tk)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + r[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_u = tl.dot(b_M, b_v, input_precision=PRECISION)  # (C, BV)
        tl.store(u + r[:, None] * V + o_v[None, :], b_u, mask=m_tv)
    if STORE_AI:
        tl.store(Ai + r[:, None] * C + o_c[None, :], b_Ai, mask=m_t[:, None])


@triton.jit
def delta_rule_fwd_kernel_state(k, u, w, G, h0, h, U, ht, T, N, H: tl.constexpr,
                                K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                                USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                                PRECISION: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    if USE_H0:
        b_S = tl.load(h0 + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.).to(tl.float32)
    else:
        b_S = tl.zeros([BK, BV], dtype=tl.float32)
    for i_n in range(N):
        tl.store(h + (i_bh * N + i_n).to(tl.int64) * K * V + p_kv, b_S, mask=m_kv)
        m_t = i_n * C + o_c < T
        r = ((i_b * T + i_n * C + o_c) * H + i_h).to(tl.int64)
        m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
        b_w = tl.load(w + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_u = tl.load(u + r[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_U = b_u - tl.dot(b_w, b_S, input_precision=PRECISION)  # (C, BV)
        tl.store(U + r[:, None] * V + o_v[None, :], b_U, mask=m_tv)
        b_k = tl.load(k + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        if USE_G:
            last = (i_b * T + tl.minimum(i_n * C + C, T) - 1) * H + i_h
            b_gl = tl.load(G + last.to(tl.int64))
            b_G = tl.load(G + r, mask=m_t, other=0.)
            b_k *= tl.exp(tl.where(m_t, b_gl - b_G, 0.))[:, None]
            b_S *= tl.exp(b_gl)
        b_S += tl.dot(tl.trans(b_k), b_U, input_precision=PRECISION)
    if STORE_HT:
        tl.store(ht + i_bh.to(tl.int64) * K * V + p_kv, b_S, mask=m_kv)


@triton.jit
def delta_rule_fwd_kernel_o(q, k, U, h, G, o, scale, T, N, H: tl.constexpr, K: tl.constexpr,
                            V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr, USE_G: tl.constexpr, PRECISION: tl.constexpr):
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = i_n * C + o_c < T, o_k < K, o_v < V
    r = ((i_b * T + i_n * C + o_c) * H + i_h).to(tl.int64)
    m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]

    b_q = tl.load(q + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_k = tl.load(k + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_S = tl.load(h + (i_bh * N + i_n).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.)
    b_U = tl.load(U + r[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
    causal = o_c[:, None] >= o_c[None, :]
    b_P = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # (C, C)
    if USE_G:
        b_G = tl.load(G + r, mask=m_t, other=0.)
        b_P *= tl.exp(tl.where(causal & m_t[:, None], b_G[:, None] - b_G[None, :], 0.))
        b_q *= tl.exp(b_G)[:, None]
    b_P = tl.where(causal, b_P, 0.)
    b_o = (tl.dot(b_q, b_S, input_precision=PRECISION)
           + tl.dot(b_P, b_U, input_precision=PRECISION)) * scale
    tl.store(o + r[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def delta_rule_bwd_kernel_dhu(q, k, w, G, do, dht, dh, dU, dh0, scale, T, N, H: tl.constexpr,
                              K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                              USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                              PRECISION: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    if USE_DHT:
        b_dS = tl.load(dht + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.)
        b_dS = b_dS.to(tl.float32)
    else:
        b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    # P^T[s, t] = k_s . q_t for s <= t: the transposed causal mask
    causal_t = o_c[:, None] <= o_c[None, :]
    for i in range(N):
        i_n = N - 1 - i
        # b_dS is the gradient of the state leaving chunk i_n
        tl.store(dh + (i_bh * N + i_n).to(tl.int64) * K * V + p_kv, b_dS, mask=m_kv)
        m_t = i_n * C + o_c < T
        r = ((i_b * T + i_n * C + o_c) * H + i_h).to(tl.int64)
        m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_k = tl.load(k + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_w = tl.load(w + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_do = tl.load(do + r[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_Pt = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)  # (C, C)
        if USE_G:
            last = (i_b * T + tl.minimum(i_n * C + C, T) - 1) * H + i_h
            b_gl = tl.load(G + last.to(tl.int64))
            b_G = tl.load(G + r, mask=m_t, other=0.)
            b_Pt *= tl.exp(tl.where(causal_t & m_t[None, :], b_G[None, :] - b_G[:, None], 0.))
            b_kd = b_k * tl.exp(tl.where(m_t, b_gl - b_G, 0.))[:, None]
            b_q *= tl.exp(b_G)[:, None]
        else:
            b_kd = b_k
        b_Pt = tl.where(causal_t, b_Pt, 0.)
        b_dU = (tl.dot(b_Pt, b_do, input_precision=PRECISION) * scale
                + tl.dot(b_kd, b_dS, input_precision=PRECISION))  # (C, BV)
        tl.store(dU + r[:, None] * V + o_v[None, :], b_dU, mask=m_tv)
        if USE_G:
            b_dS *= tl.exp(b_gl)
        b_dS += (tl.dot(tl.trans(b_q), b_do, input_precision=PRECISION) * scale
                 - tl.dot(tl.trans(b_w), b_dU, input_precision=PRECISION))
    if STORE_DH0:
        tl.store(dh0 + i_bh.to(tl.int64) * K * V + p_kv, b_dS, mask=m_kv)


@triton.jit
def span_grad(dDD, o_c):
    """The gradient at each factor's log (C,) of D[t, s] = prod_{s < j <= t} factor_j, given
    dDD = dL/dD * D (C, C): the sum over t >= j and s < j, the spans that hold factor j. Each
    term holds it, where the rows' sums minus the columns' (the gradient of differences of
    running sums) cancelled terms of size 1 up to float32's rounding, which the division by a
    small factor magnified (as nestc.ops.utils.span_sums says). The gated delta rule's
    backward and the MLP memory's use it."""
    later = tl.cumsum(dDD, 0, reverse=True)  # [j, s]: the sum over t >= j
    return tl.sum(tl.where(o_c[:, None] > o_c[None, :], later, 0.), 1)


@triton.jit
def delta_rule_bwd_kernel_dqkvbg(q, k, v, beta, G, Ai, h, dh, U, dU, do, dq, dk, dv, dbeta, dg,
                                 scale, T, N, H: tl.constexpr, K: tl.constexpr,
                                 V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                                 BV: tl.constexpr, USE_G: tl.constexpr,
                                 PRECISION: tl.constexpr):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    m_t, m_k = i_n * C + o_c < T, o_k < K
    r = ((i_b * T + i_n * C + o_c) * H + i_h).to(tl.int64)
    m_tk = m_t[:, None] & m_k[None, :]
    p_S = (i_bh * N + i_n).to(tl.int64) * K * V

    b_q = tl.load(q + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_k = tl.load(k + r[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_beta = tl.load(beta + r, mask=m_t, other=0.).to(tl.float32)
    b_Ai = tl.load(Ai + r[:, None] * C + o_c[None, :], mask=m_t[:, None], other=0.)
    b_M = b_Ai * b_beta[None, :]
    strict = o_c[:, None] > o_c[None, :]
    causal = o_c[:, None] >= o_c[None, :]
    if USE_G:
        b_G = tl.load(G + r, mask=m_t, other=0.)
        n_valid = tl.minimum(C, T - i_n * C)
        b_gl = tl.sum(tl.where(o_c == n_valid - 1, b_G, 0.), 0)
        causal_t = causal & m_t[:, None]
        b_D = tl.where(causal, tl.exp(tl.where(causal_t, b_G[:, None] - b_G[None, :], 0.)), 0.)
        b_eG = tl.exp(b_G)
        b_kg = b_k * b_eG[:, None]
        b_kd = b_k * tl.exp(tl.where(m_t, b_gl - b_G, 0.))[:, None]
    else:
        b_D = tl.where(causal, 1., 0.)
        b_kg = b_k
        b_kd = b_k

    b_dqS = tl.zeros([C, BK], dtype=tl.float32)  # dO S^T
    b_dP = tl.zeros([C, C], dtype=tl.float32)  # dO U^T
    b_dKd = tl.zeros([C, BK], dtype=tl.float32)  # U dS_{n+1}^T
    b_dw = tl.zeros([C, BK], dtype=tl.float32)  # -dU S^T
    b_dM = tl.zeros([C, C], dtype=tl.float32)  # dU V^T (+ dw kg^T below)
    b_SdS = tl.zeros([BK], dtype=tl.float32)  # rows of sum(S * dS_{n+1})
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv, m_kv = m_t[:, None] & m_v[None, :], m_k[:, None] & m_v[None, :]
        p_tv = r[:, None] * V + o_v[None, :]
        p_kv = p_S + o_k[:, None] * V + o_v[None, :]
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.).to(tl.float32)
        b_U = tl.load(U + p_tv, mask=m_tv, other=0.)
        b_dU = tl.load(dU + p_tv, mask=m_tv, other=0.)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.).to(tl.float32)
        b_S = tl.load(h + p_kv, mask=m_kv, other=0.)
        b_dSn = tl.load(dh + p_kv, mask=m_kv, other=0.)
        b_dqS += tl.dot(b_do, tl.trans(b_S), input_precision=PRECISION)
        b_dP += tl.dot(b_do, tl.trans(b_U), input_precision=PRECISION)
        b_dKd += tl.dot(b_U, tl.trans(b_dSn), input_precision=PRECISION)
        b_dw -= tl.dot(b_dU, tl.trans(b_S), input_precision=PRECISION)
        b_dM += tl.dot(b_dU, tl.trans(b_v), input_precision=PRECISION)
        b_SdS += tl.sum(b_S * b_dSn, 1)
        # v enters only through u = M V
        b_dv = tl.dot(tl.trans(b_M), b_dU, input_precision=PRECISION)
        tl.store(dv + p_tv, b_dv.to(dv.dtype.element_ty), mask=m_tv)

    # w = M kg and M = Ai diag(beta), Ai = (I + A)^{-1}
    b_dkg = tl.dot(tl.trans(b_M), b_dw, input_precision=PRECISION)  # (C, BK)
    b_dM += tl.dot(b_dw, tl.trans(b_kg), input_precision=PRECISION)
    b_dbeta = tl.sum(b_dM * b_Ai, 0)
    b_dAi = b_dM * b_beta[None, :]
    b_dA = -tl.dot(tl.dot(tl.trans(b_Ai), b_dAi, input_precision=PRECISION), tl.trans(b_Ai),
                   input_precision=PRECISION)
    b_dA = tl.where(strict, b_dA, 0.)
    # A = strict_tril(diag(beta) (K K^T * D))
    b_KK = tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
    b_dAD = b_dA * b_D
    b_dbeta += tl.sum(b_dAD * b_KK, 1)
    b_dKK = b_dAD * b_beta[:, None]
    b_dk = (tl.dot(b_dKK, b_k, input_precision=PRECISION)
            + tl.dot(tl.trans(b_dKK), b_k, input_precision=PRECISION))
    # O = scale (diag(e^G) Q S + (Q K^T * D) U)
    b_dP = tl.where(causal, b_dP * scale, 0.)
    b_dQK = b_dP * b_D
    b_dq = tl.dot(b_dQK, b_k, input_precision=PRECISION)
    b_dk += tl.dot(tl.trans(b_dQK), b_q, input_precision=PRECISION)
    if USE_G:
        b_dq += b_dqS * (scale * b_eG)[:, None]
        b_dk += b_dKd * tl.exp(tl.where(m_t, b_gl - b_G, 0.))[:, None] + b_dkg * b_eG[:, None]
        # dg_j, the gradient at token j's log retention: every factor that holds it, summed
        # where it does (no difference of running sums, whose cancellation of terms of size 1
        # left a tiny retention's gradient float32's rounding of them): e^{G_t} for t >= j
        # (the state read, w's keys, the state's own decay at the chunk's last token), the
        # hand-off's key s decayed over s < i <= last for s < j, and the spans of the two D
        # matrices that hold j
        b_run = scale * b_eG * tl.sum(b_q * b_dqS, 1) + tl.sum(b_dkg * b_kg, 1)
        b_run += tl.where(o_c == n_valid - 1, tl.exp(b_gl) * tl.sum(b_SdS, 0), 0.)
        b_r = tl.sum(b_dKd * b_kd, 1)
        b_QK = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
        b_dD = b_dAD * b_beta[:, None] * b_KK + b_dQK * b_QK
        b_dg = (tl.cumsum(b_run, 0, reverse=True) + tl.sum(tl.where(strict, b_r[None, :], 0.), 1)
                + span_grad(b_dD, o_c))
        tl.store(dg + r, b_dg, mask=m_t)
    else:
        b_dq += b_dqS * scale
        b_dk += b_dKd + b_dkg
    tl.store(dq + r[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + r[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dbeta + r, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)


# the launches (_launch_key) a GPU refused at their stages and ran with one; later calls go to
# one stage at once (triton does not remember a refusal: it refuses the launch on every call)
_ONE_STAGE: set[tuple[Any, ...]] = set()


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """kernel[grid](*args, **kwargs), and again with one stage when the GPU refuses the launch
    for its resources: the loads' pipelining buffers are much of the shared memory (_TILES is
    sized for an H100 and Triton 3.9; an A100 has 163 KiB a block, and Triton 3.6 asks more
    of some kernels, docs/triton.md). OutOfResources is raised before a kernel runs, so the
    retry starts clean. Nothing is added to a launch while no launch has been refused."""
    if _ONE_STAGE and _launch_key(kernel, args, kwargs) in _ONE_STAGE:
        kernel[grid](*args, **{**kwargs, "num_stages": 1})
        return
    try:
        kernel[grid](*args, **kwargs)
    except OutOfResources:
        if kwargs.get("num_stages", 1) == 1:
            raise
        kernel[grid](*args, **{**kwargs, "num_stages": 1})
        _ONE_STAGE.add(_launch_key(kernel, args, kwargs))


def _launch_key(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What a launch's shared memory depends on: the kernel, the device, the tensors' dtypes
    and the pointers left out (None), the integers as triton specializes them (1, multiples
    of 16), the launch's keyword arguments."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    kinds = tuple(a.dtype if isinstance(a, torch.Tensor) else a if a is None or
                  isinstance(a, float) else (a == 1, a % 16 == 0) for a in args)
    return kernel, device, kinds, tuple(sorted(kwargs.items()))


def _no_room(error: OutOfResources, what: str) -> None:
    warnings.warn(f"nestc: a delta-rule {what} kernel needs more of this GPU than it has "
                  f"({error}); computing it on the chunked tier instead", RuntimeWarning,
                  stacklevel=3)


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
             beta: torch.Tensor, scale: float, h0: torch.Tensor | None,
             output_final_state: bool, chunk_size: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same rule on the chunked PyTorch tier, for a GPU that a kernel does not fit."""
    from nestc.ops.delta_rule.chunk import chunk_delta_rule
    from nestc.ops.gated_delta_rule.chunk import chunk_gated_delta_rule

    if g is None:
        return chunk_delta_rule(q, k, v, beta, scale, h0, output_final_state, chunk_size)
    return chunk_gated_delta_rule(q, k, v, g, beta, scale, h0, output_final_state, chunk_size)


def _buffer(shape: tuple[int, ...], like: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A buffer that a kernel fills (NaN-filled first when POISON_BUFFERS is set)."""
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def chunk_local_cumsum(g: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H] -> the running sum of g within each chunk of C tokens, in float32."""
    B, T, H = g.shape
    N = -(-T // C)
    x = torch.nn.functional.pad(g.float(), (0, 0, 0, N * C - T)).view(B, N, C, H)
    return x.cumsum(2).view(B, N * C, H)[:, :T].contiguous()


# BV, num_warps and num_stages of each kernel, by BK: chosen from the registers, the spilled
# stack and the shared memory of the kernels compiled for sm_90 (benchmarks/triton_resources.py;
# docs/triton.md has the table), so that every kernel fits an H100's 227 KiB of shared memory
# a block and spills little under Triton 3.9 (3.6 asks 280 KiB of dqkvbg at K = 128 with
# 16-bit inputs: a refused launch, retried with one stage). Not timed on a GPU yet
# (benchmarks/gpu_memory.py --tiles). The kernels that loop over the chunks (state, dhu) take
# narrow value tiles for more programs at small B*H; dqkvbg takes them to hold fewer
# accumulators. A GPU that refuses a launch for its shared memory gets one stage (_launch),
# then the chunked tier.
_TILES: dict[str, dict[int, tuple[int, int, int]]] = {
    "prepare": {64: (64, 4, 2), 128: (64, 4, 2)},
    "state": {64: (32, 4, 2), 128: (32, 4, 2)},
    "o": {64: (64, 4, 2), 128: (64, 4, 2)},
    "dhu": {64: (32, 4, 2), 128: (32, 8, 2)},
    "dqkvbg": {64: (32, 8, 2), 128: (32, 8, 2)},
}


class _Launch:
    """Sizes and block shapes shared by the kernels of one call."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> None:
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.C = chunk_size
        self.N = -(-self.T // chunk_size)
        self.BK = max(16, triton.next_power_of_2(self.K))
        self.BH = self.B * self.H
        self.precision = dot_precision(q.dtype)

    def tiles(self, kernel: str) -> tuple[int, dict[str, Any]]:
        """The number of value tiles and the launch's keyword arguments for `kernel`."""
        bv, warps, stages = _TILES[kernel][max(64, self.BK)]
        bv = min(bv, max(16, triton.next_power_of_2(self.V)))
        return triton.cdiv(self.V, bv), {
            "H": self.H, "K": self.K, "V": self.V, "C": self.C, "BK": self.BK, "BV": bv,
            "PRECISION": self.precision, "num_warps": warps, "num_stages": stages}


def _prepare_and_state(n: _Launch, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       G: torch.Tensor | None, h0: torch.Tensor | None, store_ai: bool,
                       store_ht: bool) -> tuple[torch.Tensor | None, ...]:
    """Ai (or None), w = M diag(e^G) K, the states entering each chunk h, the writes U and the
    final state (or None)."""
    u = _buffer((n.B, n.T, n.H, n.V), k)
    w = _buffer((n.B, n.T, n.H, n.K), k)
    Ai = _buffer((n.B, n.T, n.H, n.C), k) if store_ai else None
    _launch(delta_rule_fwd_kernel_prepare, (n.N, n.BH),
            k, v, beta, G, u, w, Ai, n.T, USE_G=G is not None, STORE_AI=store_ai,
            **n.tiles("prepare")[1])
    h = _buffer((n.BH, n.N, n.K, n.V), k)
    U = _buffer((n.B, n.T, n.H, n.V), k)
    ht = _buffer((n.B, n.H, n.K, n.V), k) if store_ht else None
    NV, tiles = n.tiles("state")
    _launch(delta_rule_fwd_kernel_state, (NV, n.BH),
            k, u, w, G, h0, h, U, ht, n.T, n.N, USE_G=G is not None, USE_H0=h0 is not None,
            STORE_HT=store_ht, **tiles)
    return Ai, w, h, U, ht


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
             beta: torch.Tensor, scale: float, h0: torch.Tensor | None, output_final_state: bool,
             chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        return _forward_kernels(q, k, v, g, beta, scale, h0, output_final_state, chunk_size)
    except OutOfResources as error:  # raised at a launch, before that kernel runs
        _no_room(error, "forward")
        with torch.no_grad():
            return _chunked(q, k, v, g, beta, scale, h0, output_final_state, chunk_size)


def _forward_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                     beta: torch.Tensor, scale: float, h0: torch.Tensor | None,
                     output_final_state: bool, chunk_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    h0 = None if h0 is None else h0.contiguous()
    n = _Launch(q, v, chunk_size)
    G = None if g is None else chunk_local_cumsum(g, chunk_size)
    _, _, h, U, ht = _prepare_and_state(n, k, v, beta, G, h0, False, output_final_state)
    o = torch.empty_like(v, dtype=q.dtype)
    if POISON_BUFFERS:
        o.fill_(float("nan"))
    NV, tiles = n.tiles("o")
    _launch(delta_rule_fwd_kernel_o, (NV, n.N, n.BH),
            q, k, U, h, G, o, scale, n.T, n.N, USE_G=G is not None, **tiles)
    return o, ht


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
              beta: torch.Tensor, scale: float, h0: torch.Tensor | None, chunk_size: int,
              do: torch.Tensor, dht: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """dq, dk, dv, dg (None without g), dbeta, dh0 (None without h0), each in its input's
    dtype."""
    try:
        return _backward_kernels(q, k, v, g, beta, scale, h0, chunk_size, do, dht)
    except OutOfResources as error:  # raised at a launch, before that kernel runs
        _no_room(error, "backward")
    # the chunked tier's gradients: torch.func.vjp (autograd is off inside a custom op)
    xs = {name: x for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta),
                                  ("h0", h0)) if x is not None}

    def chunked(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = dict(zip(xs, args))
        o, ht = _chunked(a["q"], a["k"], a["v"], a.get("g"), a["beta"], scale, a.get("h0"),
                         dht is not None, chunk_size)
        return (o,) if ht is None else (o, ht)

    vjp = torch.func.vjp(chunked, *xs.values())[1]
    d = dict(zip(xs, vjp((do,) if dht is None else (do, dht))))
    return d["q"], d["k"], d["v"], d.get("g"), d["beta"], d.get("h0")


def _backward_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      g: torch.Tensor | None, beta: torch.Tensor, scale: float,
                      h0: torch.Tensor | None, chunk_size: int, do: torch.Tensor,
                      dht: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """_backward by the kernels: the chunk-local quantities and the states are recomputed from
    the inputs."""
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    h0 = None if h0 is None else h0.contiguous()
    do = do.contiguous()
    dht = None if dht is None else dht.contiguous()
    n = _Launch(q, v, chunk_size)
    G = None if g is None else chunk_local_cumsum(g, chunk_size)
    Ai, w, h, U, _ = _prepare_and_state(n, k, v, beta, G, h0, True, False)
    dh = _buffer((n.BH, n.N, n.K, n.V), q)
    dU = _buffer((n.B, n.T, n.H, n.V), q)
    dh0 = None if h0 is None else _buffer((n.B, n.H, n.K, n.V), q)
    NV, tiles = n.tiles("dhu")
    _launch(delta_rule_bwd_kernel_dhu, (NV, n.BH),
            q, k, w, G, do, dht, dh, dU, dh0, scale, n.T, n.N, USE_G=G is not None,
            USE_DHT=dht is not None, STORE_DH0=h0 is not None, **tiles)
    # the kernel writes the gradients in their inputs' dtypes (no float32 copy to cast)
    dq, dk, dv, dbeta = (_buffer(tuple(x.shape), q, x.dtype) for x in (q, k, v, beta))
    dg = None if g is None else _buffer(tuple(g.shape), q)
    _launch(delta_rule_bwd_kernel_dqkvbg, (n.N, n.BH),
            q, k, v, beta, G, Ai, h, dh, U, dU, do, dq, dk, dv, dbeta, dg, scale, n.T, n.N,
            USE_G=G is not None, **n.tiles("dqkvbg")[1])
    return (dq, dk, dv, None if dg is None or g is None else dg.to(g.dtype), dbeta,
            None if dh0 is None or h0 is None else dh0.to(h0.dtype))


# The kernels as torch.library custom ops (nestc::delta_rule_fwd / _bwd), so that
# torch.compile traces around them: a fake implementation gives the shapes, and the backward
# is registered as an op too. A custom op cannot return None, so "no final state" and "no
# gradient" travel as empty tensors (NONE) and become None again outside.

def _none(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return like.new_empty(shape, dtype=dtype)


def _or_none(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None or x.numel() == 0 and x.dim() == 1 else x


@torch.library.custom_op("nestc::delta_rule_fwd", mutates_args=())
def delta_rule_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                   beta: torch.Tensor, scale: float, initial_state: torch.Tensor | None,
                   output_final_state: bool, chunk_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """o and the final state (an empty tensor without output_final_state)."""
    o, ht = _forward(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    return o, ht if ht is not None else _none((0,), q, torch.float32)


@delta_rule_fwd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
      beta: torch.Tensor, scale: float, initial_state: torch.Tensor | None,
      output_final_state: bool, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = q.new_empty((B, T, H, V))
    return o, _none((B, H, K, V) if output_final_state else (0,), q, torch.float32)


@torch.library.custom_op("nestc::delta_rule_bwd", mutates_args=())
def delta_rule_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                   beta: torch.Tensor, scale: float, initial_state: torch.Tensor | None,
                   chunk_size: int, do: torch.Tensor, dht: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor]:
    """dq, dk, dv, dg, dbeta, dh0 (dg and dh0 empty when g or the initial state is None)."""
    grads = _backward(q, k, v, g, beta, scale, initial_state, chunk_size, do, dht)
    dq, dk, dv, dg, dbeta, dh0 = grads
    assert dq is not None and dk is not None and dv is not None and dbeta is not None
    return (dq, dk, dv, dg if dg is not None else _none((0,), q, q.dtype), dbeta,
            dh0 if dh0 is not None else _none((0,), q, q.dtype))


@delta_rule_bwd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
      beta: torch.Tensor, scale: float, initial_state: torch.Tensor | None, chunk_size: int,
      do: torch.Tensor, dht: torch.Tensor | None
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                 torch.Tensor]:
    # contiguous, as the kernels' gradients are (empty_like kept an input's strides)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            g.new_empty(g.shape) if g is not None else _none((0,), q, q.dtype),
            beta.new_empty(beta.shape),
            initial_state.new_empty(initial_state.shape) if initial_state is not None
            else _none((0,), q, q.dtype))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    q, k, v, g, beta, scale, h0, _, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0)
    ctx.scale, ctx.chunk_size = scale, chunk_size


def _autograd_backward(ctx: Any, do: torch.Tensor, dht: torch.Tensor | None
                       ) -> tuple[torch.Tensor | None, ...]:
    q, k, v, g, beta, h0 = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: this backward is differentiated again
        from nestc.ops.delta_rule.chunk import chunk_delta_rule
        from nestc.ops.gated_delta_rule.chunk import chunk_gated_delta_rule

        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                    beta: torch.Tensor, h0: torch.Tensor | None
                    ) -> tuple[torch.Tensor | None, ...]:
            if g is None:
                return chunk_delta_rule(q, k, v, beta, ctx.scale, h0, dht is not None)
            return chunk_gated_delta_rule(q, k, v, g, beta, ctx.scale, h0, dht is not None)

        dq, dk, dv, dg, dbeta, dh0 = recomputed_vjp(forward, (q, k, v, g, beta, h0),
                                                    (do, _or_none(dht)))
        return dq, dk, dv, dg, dbeta, None, dh0, None, None
    dq, dk, dv, dg, dbeta, dh0 = delta_rule_bwd(q, k, v, g, beta, ctx.scale, h0,
                                                ctx.chunk_size, do, _or_none(dht))
    return (dq, dk, dv, _or_none(dg) if g is not None else None, dbeta, None,
            _or_none(dh0) if h0 is not None else None, None, None)


delta_rule_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# triton.jit picks the interpreter when a kernel is defined (TRITON_INTERPRET=1 at import)
INTERPRETED = not isinstance(delta_rule_fwd_kernel_o, triton.runtime.jit.JITFunction)
if INTERPRETED:
    mend_interpreter()


def delta_rule_with_triton(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           g: torch.Tensor | None, beta: torch.Tensor, scale: float | None,
                           initial_state: torch.Tensor | None, output_final_state: bool,
                           chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The delta rule (gated when g is not None) through the kernels above; `op` names the
    caller in errors. Inputs are taken as checked by `check_delta_rule_inputs`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if q.dtype == torch.float64:
        raise ValueError(f"{op}: the Triton kernels compute in float32; use the chunked back "
                         "end for float64 inputs")
    if K > MAX_K:
        raise ValueError(f"{op}: the Triton kernels hold a whole key in registers, so K must "
                         f"be at most {MAX_K}, got {K}; use the chunked back end")
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"{op}: the Triton kernels take chunk_size up to {MAX_CHUNK}, got "
                         f"{chunk_size} (the result does not depend on it)")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{op}: the Triton kernels need CUDA tensors, got {q.device}; set "
                         "TRITON_INTERPRET=1 before triton is imported to run them on the CPU")
    scale = K ** -0.5 if scale is None else float(scale)
    if T == 0 or q.numel() == 0 or v.numel() == 0:  # (B, H or V of 0: nothing to compute)
        S0 = (q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None
              else initial_state.float().clone())  # (a copy, as the chunked tier's)
        return v.new_zeros(B, T, H, V), (S0 if output_final_state else None)
    o, ht = delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state,
                           chunk_size)
    return o, _or_none(ht)


def triton_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                      scale: float | None = None, initial_state: torch.Tensor | None = None,
                      output_final_state: bool = True, chunk_size: int = 64,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments and results as `chunk_delta_rule` (float32, bfloat16 or float16 inputs,
    K <= 128, chunk_size <= 64), on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1."""
    return delta_rule_with_triton("triton_delta_rule", q, k, v, None, beta, scale,
                                  initial_state, output_final_state, chunk_size)
