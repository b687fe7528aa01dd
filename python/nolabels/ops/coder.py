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

import math

import torch

from nolabels import _lib  # noqa: F401 - loads the kernel libraries
from nolabels.backends import (
    BackendImpl,
    BackendName,
    dispatch,
    library_cpu_status,
    library_cuda_status,
    reasons_for,
    register_op,
    triton_status,
)
from nolabels.reference.coder import (
    coder_affinity_reference,
    coder_class_scores_reference,
    topk_similarity_reference,
)
from nolabels.reference.normalize import normalize_rows, unit_big_rows

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_K = 256  # the Triton kernel keeps its running top-k in registers
CUDA_MAX_K = 1024  # CUDA: warp select in registers up to k = 256, block select in shared memory beyond


# --------------------------------------------------------------------------- helpers
def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"nolabels_C::{op}", key))
    except RuntimeError:  # the schema is not there: a library built before this op
        return False


# Filled at import (below), so that the check is a dict lookup under torch.compile.
_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def _kernel_status(op: str, key: str, lib_status) -> str | None:
    """None if the compiled library is loaded *and* has ``op``'s kernel for ``key``."""
    why = lib_status()
    if why is not None:
        return why
    has = _HAS_KERNEL.get((op, key))
    if has is None:
        has = _HAS_KERNEL[(op, key)] = _has_kernel(op, key)
    if not has:
        return f"the loaded library has no {key} kernel for {op} (rebuild: scripts/dev_build.sh)"
    return None


def _check_float_matrix(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{op}: {name} has unsupported dtype {t.dtype}; use float32, float16 or bfloat16"
        )


