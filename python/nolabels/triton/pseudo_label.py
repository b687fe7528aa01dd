"""
Fused pseudo-labeling in Triton
===============================

For image rows x_i (N, D) and class rows w_c (C, D) the op needs, per image,
the softmax over the C logits

    s_ic = scale * <x_i / max(|x_i|, eps), w_c / max(|w_c|, eps)>     (normalize=True)
    s_ic = scale * <x_i, w_c>                                          (normalize=False)

but only four things of it: the top-k probabilities and classes, the entropy
and the log-sum-exp. The (N, C) logits are never written anywhere: each
program owns BLOCK_N image rows and streams over the classes in BLOCK_C
tiles, as a GEMM whose epilogue is an online softmax (flash-attention style)
plus a running top-k kept in registers.

Why it is laid out like this:

* Normalisation commutes with the dot product, so the GEMM runs on the RAW
  inputs (no normalised copy of either matrix is ever made) and each tile is
  scaled afterwards by 1/|x_i| * 1/|w_c| * scale. The image norms are computed
  once per program; the class norms are accumulated in the same D loop as the
  dot product (the class tile is in registers anyway). For float16 inputs this
  is also more accurate than normalising first: fp16 x fp16 products are exact
  in the float32 accumulator.
* Online softmax with entropy: with running max m, s = sum exp(x - m) and
  t = sum exp(x - m) (x - m), a new max m' rescales s by a = exp(m - m') and t
  to a (t + s (m - m')). At the end lse = m + log s and entropy = log s - t/s.
* Running top-k: an unsorted (BLOCK_N, KPAD) list of values and class indices
  whose smallest value is the current k-th, ``kth``. Per tile, while some row
  of the block has a tile maximum above its kth, every such row swaps its
  tile maximum in for its kth and masks the taken element out of the tile.
  A row inserts at most TOPK elements per tile and a row that fails once
  fails for the rest of the tile (its tile maxima only decrease, its kth only
  rises), so the loop runs at most TOPK times, and zero times (one scalar
  test, on the tile max the softmax needed anyway) for the common tile that
  has nothing to offer once the list has filled up. The list is sorted once,
  at the end.
* Ties prefer the lower class index everywhere: tiles arrive in increasing
  class order, an element enters only if strictly greater than the kth, the
  eviction picks the largest index among equal values, and within a tile and
  in the final sort the smallest index among equal values is taken first.
* Non-finite image rows are detected in the norm pre-pass (|x| < inf fails
  for NaN and Inf); their logits are replaced by 0 so that no NaN flows
  through the max/top-k logic, and their lse and entropy are set to NaN at
  the end (the caller raises on a non-finite lse).
* float32 inputs use ``input_precision="ieee"`` (no TF32): the op is an
  exact argmax/selection, and TF32's 10-bit mantissa would flip labels.
  float16/bfloat16 use the native tensor-core dot with a float32 accumulator.
  Under ``TRITON_INTERPRET=1`` triton 3.8 computes tl.dot on bfloat16
  operands wrongly (they are stored as uint16 and multiplied as integers), so
  bfloat16 tiles are upcast to float32 there (the UPCAST flag).

Memory: beyond its inputs and the (N, topk) / (N,) outputs the op allocates
nothing in global memory; each program holds O(BLOCK_N * BLOCK_C +
BLOCK_N * BLOCK_D + BLOCK_D * BLOCK_C + BLOCK_N * KPAD) values in registers.

Range (normalize=True): the GEMM runs on the raw rows, which is exact as long
as no sum of squares or dot product overflows float32. That is guaranteed when
|x|^2 < 2^64 for every image and class row (all sums are then below D * 2^64).
A row beyond (max-abs entry near 2^32 or more: float32 or bfloat16 rows only)
is reported like a non-finite row, with NaN lse and entropy, and a class
beyond makes every row NaN; ``nolabels.ops.pseudo_label`` then recomputes
those rows from float32 unit rows normalised on the host (scale-safe,
``reference.normalize``), so the op matches float64 for every finite input.
The test costs one compare per row and per class: the common path is unchanged.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nolabels.triton._common import NORM_EPS, device_guard, dot, interpreted, upcast_bf16

_BIG: tl.constexpr = tl.constexpr(2147483647)  # int32 max: "no index" sentinel in index reductions
# normalize=True: a row with |x|^2 >= 2^64 (max-abs entry possibly >= 2^32) could
# overflow float32 in the raw GEMM; |x|^2 < 2^64 for both operands bounds every
# sum by D * 2^64 (see "Range" in the module docstring).
_SS_LIMIT: tl.constexpr = tl.constexpr(18446744073709551616.0)  # 2^64


@triton.jit
def _fwd(
    X, W,  # (N, D), (C, D) inputs, same dtype, any strides
    P, I, H, L,  # outputs: probs (N, TOPK) f32, classes (N, TOPK) i64, entropy (N,), lse (N,)
    N, C, D,
    stride_xn, stride_xd, stride_wc, stride_wd,
    scale,
    NORMALIZE: tl.constexpr,
    TOPK: tl.constexpr,  # k, 1..16
    KPAD: tl.constexpr,  # power of two >= max(TOPK, 2): width of the register top-k list
    IS_FP32: tl.constexpr,  # float32 inputs: exact (ieee) dot, no TF32
    UPCAST: tl.constexpr,  # interpreter + bfloat16: dot in float32 (see module docstring)
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    # int64 row offsets: N * stride can exceed 2^31 for large embedding sets.
    x_rows = X + offs_n.to(tl.int64)[:, None] * stride_xn

    # ---- pre-pass over the block's image rows: squared norms and finiteness.
    ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    nonfinite = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        x = tl.load(x_rows + dd.to(tl.int64)[None, :] * stride_xd,
                    mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
        # |x| < inf is false for NaN and +-Inf; an overflowing ss would not be.
        nonfinite = tl.maximum(nonfinite, tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1))
    bad = nonfinite > 0
    if NORMALIZE:
        # Out of the raw GEMM's range (or overflowed): reported like a non-finite
        # row (NaN lse); the op recomputes it from a float32 unit row.
        bad = bad | ~(ss < _SS_LIMIT)
        # scale folded into the image factor: one multiply less per logit.
        x_fac = scale / tl.maximum(tl.sqrt(ss), NORM_EPS)
    else:
        x_fac = tl.zeros((BLOCK_N,), dtype=tl.float32) + scale

    # ---- running softmax statistics and top-k list.
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    col = tl.arange(0, KPAD)
    real = (col < TOPK)[None, :]
    # Real slots start at -inf with distinct negative sentinel indices (so the
    # eviction always finds exactly one slot); padding slots hold +inf so they
    # are never the minimum, and are dropped at the end.
    zeros_k = tl.zeros((BLOCK_N, KPAD), dtype=tl.int32)
    topv = tl.where(real, float("-inf"), float("inf")) + tl.zeros((BLOCK_N, KPAD), dtype=tl.float32)
    topi = tl.where(real, (col - KPAD)[None, :] + zeros_k, _BIG)
    kth = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    big_class = tl.zeros((BLOCK_N,), dtype=tl.int1)  # a class out of the raw GEMM's range

    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        # Class tile loaded as (BLOCK_D, BLOCK_C): the dot's B operand directly.
        w_cols = W + offs_c.to(tl.int64)[None, :] * stride_wc
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        wss = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            x = tl.load(x_rows + dd.to(tl.int64)[None, :] * stride_xd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_cols + dd.to(tl.int64)[:, None] * stride_wd,
                        mask=d_ok[:, None] & c_ok[None, :], other=0.0)
            if NORMALIZE:
                wf = w.to(tl.float32)
                wss += tl.sum(wf * wf, axis=0)
            acc = dot(x, w, acc, IS_FP32, UPCAST)
        if NORMALIZE:
            w_fac = 1.0 / tl.maximum(tl.sqrt(wss), NORM_EPS)
            logit = acc * x_fac[:, None] * w_fac[None, :]
            # Such a class (|w|^2 >= 2^64, possible in float32/bfloat16) spoils every
            # row: their lse is set to NaN below and the op recomputes them.
            w_big = ~(wss < _SS_LIMIT)
            big_class = big_class | (tl.max(w_big.to(tl.int32), axis=0) > 0)
            logit = tl.where(w_big[None, :], 0.0, logit)
        else:
            logit = acc * x_fac[:, None]
        logit = tl.where(bad[:, None], 0.0, logit)
        logit = tl.where(c_ok[None, :], logit, float("-inf"))

        # -- online softmax + entropy. Padded classes are -inf, and
        # exp(-inf) * (-inf) would be 0 * -inf = NaN: their z is set to 0 and
        # their e to 0 instead.
        tmax = tl.max(logit, axis=1)
        m_new = tl.maximum(m, tmax)
        alpha = tl.exp(m - m_new)
        shift = tl.where(s > 0, m - m_new, 0.0)  # m = -inf only while s = 0
        z = tl.where(c_ok[None, :], logit - m_new[:, None], 0.0)
        e = tl.where(c_ok[None, :], tl.exp(z), 0.0)
        ez = e * z
        t = alpha * (t + s * shift) + tl.sum(ez, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

        # -- top-k merge: see the module docstring. tidx = lowest class index
        # attaining the row's tile max (explicit, not tl.argmax's tie rule).
        cidx = offs_c[None, :]
        tidx = tl.min(tl.where(logit == tmax[:, None], cidx, _BIG), axis=1)
        it = tl.full((), 0, dtype=tl.int32)
        while (tl.max((tmax > kth).to(tl.int32), axis=0) > 0) & (it < TOPK):
            ins = tmax > kth
            # evict the k-th: smallest value, among equals the largest index
            ev = tl.max(tl.where(topv == kth[:, None], topi, -_BIG), axis=1)
            hit = ins[:, None] & (topi == ev[:, None])
            topv = tl.where(hit, tmax[:, None], topv)
            topi = tl.where(hit, tidx[:, None], topi)
            kth = tl.min(topv, axis=1)
            logit = tl.where(cidx == tidx[:, None], float("-inf"), logit)
            tmax = tl.max(logit, axis=1)
            tidx = tl.min(tl.where(logit == tmax[:, None], cidx, _BIG), axis=1)
            it += 1

    # ---- epilogue: statistics, then sort the list (value desc, index asc).
    log_s = tl.log(s)
    lse = m + log_s
    ent = log_s - t / s
    bad = bad | big_class
    lse = tl.where(bad, float("nan"), lse)
    ent = tl.where(bad, float("nan"), ent)
    tl.store(L + offs_n, lse, mask=row_ok)
    tl.store(H + offs_n, ent, mask=row_ok)

    vals = tl.where(real, topv, float("-inf"))
    out_v = tl.zeros((BLOCK_N, KPAD), dtype=tl.float32)
    out_i = zeros_k
    for j in tl.static_range(TOPK):
        v = tl.max(vals, axis=1)
        i = tl.min(tl.where(vals == v[:, None], topi, _BIG), axis=1)
        out_v = tl.where((col == j)[None, :], v[:, None], out_v)
        out_i = tl.where((col == j)[None, :], i[:, None], out_i)
        vals = tl.where(topi == i[:, None], float("-inf"), vals)
    probs = tl.exp(out_v - lse[:, None])
    out_off = offs_n.to(tl.int64)[:, None] * TOPK + col[None, :]
    out_mask = row_ok[:, None] & real
    tl.store(P + out_off, probs, mask=out_mask)
    tl.store(I + out_off, out_i.to(tl.int64), mask=out_mask)


# Interpreter: one small fixed config (it is slow and there is nothing to tune).
_INTERPRET_META = {"BLOCK_N": 16, "BLOCK_C": 16, "BLOCK_D": 32, "num_warps": 4}


def _make(shapes):
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_C": bc, "BLOCK_D": bd}, num_warps=w, num_stages=st)
        for bn, bc, bd, w, st in shapes
    ]


# (BLOCK_N, BLOCK_C, BLOCK_D, num_warps, num_stages). The top-k list and the
# softmax state live in registers next to the (BLOCK_N, BLOCK_C) accumulator,
# so the tiles stay moderate. The float32 "ieee" dot runs on FMA units and
# holds its operand slices in registers: with BLOCK_D = 32 or 64 most shapes
# spilled 0.4-3 KB per thread (ptxas -v, sm_90), hence its own list. Checked offline with ptxas for sm_90:
# none of these spills more than ~0.4 KB per thread.
_CONFIGS_F32 = _make([
    (32, 32, 16, 4, 2),
    (32, 64, 16, 4, 3),
    (64, 32, 16, 4, 3),
    (64, 64, 16, 8, 3),
    (64, 128, 16, 8, 3),
    (128, 64, 16, 8, 3),
])
_CONFIGS_LOWP = _make([  # float16 / bfloat16: tensor-core dot
    (32, 32, 32, 4, 2),
    (32, 64, 64, 4, 3),
    (64, 64, 32, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 128, 32, 8, 3),
    (64, 128, 64, 8, 3),
    (128, 64, 32, 8, 3),
    (128, 64, 64, 8, 3),
])


def _prune(configs, named_args, **kwargs):
    """Keep the configs of the input dtype whose tiles are not far larger than C and D."""
    # The two lists are told apart by BLOCK_D: 16 for float32, >= 32 otherwise.
    f32 = named_args["X"].dtype == torch.float32
    mine = [c for c in configs if (c.kwargs["BLOCK_D"] == 16) == f32]
    c_cap = max(32, triton.next_power_of_2(named_args["C"]))
    d_cap = max(32, triton.next_power_of_2(named_args["D"]))
    kept = [c for c in mine if c.kwargs["BLOCK_C"] <= c_cap and c.kwargs["BLOCK_D"] <= d_cap]
    return kept or mine[:1]


# Autotuned per (C, D, TOPK, dtypes); N only sets the grid.
_fwd_tuned = None if interpreted(_fwd) else triton.autotune(
    configs=_CONFIGS_F32 + _CONFIGS_LOWP, key=["C", "D", "TOPK"], prune_configs_by={"early_config_prune": _prune},
)(_fwd)


def pseudo_label_triton(
    image: torch.Tensor,
    cls: torch.Tensor,
    scale: float,
    topk: int,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused pseudo-labels (Triton backend of ``nolabels.ops.pseudo_label``).

    Args:
        image: (N, D) float32/float16/bfloat16, any strides, N >= 0. CUDA
            tensor, or CPU tensor under ``TRITON_INTERPRET=1``.
        cls: (C, D), same dtype and device as ``image``, any strides, C >= 1.
        scale: logit scale (multiplies the cosines / inner products).
        topk: 1 <= topk <= min(C, 16).
        normalize: L2-normalise rows (eps 1e-12; zero rows give uniform
            probabilities) or use raw inner products.

    Returns:
        probs (N, topk) float32 descending, classes (N, topk) int64 (ties:
        lower class index first), entropy (N,) float32, lse (N,) float32.
        A row of ``image`` with NaN/Inf, or with normalize and |x|^2 >= 2^64
        (or every row, if a class has |w|^2 >= 2^64), gets NaN lse and entropy.

    Memory: only the outputs are allocated; the kernel keeps O(tile) state
    in registers and never forms the (N, C) logits.
    """
    if image.dim() != 2 or cls.dim() != 2 or image.shape[1] != cls.shape[1]:
        raise ValueError(f"pseudo_label_triton: bad shapes {tuple(image.shape)}, {tuple(cls.shape)}")
    if image.dtype != cls.dtype:
        raise ValueError(f"pseudo_label_triton: dtype mismatch {image.dtype} vs {cls.dtype}")
    if image.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"pseudo_label_triton: unsupported dtype {image.dtype}")
    n, d = image.shape
    c = cls.shape[0]
    if not 1 <= topk <= min(c, 16):
        raise ValueError(f"pseudo_label_triton: topk={topk} not in [1, min(C={c}, 16)]")
    dev = image.device
    probs = torch.empty((n, topk), dtype=torch.float32, device=dev)
    classes = torch.empty((n, topk), dtype=torch.int64, device=dev)
    entropy = torch.empty((n,), dtype=torch.float32, device=dev)
    lse = torch.empty((n,), dtype=torch.float32, device=dev)
    if n == 0:
        return probs, classes, entropy, lse

    args = (
        image, cls, probs, classes, entropy, lse,
        n, c, d,
        image.stride(0), image.stride(1), cls.stride(0), cls.stride(1),
        float(scale),
    )
    flags = dict(
        NORMALIZE=bool(normalize),
        TOPK=int(topk),
        KPAD=max(2, triton.next_power_of_2(int(topk))),
        IS_FP32=image.dtype == torch.float32,
        UPCAST=upcast_bf16(_fwd, image.dtype),
    )
    if interpreted(_fwd):
        grid = (triton.cdiv(n, _INTERPRET_META["BLOCK_N"]),)
        _fwd[grid](*args, **flags, **_INTERPRET_META)
    else:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        with device_guard(image):
            _fwd_tuned[grid](*args, **flags)
    return probs, classes, entropy, lse
