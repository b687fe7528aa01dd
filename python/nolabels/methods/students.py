"""What LaFTer and NoLA tune ("students"), their image views, and a frozen-prefix cache.

Students map preprocessed images to **un-normalised** features (methods.md §1.2: the
un-normalised CLIP feature feeds the linear classifier) and say which of their
parameters train:

* :class:`PromptedViTStudent` (open_clip ViTs): visual prompts (shallow by default;
  LaFTer 50, NoLA 16) + every visual LayerNorm, through
  :class:`nolabels.models.PromptedVisionTransformer`. ``teacher_features`` is the
  *un-prompted* tower with the same (trainable) LayerNorms, as LaFTer's teacher.
* :class:`ConSEStudent` (the offline surrogate ``surrogate:effnet-lite0+minilm``,
  which has no ViT, so no prompts): the affine parameters (weight, bias) of its
  image tower's BatchNorm layers are tuned instead, with running statistics
  frozen (the tower stays in eval mode): ``norms="all"`` (all 49 BatchNorms, the
  analogue of "all visual LayerNorms"), ``norms="block"`` (the last inverted-residual
  block's 3 BatchNorms and the head's ``bn2``) or ``norms="last"`` (``bn2`` only). Its feature is ConSE's un-normalised embedding (probability-weighted
  sum of the MiniLM embeddings of the top-20 ImageNet classes, norm <= 1) times
  ``feature_scale`` = 10, about the norm of CLIP ViT-B/32's un-normalised image
  feature: the classifier ``W · g(x)`` then starts at CLIP-like logit magnitudes
  (with norm <= 1 the softmax starts almost uniform and W must first grow ~10x).

With ``norms="block"`` or ``"last"`` everything below the first trainable norm is
frozen and deterministic, so a student can be trained on **cached prefix features**: :func:`build_prefix_cache`
runs the frozen prefix once over the weak view and ``A`` seeded strong views of
every image, and training then samples one of the ``A`` cached strong views per
image and epoch (instead of a fresh augmentation). That is what makes the
surrogate affordable on a CPU; it changes the augmentation distribution (A views,
not infinitely many) and the logs say so.

One backbone pass per image and view: the weak view's store embedding, its frozen prefix
and the pooled features of NoLA's surrogate "DINO" stand-in all come from one pass of the
surrogate's tower (:func:`weak_view_outputs`; taken from the store's own embedding pass
with :func:`weak_tap` when ``tune`` embeds the images itself), and each strong view goes
through the prefix once.

Views (methods.md §1.6): ``weak`` = the encoder's own evaluation transform;
``strong`` = LaFTer's or NoLA's augmentation with the encoder's size and
normalisation. Each view of each image is seeded by ``(seed, epoch, image, view)``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nolabels.data.safe_io import load_npy
from nolabels.errors import InputError
from nolabels.methods.trainer import sample_seed, seeded
from nolabels.progress import progress

# --------------------------------------------------------------------------- views


def _find_normalize(t: Any):
    from torchvision import transforms as T

    if isinstance(t, T.Normalize):
        return t
    for attr in ("transforms", "large", "small"):
        sub = getattr(t, attr, None)
        if sub is None:
            continue
        for s in (sub if isinstance(sub, (list, tuple)) else [sub]):
            found = _find_normalize(s)
            if found is not None:
                return found
    return None


def image_stats(encoder) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(input size, mean, std) of an encoder's evaluation transform."""
    norm = _find_normalize(encoder.transform)
    mean = tuple(float(x) for x in norm.mean) if norm is not None else (0.5, 0.5, 0.5)
    std = tuple(float(x) for x in norm.std) if norm is not None else (0.5, 0.5, 0.5)
    size = 224
    model = getattr(encoder, "model", None)
    vis = getattr(model, "visual", None)
    if vis is not None and getattr(vis, "image_size", None) is not None:
        s = vis.image_size
        size = int(s[0] if isinstance(s, (tuple, list)) else s)
    elif getattr(encoder.transform, "size", None) is not None:
        size = int(encoder.transform.size)
    return size, mean, std


