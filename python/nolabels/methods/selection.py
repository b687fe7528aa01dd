"""Label-free model selection: every epoch and threshold is chosen without labels.

The authors' code selects on labels (methods.md §8): LaFTer prints the best *test*
accuracy over 50 epochs, NoLA keeps the best labeled-validation checkpoint (the test
set for CIFAR and ImageNet), LatteCLIP has no rule and evaluates on test every
epoch. Here labels are read only to *report* accuracy; selection uses an
unlabeled criterion computed on an **unlabeled held-out split**: a seeded fraction
(default 10 %) of the unlabeled training images that is never trained on.

=============  =============================================================  ===========
method         criterion (higher is better), on the held-out images             thresholds
=============  =============================================================  ===========
``zeroshot``   nothing is trained, nothing to select                             none
``cde``        nothing is trained, nothing to select                             none
``lafter``     student/teacher agreement: the fraction of held-out images        none (hard
               whose student prediction (prompted tower + classifier, weak       argmax, as
               view) equals the teacher's pseudo-label (frozen text classifier   the paper)
               on the current un-prompted tower, weak view)
``nola``       labeller agreement: the fraction of held-out images whose         k = max(16,
               student prediction (weak view) equals the DINO labeller's         0.2·N/C), the
               constant pseudo-label                                             paper's rule
``latteclip``  mean confidence: the mean top-1 softmax probability of the        none
               prototype classifier (scale 100) on the held-out weak views
=============  =============================================================  ===========

Only epochs >= 1 are candidates (the untrained state is not a "tuned" model); ties
go to the earlier epoch. Stages with a fixed length in the paper (LaFTer's text
classifier, NoLA's labeller) keep their last epoch. An "oracle" accuracy (held-out
images with class folders) may be logged next to the criterion, always under a
key starting with ``oracle_``, and is never read by the selection.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nolabels.errors import InputError

#: The unlabeled criterion of each method (what the docs and the logs say).
CRITERIA: dict[str, str] = {
    "zeroshot": "none (nothing is trained)",
    "cde": "none (nothing is trained)",
    "lafter": "heldout_agreement: student vs teacher pseudo-label on unlabeled held-out images",
    "nola": "heldout_agreement: student vs DINO-labeller pseudo-label on unlabeled held-out images",
    "latteclip": "heldout_confidence: mean top-1 prototype probability on unlabeled held-out images",
}

DEFAULT_HELDOUT_FRACTION = 0.1


def holdout_split(n: int, fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``n`` unlabeled images into a training part and an unlabeled held-out part.

    Args:
        n: number of images.
        fraction: share held out, in [0, 1). The held-out part has
            ``ceil(fraction * n)`` images, at least 1 when ``fraction > 0`` and ``n >= 2``.
        seed: the split's seed.
    Returns:
        ``(train, heldout)``: sorted int64 index tensors, disjoint, covering ``range(n)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"holdout fraction must be in [0, 1), got {fraction}")
    m = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, math.ceil(fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 7919))
    held = torch.sort(perm[:m]).values
    train = torch.sort(perm[m:]).values
    return train, held


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two label vectors agree (nan when empty)."""
    if a.shape != b.shape:
        raise InputError(f"agreement: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return float("nan")
    return float((a == b).float().mean())


def mean_confidence(probs: torch.Tensor) -> float:
    """Mean top-1 probability of an (N, C) probability matrix (nan when empty)."""
    if probs.numel() == 0:
        return float("nan")
    return float(probs.max(dim=1).values.float().mean())


def oracle_accuracy(pred: torch.Tensor, true: Sequence[int] | torch.Tensor | None) -> float | None:
    """Accuracy against true labels, for *reporting only* (``-1`` = unknown, skipped).

    Returns None when no true label is known. Never feed this into a selection.
    """
    if true is None:
        return None
    t = torch.as_tensor(true, dtype=torch.int64).to(pred.device)
    ok = t >= 0
    if not bool(ok.any()):
        return None
    return float((pred[ok] == t[ok]).float().mean())


@dataclass
class Selector:
    """Tracks the best epoch by an unlabeled score (higher is better; ties: earlier).

    Attributes:
        criterion: the name of the score (logged).
        best_epoch: the best epoch so far (None before any finite score).
        best_score: its score.
    """

    criterion: str = "selection"
    best_epoch: int | None = None
    best_score: float | None = None

    def update(self, epoch: int, score: float | None) -> bool:
        """Offer ``score`` for ``epoch`` (1-based); returns True if it is the new best."""
        if score is None or not math.isfinite(score) or epoch < 1:
            return False
        if self.best_score is None or score > self.best_score:
            self.best_epoch, self.best_score = int(epoch), float(score)
            return True
        return False

    def state_dict(self) -> dict:
        return {"criterion": self.criterion, "best_epoch": self.best_epoch,
                "best_score": self.best_score}

    def load_state_dict(self, d: dict) -> None:
        self.criterion = d.get("criterion", self.criterion)
        self.best_epoch, self.best_score = d.get("best_epoch"), d.get("best_score")
