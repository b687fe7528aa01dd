"""
CODER kernels in Triton
=======================

Three kernels behind ``nolabels.ops.coder``:

``topk_similarity`` — exact top-k by cosine / inner product
    Grid (row blocks, key splits). A program owns BLOCK_N query rows and one
    contiguous split of the keys, computes (BLOCK_N, BLOCK_M) similarity tiles
    with ``tl.dot`` (no normalised copy of either matrix: the tile is scaled by
    1/|q| and 1/|k| afterwards; key norms are accumulated in the same D loop),
    and keeps a running top-KP list (KP = next power of two >= k) in registers.
    Each (value, index) is packed into one int64 whose order is the result
    order: the float's bits mapped to an order-preserving int32 in the high
    word, and 2^32-1-index in the low word (so equal values prefer the lower
    index). Merging a tile is then ``tl.topk(tile, KP)`` followed by a
    ``tl.topk`` of the running list joined with it; a tile whose maximum does
    not beat any row's current k-th best is skipped after one reduction. The
    (N, splits, KP) partial lists are merged on the host with ``torch.topk``
    on the packed int64s (O(N·k·splits) memory, never (N, M)).
    Non-finite inputs: a query row or key with NaN/Inf gets similarity +inf,
    so the result holds a non-finite value and the caller raises. So does
    (with normalize) a row with |x|^2 >= 2^64, whose raw products might
    overflow; the op then recomputes from unit rows (see _SS_LIMIT).

``coder_class_scores`` — CODER's mean-of-kind-0 + max-of-kind-1 per class
    The host folds the text bank (``prepare_class_bank(padded=True)``): scaled
    kind-0 sums S0 (C, D) and the scaled kind-1 texts in a slot layout
    (P, C, D) with per-class counts n1. A program owns (BLOCK_N rows, BLOCK_C
    classes): acc0 = x·S0ᵀ, then for each slot p a tile x·PAD[p]ᵀ enters a
    running max where p < n1_c. Output = (acc0 + max) / |x| (the positive row
    factor commutes with the max).

``coder_affinity`` — cosine of CODER vectors through the Gram matrix
    One generic NT-GEMM kernel with optional row, column and reduction-axis
    scale vectors computes G = T̂ᵀT̂ (reduction over the texts, scale 1/|t|²),
    U = diag(1/|x|) X G, V = diag(1/|y|) Y G, and out = diag(1/|x̂G|) U Ŷᵀ
    diag(1/|ŷG|); the norms |x̂T̂ᵀ|² = <U_i, x̂_i> come from a row-dot kernel.

All float32 products use ``input_precision="ieee"`` (no TF32: these are exact
selections and scores). float16/bfloat16 tiles are multiplied natively into a
float32 accumulator, except under ``TRITON_INTERPRET=1``, where triton 3.8
computes ``tl.dot`` on bfloat16 wrongly: tiles are upcast to float32 there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nolabels.triton._common import NORM_EPS, device_guard, dot, interpreted, upcast_bf16

_INT64_MIN: tl.constexpr = tl.constexpr(-9223372036854775808)
_LOW_MASK: tl.constexpr = tl.constexpr(4294967295)  # 2^32 - 1
# Cosine kernels multiply raw rows and normalise afterwards: exact while every
# |row|^2 < 2^64 (then every sum is below D * 2^64, far from float32's 2^128). A row
# beyond (float32/bfloat16 only) is reported like a non-finite one and the op
# recomputes it from float32 unit rows normalised on the host (scale-safe).
_SS_LIMIT: tl.constexpr = tl.constexpr(18446744073709551616.0)  # 2^64


# =========================================================================== helpers
@triton.jit
def _pack(val, idx):
    """(float32 value, int32 index) -> int64 ordered by (value desc, index asc)."""
    bits = val.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (_LOW_MASK - idx.to(tl.int64))


@triton.jit
def _row_inv_norm_kernel(X, OUT, R, D, stride_r, stride_d, SQUARE: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[r] = 1 / max(|x_r|, eps) (or its square); NaN for a non-finite row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_r + dd[None, :] * stride_d,
                    mask=ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(ss), NORM_EPS)
    if SQUARE:
        inv = inv * inv
    inv = tl.where(ss < float("inf"), inv, float("nan"))
    tl.store(OUT + rows, inv, mask=ok)


def _row_inv_norm(x: torch.Tensor, square: bool = False) -> torch.Tensor:
    r, d = x.shape
    out = torch.empty((r,), dtype=torch.float32, device=x.device)
    if r:
        br, bd = 32, min(128, triton.next_power_of_2(max(d, 16)))
        _row_inv_norm_kernel[(triton.cdiv(r, br),)](
            x, out, r, d, x.stride(0), x.stride(1), SQUARE=square, BLOCK_R=br, BLOCK_D=bd)
    return out


# =========================================================================== top-k
@triton.jit
def _topk_kernel(
    Q, K, OUT,  # (N, D), (M, D) any strides; OUT (N, S, KP) int64 packed
    N, M, D, m_per_split,
    stride_qn, stride_qd, stride_km, stride_kd,
    NORMALIZE: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    S: tl.constexpr,
    IS_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = Q + rows.to(tl.int64)[:, None] * stride_qn

    ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        x = tl.load(q_rows + dd[None, :] * stride_qd,
                    mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    if NORMALIZE:
        q_bad = ~(ss < _SS_LIMIT)  # NaN or Inf in the row, or out of the raw range
        q_fac = 1.0 / tl.maximum(tl.sqrt(ss), NORM_EPS)
    else:
        q_bad = ~(ss < float("inf"))  # NaN or Inf anywhere in the row (or overflow)
        q_fac = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)

    col = tl.arange(0, KP)
    run = tl.full((BLOCK_N, KP), _INT64_MIN, dtype=tl.int64)
    kth = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # k-th best value so far
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_hi
        k_cols = K + offs_m.to(tl.int64)[None, :] * stride_km
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        kss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            x = tl.load(q_rows + dd[None, :] * stride_qd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            kt = tl.load(k_cols + dd[:, None] * stride_kd,
                         mask=d_ok[:, None] & m_ok[None, :], other=0.0)
            ktf = kt.to(tl.float32)
            kss += tl.sum(ktf * ktf, axis=0)
            acc = dot(x, kt, acc, IS_FP32, UPCAST)
        sim = acc * q_fac[:, None]
        if NORMALIZE:
            sim = sim * (1.0 / tl.maximum(tl.sqrt(kss), NORM_EPS))[None, :]
            k_bad = ~(kss < _SS_LIMIT)
        else:
            k_bad = ~(kss < float("inf"))
        sim = tl.where(q_bad[:, None] | k_bad[None, :] | (sim != sim), float("inf"), sim)  # noqa: PLR0124
        sim = tl.where(m_ok[None, :], sim, float("-inf"))
        tmax = tl.max(sim, axis=1)
        if tl.max((tmax > kth).to(tl.int32), axis=0) > 0:
            packed = _pack(sim, offs_m)
            packed = tl.where(m_ok[None, :], packed, _INT64_MIN)
            cand = tl.topk(packed, KP, dim=1)
            run = tl.topk(tl.reshape(tl.join(run, cand), (BLOCK_N, 2 * KP)), KP, dim=1)
            # value of column TOPK-1 (the k-th best; -inf while unfilled)
            kcol = tl.sum(tl.where((col == TOPK - 1)[None, :], run, 0), axis=1)
            kkey = (kcol >> 32).to(tl.int32)
            kbits = tl.where(kkey >= 0, kkey, kkey ^ 0x7FFFFFFF)
            kth = tl.where(kcol == _INT64_MIN, float("-inf"), kbits.to(tl.float32, bitcast=True))
    out = OUT + rows.to(tl.int64)[:, None] * (S * KP) + pid_s * KP + col[None, :]
    tl.store(out, run, mask=row_ok[:, None])


def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (packed >> 32).to(torch.int32)
    bits = torch.where(key >= 0, key, key ^ 0x7FFFFFFF)
    values = bits.view(torch.float32)
    indices = 4294967295 - (packed & 4294967295)
    return values, indices


_TOPK_INTERPRET_META = {"BLOCK_N": 16, "BLOCK_D": 32, "num_warps": 4}


def topk_meta(kp: int) -> dict:
    """GPU launch parameters of ``_topk_kernel`` for a padded list width ``kp``.

    BLOCK_M >= KP because each key tile contributes a top-KP candidate list.
    Checked by ahead-of-time compilation for sm_80/sm_90 (tests/triton_aot.py).
    """
    return {"BLOCK_N": 32 if kp <= 64 else 16, "BLOCK_M": max(64, kp), "BLOCK_D": 32,
            "num_warps": 4 if kp <= 64 else 8, "num_stages": 2}


def topk_similarity_triton(
    queries: torch.Tensor, keys: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``nolabels.ops.topk_similarity`` (k <= 256).

    Returns values (N, k) float32 descending and indices (N, k) int64; among
    equal values the lower index comes first. Memory: the (N, splits, KP)
    packed partial lists, splits chosen to fill the GPU (1 under the
    interpreter unless M is large).
    """
    n, d = queries.shape
    m = keys.shape[0]
    if not 1 <= k <= min(m, 256):
        raise ValueError(f"topk_similarity_triton: k={k} not in [1, min(M={m}, 256)]")
    dev = queries.device
    if n == 0:
        return (torch.empty((0, k), dtype=torch.float32, device=dev),
                torch.empty((0, k), dtype=torch.int64, device=dev))
    kp = max(16, triton.next_power_of_2(k))
    if interpreted(_topk_kernel):
        meta = dict(_TOPK_INTERPRET_META)
        meta["BLOCK_M"] = max(32, kp)
        block_n = meta["BLOCK_N"]
        splits = max(1, min(4, triton.cdiv(m, 4 * meta["BLOCK_M"])))
    else:
        meta = topk_meta(kp)
        block_n = meta["BLOCK_N"]
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        want = max(1, (4 * sms) // triton.cdiv(n, block_n))
        splits = max(1, min(want, triton.cdiv(m, 4 * meta["BLOCK_M"])))
    m_per_split = triton.cdiv(triton.cdiv(m, splits), meta["BLOCK_M"]) * meta["BLOCK_M"]
    splits = triton.cdiv(m, m_per_split)
    part = torch.empty((n, splits, kp), dtype=torch.int64, device=dev)
    grid = (triton.cdiv(n, block_n), splits)
    args = (queries, keys, part, n, m, d, m_per_split,
            queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1))
    flags = {"NORMALIZE": bool(normalize), "TOPK": int(k), "KP": kp, "S": splits,
             "IS_FP32": queries.dtype == torch.float32,
             "UPCAST": upcast_bf16(_topk_kernel, queries.dtype)}
    with device_guard(queries):
        _topk_kernel[grid](*args, **flags, **meta)
    best = part.view(n, splits * kp).topk(k, dim=1).values  # packed order = result order
    return _unpack(best)


