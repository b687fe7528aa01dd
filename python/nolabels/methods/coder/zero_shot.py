"""CODER zero-shot: the heuristic classifier and CODER*'s one-vs-one re-ranking.

Follows methods.md §5.4-5.5 and YCaigogogo/CVPR24-CODER ``classify_zero_shot.py``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nolabels import ops
from nolabels.errors import InputError
from nolabels.methods.coder.knowledge import Knowledge
from nolabels.methods.coder.templates import default_tau
from nolabels.methods.coder.text_bank import TextBank, TextEncoder


def class_text_classifier(
    class_names: Sequence[str],
    templates: Sequence[str],
    encoder: TextEncoder,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot text classifier W (C, D): per class, the renormalised mean of the
    normalised embeddings of ``templates`` (``"{}"`` = class name), Tip-Adapter style."""
    names = [Knowledge._key(c) for c in class_names]
    texts = [t.format(c) for c in names for t in templates]
    embs = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            embs.append(torch.as_tensor(encoder.encode_text(texts[s : s + batch_size])).float().cpu())
    e = F.normalize(torch.cat(embs), dim=1).view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(e, dim=1)


def zero_shot_scores(
    image_emb: torch.Tensor, bank: TextBank, *, scale: float = 100.0, backend: str = "auto"
) -> torch.Tensor:
    """CODER's heuristic-classifier scores (N, C) (methods.md §5.4)."""
    bank._need_emb()
    emb = bank.emb.to(image_emb.device)
    return ops.coder_class_scores(
        image_emb, emb.to(image_emb.dtype), bank.text_class.to(image_emb.device),
        bank.text_kind.to(image_emb.device), bank.num_classes, scale=scale, backend=backend,
    )


@dataclass
class RerankResult:
    """CODER* output. ``pred`` (N,) final labels; ``reranked`` (N,) bool, which rows the
    one-vs-one stage looked at; ``changed`` (N,) bool, which rows it changed."""

    pred: torch.Tensor
    reranked: torch.Tensor
    changed: torch.Tensor


