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
``lafter``     ``heldout_balanced_agreement`` = agreement − balance penalty.     none (hard
               Agreement: the fraction of held-out images whose student          argmax, as
               prediction on a seeded *strong* view equals the label of the      the paper);
               **frozen epoch-0 teacher** (text classifier on the un-prompted    tolerance
               tower with the *initial* norms, weak view; computed once before   τ = 0.1 of
               training). Penalty: :func:`balance_penalty` of the student's      the guard
               predictions against the frozen labels' class histogram
``nola``       ``heldout_agreement``: the fraction of held-out images whose      k = max(16,
               student prediction (weak view) equals the DINO labeller's         0.2·N/C), the
               constant pseudo-label. Logged beside it, never selected on:       paper's rule
               ``labeller_heldout_agreement`` (the labeller vs the CDE
               zero-shot labels on the held-out images)
``latteclip``  ``heldout_agreement``: the fraction of held-out images whose      none
               prototype prediction on a seeded training-style (augmented)
               view equals the **fixed zero-shot pseudo-label** (the store's
               weak-view embedding, the run's single template)
=============  =============================================================  ===========

**Epoch 0 is a candidate.** Before the first step the trainer evaluates the initial
model (LaFTer: the text classifier on the untrained student; NoLA: the CDE student;
LatteCLIP: the zero-shot prototypes) and logs it as epoch 0; ties go to the earlier
epoch, so a run that only degrades by its own criterion returns epoch 0 and its run
directory holds the epoch-0 weights.

**Why frozen references.** A criterion measured against something that trains with the
student can be fooled: LaFTer's teacher shares the trainable LayerNorms, so a tower
collapsed to one output makes student and teacher agree on every image (agreement
1.0). Every reference here is fixed before training (frozen epoch-0 teacher labels,
the labeller's constant targets, the zero-shot labels), so a collapsed model only
agrees on the images of the class it collapsed to.

**Why the strong view (LaFTer, LatteCLIP).** Their references are computed by the
*initial model itself* on the weak view (the surrogate's LaFTer student has no prompts
and equals its teacher at epoch 0; LatteCLIP's prototypes start as the zero-shot
classifier), so weak-view agreement is 1.0 at epoch 0 by construction and no epoch
could ever beat it. The student is therefore scored on a seeded augmented view (the
same draw per image at every epoch; LaFTer's strong augmentation, LatteCLIP's
training augmentation), against the frozen weak-view labels: the held-out version of
the training objective with the teacher frozen. The weak-view agreement is logged too
(``heldout_agreement_weak``), as is LaFTer's agreement with the co-adapting teacher
(``heldout_agreement_coadapting``, the old criterion), neither used for selection.

**LaFTer's class-balance guard.** With ``q`` the class histogram of the student's
held-out predictions, ``r`` that of the frozen teacher's labels (the pseudo-label
prior), ``H`` the entropy in nats and ``τ`` = :data:`BALANCE_TOLERANCE` = 0.1::

    penalty = max(0, (1 − τ)·H(r) − H(q)) / H(r)      (0 when H(r) = 0)
    heldout_balanced_agreement = agreement − penalty

The penalty is the share of the prior's class entropy the predictions lost beyond a
10 % tolerance, in the same units as the agreement (a fraction of the images): a model
collapsed to one class (``H(q)`` = 0) loses 0.9, so it scores at most (its class's
share) − 0.9 and never beats epoch 0. Self-training with hard pseudo-labels shrinks
minority classes (confirmation bias) gradually, long before a full collapse, which is
what the entropy of the prediction histogram measures; the tolerance leaves room for
legitimate re-balancing of a biased zero-shot prior and for the sampling noise of a
plug-in entropy on a small held-out split (both histograms come from the same images,
so their common bias cancels in the difference).

Stages with a fixed length in the paper (LaFTer's text classifier, NoLA's labeller)
keep their last epoch. An "oracle" accuracy (held-out images with class folders) is
logged next to the criterion, always under a key starting with ``oracle_``, and is
never read by the selection; :func:`curve_summary` reports both curves' best epochs
(``nolabels tune`` prints them).
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
    "lafter": "heldout_balanced_agreement: student (strong view) vs frozen epoch-0 teacher "
              "(weak view) on unlabeled held-out images, minus a class-balance penalty; "
              "epoch 0 included",
    "nola": "heldout_agreement: student vs DINO-labeller pseudo-label on unlabeled held-out "
            "images; epoch 0 included",
    "latteclip": "heldout_agreement: prototype prediction (augmented view) vs fixed zero-shot "
                 "pseudo-label on unlabeled held-out images; epoch 0 included",
}

DEFAULT_HELDOUT_FRACTION = 0.1

#: τ of LaFTer's class-balance guard (see the module docstring).
BALANCE_TOLERANCE = 0.1

#: The oracle curve :func:`curve_summary` reports (the student's held-out accuracy).
ORACLE_KEY = "oracle_heldout_accuracy"


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


def class_entropy(labels: torch.Tensor, num_classes: int) -> float:
    """Entropy (nats) of the class histogram of an (N,) int64 label vector (nan when empty).

    Classes never predicted contribute 0; the maximum is ``log(num_classes)``.
    """
    if labels.numel() == 0:
        return float("nan")
    p = torch.bincount(labels.reshape(-1).long().cpu(), minlength=num_classes).double()
    p = p[p > 0] / labels.numel()
    return float(-(p * p.log()).sum())


#: below this many held-out images, :func:`small_heldout_note` says the pick is noisy
SMALL_HELDOUT = 100


def small_heldout_note(heldout: int, fraction: float) -> str | None:
    """A note when model selection scores fewer than :data:`SMALL_HELDOUT` held-out images
    (each image moves an agreement criterion by ``100 / heldout`` points), else None."""
    if not 0 < heldout < SMALL_HELDOUT:
        return None
    return (f"note: model selection scores {heldout} held-out images (--heldout-fraction "
            f"{fraction:g}): one image moves its criterion by {100.0 / heldout:.1f} points, so "
            "the kept epoch is a noisy pick; a larger --heldout-fraction steadies it")


def coverage_warning(counts: Sequence[int], classes: Sequence[str], what: str) -> str | None:
    """A warning when pseudo-labels leave classes without a single image, else None.

    A model trained on such pseudo-labels cannot learn the missing classes, and no
    label-free selection can see it: the usual cause is a model that does not know the
    classes by these names (e.g. a zero-shot classifier that puts every image in one class).

    Args:
        counts: (C,) images per class in the pseudo-labelled set.
        classes: the C class names.
        what: what was counted, for the message (e.g. "NoLA's confident subset").
    """
    if len(counts) != len(classes):
        raise InputError(f"coverage_warning: {len(counts)} counts for {len(classes)} classes")
    empty = [c for c, n in zip(classes, counts) if int(n) == 0]
    if not empty:
        return None
    shown = ", ".join(empty[:8]) + (f" and {len(empty) - 8} more" if len(empty) > 8 else "")
    return (f"warning: {what} has no image of {len(empty)} of {len(classes)} classes ({shown}); "
            "a model trained on it cannot learn them. The model may not know these classes "
            "by these names: check the class names and templates (or pass descriptions) "
            "before trusting the result")


def balance_penalty(pred: torch.Tensor, reference: torch.Tensor, num_classes: int,
                    tolerance: float = BALANCE_TOLERANCE) -> float:
    """LaFTer's class-balance guard: ``max(0, (1 − τ)·H(r) − H(q)) / H(r)``.

    Args:
        pred: (N,) int64 predictions of the candidate model (histogram ``q``).
        reference: (N,) int64 fixed pseudo-labels (histogram ``r``, the prior).
        num_classes: C.
        tolerance: τ, the share of ``H(r)`` that may be lost without penalty.
    Returns:
        the penalty in [0, 1 − τ] (0 when ``H(r)`` is 0 or nan).
    """
    h_ref = class_entropy(reference, num_classes)
    if not h_ref > 0:
        return 0.0
    h_pred = class_entropy(pred, num_classes)
    return max(0.0, (1.0 - tolerance) * h_ref - h_pred) / h_ref


def balanced_agreement(pred: torch.Tensor, reference: torch.Tensor, num_classes: int,
                       tolerance: float = BALANCE_TOLERANCE) -> dict[str, float]:
    """LaFTer's criterion and its parts (all logged).

    Args:
        pred: (N,) int64 student predictions; reference: (N,) int64 frozen labels.
    Returns:
        ``{"heldout_balanced_agreement": agreement − penalty, "heldout_agreement":
        agreement, "balance_penalty": penalty, "heldout_prediction_entropy": H(q),
        "heldout_reference_entropy": H(r)}`` (entropies in nats).
    """
    a = agreement(pred.cpu(), reference.cpu())
    pen = balance_penalty(pred, reference, num_classes, tolerance)
    return {"heldout_balanced_agreement": a - pen, "heldout_agreement": a,
            "balance_penalty": pen,
            "heldout_prediction_entropy": class_entropy(pred, num_classes),
            "heldout_reference_entropy": class_entropy(reference, num_classes)}


def curve_summary(history: Sequence[dict], criterion: str | None,
                  oracle_key: str = ORACLE_KEY) -> dict:
    """The best epochs of the criterion curve and of the oracle curve of a training log.

    Args:
        history: the trainer's per-epoch records (``epoch`` 0 = the initial model).
        criterion: the selection key (None: no criterion curve).
        oracle_key: the reported oracle accuracy key.
    Returns:
        ``{"criterion": name, "criterion_best_epoch", "criterion_best", "oracle":
        oracle_key, "oracle_best_epoch", "oracle_best", "oracle_at_criterion_best"}``;
        a curve without finite values has None entries. Ties: the earlier epoch.
    """
    def best(key):
        pts = [(h["epoch"], h[key]) for h in history if isinstance(h.get(key), (int, float))
               and not isinstance(h.get(key), bool) and math.isfinite(h[key])]
        if not pts:
            return None, None
        e, v = max(pts, key=lambda p: (p[1], -p[0]))
        return int(e), float(v)

    ce, cv = best(criterion) if criterion else (None, None)
    oe, ov = best(oracle_key)
    at = next((h.get(oracle_key) for h in history if h.get("epoch") == ce), None)
    return {"criterion": criterion, "criterion_best_epoch": ce, "criterion_best": cv,
            "oracle": oracle_key, "oracle_best_epoch": oe, "oracle_best": ov,
            "oracle_at_criterion_best": at}


def curve_lines(curves: dict) -> list[str]:
    """Two lines for the log: the criterion curve's best epoch and the oracle curve's
    (the second says it is a report only; absent without labels)."""
    lines = []
    if curves.get("criterion_best_epoch") is not None:
        lines.append(f"selection: {curves['criterion']} best at epoch "
                     f"{curves['criterion_best_epoch']} ({curves['criterion_best']:.4f})")
    if curves.get("oracle_best_epoch") is not None:
        at = curves.get("oracle_at_criterion_best")
        at_s = "" if at is None else f"; {at:.4f} at the criterion's best epoch"
        lines.append(f"oracle (labels, reported only, never selected on): {curves['oracle']} "
                     f"best at epoch {curves['oracle_best_epoch']} ({curves['oracle_best']:.4f})"
                     f"{at_s}")
    return lines


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

    Epoch 0 (the initial model, evaluated before training) is a candidate like any other.

    Attributes:
        criterion: the name of the score (logged).
        best_epoch: the best epoch so far (None before any finite score).
        best_score: its score.
    """

    criterion: str = "selection"
    best_epoch: int | None = None
    best_score: float | None = None

    def update(self, epoch: int, score: float | None) -> bool:
        """Offer ``score`` for ``epoch`` (0: the initial model); returns True if it is the
        new best (a tie keeps the earlier epoch)."""
        if score is None or not math.isfinite(score) or epoch < 0:
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
