"""Reference CODER ops: exact top-k similarity, CODER zero-shot class scores, CODER affinity.

Readable PyTorch, any device, float64-capable (``compute_dtype=torch.float64``):
the ground truth for the tests and the ``torch`` backend of ``nolabels.ops.coder``.
They materialise intermediate matrices, but in chunks of at most
``max_elems`` elements, so the torch backend stays usable at M = 10^6.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nolabels.reference.normalize import NORM_EPS, normalize_rows

# NORM_EPS: F.normalize's eps, a zero row stays zero
DEFAULT_MAX_ELEMS = 1 << 25  # largest intermediate (rows x cols) block: 32M elements


def _work(t: torch.Tensor, normalize: bool, compute_dtype: torch.dtype | None) -> torch.Tensor:
    # float32: scale-safe normalisation (rows with entries up to 3e38 normalise
    # exactly); float64 (the ground truth): F.normalize, which cannot overflow there.
    if compute_dtype == torch.float64:
        t = t.to(torch.float64)
        return F.normalize(t, dim=1, eps=NORM_EPS) if normalize else t
    t = t.to(torch.float32)
    return normalize_rows(t, NORM_EPS) if normalize else t


def _chunk(rows: int, cols: int, max_elems: int) -> int:
    return max(1, min(cols, max_elems // max(rows, 1)))


# --------------------------------------------------------------------------- top-k
def topk_similarity_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    normalize: bool = True,
    compute_dtype: torch.dtype | None = None,
    max_elems: int = DEFAULT_MAX_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``cos(q, key)`` (or ``<q, key>``) per query, streaming over keys.

    Chunked matmul + ``torch.topk``, merging each chunk's top-k with the running
    one. Returns ``values (N, k)`` (float32, or float64 with
    ``compute_dtype=torch.float64``) descending and ``indices (N, k)`` int64.
    Ties: any order (``torch.topk``'s).
    """
    q = _work(queries, normalize, compute_dtype)
    n = q.shape[0]
    m = keys.shape[0]
    vals = q.new_full((n, 0), float("-inf"))
    idx = torch.empty((n, 0), dtype=torch.int64, device=q.device)
    step = _chunk(n, m, max_elems)
    for s in range(0, m, step):
        kc = _work(keys[s : s + step], normalize, compute_dtype)
        sc = q @ kc.T
        kk = min(k, sc.shape[1])
        cv, ci = sc.topk(kk, dim=1)
        vals = torch.cat([vals, cv], dim=1)
        idx = torch.cat([idx, ci + s], dim=1)
        if vals.shape[1] > k:
            vals, pos = vals.topk(k, dim=1)
            idx = idx.gather(1, pos)
    return vals, idx


# --------------------------------------------------------------------------- class scores
def coder_class_scores_reference(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_class: torch.Tensor,
    text_kind: torch.Tensor,
    num_classes: int,
    scale: float = 100.0,
    compute_dtype: torch.dtype | None = None,
    max_elems: int = DEFAULT_MAX_ELEMS,
) -> torch.Tensor:
    """CODER's zero-shot score (methods.md §5.4), dense per row chunk.

    ``score[i, c] = scale * (sum_{j: class c, kind 0} cos(x_i, t_j) + max_{j: class c, kind 1}
    cos(x_i, t_j)) / (n0_c + [n1_c > 0])``: the mean over the kind-0 cosines together with
    one more number, the max over the kind-1 cosines. A class without kind-1 texts averages
    its kind-0 cosines only. Every class must have at least one text (the op checks).

    Dense: the (rows, M) similarity block goes through ``index_add`` (kind 0) and
    ``scatter_reduce(amax)`` (kind 1). Returns (N, C) float32 (float64 on request).
    """
    x = _work(image_emb, True, compute_dtype)
    t = _work(text_emb, True, compute_dtype)
    cls = text_class.to(device=x.device, dtype=torch.int64)
    kind = text_kind.to(device=x.device, dtype=torch.int64)
    n, c = x.shape[0], num_classes
    is0, is1 = kind == 0, kind == 1
    cls0, cls1 = cls[is0], cls[is1]
    t0, t1 = t[is0], t[is1]
    n0 = torch.bincount(cls0, minlength=c).to(x.dtype)
    n1 = torch.bincount(cls1, minlength=c)
    has1 = n1 > 0
    denom = n0 + has1.to(x.dtype)
    out = x.new_empty((n, c))
    step = _chunk(max(t.shape[0], c), n, max_elems)
    for s in range(0, n, step):
        xc = x[s : s + step]
        r = xc.shape[0]
        acc = xc.new_zeros((r, c))
        if t0.shape[0]:
            acc.index_add_(1, cls0, xc @ t0.T)
        if t1.shape[0]:
            mx = xc.new_full((r, c), float("-inf"))
            mx.scatter_reduce_(1, cls1.expand(r, -1), xc @ t1.T, reduce="amax")
            acc += torch.where(has1, mx, torch.zeros_like(mx))
        out[s : s + step] = scale * acc / denom
    return out


# --------------------------------------------------------------------------- affinity
def coder_vectors_reference(
    x: torch.Tensor, text_emb: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """CODER vectors normalize(normalize(x) @ normalize(T)^T): (N, M) (methods.md §5.6)."""
    xn = _work(x, True, compute_dtype)
    t = _work(text_emb, True, compute_dtype)
    return F.normalize(xn @ t.T, dim=1, eps=NORM_EPS)


def coder_affinity_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    text_emb: torch.Tensor,
    compute_dtype: torch.dtype | None = None,
    max_elems: int = DEFAULT_MAX_ELEMS,
) -> torch.Tensor:
    """Cosine between the CODER vectors of ``x`` (N, D) and ``y`` (K, D): (N, K).

    Dense: builds the (N, M) and (K, M) CODER vectors (in row chunks of ``x``)
    and multiplies them. A zero row of ``x`` or ``y`` has a zero CODER vector and
    affinity 0 with everything.
    """
    cy = coder_vectors_reference(y, text_emb, compute_dtype)
    out = cy.new_empty((x.shape[0], y.shape[0]))
    step = _chunk(text_emb.shape[0], x.shape[0], max_elems)
    for s in range(0, x.shape[0], step):
        out[s : s + step] = coder_vectors_reference(x[s : s + step], text_emb, compute_dtype) @ cy.T
    return out
