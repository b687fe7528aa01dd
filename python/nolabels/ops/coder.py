"""CODER kernels: exact top-k similarity, CODER zero-shot class scores, CODER affinity.

* :func:`topk_similarity` — exact brute-force top-k by cosine (or inner product),
  streaming over the keys: O(tile + N·k) working memory, k up to 1024, M up to 10^6.
* :func:`coder_class_scores` — CODER's zero-shot "heuristic classifier"
  (methods.md §5.4) without the (N, M) cosine matrix: the kind-0 mean is one GEMM
  against per-class *sums* of text vectors (a mean of dot products is the dot
  product with the mean); the kind-1 max is a GEMM against the kind-1 texts,
  reduced per class segment tile by tile.
* :func:`coder_affinity` — cosine between CODER vectors normalize(x̂Tᵀ) and
  normalize(ŷTᵀ) (methods.md §5.6) through the D×D Gram matrix G = T̂ᵀT̂:
  (x̂T̂ᵀ)·(ŷT̂ᵀ) = x̂ G ŷᵀ and |x̂T̂ᵀ|² = x̂ G x̂ᵀ, so O(D²) per row instead of O(M·D).

Backends: ``torch`` (the float64-capable reference, chunked), ``cpu`` (C++
library), ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1`` for tests),
``cuda`` (C++/CUDA library). See each function for what the fused backends keep
in memory.
"""
from __future__ import annotations

import torch

from nolabels.backends import (
    ANY_DEVICE,
    CUDA_MIN_CAPABILITY,
    TRITON_MIN_CAPABILITY,
    BackendImpl,
    BackendName,
    define_op,
    lazy,
    library,
)
from nolabels.ops._validate import (
    SUPPORTED_DTYPES,
    all_finite,
    check_finite_scalar,
    check_float_tensor,
    check_index_vector,
    check_int_in,
    check_nonzero_dim,
    check_rows_match,
    raise_if_nonfinite,
)
from nolabels.reference.coder import (
    coder_affinity_reference,
    coder_class_scores_reference,
    topk_similarity_reference,
)
from nolabels.reference.normalize import normalize_rows, unit_big_rows

TRITON_MAX_K = 256  # the Triton kernel keeps its running top-k in registers
CUDA_MAX_K = 1024  # CUDA: warp select in registers up to k = 256, block select in shared memory beyond
_TRITON = "nolabels.triton.coder"
# Kept as names of this module (tests and callers use them).
_all_finite = all_finite
_raise_if_nonfinite = raise_if_nonfinite


# Scale-safe normalisation. The fused backends (triton, cuda) multiply raw rows and
# normalise afterwards, which is exact while no sum of squares or dot product
# overflows float32: guaranteed for rows with max-abs entry below 2^32. Rows beyond
# (float32/bfloat16 entries up to 3e38) are either reported by the kernels (NaN
# results, recomputed below with those rows made unit vectors) or made unit vectors
# before the call (coder_affinity, whose finiteness check reads every input anyway):
# reference.normalize.unit_big_rows, exact at any magnitude, and a no-op for the
# cosines (a unit row normalises to itself; rows below eps are left alone).
_RAW_LIMIT = 2.0**32


def _check_finite_is_big(op: str, name: str, t: torch.Tensor) -> bool:
    """Raise if ``t`` has NaN/Inf; return whether an entry reaches 2^32. One reduction."""
    if t.numel() == 0:
        return False
    if bool(torch.linalg.vector_norm(t, ord=float("inf")) < _RAW_LIMIT):  # NaN compares False
        return False
    raise_if_nonfinite(op, **{name: t})
    return True


def _redo_rows(bad: torch.Tensor, outs: tuple[torch.Tensor, ...], run, rows: torch.Tensor, *args) -> None:
    """Recompute rows ``bad`` (bool (N,)) of ``outs`` as ``run(unit_big_rows(rows[bad]), *args)``."""
    idx = bad.nonzero().flatten()
    new = run(unit_big_rows(rows.index_select(0, idx)), *args)
    for out, n in zip(outs, new if isinstance(new, tuple) else (new,)):
        out.index_copy_(0, idx, n)


