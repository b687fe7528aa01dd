"""The ``Encoder`` interface shared by every image/text model, and ``load_encoder``.

An encoder maps preprocessed images and strings into one L2-normalised space:

* ``encode_image(images)``: (B, 3, H, W) float32 (the output of ``transform``)
  -> (B, D) float32, rows L2-normalised;
* ``encode_text(texts)``: list of T strings -> (T, D) float32, rows L2-normalised
  (``has_text`` is False for image-only models such as DINO, which raise);
* ``transform``: PIL RGB image -> (3, H, W) float32 tensor (the model's own
  evaluation preprocessing);
* ``model_id``: a stable string that identifies the weights (recorded in the
  embedding store, checked when a store is resumed or labelled).

Model specs (``load_encoder``):

=====================================  ==================================================
``openclip:ARCH/TAG``                  open_clip pretrained weights (downloaded once,
                                       e.g. ``openclip:ViT-B-32/laion2b_s34b_b79k``)
``openclip:ARCH`` + ``checkpoint``     open_clip architecture, weights from a local file
``openclip:ARCH/random``               random init (tests and benchmarks only)
``openclip:/path/cfg.json[/...]``      a custom open_clip model config file as ARCH
``timm:NAME`` [+ ``checkpoint``]       timm image model, e.g. ``timm:vit_base_patch16_224.dino``
                                       (CLS / pre-logits feature; image only)
``surrogate:effnet-lite0+minilm``      offline ConSE stand-in, **NOT CLIP** (see
                                       :mod:`nolabels.models.surrogate`)
``surrogate:effnet-lite0``             its EfficientNet-Lite0 image features only
=====================================  ==================================================
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from nolabels.errors import InputError, MissingDependencyError, UnavailableError

#: What ``Encoder.transform`` returns for one image: (3, H, W) float32.
ImageTransform = Callable[[object], torch.Tensor]


class WeightsUnavailableError(UnavailableError):
    """Pretrained weights could not be fetched (no network, unknown tag, missing file).

    The message always says how to pass a local checkpoint instead.
    """


class Encoder(abc.ABC):
    """An image (and optionally text) encoder into one L2-normalised space.

    Attributes:
        spec: the spec string it was loaded from (``openclip:ViT-B-32/openai``).
        model_id: stable identifier of architecture + weights (a checkpoint file
            is identified by its SHA-256), stored in embedding stores.
        dim: D, the embedding width.
        has_text: whether :meth:`encode_text` is available.
        logit_scale: the temperature the model was trained with (CLIP: 100);
            used as ``ops.pseudo_label``'s ``logit_scale`` by default.
        transform: PIL RGB image -> (3, H, W) float32 tensor.
        preprocessing: a human-readable description of ``transform``.
        checkpoint: the local weights file, if any.
    """

    spec: str
    model_id: str
    dim: int
    has_text: bool = True
    #: a convolutional image tower that runs faster on channels-last tensors on CUDA
    channels_last: bool = False
    logit_scale: float = 100.0
    transform: ImageTransform
    checkpoint: str | None = None

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    @property
    def preprocessing(self) -> str:
        return describe_transform(self.transform)

    @abc.abstractmethod
    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) on ``self.device`` -> (B, D) float features (not normalised)."""

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError(f"{self.spec} has no text encoder (image features only)")

    @abc.abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """The torch modules to move with :meth:`to`."""

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of preprocessed images.

        Args:
            images: (B, 3, H, W) float32, as produced by ``transform`` (any device).
        Returns:
            (B, D) float32 on ``self.device``, rows L2-normalised.
        """
        if images.dim() != 4:
            raise InputError(f"encode_image: expected (B, 3, H, W), got {tuple(images.shape)}")
        feats = self._image_features(images.to(self.device, torch.float32, non_blocking=True))
        return F.normalize(feats.float(), dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Embed strings.

        Args:
            texts: T strings (T may be 0).
            batch_size: strings per forward pass.
        Returns:
            (T, D) float32 on ``self.device``, rows L2-normalised.
        Raises:
            NotImplementedError: if ``has_text`` is False.
        """
        if isinstance(texts, str):
            raise TypeError("encode_text: pass a list of strings, not one string")
        texts = list(texts)
        if not self.has_text:
            return self._text_features(texts)
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        out = [self._text_features(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(out).float().to(self.device), dim=-1)

    def to(self, device: str | torch.device) -> Encoder:
        """Move the model to ``device``; returns self."""
        self.device = torch.device(device)
        for m in self.modules():
            m.to(self.device)
        return self

    def describe(self) -> dict:
        """JSON-serialisable facts recorded in a store's manifest."""
        return {
            "spec": self.spec,
            "model_id": self.model_id,
            "dim": self.dim,
            "has_text": self.has_text,
            "logit_scale": self.logit_scale,
            "preprocessing": self.preprocessing,
            "checkpoint": self.checkpoint,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_id!r}, dim={self.dim}, device={self.device})"


