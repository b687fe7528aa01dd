"""Fused cosine-similarity pseudo-labeling and NoLA's per-class selection.

``pseudo_label`` computes, for every image, the softmax over classes of
``logit_scale * cos(image, class)`` and keeps only what label-free methods
need: the top-k classes and probabilities, the entropy and the log-sum-exp.
The fused backends (cpu, triton, cuda) never materialise the (N, C) logits.
"""
from __future__ import annotations

from typing import NamedTuple

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
from nolabels.errors import InputError
from nolabels.ops._validate import (
    SUPPORTED_DTYPES,
    check_finite_scalar,
    check_float_tensor,
    check_int_in,
    check_nonzero_dim,
    check_same_device,
    check_same_dim,
    nonfinite_rows,
    raise_if_nonfinite,
)
from nolabels.reference.normalize import unit_big_rows
from nolabels.reference.pseudo_label import pseudo_label_reference

TRITON_MAX_TOPK = 16  # the Triton kernel keeps its running top-k in registers
CUDA_MAX_TOPK = 16  # likewise for the CUDA kernel (kernels/pseudo_label.cuh kPseudoLabelMaxTopk)
CUDA_MAX_DIM = 2**31 - 1  # the CUDA kernel indexes C and D in int32


class PseudoLabels(NamedTuple):
    """Result of :func:`pseudo_label`. N rows, ``k = topk``.

    Attributes:
        labels: (N,) int64, the arg-max class (``classes[:, 0]``).
        probs: (N, k) float32, softmax probabilities of the top-k classes, descending.
        classes: (N, k) int64, the top-k class indices (exactly equal logits:
            the fused backends put the lower index first; the torch backend
            follows ``torch.topk``).
        entropy: (N,) float32, entropy (nats) of the softmax over all C classes.
        lse: (N,) float32, log-sum-exp of the scaled logits.
    """

    labels: torch.Tensor
    probs: torch.Tensor
    classes: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor

    def take(self, index: torch.Tensor) -> PseudoLabels:
        """Rows ``index`` (int64 (S,) or bool (N,)) of every field."""
        return PseudoLabels(*(t[index] for t in self))


class Selection(NamedTuple):
    """Result of :func:`select_per_class`: S selected rows.

    Attributes:
        indices: (S,) int64 row indices (or the given ``row_ids``), ordered by
            label, then confidence descending, then index.
        labels: (S,) int64 pseudo-label of each selected row.
    """

    indices: torch.Tensor
    labels: torch.Tensor


# --------------------------------------------------------------------------- backends
# Each run: (image (N, D), cls (C, D) same dtype, scale, topk, normalize) ->
# (probs (N, k) f32, classes (N, k) i64, entropy (N,) f32, lse (N,) f32); a row it
# cannot compute (non-finite, or out of a fused kernel's raw range) gets a NaN lse.
# Priority order: auto takes the first that can run the call.
PSEUDO_LABEL = define_op("pseudo_label", (
    BackendImpl("cuda", library("pseudo_label"), devices=("cuda",), dtypes=SUPPORTED_DTYPES,
                min_capability=CUDA_MIN_CAPABILITY, needs=("library",),
                max={"topk": CUDA_MAX_TOPK, "D": CUDA_MAX_DIM, "C": CUDA_MAX_DIM}),
    BackendImpl("triton", lazy("nolabels.triton.pseudo_label", "pseudo_label_triton"),
                devices=("cuda",), dtypes=SUPPORTED_DTYPES, min_capability=TRITON_MIN_CAPABILITY,
                needs=("triton",), max={"topk": TRITON_MAX_TOPK}),
    BackendImpl("cpu", library("pseudo_label"), devices=("cpu",), dtypes=SUPPORTED_DTYPES,
                needs=("library",)),
    BackendImpl("torch", pseudo_label_reference, devices=(ANY_DEVICE,), dtypes=SUPPORTED_DTYPES),
))
BACKEND_IMPLS: tuple[BackendImpl, ...] = PSEUDO_LABEL.backends