# =========================================================================== top-k
# run: (queries (N, D), keys (M, D) same dtype, k, normalize) -> (values (N, k) f32,
# indices (N, k) i64); non-finite values where an input is non-finite or out of a fused
# kernel's raw range.
TOPK = define_op("topk_similarity", (
    BackendImpl("cuda", library("topk_similarity"), devices=("cuda",), dtypes=SUPPORTED_DTYPES,
                min_capability=CUDA_MIN_CAPABILITY, needs=("library",), max={"k": CUDA_MAX_K}),
    BackendImpl("triton", lazy(_TRITON, "topk_similarity_triton"), devices=("cuda",),
                dtypes=SUPPORTED_DTYPES, min_capability=TRITON_MIN_CAPABILITY, needs=("triton",),
                max={"k": TRITON_MAX_K}),
    BackendImpl("cpu", library("topk_similarity"), devices=("cpu",), dtypes=SUPPORTED_DTYPES,
                needs=("library",)),
    BackendImpl("torch", topk_similarity_reference, devices=(ANY_DEVICE,), dtypes=SUPPORTED_DTYPES),
))
TOPK_IMPLS: tuple[BackendImpl, ...] = TOPK.backends


def _topk_fake(queries, keys, k, normalize, backend):
    n = queries.shape[0]
    return (
        queries.new_empty((n, k), dtype=torch.float32),
        queries.new_empty((n, k), dtype=torch.int64),
    )