def _pair_lookup(pairs: torch.Tensor, num_classes: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Index of pair (a, b) in ``pairs`` (P, 2) (first occurrence), or -1: vectorised."""
    if pairs.shape[0] == 0:
        return torch.full_like(a, -1)
    keys = pairs[:, 0] * num_classes + pairs[:, 1]
    skeys, order = torch.sort(keys)
    q = a * num_classes + b
    pos = torch.searchsorted(skeys, q).clamp_max(skeys.numel() - 1)
    return torch.where(skeys[pos] == q, order[pos], torch.full_like(q, -1))


def ovo_pair_means(bank: TextBank) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ordered pairs (Q, 2) and the mean of their ovo text embeddings (Q, D):
    mean_j x̂·u_{c,o,j} = x̂·mean_j u_{c,o,j}."""
    bank._need_emb()
    if bank.ovo_pair.shape[0] == 0:
        d = bank.emb.shape[1]
        return torch.empty(0, 2, dtype=torch.int64), torch.empty(0, d)
    uniq, inv = torch.unique(bank.ovo_pair, dim=0, return_inverse=True)
    sums = torch.zeros(uniq.shape[0], bank.ovo_emb.shape[1]).index_add_(0, inv, bank.ovo_emb)
    counts = torch.bincount(inv, minlength=uniq.shape[0]).clamp_min(1).to(sums.dtype)
    return uniq, sums / counts[:, None]


def ovo_rerank(
    image_emb: torch.Tensor,
    scores: torch.Tensor,
    bank: TextBank,
    *,
    tau: float,
    top: int = 5,
    chunk: int = 4096,
) -> RerankResult:
    """CODER*: one-vs-one re-ranking (methods.md §5.5), vectorised.

    For every row whose softmax top-1 minus top-2 probability is below ``tau`` (all such
    rows: no ground truth is read), with K its ``top`` best classes::

        r_c = 1/(top-1) · Σ_{o ∈ K∖c} [ mean_j x̂·u_{c,o,j} − mean_j x̂·u_{o,c,j} ]

    where a term is 0 unless both (c, o) and (o, c) have ovo texts (as the authors'
    code). The new label is argmax_{c ∈ K} r_c; ties keep the better-ranked class, so a
    row without any ovo pair among its candidates keeps its label.
    """
    if scores.dim() != 2 or scores.shape[0] != image_emb.shape[0]:
        raise InputError("ovo_rerank: scores must be (N, C) for the N image rows")
    if not (isinstance(tau, (int, float)) and tau >= 0):
        raise InputError(f"ovo_rerank: tau must be a number >= 0, got {tau!r}")
    n, c = scores.shape
    pred = scores.argmax(dim=1)
    top = min(top, c)
    if n == 0 or top < 2:
        z = torch.zeros(n, dtype=torch.bool, device=scores.device)
        return RerankResult(pred, z, z.clone())
    p = scores.float().softmax(dim=1)
    p2 = p.topk(2, dim=1).values
    sel = (p2[:, 0] - p2[:, 1]) < tau
    rows = sel.nonzero().flatten()
    changed = torch.zeros(n, dtype=torch.bool, device=scores.device)
    pairs, means = ovo_pair_means(bank)
    if rows.numel() == 0 or pairs.shape[0] == 0:
        return RerankResult(pred, sel, changed)
    dev = scores.device
    pairs, means = pairs.to(dev), means.to(dev)
    cand = scores[rows].topk(top, dim=1).indices  # (S, top), best first
    # ordered candidate pairs (c = cand[:, a], o = cand[:, b]) for a != b
    aa, bb = torch.meshgrid(torch.arange(top, device=dev), torch.arange(top, device=dev), indexing="ij")
    off = aa != bb
    aa, bb = aa[off], bb[off]  # (top*(top-1),)
    ci, oi = cand[:, aa], cand[:, bb]  # (S, T2)
    fwd = _pair_lookup(pairs, c, ci, oi)
    rev = _pair_lookup(pairs, c, oi, ci)
    both = (fwd >= 0) & (rev >= 0)
    x = F.normalize(image_emb[rows].float(), dim=1, eps=1e-12)
    r = torch.empty(rows.numel(), top, device=dev)
    for s in range(0, rows.numel(), chunk):  # bounded memory: (chunk, Q) pair scores
        ps = x[s : s + chunk] @ means.T  # (s, Q)
        f = ps.gather(1, fwd[s : s + chunk].clamp_min(0))
        b = ps.gather(1, rev[s : s + chunk].clamp_min(0))
        term = torch.where(both[s : s + chunk], f - b, torch.zeros_like(f))
        r[s : s + chunk] = torch.zeros(term.shape[0], top, device=dev).index_add_(1, aa, term) / (top - 1)
    best = r.argmax(dim=1)  # first max: the better-ranked candidate wins ties
    new = cand.gather(1, best[:, None]).squeeze(1)
    pred = pred.clone()
    changed[rows] = new != pred[rows]
    pred[rows] = new
    return RerankResult(pred, sel, changed)


def coder_zero_shot(
    image_emb: torch.Tensor,
    bank: TextBank,
    *,
    rerank: bool = True,
    tau: float | None = None,
    dataset: str | None = None,
    scale: float = 100.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, RerankResult]:
    """CODER zero-shot (+ CODER* when ``rerank`` and the bank has ovo texts).

    Returns (scores (N, C) float32, :class:`RerankResult`). ``tau`` defaults to
    :func:`default_tau` of ``dataset``.
    """
    scores = zero_shot_scores(image_emb, bank, scale=scale, backend=backend)
    if not rerank:
        n = scores.shape[0]
        z = torch.zeros(n, dtype=torch.bool, device=scores.device)
        return scores, RerankResult(scores.argmax(dim=1), z, z.clone())
    t = default_tau(dataset) if tau is None else tau
    return scores, ovo_rerank(image_emb, scores, bank, tau=t)
