"""Image-only encoders through timm, e.g. DINO ``timm:vit_base_patch16_224.dino``.

The feature is timm's pre-logits output with the model's own pooling; for ViTs
with ``global_pool="token"`` (DINO) that is the final-norm CLS token (768-d for
ViT-B/16), as NoLA uses it. ``encode_text`` is not available (``has_text`` False).

Weights: ``timm:NAME`` downloads timm's pretrained weights (Hugging Face Hub);
``timm:ARCH`` with ``checkpoint=FILE`` loads a local state_dict (.pth/.bin/.safetensors;
a ``{"state_dict"|"model"|"teacher": ...}`` wrapper and ``module.``/``backbone.``
prefixes, as in the original DINO checkpoints, are accepted).
"""
from __future__ import annotations

import os

import torch

from nolabels.errors import InputError
from nolabels.models.base import (
    Encoder,
    check_checkpoint,
    file_sha256,
    hub_offline_unless_reachable,
    require,
    weights_error,
)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors or a torch file (``weights_only=True``: nothing in it
    is executed; CorruptFileError naming the file otherwise), unwrapped and de-prefixed."""
    from nolabels.data.safe_io import load_safetensors, load_torch_file

    path = str(path)
    if path.endswith(".safetensors"):
        sd = load_safetensors(path)[0]
    else:
        sd = load_torch_file(path)
    if not isinstance(sd, dict):
        from nolabels.errors import CorruptFileError

        raise CorruptFileError(path, f"holds a {type(sd).__name__}, not a state_dict")
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        for p in ("module.", "backbone."):
            k = k.removeprefix(p)
        out[k] = v
    return out


class TimmEncoder(Encoder):
    """A timm image model's pooled pre-logits feature, L2-normalised.

    Args:
        name: timm model name, with a pretrained tag (``vit_base_patch16_224.dino``).
        checkpoint: a local weights file instead of downloading.
    """

    has_text = False

    def __init__(self, name: str, *, checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__()
        timm = require("timm", "clip")
        self.spec = f"timm:{name}"
        if checkpoint is not None:
            path = check_checkpoint(checkpoint, self.spec)
            self.checkpoint = str(path.resolve())
            model = timm.create_model(name, pretrained=False, num_classes=0)
            sd = load_state_dict_file(path)
            sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))}
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise InputError(
                    f"{self.spec}: checkpoint {str(path)!r} does not match {name}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            self.model_id = f"timm:{name}@sha256:{file_sha256(path)[:16]}"
        else:
            with hub_offline_unless_reachable() as reachable:
                try:
                    model = timm.create_model(name, pretrained=True, num_classes=0)
                except Exception as e:
                    cfg = getattr(timm.models, "get_pretrained_cfg", lambda n: None)(name)
                    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
                    example = (f"`hf download {hub} model.safetensors`" if hub
                               else "the model's weights file")
                    raise weights_error(self.spec, f"timm {name}", f"{type(e).__name__}: {e}",
                                        example_file=example, reachable=reachable) from e
            self.model_id = f"timm:{name}"
        self.model = model.eval()
        data_cfg = timm.data.resolve_data_config({}, model=model)
        self.transform = timm.data.create_transform(**data_cfg, is_training=False)
        self.dim = int(model.num_features)

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def from_spec(rest: str, *, checkpoint: str | os.PathLike | None = None, seed: int = 0
              ) -> TimmEncoder:
    """The ``timm:`` factory (:func:`nolabels.models.register_encoder`); ``seed`` unused."""
    return TimmEncoder(rest, checkpoint=checkpoint)
