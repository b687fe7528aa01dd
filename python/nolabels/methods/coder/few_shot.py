"""Few-shot CODER: CODER vectors in a training-free Tip-Adapter cache, α and β chosen by
grid search on held-out shots; the augmented cache keys.

Follows methods.md §5.6 and YCaigogogo/CVPR24-CODER ``classify_few_shot.py`` / ``utils.py``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nolabels import ops
from nolabels.errors import InputError
from nolabels.methods.coder.templates import DEFAULT_FEW_SHOT_INIT, FEW_SHOT_INIT, _canon
from nolabels.methods.coder.text_bank import TextBank


def minmax_rows(a: torch.Tensor) -> torch.Tensor:
    """Row-wise min-max normalisation to [0, 1]; a constant row becomes all ones
    (the authors' code divides 0 by 0 there)."""
    lo = a.min(dim=1, keepdim=True).values
    hi = a.max(dim=1, keepdim=True).values
    rng = hi - lo
    return torch.where(rng > 0, (a - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                       torch.ones_like(a))


def grid(lo: float, hi: float, steps: int) -> torch.Tensor:
    """The authors' grid: lo + i (hi - lo) / steps, i < steps (hi excluded)."""
    return lo + torch.arange(steps, dtype=torch.float64) * (hi - lo) / steps


def stratified_split(labels: torch.Tensor, val_fraction: float, num_classes: int, *,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, hold out ``floor(val_fraction * K_c)`` shots (at least 1 when
    ``val_fraction > 0``; none of a class with a single shot), drawn by a seeded
    permutation.

    Args:
        labels: (S,) int64 class of each shot, in [0, num_classes).
        val_fraction: in [0, 1).
        num_classes: C.
        seed: the permutation's seed (same seed, same split).
    Returns:
        ``(val_idx, cache_idx)``: int64 indices into ``labels``, disjoint, together
        every shot; grouped by class (ascending), in permuted order within a class.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=g)
    lab = labels[perm]
    order = torch.argsort(lab, stable=True)
    perm, lab = perm[order], lab[order]  # grouped by class, random within class
    counts = torch.bincount(lab, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(lab.numel()) - starts[lab]
    n_val = torch.floor(counts.double() * val_fraction).long()
    n_val = torch.where(counts > 1, n_val.clamp_min(1 if val_fraction > 0 else 0),
                        torch.zeros_like(n_val))
    is_val = rank < n_val[lab]
    return perm[is_val], perm[~is_val]


#: The augmentation of the authors' few-shot cache keys (``classify_few_shot.py``:
#: RandomResizedCrop(224, scale (0.5, 1), bicubic), HFlip(0.5), CLIP normalisation).
CACHE_CROP_SCALE = (0.5, 1.0)


def cache_key_transform(size: int, mean: Sequence[float], std: Sequence[float]):
    """PIL image -> (3, size, size) tensor: the authors' augmentation of cache-key images
    (random resized crop of scale :data:`CACHE_CROP_SCALE`, bicubic; horizontal flip;
    the encoder's normalisation)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=CACHE_CROP_SCALE,
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


@torch.no_grad()
def augmented_embeddings(encoder, source, items: Sequence[int], passes: int, *, seed: int = 0,
                         batch_size: int = 64) -> torch.Tensor:
    """Few-shot cache keys from ``passes`` augmented views of each image (the authors'
    ``augment_epoch``: 20 for most data sets, 10 Pets, 1 ImageNet).

    View ``p`` of item ``i`` is drawn with :func:`cache_key_transform` under the seed
    ``(seed, p, i, 0)`` (:class:`nolabels.methods.students.ImageViews`), so the keys are
    the same on every run and independent of batching. The views' embeddings are
    averaged over passes and L2-normalised. (The authors average the un-normalised image
    features; :meth:`Encoder.encode_image` returns normalised rows, so their mean is
    taken here: equal when the feature norms of one image's views are equal.)

    Args:
        encoder: a :class:`nolabels.models.Encoder` (the model that embedded the shots).
        source: the :class:`nolabels.data.ImageSource` the shots were embedded from.
        items: S source items, in the row order of the shots.
        passes: number of augmented views per image (>= 1).
    Returns:
        (S, D) float32 on the CPU, rows L2-normalised.
    """
    from nolabels.methods.students import ImageViews, image_stats

    if passes < 1:
        raise InputError(f"augmented_embeddings: passes must be >= 1, got {passes}")
    size, mean, std = image_stats(encoder)
    views = ImageViews(source, list(items), {"aug": cache_key_transform(size, mean, std)}, seed)
    total = torch.zeros(len(views), encoder.dim)
    for p in range(passes):
        for s in range(0, len(views), batch_size):
            batch = torch.stack([views[(p, i)]["aug"] for i in range(s, min(s + batch_size,
                                                                              len(views)))])
            total[s : s + batch.shape[0]] += encoder.encode_image(batch).float().cpu()
    return F.normalize(total / passes, dim=1)


@dataclass
class FewShotFit:
    """Chosen hyper-parameters and how they were chosen."""

    beta: float
    alpha: float
    val_acc: float | None  # held-out-shot accuracy at (beta, alpha); None if not searched
    n_cache: int
    n_val: int
    searched: bool


class CoderFewShot:
    """Few-shot CODER: CODER vectors in a training-free Tip-Adapter cache (methods.md §5.6).

    ``logits = scale · x̂ W_zsᵀ + α · exp(−β (1 − minmax(A))) L``, where A is the CODER
    affinity of x to the cache keys (``ops.coder_affinity``), minmax is row-wise, L the
    one-hot labels of the shots and W_zs the class text classifier (T = 1).

    Args:
        bank: the few-shot text bank (the authors: name + att + ana), encoded.
        zs_weights: (C, D) zero-shot text classifier (:func:`class_text_classifier`).
        shot_emb: (S, D) image embeddings of the labelled shots (averaged over
            augmentation passes upstream if desired, as the authors do).
        shot_labels: (S,) int64 in [0, C).
    """

    def __init__(self, bank: TextBank, zs_weights: torch.Tensor, shot_emb: torch.Tensor,
                 shot_labels: torch.Tensor, *, scale: float = 100.0, backend: str = "auto"):
        bank._need_emb()
        c = bank.num_classes
        if zs_weights.shape != (c, bank.emb.shape[1]):
            raise InputError(f"CoderFewShot: zs_weights must be ({c}, {bank.emb.shape[1]}), "
                             f"got {tuple(zs_weights.shape)}")
        if shot_emb.dim() != 2 or shot_emb.shape[1] != bank.emb.shape[1]:
            raise InputError(f"CoderFewShot: shot_emb must be (S, {bank.emb.shape[1]})")
        if shot_labels.shape != (shot_emb.shape[0],):
            raise InputError("CoderFewShot: shot_labels must be (S,)")
        if shot_emb.shape[0] == 0:
            raise InputError("CoderFewShot: no shots")
        lab = shot_labels.to(torch.int64)
        if int(lab.min()) < 0 or int(lab.max()) >= c:
            raise InputError(f"CoderFewShot: shot_labels must be in [0, {c})")
        self.bank, self.scale, self.backend = bank, float(scale), backend
        self.zs = F.normalize(zs_weights.float(), dim=1)
        self.shots, self.labels = shot_emb.float(), lab
        self.beta, self.alpha = DEFAULT_FEW_SHOT_INIT[0], DEFAULT_FEW_SHOT_INIT[1]
        self.fit_info: FewShotFit | None = None

    # -- pieces -------------------------------------------------------------
    def _zs_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x.float(), dim=1, eps=1e-12) @ self.zs.to(x.device).T

    def _affinity(self, x: torch.Tensor, keys: torch.Tensor, max_elems: int = 1 << 25) -> torch.Tensor:
        """minmax(A) for rows of x against keys, computed once, in row chunks."""
        emb = self.bank.emb.to(x.device)
        step = max(1, max_elems // max(keys.shape[0], 1))
        out = [minmax_rows(ops.coder_affinity(x[s : s + step], keys, emb, backend=self.backend))
               for s in range(0, x.shape[0], step)]
        return torch.cat(out) if out else x.new_empty((0, keys.shape[0]))

    @staticmethod
    def _cache_logits(a: torch.Tensor, onehot: torch.Tensor, beta: float) -> torch.Tensor:
        return torch.exp(-beta * (1.0 - a)) @ onehot

    # -- fitting ---------------------------------------------------------------
    def fit(
        self,
        *,
        val_fraction: float = 0.25,
        init: tuple[float, float] | None = None,
        dataset: str | None = None,
        beta_range: tuple[float, float] = (0.1, 200.0),
        alpha_range: tuple[float, float] = (0.1, 20.0),
        steps: tuple[int, int] = (500, 50),
        rounds: int = 3,
        seed: int = 0,
    ) -> FewShotFit:
        """Choose β, α by grid search on held-out shots (never on test data).

        Per class, ``floor(val_fraction · K_c)`` shots (0 if a class has one shot) are
        held out; the cache is built from the rest, the affinity of the held-out shots
        to it is computed *once*, and the authors' grid (500 β × 50 α over
        [0.1, 200) × [0.1, 20), then ``rounds − 1`` zoom rounds over [0.5, 1.5] × best)
        is scored by held-out accuracy, vectorised over α. Ties keep the first grid point.
        With no held-out shot (1-shot), ``init`` (default :data:`FEW_SHOT_INIT` of
        ``dataset``) is used unchanged. The predictor then caches *all* shots.
        """
        if not 0 <= val_fraction < 1:
            raise InputError(f"fit: val_fraction must be in [0, 1), got {val_fraction}")
        if init is None:
            init = FEW_SHOT_INIT.get(_canon(dataset) or "", DEFAULT_FEW_SHOT_INIT)
        c = self.bank.num_classes
        val_idx, cache_idx = stratified_split(self.labels, val_fraction, c, seed=seed)
        if val_idx.numel() == 0:
            self.beta, self.alpha = float(init[0]), float(init[1])
            self.fit_info = FewShotFit(self.beta, self.alpha, None, cache_idx.numel(), 0, False)
            return self.fit_info

        xv, yv = self.shots[val_idx], self.labels[val_idx]
        keys = self.shots[cache_idx]
        onehot = F.one_hot(self.labels[cache_idx], c).float()
        a = self._affinity(xv, keys)  # computed once for the whole search
        zs = self._zs_logits(xv)
        one_minus = 1.0 - a

        def score(betas: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
            acc = torch.empty(len(betas), len(alphas), dtype=torch.float64)
            al = alphas.float()[:, None, None]
            for i, b in enumerate(betas.tolist()):  # loop over grid values, not samples
                cache = torch.exp(-b * one_minus) @ onehot  # (V, C)
                pred = (zs[None] + al * cache[None]).argmax(dim=2)  # (A, V)
                acc[i] = (pred == yv[None]).double().mean(dim=1)
            return acc

        (blo, bhi), (alo, ahi) = beta_range, alpha_range
        best_b, best_a, best_acc = float(init[0]), float(init[1]), -1.0
        for _ in range(max(1, rounds)):
            betas, alphas = grid(blo, bhi, steps[0]), grid(alo, ahi, steps[1])
            acc = score(betas, alphas)
            flat = int(torch.argmax(acc))  # first maximum in (beta, alpha) order
            bi, ai = divmod(flat, acc.shape[1])
            best_b, best_a, best_acc = float(betas[bi]), float(alphas[ai]), float(acc[bi, ai])
            blo, bhi, alo, ahi = 0.5 * best_b, 1.5 * best_b, 0.5 * best_a, 1.5 * best_a
        self.beta, self.alpha = best_b, best_a
        self.fit_info = FewShotFit(best_b, best_a, best_acc, cache_idx.numel(), val_idx.numel(), True)
        return self.fit_info

    # -- prediction ------------------------------------------------------------
    def logits(self, image_emb: torch.Tensor, *, beta: float | None = None,
               alpha: float | None = None) -> torch.Tensor:
        """Few-shot logits (N, C) with all shots in the cache."""
        beta = self.beta if beta is None else beta
        alpha = self.alpha if alpha is None else alpha
        x = image_emb
        c = self.bank.num_classes
        onehot = F.one_hot(self.labels, c).float().to(x.device)
        keys = self.shots.to(x.device)
        out = self._zs_logits(x)
        step = max(1, (1 << 25) // max(keys.shape[0], 1))
        for s in range(0, x.shape[0], step):
            a = self._affinity(x[s : s + step], keys)
            out[s : s + step] += alpha * self._cache_logits(a, onehot, beta)
        return out

    def predict(self, image_emb: torch.Tensor) -> torch.Tensor:
        return self.logits(image_emb).argmax(dim=1)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (for reporting only)."""
    return float((pred.cpu() == labels.cpu()).double().mean()) if labels.numel() else math.nan