@TOPK.custom_op(fake=_topk_fake)
def _topk_op(
    queries: torch.Tensor, keys: torch.Tensor, k: int, normalize: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    run = TOPK.backend(backend).run
    values, indices = run(queries, keys, k, normalize)
    if not all_finite(values):
        # Every backend turns a non-finite query row, or any non-finite key,
        # into NaN values; the input scans run only on this error path.
        raise_if_nonfinite("topk_similarity", queries=queries, keys=keys)
        if normalize:
            # Finite rows out of the fused kernels' raw range (see _RAW_LIMIT):
            # recompute the affected query rows against float32 unit keys.
            bad = (~torch.isfinite(values)).any(dim=1)
            _redo_rows(bad, (values, indices), run, queries, unit_big_rows(keys), k, True)
            if all_finite(values):
                return values, indices
        raise ValueError(
            "topk_similarity: similarities overflowed float32 (normalize=False with very "
            "large embeddings)"
        )
    return values, indices


def topk_similarity(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    normalize: bool = True,
    backend: BackendName = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact brute-force top-k nearest keys by cosine similarity (or inner product).

    Args:
        queries: (N, D) float32/float16/bfloat16, any strides; N may be 0.
        keys: (M, D), M >= 1, same device; cast to ``queries.dtype`` if different.
        k: 1 <= k <= M (``cpu``: any such k; ``cuda``: k <= 1024; ``triton``: k <= 256).
        normalize: cosine similarity (rows L2-normalised, eps 1e-12: a zero row has
            similarity 0 with everything; rows of any finite magnitude, up to 3e38,
            normalise as in float64) or raw inner product (``False``).
        backend: "auto" | "torch" | "cpu" | "triton" | "cuda".

    Returns:
        ``values (N, k)`` float32, descending, and ``indices (N, k)`` int64 into
        ``keys``. Exact up to float32 rounding of the similarities; among equal
        similarities the ``cpu`` and ``cuda`` backends return the lower index first.

    Raises:
        ValueError: wrong shapes/dtypes/devices, M = 0, k outside [1, M], NaN/Inf
            inputs, or a backend that cannot take the call.

    Memory and speed (cpu): keys are streamed in tiles; beyond the outputs the op
    holds a normalised copy of at most 8192 query rows and one key tile, never the
    (N, M) similarities. On CPUs with AVX512-BF16 it ranks each tile with a
    bfloat16 GEMM and re-scores in float32 every key whose approximate score is
    within a rigorous error bound of the running k-th best, so the result is the
    same as an all-float32 search (``NOLABELS_TOPK_FILTER=off`` disables this).
    """
    op = "topk_similarity"
    check_float_tensor(op, "queries", queries, 2)
    check_float_tensor(op, "keys", keys, 2)
    check_rows_match(op, "queries", queries, "keys", keys)
    check_nonzero_dim(op, queries)
    m = keys.shape[0]
    if m == 0:
        raise ValueError(f"{op}: keys is empty (M = 0)")
    check_int_in(op, "k", k, 1, m, "M")
    if keys.dtype != queries.dtype:
        keys = keys.to(queries.dtype)
    call = {"device": queries.device, "dtype": queries.dtype, "k": k}
    impl = TOPK.select(backend, call)
    return _topk_op(queries, keys, int(k), bool(normalize), impl.name)


# =========================================================================== class scores
def prepare_class_bank(
    text_emb: torch.Tensor,
    text_class: torch.Tensor,
    text_kind: torch.Tensor,
    num_classes: int,
    scale: float,
    padded: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fold CODER's per-class mean / max into one float32 weight matrix.

    With w_c = scale / (n0_c + [n1_c > 0]) (positive), the score is
    ``x̂ · (w_c Σ_{kind 0} t̂_j) + max_{kind 1} x̂ · (w_c t̂_j)`` (max commutes with a
    positive factor). Returns:

    * ``bank`` (C + M1, D) float32: rows 0..C-1 the scaled kind-0 sums (zero for a
      class without kind-0 texts), rows C.. the scaled kind-1 texts sorted by class;
    * ``seg`` (C + 1,) int64 offsets of each class's kind-1 rows (relative to row C);
    * with ``padded``: ``pad`` (P, C, D) float32, the kind-1 rows laid out as
      [slot, class] with P = max n1_c (zeros in unused slots; ``seg`` tells which
      are used), for kernels that loop over slots (Triton). Else None.
    """
    t = normalize_rows(text_emb.float())  # scale-safe: texts with entries up to 3e38
    cls = text_class.to(device=t.device, dtype=torch.int64)
    kind = text_kind.to(device=t.device, dtype=torch.int64)
    c = num_classes
    is1 = kind == 1
    cls0, cls1 = cls[~is1], cls[is1]
    n0 = torch.bincount(cls0, minlength=c)
    n1 = torch.bincount(cls1, minlength=c)
    w = float(scale) / (n0 + (n1 > 0).to(n0.dtype)).clamp_min(1).to(torch.float32)
    sums = torch.zeros((c, t.shape[1]), dtype=torch.float32, device=t.device)
    sums.index_add_(0, cls0, t[~is1])
    order = torch.argsort(cls1, stable=True)
    cls1 = cls1[order]
    ones = t[is1][order] * w[cls1][:, None]
    bank = torch.cat([sums * w[:, None], ones], dim=0)
    seg = torch.zeros(c + 1, dtype=torch.int64, device=t.device)
    seg[1:] = torch.cumsum(n1, 0)
    pad = None
    if padded:
        p = int(n1.max()) if c else 0
        pad = torch.zeros((max(p, 1), c, t.shape[1]), dtype=torch.float32, device=t.device)
        if ones.shape[0]:
            slot = torch.arange(ones.shape[0], device=t.device) - seg[cls1]
            pad[slot, cls1] = ones
    return bank, seg, pad


def _scores_cuda(image, text, tcls, tkind, c, scale):
    bank, seg, _ = prepare_class_bank(text, tcls, tkind, c, scale)
    return torch.ops.nolabels_C.coder_class_scores_bank(image, bank, seg)


def _scores_triton(image, text, tcls, tkind, c, scale):
    from nolabels.triton.coder import coder_class_scores_triton

    bank, seg, pad = prepare_class_bank(text, tcls, tkind, c, scale, padded=True)
    return coder_class_scores_triton(image, bank[:c], seg, pad)


# run: (image (N, D), text (M, D) same dtype, text_class (M,) i64, text_kind (M,) i64,
# num_classes, scale) -> (N, C) f32; NaN rows where an image row is non-finite or out
# of a fused kernel's raw range.
SCORES = define_op("coder_class_scores", (
    BackendImpl("cuda", _scores_cuda, devices=("cuda",), dtypes=SUPPORTED_DTYPES,
                min_capability=CUDA_MIN_CAPABILITY, needs=("library",),
                kernel="coder_class_scores_bank"),
    BackendImpl("triton", _scores_triton, devices=("cuda",), dtypes=SUPPORTED_DTYPES,
                min_capability=TRITON_MIN_CAPABILITY, needs=("triton",)),
    # The C++ op builds its bank itself (one pass over the texts, no torch ops).
    BackendImpl("cpu", library("coder_class_scores"), devices=("cpu",), dtypes=SUPPORTED_DTYPES,
                needs=("library",)),
    BackendImpl("torch", coder_class_scores_reference, devices=(ANY_DEVICE,), dtypes=SUPPORTED_DTYPES),
))
SCORES_IMPLS: tuple[BackendImpl, ...] = SCORES.backends


def _scores_fake(image_emb, text_emb, text_class, text_kind, num_classes, scale, backend):
    return image_emb.new_empty((image_emb.shape[0], num_classes), dtype=torch.float32)


@SCORES.custom_op(fake=_scores_fake)
def _scores_op(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_class: torch.Tensor,
    text_kind: torch.Tensor,
    num_classes: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    op = "coder_class_scores"
    # Value checks (they read data) live here, not in the traced wrapper.
    if text_class.numel():
        lo, hi = int(text_class.min()), int(text_class.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{op}: text_class values must be in [0, {num_classes}), got [{lo}, {hi}]")
        bad_kind = (text_kind != 0) & (text_kind != 1)
        if bool(bad_kind.any()):
            v = text_kind[bad_kind][:5].tolist()
            raise ValueError(f"{op}: text_kind must be 0 (attribute/analogous) or 1 (name/synonym), got {v}")
    counts = torch.bincount(text_class.to(torch.int64), minlength=num_classes)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{op}: classes {empty}... have no texts (every class needs at least one)")
    raise_if_nonfinite(op, text_emb=text_emb)
    run = SCORES.backend(backend).run
    out = run(image_emb, text_emb, text_class, text_kind, num_classes, scale)
    if not all_finite(out):
        raise_if_nonfinite(op, image_emb=image_emb)
        # Finite image rows out of the fused kernels' raw range (NaN scores):
        # recompute them from float32 unit rows (see _RAW_LIMIT).
        bad = (~torch.isfinite(out)).any(dim=1)
        _redo_rows(bad, (out,), run, image_emb, text_emb, text_class, text_kind, num_classes, scale)
        if not all_finite(out):
            raise ValueError(f"{op}: scores overflowed float32 (scale={scale})")
    return out


def coder_class_scores(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_class: torch.Tensor,
    text_kind: torch.Tensor,
    num_classes: int,
    *,
    scale: float = 100.0,
    backend: BackendName = "auto",
) -> torch.Tensor:
    """CODER zero-shot scores (methods.md §5.4), never forming the (N, M) cosines.

    ``score[i, c] = scale · mean({cos(x_i, t_j) : j kind 0 of c} ∪ {max_{j kind 1 of c} cos(x_i, t_j)})``

    Kind 0 = attribute and analogous-class texts, kind 1 = the class name and its
    synonyms (only their max enters the mean). A class without kind-1 texts
    averages its kind-0 cosines; one without kind-0 texts scores its kind-1 max.

    Args:
        image_emb: (N, D) float32/float16/bfloat16, any strides; N may be 0.
        text_emb: (M, D), M >= 1, same device, in any order (not grouped by class).
        text_class: (M,) integer (int64), class of each text, in [0, num_classes).
        text_kind: (M,) integer, 0 or 1 (see above).
        num_classes: C >= 1; every class needs at least one text.
        scale: positive, finite (CODER uses 100).
        backend: "auto" | "torch" | "cpu" | "triton" | "cuda".

    Returns:
        (N, C) float32 scores; prediction = argmax over classes. Image and text
        rows of any finite magnitude (up to 3e38) are normalised as in float64.

    Memory: the fused backends build a (C + M1, D) float32 bank (M1 = number of
    kind-1 texts; Triton: (P, C, D) with P the most kind-1 texts of any class)
    and then stream over image rows; only the (N, C) output is allocated per row.
    The torch backend materialises (rows, M) similarity blocks.
    """
    op = "coder_class_scores"
    check_float_tensor(op, "image_emb", image_emb, 2)
    check_float_tensor(op, "text_emb", text_emb, 2)
    check_rows_match(op, "image_emb", image_emb, "text_emb", text_emb)
    check_nonzero_dim(op, image_emb)
    m = text_emb.shape[0]
    if m == 0:
        raise ValueError(f"{op}: text_emb is empty (M = 0)")
    check_index_vector(op, "text_class", text_class, m, text_emb.device, "text_emb")
    check_index_vector(op, "text_kind", text_kind, m, text_emb.device, "text_emb")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{op}: num_classes must be an int >= 1, got {num_classes!r}")
    check_finite_scalar(op, "scale", scale, positive=True)
    if text_emb.dtype != image_emb.dtype:
        text_emb = text_emb.to(image_emb.dtype)
    call = {"device": image_emb.device, "dtype": image_emb.dtype}
    impl = SCORES.select(backend, call)
    return _scores_op(
        image_emb, text_emb, text_class.to(torch.int64), text_kind.to(torch.int64),
        int(num_classes), float(scale), impl.name,
    )


# =========================================================================== affinity
# run: (x (N, D), y (K, D), text (M, D), one dtype) -> (N, K) f32.
AFFINITY = define_op("coder_affinity", (
    BackendImpl("cuda", library("coder_affinity"), devices=("cuda",), dtypes=SUPPORTED_DTYPES,
                min_capability=CUDA_MIN_CAPABILITY, needs=("library",)),
    BackendImpl("triton", lazy(_TRITON, "coder_affinity_triton"), devices=("cuda",),
                dtypes=SUPPORTED_DTYPES, min_capability=TRITON_MIN_CAPABILITY, needs=("triton",)),
    BackendImpl("cpu", library("coder_affinity"), devices=("cpu",), dtypes=SUPPORTED_DTYPES,
                needs=("library",)),
    BackendImpl("torch", coder_affinity_reference, devices=(ANY_DEVICE,), dtypes=SUPPORTED_DTYPES),
))
AFFINITY_IMPLS: tuple[BackendImpl, ...] = AFFINITY.backends


def _affinity_fake(x, y, text_emb, backend):
    return x.new_empty((x.shape[0], y.shape[0]), dtype=torch.float32)


@AFFINITY.custom_op(fake=_affinity_fake)
def _affinity_op(x: torch.Tensor, y: torch.Tensor, text_emb: torch.Tensor, backend: str) -> torch.Tensor:
    # One max-abs reduction per input: raises on NaN/Inf, and an input with entries
    # >= 2^32 goes in as float32 unit rows (what every backend computes from it
    # anyway, here without overflow; see _RAW_LIMIT).
    args = []
    for name, t in (("x", x), ("y", y), ("text_emb", text_emb)):
        args.append(unit_big_rows(t) if _check_finite_is_big("coder_affinity", name, t) else t)
    return AFFINITY.backend(backend).run(*args)


def coder_affinity(
    x: torch.Tensor,
    y: torch.Tensor,
    text_emb: torch.Tensor,
    *,
    backend: BackendName = "auto",
) -> torch.Tensor:
    """Cosine between CODER vectors: ``normalize(x̂ T̂ᵀ) · normalize(ŷ T̂ᵀ)`` (methods.md §5.6).

    Computed through the Gram matrix G = T̂ᵀT̂ (D×D): x̂ G ŷᵀ / sqrt(x̂ G x̂ᵀ · ŷ G ŷᵀ),
    O(M·D² + (N + K)·D² + N·K·D) instead of O((N + K)·M·D + N·K·M).

    Args:
        x: (N, D) float32/float16/bfloat16 (e.g. test images); N may be 0.
        y: (K, D), same device (e.g. the few-shot cache keys); K may be 0.
        text_emb: (M, D) text bank, M >= 1. ``y`` and ``text_emb`` are cast to
            ``x.dtype`` if different.
        backend: "auto" | "torch" | "cpu" | "triton" | "cuda".

    Returns:
        (N, K) float32 in [-1, 1]. A row whose CODER vector is zero (a zero
        embedding) has affinity 0 with everything. Rows of any finite magnitude
        (up to 3e38) are normalised as in float64: an input with entries >= 2^32
        enters the backend as float32 unit rows (one extra pass over it).

    Numerics: |x̂T̂ᵀ|² is evaluated as x̂ G x̂ᵀ in float32, accurate to about
    D·2^-24·|x̂|²·|G| absolute; rows nearly orthogonal to every text (CODER
    vector norm < ~1e-3) lose relative precision. Working memory of the fused
    backends: G plus (N + K)·D, never (N, M) or (K, M).
    """
    op = "coder_affinity"
    check_float_tensor(op, "x", x, 2)
    check_float_tensor(op, "y", y, 2)
    check_float_tensor(op, "text_emb", text_emb, 2)
    check_rows_match(op, "x", x, "y", y)
    check_rows_match(op, "x", x, "text_emb", text_emb)
    check_nonzero_dim(op, x)
    if text_emb.shape[0] == 0:
        raise ValueError(f"{op}: text_emb is empty (M = 0)")
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if text_emb.dtype != x.dtype:
        text_emb = text_emb.to(x.dtype)
    call = {"device": x.device, "dtype": x.dtype}
    impl = AFFINITY.select(backend, call)
    return _affinity_op(x, y, text_emb, impl.name)