def strong_transform(style: str, size: int, mean: Sequence[float], std: Sequence[float]):
    """The strong view (methods.md §1.6).

    ``lafter``: RandomResizedCrop(size, scale (0.2, 1)) -> HFlip -> ColorJitter(0.4,
    0.4, 0.4, 0.1) with p 0.8 -> RandomGrayscale(0.2) -> GaussianBlur(σ ~ U(0.1, 2))
    -> ToTensor -> Normalize. ``nola``: the same, with RandomGrayscale replaced by
    RandomPerspective(0.2, p 0.5, bicubic) followed by an unconditional ColorJitter.
    ``none``: the resize + normalise of the weak view (for tests).
    """
    from torchvision import transforms as T

    bic = T.InterpolationMode.BICUBIC
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    tail = [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    cj = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    if style == "lafter":
        ops = [T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=bic),
               T.RandomHorizontalFlip(), T.RandomApply([cj], p=0.8), T.RandomGrayscale(0.2),
               T.GaussianBlur(kernel, sigma=(0.1, 2.0))]
    elif style == "nola":
        ops = [T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=bic),
               T.RandomHorizontalFlip(), T.RandomApply([cj], p=0.8),
               T.RandomPerspective(0.2, p=0.5, interpolation=bic),
               T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.GaussianBlur(kernel, sigma=(0.1, 2.0))]
    elif style == "none":
        ops = [T.Resize((size, size), interpolation=bic)]
    else:
        raise InputError(f"unknown strong augmentation {style!r} (lafter, nola, none)")
    return T.Compose(ops + tail)


class ImageViews(torch.utils.data.Dataset):
    """Views of images for training, addressed by ``(epoch, position)`` keys.

    ``ds[(epoch, pos)]`` -> ``{"index": pos, name: view(image) for each view}``;
    the random transforms of view ``v`` are seeded by ``(seed, epoch, item, v)``.

    Args:
        source: an :class:`nolabels.data.ImageSource`.
        items: the source items, by position.
        views: name -> transform (PIL -> tensor).
        seed: the augmentation seed.
    """

    def __init__(self, source, items: Sequence[int], views: dict[str, Callable],
                 seed: int = 0) -> None:
        self.source, self.items, self.views, self.seed = source, list(items), views, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        from nolabels.data.transforms import decode_image

        epoch, pos = key if isinstance(key, tuple) else (0, key)
        item = self.items[pos]
        img = decode_image(self.source.read_bytes(item))
        out: dict[str, Any] = {"index": pos}
        for v, (name, t) in enumerate(self.views.items()):
            with seeded(sample_seed(self.seed, epoch, item, v)):
                out[name] = t(img)
        return out