# --------------------------------------------------------------------------- custom op
def _fake(image_emb, class_emb, logit_scale, topk, normalize, backend):
    n = image_emb.shape[0]
    dev = image_emb.device
    return (
        image_emb.new_empty((n, topk), dtype=torch.float32),
        image_emb.new_empty((n, topk), dtype=torch.int64),
        torch.empty((n,), dtype=torch.float32, device=dev),
        torch.empty((n,), dtype=torch.float32, device=dev),
    )


@PSEUDO_LABEL.custom_op(fake=_fake)
def _pseudo_label_op(
    image_emb: torch.Tensor,
    class_emb: torch.Tensor,
    logit_scale: float,
    topk: int,
    normalize: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Value checks live here, not in the traced wrapper: they read data, and
    # inside torch.compile this body runs eagerly as one opaque node.
    raise_if_nonfinite("pseudo_label", class_emb=class_emb)
    run = PSEUDO_LABEL.backend(backend).run
    probs, classes, entropy, lse = run(image_emb, class_emb, logit_scale, topk, normalize)
    if lse.numel() and not bool(torch.isfinite(lse).all()):
        # Each backend turns a non-finite input row into a NaN lse; the input
        # scan below runs only on this error path.
        if not bool(torch.isfinite(image_emb).all()):
            raise ValueError(
                f"pseudo_label: image_emb contains NaN or Inf (rows {nonfinite_rows(image_emb)}...)"
            )
        if normalize:
            # The fused GPU kernels multiply raw rows and report a row they cannot
            # normalise inside float32's range (|x|^2 >= 2^64; a class like that:
            # every row) as NaN. Recompute those rows with every row of norm >= 2^31
            # made a unit vector here, without overflow: the same cosines, exactly.
            redo = (~torch.isfinite(lse)).nonzero().flatten()
            xs = unit_big_rows(image_emb.index_select(0, redo))
            ws = unit_big_rows(class_emb)
            for out, new in zip((probs, classes, entropy, lse), run(xs, ws, logit_scale, topk, True)):
                out.index_copy_(0, redo, new)
            if bool(torch.isfinite(lse).all()):
                return probs, classes, entropy, lse
        raise ValueError(
            "pseudo_label: logits overflowed float32 (normalize=False with very large "
            "embeddings or logit_scale)"
        )
    return probs, classes, entropy, lse


def _validate(image_emb, class_emb, logit_scale, topk) -> None:
    op = "pseudo_label"
    check_float_tensor(op, "image_emb", image_emb, 2)
    check_float_tensor(op, "class_emb", class_emb, 2)
    if class_emb.shape[0] == 0:
        raise ValueError(f"{op}: class_emb has no classes (C = 0)")
    check_same_dim(op, "image_emb", image_emb, "class_emb", class_emb)
    check_nonzero_dim(op, image_emb)
    check_same_device(op, "image_emb", image_emb, "class_emb", class_emb)
    check_int_in(op, "topk", topk, 1, class_emb.shape[0], "C")
    check_finite_scalar(op, "logit_scale", logit_scale)


def pseudo_label(
    image_emb: torch.Tensor,
    class_emb: torch.Tensor,
    *,
    logit_scale: float = 100.0,
    topk: int = 1,
    normalize: bool = True,
    backend: BackendName = "auto",
) -> PseudoLabels:
    """Zero-shot pseudo-labels: softmax over ``logit_scale * cos(image, class)``.

    Args:
        image_emb: (N, D) float32/float16/bfloat16, any strides; N may be 0.
        class_emb: (C, D), C >= 1, same device as ``image_emb``. If its dtype
            differs from ``image_emb``'s it is cast to ``image_emb.dtype``.
        logit_scale: multiplies the cosines (CLIP's 100).
        topk: how many classes to keep per row, 1 <= topk <= C.
        normalize: L2-normalise rows of both inputs first (cosine similarity);
            ``False`` uses raw inner products. A zero row stays zero, so its
            logits are all 0: uniform probabilities 1/C, entropy = lse = log C,
            never NaN. Rows of any finite magnitude normalise as in float64
            (``x / max(|x|, eps)``, eps 1e-12), float32/bfloat16 entries up to
            3e38 and far below eps included, on every backend.
        backend: "auto" | "torch" | "cpu" | "triton" | "cuda" (see
            ``nolabels info``); ``NOLABELS_BACKEND`` overrides "auto".

    Returns:
        :class:`PseudoLabels` with labels (N,) int64, probs (N, topk) float32
        descending, classes (N, topk) int64, entropy (N,) float32, lse (N,) float32.

    Raises:
        ValueError: on wrong shapes, D mismatch, C = 0, topk out of range,
            unsupported dtype, different devices, NaN/Inf inputs, or a backend
            that cannot take the call (with every reason).

    Memory: the fused backends allocate O(tile) beyond inputs and outputs
    (cpu: a float32 copy of the class matrix plus, per worker thread, one
    R x min(C, 4096) float32 logit tile, R = 2048 rows (512 for C <= 512): 18 MB at
    C = 1,000 with 2 threads, 2.2 % of the N x C logits at N = 200,000);
    the torch backend materialises the (N, C) logits.
    """
    _validate(image_emb, class_emb, logit_scale, topk)
    if class_emb.dtype != image_emb.dtype:
        class_emb = class_emb.to(image_emb.dtype)
    call = {"device": image_emb.device, "dtype": image_emb.dtype, "topk": topk,
            "C": class_emb.shape[0], "D": image_emb.shape[1]}
    impl = PSEUDO_LABEL.select(backend, call)
    probs, classes, entropy, lse = _pseudo_label_op(
        image_emb, class_emb, float(logit_scale), int(topk), bool(normalize), impl.name
    )
    return PseudoLabels(classes[:, 0].contiguous(), probs, classes, entropy, lse)


# --------------------------------------------------------------------------- selection
def select_per_class(
    pl: PseudoLabels,
    k: int,
    *,
    fallback_ranks: bool = True,
    row_ids: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> Selection:
    """NoLA's confident subset: for each class the ``k`` most confident rows labelled with it.

    Rule (NoLA ``top_k_indices_per_class2``): for class c take the rows whose
    top-1 class is c, sorted by top-1 probability, and keep the first ``k``.
    Only if *no* row has top-1 = c (and ``fallback_ranks``), use the rows whose
    rank-2 class is c (sorted by the rank-2 probability), and if none of those
    either, rank 3. A row picked for several classes is kept once, for the
    smallest class index (NoLA iterates classes in order and drops later
    duplicates). Ties in probability are broken by the smaller row id.

    Mergeable: for shards A, B of the rows (with global ``row_ids``), selecting
    on ``pl`` restricted to the union of the shards' selected rows gives exactly
    the selection on A ∪ B. That is how ``torchrun`` runs merge.

    Args:
        pl: pseudo-labels of N rows (``topk`` >= 3 for the full fallback).
        k: rows per class, k >= 1.
        row_ids: (N,) int64 global ids of the rows; default ``arange(N)``.
        num_classes: C; default 1 + the largest class index in ``pl.classes``.

    Returns:
        :class:`Selection` (indices are ``row_ids`` of the selected rows).

    Raises:
        InputError (a ValueError), naming the argument: k < 1 or not an int;
            ``pl.classes`` not an integer (N, topk) tensor, or holding a negative
            class or one >= ``num_classes``; NaN in ``pl.probs``; ``row_ids`` not an
            integer tensor of shape (N,); ``num_classes`` not an int >= 1.
    """
    op = "select_per_class"
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"{op}: k must be an int >= 1, got {k!r}")
    classes, probs = pl.classes, pl.probs
    if classes.dim() != 2 or probs.shape != classes.shape:
        raise InputError(f"{op}: pl.classes and pl.probs must both be (N, topk)")
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise InputError(f"{op}: pl.classes must be an integer tensor, got {classes.dtype}")
    n, kk = classes.shape
    dev = classes.device
    if row_ids is None:
        row_ids = torch.arange(n, device=dev)
    else:
        if not isinstance(row_ids, torch.Tensor):
            raise InputError(f"{op}: row_ids must be a torch.Tensor, got {type(row_ids).__name__}")
        if row_ids.is_floating_point() or row_ids.is_complex() or row_ids.dtype == torch.bool:
            raise InputError(f"{op}: row_ids must be an integer tensor (int64), got {row_ids.dtype}")
        if row_ids.shape != (n,):
            raise InputError(f"{op}: row_ids must be ({n},), got {tuple(row_ids.shape)}")
    row_ids = row_ids.to(device=dev, dtype=torch.int64)
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise InputError(f"{op}: num_classes must be an int >= 1, got {num_classes!r}")
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return Selection(empty, empty.clone())
    # Value checks (one sync each): the sort below is meaningless with NaN
    # probabilities, and bincount needs classes in [0, num_classes).
    if probs.is_floating_point() and bool(torch.isnan(probs).any()):
        rows = torch.isnan(probs).any(dim=1).nonzero().flatten()[:5].tolist()
        raise InputError(f"{op}: pl.probs contains NaN (rows {rows}...)")
    lo, hi = int(classes.min()), int(classes.max())
    if lo < 0:
        row = int((classes < 0).any(dim=1).nonzero()[0])
        raise InputError(f"{op}: pl.classes holds a negative class index {lo} (row {row})")
    if num_classes is None:
        num_classes = hi + 1
    elif hi >= num_classes:
        raise InputError(
            f"{op}: num_classes={num_classes} but pl.classes holds class {hi} "
            f"(every class index must be < num_classes)"
        )
    ranks = min(3, kk) if fallback_ranks else 1

    # Which rank each class is selected from: the first rank with any row.
    chosen = torch.full((num_classes,), ranks, dtype=torch.int64, device=dev)
    for r in reversed(range(ranks)):
        present = torch.bincount(classes[:, r], minlength=num_classes) > 0
        chosen = torch.where(present, torch.full_like(chosen, r), chosen)

    # Candidates (class, prob, row id) from every rank that is chosen for its class.
    cand_c, cand_p, cand_id = [], [], []
    for r in range(ranks):
        c = classes[:, r]
        m = chosen[c] == r
        cand_c.append(c[m])
        cand_p.append(probs[:, r][m])
        cand_id.append(row_ids[m])
    c, p, ids = torch.cat(cand_c), torch.cat(cand_p), torch.cat(cand_id)

    # Sort by (class asc, prob desc, id asc): stable sorts, least significant key first.
    order = torch.argsort(ids, stable=True)
    order = order[torch.argsort(-p[order], stable=True)]
    order = order[torch.argsort(c[order], stable=True)]
    c, ids = c[order], ids[order]

    # Position inside each class group; keep the first k.
    counts = torch.bincount(c, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(c.numel(), device=dev) - starts[c]
    keep = pos < k
    c, ids = c[keep], ids[keep]

    # Drop duplicate rows, keeping the occurrence with the smallest class.
    if c.numel():
        by_id = torch.argsort(ids, stable=True)  # stable: class order kept within an id
        sid = ids[by_id]
        first = torch.ones_like(sid, dtype=torch.bool)
        first[1:] = sid[1:] != sid[:-1]
        keep = torch.zeros_like(first)
        keep[by_id[first]] = True
        c, ids = c[keep], ids[keep]
    return Selection(ids, c)