def _check_same(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{op}: D mismatch, {a_name} is {tuple(a.shape)} but {b_name} is {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{op}: {a_name} is on {a.device} but {b_name} is on {b.device}")


def _nonfinite_rows(t: torch.Tensor) -> list[int]:
    return (~torch.isfinite(t)).any(dim=1).nonzero().flatten()[:5].tolist()


def _all_finite(t: torch.Tensor) -> bool:
    """Exact finiteness test, fast path first: any NaN/Inf makes the float32 sum
    non-finite; only if the sum is non-finite (which finite values near float32's
    range can also cause) are the elements tested one by one."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _raise_if_nonfinite(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not _all_finite(t):
            raise ValueError(f"{op}: {name} contains NaN or Inf (rows {_nonfinite_rows(t)}...)")


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
    _raise_if_nonfinite(op, **{name: t})
    return True


def _redo_rows(bad: torch.Tensor, outs: tuple[torch.Tensor, ...], run, rows: torch.Tensor, *args) -> None:
    """Recompute rows ``bad`` (bool (N,)) of ``outs`` as ``run(unit_big_rows(rows[bad]), *args)``."""
    idx = bad.nonzero().flatten()
    new = run(unit_big_rows(rows.index_select(0, idx)), *args)
    for out, n in zip(outs, new if isinstance(new, tuple) else (new,)):
        out.index_copy_(0, idx, n)


# =========================================================================== top-k
def _topk_torch(q, keys, k, normalize):
    return topk_similarity_reference(q, keys, k, normalize)


def _topk_library(q, keys, k, normalize):
    return torch.ops.nolabels_C.topk_similarity(q, keys, k, normalize)


def _topk_triton(q, keys, k, normalize):
    from nolabels.triton.coder import topk_similarity_triton

    return topk_similarity_triton(q, keys, k, normalize)


TOPK_IMPLS: tuple[BackendImpl, ...] = register_op("topk_similarity", (
    BackendImpl("torch", lambda: None, reasons_for("torch"), _topk_torch),
    BackendImpl("cpu", lambda: _kernel_status("topk_similarity", "CPU", library_cpu_status),
                reasons_for("cpu"), _topk_library),
    BackendImpl("triton", triton_status, reasons_for("triton", "k", TRITON_MAX_K), _topk_triton),
    BackendImpl("cuda", lambda: _kernel_status("topk_similarity", "CUDA", library_cuda_status),
                reasons_for("cuda", "k", CUDA_MAX_K), _topk_library),
))
_TOPK_BY_NAME = {b.name: b for b in TOPK_IMPLS}


@torch.library.custom_op("nolabels::topk_similarity", mutates_args=())
def _topk_op(
    queries: torch.Tensor, keys: torch.Tensor, k: int, normalize: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    run = _TOPK_BY_NAME[backend].run
    values, indices = run(queries, keys, k, normalize)
    if not _all_finite(values):
        # Every backend turns a non-finite query row, or any non-finite key,
        # into NaN values; the input scans run only on this error path.
        _raise_if_nonfinite("topk_similarity", queries=queries, keys=keys)
        if normalize:
            # Finite rows out of the fused kernels' raw range (see _RAW_LIMIT):
            # recompute the affected query rows against float32 unit keys.
            bad = (~torch.isfinite(values)).any(dim=1)
            _redo_rows(bad, (values, indices), run, queries, unit_big_rows(keys), k, True)
            if _all_finite(values):
                return values, indices
        raise ValueError(
            "topk_similarity: similarities overflowed float32 (normalize=False with very "
            "large embeddings)"
        )
    return values, indices


@_topk_op.register_fake
def _(queries, keys, k, normalize, backend):
    n = queries.shape[0]
    return (
        queries.new_empty((n, k), dtype=torch.float32),
        queries.new_empty((n, k), dtype=torch.int64),
    )


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
    _check_float_matrix(op, "queries", queries)
    _check_float_matrix(op, "keys", keys)
    _check_same(op, "queries", queries, "keys", keys)
    if queries.shape[1] == 0:
        raise ValueError(f"{op}: embeddings have D = 0")
    m = keys.shape[0]
    if m == 0:
        raise ValueError(f"{op}: keys is empty (M = 0)")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{op}: k must be an int, got {k!r}")
    if not 1 <= k <= m:
        raise ValueError(f"{op}: k must be in [1, M={m}], got {k}")
    if keys.dtype != queries.dtype:
        keys = keys.to(queries.dtype)
    call = {"device": queries.device, "dtype": queries.dtype, "k": k}
    impl = dispatch(op, TOPK_IMPLS, backend, queries.device, call)
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


def _scores_torch(image, text, tcls, tkind, c, scale):
    return coder_class_scores_reference(image, text, tcls, tkind, c, scale)


def _scores_cpu(image, text, tcls, tkind, c, scale):
    # The C++ op builds its bank itself (one pass over the texts, no torch ops).
    return torch.ops.nolabels_C.coder_class_scores(image, text, tcls, tkind, c, scale)


def _scores_cuda(image, text, tcls, tkind, c, scale):
    bank, seg, _ = prepare_class_bank(text, tcls, tkind, c, scale)
    return torch.ops.nolabels_C.coder_class_scores_bank(image, bank, seg)


def _scores_triton(image, text, tcls, tkind, c, scale):
    from nolabels.triton.coder import coder_class_scores_triton

    bank, seg, pad = prepare_class_bank(text, tcls, tkind, c, scale, padded=True)
    return coder_class_scores_triton(image, bank[:c], seg, pad)


SCORES_IMPLS: tuple[BackendImpl, ...] = register_op("coder_class_scores", (
    BackendImpl("torch", lambda: None, reasons_for("torch"), _scores_torch),
    BackendImpl("cpu", lambda: _kernel_status("coder_class_scores", "CPU", library_cpu_status),
                reasons_for("cpu"), _scores_cpu),
    BackendImpl("triton", triton_status, reasons_for("triton"),
                _scores_triton),
    BackendImpl("cuda", lambda: _kernel_status("coder_class_scores_bank", "CUDA", library_cuda_status),
                reasons_for("cuda"), _scores_cuda),
))
_SCORES_BY_NAME = {b.name: b for b in SCORES_IMPLS}


@torch.library.custom_op("nolabels::coder_class_scores", mutates_args=())
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
    _raise_if_nonfinite(op, text_emb=text_emb)
    run = _SCORES_BY_NAME[backend].run
    out = run(image_emb, text_emb, text_class, text_kind, num_classes, scale)
    if not _all_finite(out):
        _raise_if_nonfinite(op, image_emb=image_emb)
        # Finite image rows out of the fused kernels' raw range (NaN scores):
        # recompute them from float32 unit rows (see _RAW_LIMIT).
        bad = (~torch.isfinite(out)).any(dim=1)
        _redo_rows(bad, (out,), run, image_emb, text_emb, text_class, text_kind, num_classes, scale)
        if not _all_finite(out):
            raise ValueError(f"{op}: scores overflowed float32 (scale={scale})")
    return out


@_scores_op.register_fake
def _(image_emb, text_emb, text_class, text_kind, num_classes, scale, backend):
    return image_emb.new_empty((image_emb.shape[0], num_classes), dtype=torch.float32)


def _check_index_vector(op: str, name: str, t, m: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (m,):
        raise ValueError(f"{op}: {name} must have shape ({m},) (one entry per text), got {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{op}: {name} must be an integer tensor (int64), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but text_emb is on {device}")


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
    _check_float_matrix(op, "image_emb", image_emb)
    _check_float_matrix(op, "text_emb", text_emb)
    _check_same(op, "image_emb", image_emb, "text_emb", text_emb)
    if image_emb.shape[1] == 0:
        raise ValueError(f"{op}: embeddings have D = 0")
    m = text_emb.shape[0]
    if m == 0:
        raise ValueError(f"{op}: text_emb is empty (M = 0)")
    _check_index_vector(op, "text_class", text_class, m, text_emb.device)
    _check_index_vector(op, "text_kind", text_kind, m, text_emb.device)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{op}: num_classes must be an int >= 1, got {num_classes!r}")
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"{op}: scale must be positive and finite, got {scale}")
    if text_emb.dtype != image_emb.dtype:
        text_emb = text_emb.to(image_emb.dtype)
    call = {"device": image_emb.device, "dtype": image_emb.dtype}
    impl = dispatch(op, SCORES_IMPLS, backend, image_emb.device, call)
    return _scores_op(
        image_emb, text_emb, text_class.to(torch.int64), text_kind.to(torch.int64),
        int(num_classes), float(scale), impl.name,
    )


# =========================================================================== affinity
def _aff_torch(x, y, text):
    return coder_affinity_reference(x, y, text)


def _aff_library(x, y, text):
    return torch.ops.nolabels_C.coder_affinity(x, y, text)


def _aff_triton(x, y, text):
    from nolabels.triton.coder import coder_affinity_triton

    return coder_affinity_triton(x, y, text)


AFFINITY_IMPLS: tuple[BackendImpl, ...] = register_op("coder_affinity", (
    BackendImpl("torch", lambda: None, reasons_for("torch"), _aff_torch),
    BackendImpl("cpu", lambda: _kernel_status("coder_affinity", "CPU", library_cpu_status),
                reasons_for("cpu"), _aff_library),
    BackendImpl("triton", triton_status, reasons_for("triton"),
                _aff_triton),
    BackendImpl("cuda", lambda: _kernel_status("coder_affinity", "CUDA", library_cuda_status),
                reasons_for("cuda"), _aff_library),
))
_AFF_BY_NAME = {b.name: b for b in AFFINITY_IMPLS}


@torch.library.custom_op("nolabels::coder_affinity", mutates_args=())
def _affinity_op(x: torch.Tensor, y: torch.Tensor, text_emb: torch.Tensor, backend: str) -> torch.Tensor:
    # One max-abs reduction per input: raises on NaN/Inf, and an input with entries
    # >= 2^32 goes in as float32 unit rows (what every backend computes from it
    # anyway, here without overflow; see _RAW_LIMIT).
    args = []
    for name, t in (("x", x), ("y", y), ("text_emb", text_emb)):
        args.append(unit_big_rows(t) if _check_finite_is_big("coder_affinity", name, t) else t)
    return _AFF_BY_NAME[backend].run(*args)


@_affinity_op.register_fake
def _(x, y, text_emb, backend):
    return x.new_empty((x.shape[0], y.shape[0]), dtype=torch.float32)


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
    _check_float_matrix(op, "x", x)
    _check_float_matrix(op, "y", y)
    _check_float_matrix(op, "text_emb", text_emb)
    _check_same(op, "x", x, "y", y)
    _check_same(op, "x", x, "text_emb", text_emb)
    if x.shape[1] == 0:
        raise ValueError(f"{op}: embeddings have D = 0")
    if text_emb.shape[0] == 0:
        raise ValueError(f"{op}: text_emb is empty (M = 0)")
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if text_emb.dtype != x.dtype:
        text_emb = text_emb.to(x.dtype)
    call = {"device": x.device, "dtype": x.dtype}
    impl = dispatch(op, AFFINITY_IMPLS, backend, x.device, call)
    return _affinity_op(x, y, text_emb, impl.name)


# The kernel libraries are loaded (nolabels._lib, imported above); record which ops they have.

for _op in ("topk_similarity", "coder_class_scores", "coder_class_scores_bank", "coder_affinity"):
    for _key in ("CPU", "CUDA"):
        _HAS_KERNEL[(_op, _key)] = _has_kernel(_op, _key)