# =========================================================================== class scores
@triton.jit
def _scores_kernel(
    X, S0, PAD, N1, OUT,  # X (N, D) any strides; S0 (C, D), PAD (P, C, D) f32 contiguous
    N, C, D, P,
    stride_xn, stride_xd,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # 1-D grid, row blocks fastest (the order of the former (rows, classes) grid)
    pid = tl.program_id(0)
    n_n = tl.cdiv(N, BLOCK_N)
    pid_c = pid // n_n
    pid_n = pid - pid_c * n_n
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cls = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cls < C
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xn

    ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        x = tl.load(x_rows + dd[None, :] * stride_xd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
        w = tl.load(S0 + cls.to(tl.int64)[None, :] * D + dd[:, None],
                    mask=d_ok[:, None] & c_ok[None, :], other=0.0)
        acc0 = tl.dot(x, w, acc0, input_precision="ieee")
    n1 = tl.load(N1 + cls, mask=c_ok, other=0)
    mx = tl.full((BLOCK_N, BLOCK_C), float("-inf"), dtype=tl.float32)
    for p in range(P):
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            x = tl.load(x_rows + dd[None, :] * stride_xd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(PAD + (p * C + cls.to(tl.int64))[None, :] * D + dd[:, None],
                        mask=d_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision="ieee")
        mx = tl.where((p < n1)[None, :], tl.maximum(mx, acc), mx)
    mx = tl.where((n1 > 0)[None, :], mx, 0.0)
    fac = 1.0 / tl.maximum(tl.sqrt(ss), NORM_EPS)
    out = (acc0 + mx) * fac[:, None]
    # NaN: a non-finite row, or one out of the raw GEMM's range (the op recomputes it).
    out = tl.where((ss < _SS_LIMIT)[:, None], out, float("nan"))
    tl.store(OUT + rows.to(tl.int64)[:, None] * C + cls[None, :], out,
             mask=row_ok[:, None] & c_ok[None, :])


# GPU launch parameters (fixed: float32 "ieee" dots, the kernel is memory/latency bound).
SCORES_META = {"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 3}
_SCORES_INTERPRET_META = {"BLOCK_N": 16, "BLOCK_C": 16, "BLOCK_D": 32, "num_warps": 4}


def scores_grid(n: int, c: int, meta: dict) -> tuple[int]:
    """Grid of ``_scores_kernel``: one program per (row block, class block), on axis 0."""
    return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(c, meta["BLOCK_C"]),)


def mm_nt_grid(r: int, cn: int, meta: dict) -> tuple[int]:
    """Grid of ``_mm_nt_kernel``: one program per (row block, column block), on axis 0."""
    return (triton.cdiv(r, meta["BLOCK_R"]) * triton.cdiv(cn, meta["BLOCK_C"]),)


def coder_class_scores_triton(
    image: torch.Tensor, sums: torch.Tensor, seg: torch.Tensor, pad: torch.Tensor
) -> torch.Tensor:
    """Triton backend of ``nolabels.ops.coder_class_scores``.

    Args:
        image: (N, D) float32/float16/bfloat16, any strides.
        sums: (C, D) float32, scaled kind-0 sums (``prepare_class_bank`` rows 0..C-1).
        seg: (C + 1,) int64 kind-1 segment offsets (gives n1 per class).
        pad: (P, C, D) float32 scaled kind-1 texts in slot layout.

    Returns:
        (N, C) float32 scores; NaN rows for non-finite image rows.
    """
    n, d = image.shape
    c = sums.shape[0]
    out = torch.empty((n, c), dtype=torch.float32, device=image.device)
    if n == 0:
        return out
    n1 = (seg[1:] - seg[:-1]).contiguous()
    p = int(n1.max()) if c else 0
    sums = sums.contiguous()
    pad = pad.contiguous()
    meta = _SCORES_INTERPRET_META if interpreted(_scores_kernel) else SCORES_META
    grid = scores_grid(n, c, meta)
    args = (image, sums, pad, n1, out, n, c, d, p, image.stride(0), image.stride(1))
    with device_guard(image):
        _scores_kernel[grid](*args, **meta)
    return out


# =========================================================================== affinity
@triton.jit
def _mm_nt_kernel(
    A, B, OUT, RS, CS, KS,  # OUT[r, c] = RS[r] CS[c] sum_k A[r, k] KS[k] B[c, k]
    R, Cn, Kd,
    stride_ar, stride_ak, stride_bc, stride_bk,
    HAS_RS: tl.constexpr,
    HAS_CS: tl.constexpr,
    HAS_KS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 1-D grid, row blocks fastest (the order of the former (rows, columns) grid)
    pid = tl.program_id(0)
    n_r = tl.cdiv(R, BLOCK_R)
    pid_c = pid // n_r
    pid_r = pid - pid_c * n_r
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rr < R
    c_ok = cc < Cn
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < Kd
        a = tl.load(A + rr.to(tl.int64)[:, None] * stride_ar + kk.to(tl.int64)[None, :] * stride_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if HAS_KS:
            ks = tl.load(KS + kk, mask=k_ok, other=0.0)
            a = a * ks[None, :]
        b = tl.load(B + cc.to(tl.int64)[None, :] * stride_bc + kk.to(tl.int64)[:, None] * stride_bk,
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    if HAS_RS:
        acc = acc * tl.load(RS + rr, mask=r_ok, other=0.0)[:, None]
    if HAS_CS:
        acc = acc * tl.load(CS + cc, mask=c_ok, other=0.0)[None, :]
    tl.store(OUT + rr.to(tl.int64)[:, None] * Cn + cc[None, :], acc, mask=r_ok[:, None] & c_ok[None, :])


MM_META = {"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
_MM_INTERPRET_META = {"BLOCK_R": 16, "BLOCK_C": 16, "BLOCK_K": 32, "num_warps": 4}


def _mm_nt(a, a_strides, b, b_strides, r, cn, kd, rs=None, cs=None, ks=None):
    out = torch.empty((r, cn), dtype=torch.float32, device=a.device)
    if r == 0 or cn == 0:
        return out
    meta = _MM_INTERPRET_META if interpreted(_mm_nt_kernel) else MM_META
    dummy = out
    grid = mm_nt_grid(r, cn, meta)
    _mm_nt_kernel[grid](
        a, b, out,
        rs if rs is not None else dummy, cs if cs is not None else dummy, ks if ks is not None else dummy,
        r, cn, kd, a_strides[0], a_strides[1], b_strides[0], b_strides[1],
        HAS_RS=rs is not None, HAS_CS=cs is not None, HAS_KS=ks is not None, **meta,
    )
    return out


@triton.jit
def _rowdot_kernel(U, X, XF, OUT, R, D, stride_xr, stride_xd,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[r] = 1 / max(sqrt(max(XF[r] <U_r, X_r>, 0)), eps), U (R, D) f32 contiguous."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (dd < D)[None, :]
        u = tl.load(U + rows.to(tl.int64)[:, None] * D + dd[None, :], mask=m, other=0.0)
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xr + dd[None, :] * stride_xd,
                    mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(u * x, axis=1)
    xf = tl.load(XF + rows, mask=ok, other=0.0)
    q = tl.maximum(acc * xf, 0.0)
    tl.store(OUT + rows, 1.0 / tl.maximum(tl.sqrt(q), NORM_EPS), mask=ok)


def _inv_coder_norm(u: torch.Tensor, x: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
    r, d = x.shape
    out = torch.empty((r,), dtype=torch.float32, device=x.device)
    if r:
        bd = min(128, triton.next_power_of_2(max(d, 16)))
        _rowdot_kernel[(triton.cdiv(r, 32),)](u, x, xf, out, r, d, x.stride(0), x.stride(1),
                                              BLOCK_R=32, BLOCK_D=bd)
    return out


def coder_affinity_triton(x: torch.Tensor, y: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Triton backend of ``nolabels.ops.coder_affinity``: (N, K) float32.

    Memory: G (D, D), U (N, D), V (K, D) and the output; no (N, M) or (K, M).
    """
    n, d = x.shape
    kk = y.shape[0]
    m = text.shape[0]

    def run():
        w = _row_inv_norm(text, square=True)  # 1/|t|^2 per text
        # G = T^T diag(w) T: A = B = T^T, i.e. A[a, j] = T[j, a].
        g = _mm_nt(text, (text.stride(1), text.stride(0)), text, (text.stride(1), text.stride(0)),
                   d, d, m, ks=w)
        xf = _row_inv_norm(x)
        yf = _row_inv_norm(y)
        u = _mm_nt(x, x.stride(), g, g.stride(), n, d, d, rs=xf)  # x̂ G
        v = _mm_nt(y, y.stride(), g, g.stride(), kk, d, d, rs=yf)  # ŷ G
        inx = _inv_coder_norm(u, x, xf)  # 1 / |x̂ T̂ᵀ|
        iny = _inv_coder_norm(v, y, yf)
        out = _mm_nt(u, u.stride(), y, y.stride(), n, kk, d, rs=inx, cs=iny * yf)
        return out.clamp_(-1.0, 1.0)

    if n == 0 or kk == 0:
        return torch.empty((n, kk), dtype=torch.float32, device=x.device)
    with device_guard(x):
        return run()