# --------------------------------------------------------------------------- students
class Student(nn.Module):
    """An image tower with some trainable parameters -> un-normalised (B, D) features.

    Attributes:
        kind: "prompted-vit" or "conse-norm".
        dim: D.
        cacheable: True when a frozen, deterministic prefix exists
            (:meth:`prefix` / :meth:`head`), so training can use cached features.
    """

    kind: str = ""
    dim: int = 0
    cacheable: bool = False

    def features(self, x: torch.Tensor, *, cached: bool = False) -> torch.Tensor:
        """Student features of images (or of cached prefix outputs)."""
        return self.head(x) if cached else self(x)

    def teacher_features(self, x: torch.Tensor, *, cached: bool = False) -> torch.Tensor:
        """L2-normalised features *without prompts* but with the current trainable norms."""
        return F.normalize(self.features(x, cached=cached).float(), dim=-1)

    def features_and_teacher(self, x: torch.Tensor, *, cached: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features(x), teacher_features(x))``, (B, D) each; students whose teacher is
        their own normalised feature compute both from one pass."""
        return self.features(x, cached=cached), self.teacher_features(x, cached=cached)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.kind}: no frozen prefix to cache")

    def head(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.kind}: no frozen prefix to cache")

    def named_trainable_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def describe(self) -> str:
        raise NotImplementedError

    def config(self) -> dict:
        """What :func:`make_student` needs to rebuild this student."""
        raise NotImplementedError


class PromptedViTStudent(Student):
    """An open_clip ViT with visual prompts; prompts + visual LayerNorms train.

    The encoder's vision tower is deep-copied (the encoder itself stays frozen).
    """

    kind = "prompted-vit"

    def __init__(self, encoder, num_prompts: int, mode: str = "shallow", seed: int = 0) -> None:
        super().__init__()
        from nolabels.models import PromptedVisionTransformer

        visual = copy.deepcopy(encoder.model.visual).float()
        gen = torch.Generator().manual_seed(sample_seed(seed, 2718))
        self.pvt = PromptedVisionTransformer(visual, num_prompts, mode, generator=gen)
        self.pvt.to(encoder.device)
        self.num_prompts, self.mode = num_prompts, mode
        self.dim = int(encoder.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pvt(images)

    def teacher_features(self, x: torch.Tensor, *, cached: bool = False) -> torch.Tensor:
        if cached:
            raise InputError("prompted-vit students cannot use cached features")
        out = self.pvt.visual(x)
        if isinstance(out, tuple):
            out = out[0]
        return F.normalize(out.float(), dim=-1)

    def describe(self) -> str:
        n = sum(p.numel() for _, p in self.named_trainable_parameters())
        return (f"prompted ViT: {self.num_prompts} {self.mode} visual prompts + every visual "
                f"LayerNorm ({n:,} trainable parameters)")

    def config(self) -> dict:
        return {"kind": self.kind, "num_prompts": self.num_prompts, "mode": self.mode}


class ConSEStudent(Student):
    """The surrogate's image tower with trainable BatchNorm affine parameters (no prompts).

    Args:
        encoder: a :class:`nolabels.models.surrogate.ConSESurrogate`.
        norms: "all" (every BatchNorm's weight and bias), "block" (the last block's
            BatchNorms and ``bn2``) or "last" (``bn2`` only); with "block" and "last"
            :meth:`prefix` / :meth:`head` split the tower for caching.
    """

    kind = "conse-norm"

    def __init__(self, encoder, norms: str = "all", feature_scale: float = 10.0) -> None:
        super().__init__()
        if norms not in ("all", "block", "last"):
            raise InputError(f"norms must be 'all', 'block' or 'last', got {norms!r}")
        self.net = copy.deepcopy(encoder.image_model).float().eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        bns = [m for m in self.net.modules() if isinstance(m, nn.BatchNorm2d)]
        if norms == "last":
            bns = [self.net.bn2]
        elif norms == "block":
            bns = [m for m in self.net.blocks[-1].modules() if isinstance(m, nn.BatchNorm2d)]
            bns.append(self.net.bn2)
        for m in bns:
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
        self.num_norms = len(bns)
        self.class_text: torch.Tensor  # (ImageNet classes, D) text embeddings, a buffer
        self.register_buffer("class_text", encoder.imagenet_emb.detach().clone().float(),
                             persistent=False)
        self.top_k = int(encoder.top_k)
        self.norms = norms
        self.feature_scale = float(feature_scale)
        self.cacheable = norms in ("block", "last")
        self.dim = int(encoder.dim)
        self.to(encoder.device)

    def train(self, mode: bool = True):
        # BatchNorm running statistics stay frozen: the tower is always in eval mode.
        super().train(mode)
        self.net.eval()
        return self

    def _conse(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        v, i = probs.topk(self.top_k, dim=1)
        return self.feature_scale * (v[..., None] * self.class_text[i]).sum(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._conse(self.net(images))

    def features_and_teacher(self, x: torch.Tensor, *, cached: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        # no prompts, so the teacher is the student's own feature, normalised: one pass
        f = self.features(x, cached=cached)
        return f, F.normalize(f.float(), dim=-1)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen part below the first trainable norm: ``norms="last"``: up to
        ``conv_head`` (B, 1280, h, w); ``"block"``: up to the last block (B, 192, h, w)."""
        n = self.net
        x = n.bn1(n.conv_stem(images))
        if self.norms == "block":
            return n.blocks[:-1](x)
        return n.conv_head(n.blocks(x))

    def _top(self, pre: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = pre.float()
        if self.norms == "block":
            x = n.conv_head(n.blocks[-1](x))
        return n.bn2(x)

    def head(self, pre: torch.Tensor) -> torch.Tensor:
        n = self.net
        return self._conse(n.classifier(n.global_pool(self._top(pre))))

    def pooled(self, pre: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-d image feature from a prefix output (current norms)."""
        return self.net.global_pool(self._top(pre))

    def describe(self) -> str:
        n = sum(p.numel() for _, p in self.named_trainable_parameters())
        which = {"all": "all", "block": "the last", "last": "the last"}[self.norms]
        return (f"surrogate has no ViT, so no prompts: tuning the affine parameters of {which} "
                f"{self.num_norms} BatchNorm layer(s) of its EfficientNet-Lite0 tower "
                f"({n:,} parameters, running statistics frozen) and the classifier instead")

    def config(self) -> dict:
        return {"kind": self.kind, "norms": self.norms, "feature_scale": self.feature_scale}


def is_vit_encoder(encoder) -> bool:
    vis = getattr(getattr(encoder, "model", None), "visual", None)
    return vis is not None and hasattr(vis, "transformer") and hasattr(vis, "conv1")


def make_student(encoder, config: dict | None = None, *, num_prompts: int = 16,
                 prompt_mode: str = "shallow", surrogate_norms: str = "all",
                 seed: int = 0) -> Student:
    """The student for ``encoder``: prompted ViT for open_clip ViTs, norm-tuned ConSE for
    the surrogate. ``config`` (from :meth:`Student.config`) rebuilds a saved one."""
    cfg = dict(config or {})
    if is_vit_encoder(encoder):
        if cfg and cfg.get("kind") != "prompted-vit":
            raise InputError(f"a {cfg.get('kind')} student cannot be built for {encoder.model_id}")
        return PromptedViTStudent(encoder, int(cfg.get("num_prompts", num_prompts)),
                                  cfg.get("mode", prompt_mode), seed=seed)
    if hasattr(encoder, "image_model") and hasattr(encoder, "imagenet_emb"):
        if cfg and cfg.get("kind") != "conse-norm":
            raise InputError(f"a {cfg.get('kind')} student cannot be built for {encoder.model_id}")
        return ConSEStudent(encoder, cfg.get("norms", surrogate_norms),
                            float(cfg.get("feature_scale", 10.0)))
    raise InputError(
        f"{encoder.model_id}: LaFTer/NoLA need an open_clip ViT (prompts) or the surrogate "
        "(normalisation layers); this vision tower is neither")


class ImageClassifier(nn.Module):
    """``logits = W · student(x)``: the tuned LaFTer / NoLA model used for prediction."""

    def __init__(self, student: Student, num_classes: int) -> None:
        super().__init__()
        self.student = student
        self.classifier = nn.Linear(student.dim, num_classes, bias=False)

    def forward(self, x: torch.Tensor, *, cached: bool = False) -> torch.Tensor:
        return self.classifier(self.student.features(x, cached=cached).float())


# --------------------------------------------------------------------------- prefix cache
def prefix_cache_key(student: Student, model_id: str, source_fingerprint: str,
                     items: Sequence[int], views: Sequence[str], view_seed: int) -> str:
    h = hashlib.sha256(json.dumps({
        "model": model_id, "source": source_fingerprint,
        # only what fixes the frozen prefix (not e.g. the feature scale of the head)
        "student": {k: v for k, v in student.config().items() if k in ("kind", "norms")},
        "items": hashlib.sha256(np.asarray(items, np.int64).tobytes()).hexdigest(),
        "views": list(views), "seed": view_seed, "v": 1,
    }, sort_keys=True).encode())
    return h.hexdigest()[:20]


def prefix_view_path(cache_dir: str | os.PathLike, key: str, view: str) -> Path:
    """Where :func:`build_prefix_cache` keeps view ``view`` of the cache ``key``."""
    return Path(cache_dir) / f"prefix-{key}" / f"{view}.npy"


@torch.no_grad()
def build_prefix_cache(student: Student, source, items: Sequence[int], views: dict[str, Callable],
                       cache_dir: str | os.PathLike, *, key: str, view_seed: int = 0,
                       batch_size: int = 64, workers: int = 0, device: torch.device | None = None,
                       log: Callable[[str], None] = lambda _m: None, quiet: bool = True
                       ) -> dict[str, np.ndarray]:
    """Frozen-prefix outputs of every view of every item, cached as float16 ``.npy``.

    Returns ``{view name: (N, ...) float16 memmap}``. Views already cached under
    ``cache_dir/key`` are reused; each view file is written atomically.
    """
    root = prefix_view_path(cache_dir, key, "weak").parent
    root.mkdir(parents=True, exist_ok=True)
    dev = device or next(student.parameters()).device
    out = {}
    for v, (name, tf) in enumerate(views.items()):
        path = root / f"{name}.npy"
        if path.is_file():
            out[name] = load_npy(path, mmap_mode="r")  # no pickle; CorruptFileError names it
            continue
        for stale in root.glob(f".{name}.tmp-*.npy"):  # left by a killed run
            stale.unlink(missing_ok=True)
        ds = ImageViews(source, items, {"x": tf}, seed=view_seed)
        keys = [(v, p) for p in range(len(items))]
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, sampler=keys, num_workers=workers)
        tmp = root / f".{name}.tmp-{os.getpid()}.npy"
        arr = None
        bar = progress(len(items), f"caching {name} view", quiet=quiet, unit="img")
        pos = 0
        for b in loader:
            pre = student.prefix(b["x"].to(dev)).float().cpu().numpy().astype(np.float16)
            if arr is None:
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                shape=(len(items), *pre.shape[1:]))
            arr[pos:pos + len(pre)] = pre
            pos += len(pre)
            bar.update(len(pre))
        bar.close()
        if arr is None:
            raise InputError(f"caching the {name} view: no images (items is empty)")
        arr.flush()
        del arr
        os.replace(tmp, path)
        log(f"cached the frozen prefix of the {name} view of {len(items)} images in {path}")
        out[name] = load_npy(path, mmap_mode="r")
    return out


class CachedViews(torch.utils.data.Dataset):
    """Training views from a prefix cache: the weak view, and for epoch ``e`` one of the
    ``A`` cached strong views per image, chosen by ``(seed, e, position)``."""

    def __init__(self, weak: np.ndarray, strong: Sequence[np.ndarray], seed: int,
                 need_weak: bool = True) -> None:
        self.weak, self.strong, self.seed = weak, list(strong), seed
        self.need_weak = need_weak

    def __len__(self) -> int:
        return len(self.weak)

    def __getitem__(self, key):
        epoch, pos = key if isinstance(key, tuple) else (0, key)
        out: dict[str, Any] = {"index": pos}
        if self.need_weak:
            out["weak"] = torch.from_numpy(np.asarray(self.weak[pos], np.float32))
        if self.strong:
            a = sample_seed(self.seed, epoch, pos, 4242) % len(self.strong)
            out["strong"] = torch.from_numpy(np.asarray(self.strong[a][pos], np.float32))
        return out


# --------------------------------------------------------------------------- weak view, one pass
def weak_outputs(encoder, *, prefix_norms: str | None = None, pooled: bool = False) -> list[str]:
    """The surrogate tower outputs of the weak view a tuning run needs besides the store
    embedding: ``"prefix:block"`` / ``"prefix:last"`` (a prefix cache for that student),
    ``"pooled"`` (NoLA's DINO stand-in). Empty for encoders without
    :meth:`~nolabels.models.surrogate.ConSESurrogate.tap` (CLIP, timm)."""
    if not hasattr(encoder, "tap"):
        return []
    out = [f"prefix:{prefix_norms}"] if prefix_norms in ("block", "last") else []
    return out + (["pooled"] if pooled else [])


@contextlib.contextmanager
def weak_tap(encoder, outputs: Sequence[str]) -> Iterator[Any]:
    """``encoder.tap(outputs)`` (a :class:`~nolabels.models.surrogate.FeatureTap` that
    collects those outputs from the pass an ``embed`` runs anyway), or None when
    ``outputs`` is empty."""
    if not outputs:
        yield None
        return
    with encoder.tap(outputs) as tap:
        yield tap


def _store_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) features -> float16 L2-normalised rows, computed as ``encode_image`` and
    :meth:`nolabels.data.EmbeddingStore.write_shard` do (torch normalisation, then the
    store's), so they equal what an embedding store of the same features holds."""
    e = F.normalize(torch.from_numpy(np.asarray(x, np.float32)), dim=-1).numpy()
    return (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).astype(np.float16)


def _weak_pass(encoder, source, items: Sequence[int], files: Mapping[str, Path], *,
               batch_size: int, workers: int, quiet: bool) -> None:
    """ONE pass of the surrogate tower over the weak view of ``items``, writing every
    output of ``files`` (atomically: temp file, then rename)."""
    ds = ImageViews(source, items, {"x": encoder.transform})
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         sampler=[(0, p) for p in range(len(items))])
    for p in files.values():
        for stale in p.parent.glob(f".{p.stem}.tmp-*.npy"):  # left by a killed run
            stale.unlink(missing_ok=True)
    tmp = {w: p.parent / f".{p.stem}.tmp-{os.getpid()}.npy" for w, p in files.items()}
    arrs: dict[str, np.ndarray] = {}
    bar = progress(len(items), "weak view, one pass", quiet=quiet, unit="img")
    pos = 0
    for b in loader:
        outs = encoder.image_features(b["x"], list(files))
        for w, t in outs.items():
            a = t.float().cpu().numpy()
            a = _store_rows(a) if w == "pooled" else a.astype(np.float16)
            if w not in arrs:
                files[w].parent.mkdir(parents=True, exist_ok=True)
                arrs[w] = np.lib.format.open_memmap(tmp[w], mode="w+", dtype=np.float16,
                                                    shape=(len(items), *a.shape[1:]))
            arrs[w][pos:pos + len(a)] = a
        pos += len(b["x"])
        bar.update(len(b["x"]))
    bar.close()
    if pos != len(items) or not arrs:
        raise InputError(f"the weak-view pass saw {pos} of {len(items)} images")
    for a in arrs.values():
        a.flush()
    names = list(arrs)
    arrs.clear()  # closes the memmaps
    for w in names:
        os.replace(tmp[w], files[w])


def weak_view_outputs(encoder, source, items: Sequence[int],
                      files: Mapping[str, str | os.PathLike], *, tap=None,
                      store_emb: np.ndarray | torch.Tensor | None = None, batch_size: int = 64,
                      workers: int | str = 0, log: Callable[[str], None] = lambda _m: None,
                      quiet: bool = True) -> dict[str, np.ndarray]:
    """Surrogate tower outputs of the weak view of every item, each kept in a ``.npy``
    file, computed by at most ONE pass over the images.

    Args:
        encoder: a :class:`~nolabels.models.surrogate.ConSESurrogate`.
        source, items: the images (rows in this order).
        files: output -> ``.npy`` path. ``"prefix:block"`` / ``"prefix:last"``: (N, C, h, w)
            float16 (as :func:`build_prefix_cache` stores a view: pass
            :func:`prefix_view_path` ``(..., "weak")`` and it is reused there);
            ``"pooled"``: (N, 1280) float16 L2-normalised rows, what an embedding store
            of ``surrogate:effnet-lite0`` holds for these images.
        tap: a :class:`~nolabels.models.surrogate.FeatureTap` from the pass that embedded
            the store; used, with no further pass, when its rows verify against
            ``store_emb`` (the store's (N, D) embeddings of the same rows).
        batch_size, workers: of the pass (``workers`` "auto": as ``embed``).
    Returns:
        ``{output: (N, ...) float16 memmap}``. Files that already exist (a resumed run)
        are loaded. Under torchrun rank 0 computes and the other ranks load.
    """
    from nolabels import dist
    from nolabels.data.safe_io import load_npy
    from nolabels.data.store import atomic_write_npy

    files = {w: Path(p) for w, p in files.items()}
    n = len(items)

    def present(p: Path) -> bool:
        if not p.is_file():
            return False
        try:
            return load_npy(p, mmap_mode="r").shape[0] == n
        except (OSError, ValueError):  # CorruptFileError is a ValueError: redo it
            return False

    missing = {w: p for w, p in files.items() if not present(p)}
    if missing and dist.get_rank() == 0:
        got = None
        if tap is not None and store_emb is not None and set(missing) <= set(tap.which):
            got = tap.aligned(store_emb)
        if got is not None:
            for w, p in missing.items():
                p.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_npy(p, _store_rows(got[w]) if w == "pooled"
                                 else got[w].astype(np.float16, copy=False))
            log(f"weak view: {', '.join(missing)} of {n} images taken from the store's "
                "embedding pass (no further pass over the images)")
        else:
            if workers == "auto":
                from nolabels.data.readers import default_workers

                workers = default_workers(encoder.device.type)
            _weak_pass(encoder, source, items, missing, batch_size=batch_size,
                       workers=int(workers), quiet=quiet)
            log(f"weak view: {', '.join(missing)} of {n} images from one pass of the tower")
    dist.barrier()  # every rank: whether a file was missing can differ between ranks
    return {w: load_npy(p, mmap_mode="r") for w, p in files.items()}