# --------------------------------------------------------------------------- helpers
def describe_transform(t: object) -> str:
    """A one-line description of a torchvision-style transform."""
    return " ".join(repr(t).split())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (identifies checkpoint weights in ``model_id``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def check_checkpoint(path: str | os.PathLike, spec: str) -> Path:
    """The checkpoint as a Path, or :class:`WeightsUnavailableError` if it is not a file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsUnavailableError(
            f"{spec}: checkpoint file {str(p)!r} does not exist. Pass the path of a local "
            "weights file (a state_dict saved with torch.save, or .safetensors) with "
            "--checkpoint FILE (Python: load_encoder(spec, checkpoint=FILE))."
        )
    return p


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub endpoint accepts a TCP connection (False when offline).

    Honours ``HF_HUB_OFFLINE`` / ``HF_ENDPOINT``. Used to fail in seconds instead of
    retrying downloads for a minute on a machine without network.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.is_offline_mode():
        return False
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if host is None:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable() -> Iterator[bool]:
    """Run the block with the Hub in offline mode (cache only) if it cannot be reached.

    Yields whether the Hub is reachable. Downloads inside the block then either
    come from the local cache or fail at once instead of after many retries.
    """
    reachable = hub_reachable()
    if reachable:
        yield True
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield False
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE = old


def weights_error(spec: str, what: str, cause: BaseException | str, *, example_file: str,
                  reachable: bool) -> WeightsUnavailableError:
    """A :class:`WeightsUnavailableError` that says how to pass a local checkpoint."""
    net = "" if reachable else " (the Hugging Face Hub is not reachable from this machine)"
    kind, _, rest = spec.partition(":")
    arch = rest.split("/")[0] if kind == "openclip" else rest
    return WeightsUnavailableError(
        f"could not fetch the pretrained weights of {what}{net}: {cause}\n"
        f"To run without network, download the weights on a machine with internet access "
        f"(e.g. {example_file}), copy the file here, and pass it as a local checkpoint:\n"
        f"    nolabels embed IMAGES --model {kind}:{arch} --checkpoint /path/to/weights "
        f"--out STORE\n"
        f"(Python: nolabels.models.load_encoder('{kind}:{arch}', checkpoint='/path/to/weights'))."
    )


def parse_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> cuda if available else cpu; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


EncoderFactory = Callable[..., "Encoder"]
#: model kind (the spec's prefix) -> a factory ``f(rest, *, checkpoint, seed) -> Encoder``, or
#: ``"module:attribute"`` naming one (imported on first use, so optional dependencies load
#: only when that kind of model is built). Fill with :func:`register_encoder`.
_ENCODERS: dict[str, EncoderFactory | str] = {}


def register_encoder(kind: str, factory: EncoderFactory | str) -> None:
    """Make ``load_encoder("KIND:...")`` build models with ``factory``.

    Args:
        kind: the spec prefix before ``:`` (letters, digits, ``-``, ``_``).
        factory: ``f(rest: str, *, checkpoint, seed) -> Encoder`` (``rest``: the spec after
            ``KIND:``), or the string ``"package.module:attribute"`` naming it (lazy).
    """
    if not kind or not all(ch.isalnum() or ch in "-_" for ch in kind):
        raise InputError(f"register_encoder: bad model kind {kind!r}")
    _ENCODERS[kind] = factory


def _factory(kind: str) -> EncoderFactory:
    f = _ENCODERS[kind]
    if isinstance(f, str):
        import importlib

        mod, _, attr = f.partition(":")
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
        _ENCODERS[kind] = f = obj
    return f


def load_encoder(spec: str, *, checkpoint: str | os.PathLike | None = None,
                 device: str | torch.device | None = "cpu", seed: int = 0) -> Encoder:
    """Build an :class:`Encoder` from a model spec (see the module docstring).

    The spec's prefix picks the factory registered with :func:`register_encoder`
    (built in: ``openclip``, ``timm``, ``surrogate``; see ``nolabels.models``).

    Args:
        spec: ``openclip:...``, ``timm:...`` or ``surrogate:...``.
        checkpoint: a local weights file; required for ``openclip:ARCH`` without a tag.
        device: where to put the model ("auto": cuda if available).
        seed: the seed of random-init models (``openclip:ARCH/random``).
    Raises:
        WeightsUnavailableError: weights cannot be fetched or the checkpoint is missing;
            the message says how to pass a local checkpoint.
        ValueError: an unknown spec.
        ImportError: the optional dependency is missing (with the pip extra to install).
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise InputError(
            f"unknown model spec {spec!r}: expected openclip:ARCH/TAG, openclip:ARCH with "
            "--checkpoint, timm:NAME, or surrogate:effnet-lite0+minilm"
        )
    if kind not in _ENCODERS:
        raise InputError(f"unknown model kind {kind!r} in {spec!r} "
                         f"({', '.join(sorted(_ENCODERS))})")
    enc = _factory(kind)(rest, checkpoint=checkpoint, seed=seed)
    return enc.to(parse_device(device))


def require(module: str, extra: str):
    """Import an optional dependency or raise ImportError naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{module} is needed for this model; install it with: pip install 'nolabels[{extra}]'"
        ) from e
