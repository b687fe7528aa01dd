"""Zero-shot text classifiers: prompt-template ensembles and CDE description averaging.

For class ``c`` the texts are ``T_c = {template(c) for each template} ∪ descriptions(c)``
and the class embedding is ``w_c = normalize(mean_{t in T_c} normalize(text_encoder(t)))``
(CLIP's prompt ensemble; with descriptions it is NoLA's CDE classifier, methods.md §3.2).
Underscores in class names become spaces.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

#: Named template sets (CLIP's, from the CLIP repository's prompt engineering notes).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "none": ("{}",),
    "simple": ("a photo of a {}.",),
    # CLIP's 7-template ImageNet subset (also LaFTer's/NoLA's ImageNet set).
    "imagenet7": (
        "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
    ),
    # CLIP's 18 CIFAR-10 templates.
    "cifar": (
        "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
        "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
        "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
        "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
        "a low contrast photo of the {}.", "a high contrast photo of the {}.",
        "a bad photo of the {}.", "a good photo of the {}.", "a photo of the small {}.",
        "a photo of the big {}.",
    ),
}


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names, one per line, in label order (blank lines and ``#`` comments skipped)."""
    names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(f"{path}: no class names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate class names {dup[:5]}")
    return names


def norm_name(name: str) -> str:
    """Case-, underscore- and space-insensitive form of a class name (for matching)."""
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def resolve_templates(spec: str | Sequence[str]) -> list[str]:
    """A named set (``none``, ``simple``, ``imagenet7``, ``cifar``), a file with one
    template per line, or a list of templates; each must contain ``{}``."""
    if not isinstance(spec, str):
        templates = list(spec)
    elif spec in TEMPLATES:
        templates = list(TEMPLATES[spec])
    elif os.path.isfile(spec):
        templates = [t for t in Path(spec).read_text(encoding="utf-8").splitlines() if t.strip()]
    else:
        raise ValueError(f"unknown template set {spec!r}: use one of {sorted(TEMPLATES)} "
                         "or a file with one template per line")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"templates must each contain '{{}}'; bad: {bad[:3]}")
    return templates


def read_descriptions(path: str | os.PathLike, classes: Sequence[str]) -> dict[str, list[str]]:
    """A descriptions JSON ``{class name: [sentence, ...]}`` (LaFTer/NoLA/CuPL format),
    keyed by the matching entry of ``classes`` (names matched with :func:`norm_name`).
    Classes without descriptions get an empty list (templates only)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{class: [descriptions]}}")  # noqa: TRY004
    by_norm = {norm_name(k): v for k, v in raw.items()}
    out = {}
    for c in classes:
        v = by_norm.get(norm_name(c), [])
        if isinstance(v, str):
            v = [v]
        out[c] = [str(s) for s in v if str(s).strip()]
    return out


def class_texts(classes: Sequence[str], templates: Sequence[str],
                descriptions: Mapping[str, Sequence[str]] | None = None) -> list[list[str]]:
    """``T_c`` for every class: filled templates, then its descriptions."""
    out = []
    for c in classes:
        name = c.replace("_", " ")
        texts = [t.format(name) for t in templates]
        if descriptions:
            texts += list(descriptions.get(c, []))
        out.append(texts)
    return out


@torch.no_grad()
def class_embeddings(encoder, classes: Sequence[str], *, templates: str | Sequence[str] = "simple",
                     descriptions: Mapping[str, Sequence[str]] | None = None) -> torch.Tensor:
    """The zero-shot (or CDE) classifier.

    Args:
        encoder: a :class:`nolabels.models.Encoder` with a text tower.
        classes: C class names.
        templates: a template set name, file, or list (see :func:`resolve_templates`).
        descriptions: optional ``{class: [sentences]}`` (CDE).
    Returns:
        (C, D) float32 on the encoder's device, rows L2-normalised.
    """
    texts = class_texts(classes, resolve_templates(templates), descriptions)
    unique = sorted({t for ts in texts for t in ts})
    index = {t: i for i, t in enumerate(unique)}
    emb = encoder.encode_text(unique)  # (U, D), normalised
    rows = [emb[[index[t] for t in ts]].mean(0) for ts in texts]
    return F.normalize(torch.stack(rows).float(), dim=-1)
