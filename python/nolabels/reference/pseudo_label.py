"""Reference pseudo-labeling: normalize -> matmul -> softmax -> top-k."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nolabels.reference.normalize import NORM_EPS, normalize_rows

# NORM_EPS: same eps as F.normalize; zero rows stay zero -> uniform probabilities


def reference_logits(
    image_emb: torch.Tensor,
    class_emb: torch.Tensor,
    logit_scale: float = 100.0,
    normalize: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scaled cosine (or inner-product) logits, (N, C) float32 or float64.

    ``compute_dtype=None`` normalises in float32 (scale-safe: rows whose squared
    norm overflows float32 normalise exactly, see ``reference.normalize``),
    multiplies in the input dtype (what a user would write) and returns float32;
    ``torch.float64`` does everything in float64 with ``F.normalize`` (the test
    ground truth: no float32-range input can overflow it).
    """
    if compute_dtype == torch.float64:
        x, w = image_emb.double(), class_emb.double()
        if normalize:
            x, w = F.normalize(x, dim=1, eps=NORM_EPS), F.normalize(w, dim=1, eps=NORM_EPS)
        return logit_scale * (x @ w.T)
    mm_dtype = torch.promote_types(image_emb.dtype, class_emb.dtype)
    x, w = image_emb.float(), class_emb.float()
    if normalize:
        x, w = normalize_rows(x, NORM_EPS), normalize_rows(w, NORM_EPS)
    return logit_scale * (x.to(mm_dtype) @ w.to(mm_dtype).T).float()


def stats_from_logits(
    logits: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs (N,k), classes (N,k) int64, entropy (N,), lse (N,)) from (N, C) logits."""
    lse = torch.logsumexp(logits, dim=1)
    logp = logits - lse[:, None]
    p = logp.exp()
    entropy = -(p * logp).sum(dim=1)
    vals, classes = logits.topk(topk, dim=1)
    probs = (vals - lse[:, None]).exp()
    return probs, classes, entropy, lse


def pseudo_label_reference(
    image_emb: torch.Tensor,
    class_emb: torch.Tensor,
    logit_scale: float = 100.0,
    topk: int = 1,
    normalize: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for ``nolabels.ops.pseudo_label`` (the contract is documented there).

    Args:
        image_emb: (N, D) float tensor.
        class_emb: (C, D) float tensor.
        compute_dtype: ``None`` (float32 results) or ``torch.float64``.

    Returns:
        probs (N, topk), classes (N, topk) int64, entropy (N,), lse (N,); float
        outputs are float32 unless ``compute_dtype=torch.float64``. Peak memory:
        the full (N, C) logits and probabilities.
    """
    logits = reference_logits(image_emb, class_emb, logit_scale, normalize, compute_dtype)
    probs, classes, entropy, lse = stats_from_logits(logits, topk)
    if compute_dtype != torch.float64:
        probs, entropy, lse = probs.float(), entropy.float(), lse.float()
    return probs, classes, entropy, lse
