"""CLIP through open_clip (``pip install 'nolabels[clip]'``).

Specs: ``openclip:ARCH/TAG`` (pretrained tag, e.g. ``ViT-B-32/laion2b_s34b_b79k`` or
``ViT-B-32/openai``), ``openclip:ARCH`` with ``checkpoint=FILE`` (a local state_dict,
.bin/.pt/.safetensors, or an OpenAI JIT file), ``openclip:ARCH/random`` (random init,
for tests and benchmarks), ``openclip:hf-hub:ORG/REPO``. ARCH may also be the path of
an open_clip model-config JSON file (its file stem becomes the architecture name).

OpenAI's own checkpoints use QuickGELU: pass them with ``ARCH-quickgelu``
(e.g. ``openclip:ViT-B-32-quickgelu`` + ``--checkpoint ViT-B-32.pt``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


def _parse(rest: str) -> tuple[str, str | None, str | None]:
    """``ARCH[/TAG]`` -> (arch name, tag or None, config-file path or None)."""
    if rest.startswith("hf-hub:"):
        return rest, None, None
    if ".json" in rest:
        cfg, _, tag = rest.partition(".json")
        cfg += ".json"
        tag = tag.lstrip("/") or None
        return Path(cfg).stem, tag, cfg
    arch, _, tag = rest.partition("/")
    return arch, (tag or None), None


class OpenCLIPEncoder(Encoder):
    """An open_clip CLIP model: ``encode_image`` / ``encode_text`` into the joint space.

    Args:
        rest: the part of the spec after ``openclip:`` (``ARCH/TAG``, ``ARCH``,
            ``ARCH/random``, ``hf-hub:ORG/REPO``, ``/path/cfg.json[/TAG]``).
        checkpoint: a local weights file (then no tag may be given).
        seed: seed of the random init (``/random``).
    """

    def __init__(self, rest: str, *, checkpoint: str | os.PathLike | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        open_clip = require("open_clip", "clip")
        arch, tag, cfg_file = _parse(rest)
        self.spec = f"openclip:{rest}"
        suffix = ""
        if cfg_file is not None:
            if not Path(cfg_file).is_file():
                raise InputError(f"{self.spec}: model config {cfg_file!r} does not exist")
            open_clip.add_model_config(cfg_file)
            suffix = "#cfg=" + hashlib.sha256(Path(cfg_file).read_bytes()).hexdigest()[:12]
        elif not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
            raise InputError(
                f"{self.spec}: unknown open_clip architecture {arch!r} "
                f"(see open_clip.list_models(), e.g. ViT-B-32, ViT-B-16, ViT-L-14)"
            )

        if checkpoint is not None:
            if tag not in (None,):
                raise InputError(f"{self.spec}: give either a pretrained tag or a checkpoint, not both")
            path = check_checkpoint(checkpoint, self.spec)
            self.checkpoint = str(path.resolve())
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=str(path), weights_only=True)
            except Exception as e:
                from nolabels.data.safe_io import error_summary

                raise InputError(  # one line: a pickle's refusal by weights_only is long
                    f"{self.spec}: could not load checkpoint {str(path)!r} into {arch}: "
                    f"{error_summary(e)}"
                ) from e
            self.model_id = f"openclip:{arch}{suffix}@sha256:{file_sha256(path)[:16]}"
        elif tag == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
            self.model_id = f"openclip:{arch}{suffix}/random@seed{seed}"
        elif tag is None and not arch.startswith("hf-hub:"):
            raise InputError(
                f"{self.spec}: no weights given. Use openclip:{arch}/TAG with a pretrained tag "
                f"(one of {open_clip.list_pretrained_tags_by_model(arch)[:6]}...), or "
                f"--checkpoint FILE for a local weights file, or openclip:{arch}/random for a "
                "random init (tests only)."
            )
        else:
            if tag is not None and cfg_file is None and tag not in open_clip.list_pretrained_tags_by_model(arch):
                raise InputError(
                    f"{self.spec}: unknown pretrained tag {tag!r} for {arch}; known tags: "
                    f"{open_clip.list_pretrained_tags_by_model(arch)}. For a local file use "
                    f"openclip:{arch} --checkpoint FILE."
                )
            with hub_offline_unless_reachable() as reachable:
                try:
                    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag)
                except Exception as e:
                    raise weights_error(self.spec, f"open_clip {arch} ({tag or 'hub'})",
                                        f"{type(e).__name__}: {e}",
                                        example_file=_example_download(open_clip, arch, tag),
                                        reachable=reachable) from e
            self.model_id = f"openclip:{arch}/{tag}" if tag else f"openclip:{arch}"

        self.model = model.eval()
        self.transform = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        ls = getattr(model, "logit_scale", None)
        self.logit_scale = float(ls.detach().exp()) if isinstance(ls, torch.Tensor) else 100.0
        dim = getattr(model.visual, "output_dim", None)
        if not isinstance(dim, int):
            size = getattr(model.visual, "image_size", (224, 224))
            size = (size, size) if isinstance(size, int) else tuple(size)
            with torch.inference_mode():
                dim = int(model.encode_image(torch.zeros(1, 3, *size)).shape[-1])
        self.dim = dim

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens)


def _example_download(open_clip, arch: str, tag: str | None) -> str:
    try:
        cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    except Exception:  # noqa: BLE001
        cfg = {}
    hub = (cfg or {}).get("hf_hub", "").rstrip("/")
    if hub:
        return f"`hf download {hub} open_clip_pytorch_model.bin`"
    if (cfg or {}).get("url"):
        return cfg["url"]
    return "the model's open_clip_pytorch_model.bin from its Hugging Face repository"


def from_spec(rest: str, *, checkpoint: str | os.PathLike | None = None, seed: int = 0
              ) -> OpenCLIPEncoder:
    """The ``openclip:`` factory (:func:`nolabels.models.register_encoder`)."""
    return OpenCLIPEncoder(rest, checkpoint=checkpoint, seed=seed)
