"""Zero-shot text classifiers: prompt-template ensembles and CDE description averaging.

For class ``c`` the texts are ``T_c = {template(c) for each template} ∪ descriptions(c)``
and the class embedding is ``w_c = normalize(mean_{t in T_c} normalize(text_encoder(t)))``
(CLIP's prompt ensemble; with descriptions it is NoLA's CDE classifier, methods.md §3.2:
``e_t = normalize(text(t))``, ``w_c = normalize(mean_{t in T_c} e_t)``; no classifier is
trained). Underscores in class names become spaces.

Descriptions are a JSON file ``{class: [sentence, ...]}`` (LaFTer/NoLA/CuPL format) or
the name of one shipped with the package: ``cifar10`` (hand-written, 10 sentences per
class, ``nolabels/methods/data/cifar10_descriptions.json``; not LLM output).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from nolabels.errors import InputError

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
        raise InputError(f"{path}: no class names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{path}: duplicate class names {dup[:5]}")
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
        raise InputError(f"unknown template set {spec!r}: use one of {sorted(TEMPLATES)} "
                         "or a file with one template per line")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise InputError(f"templates must each contain '{{}}'; bad: {bad[:3]}")
    return templates


#: Descriptions shipped with the package (name -> file in ``nolabels/methods/data``).
BUILTIN_DESCRIPTIONS = {"cifar10": "cifar10_descriptions.json"}


def descriptions_path(spec: str | os.PathLike) -> Path:
    """A descriptions file: an existing path, or a built-in name (``cifar10``)."""
    if os.path.isfile(spec):
        return Path(spec)
    if str(spec) in BUILTIN_DESCRIPTIONS:
        from importlib import resources

        return Path(str(resources.files("nolabels.methods").joinpath(
            "data", BUILTIN_DESCRIPTIONS[str(spec)])))
    raise FileNotFoundError(f"descriptions {str(spec)!r}: no such file, and not a built-in set "
                            f"({', '.join(sorted(BUILTIN_DESCRIPTIONS))})")


def read_descriptions(path: str | os.PathLike, classes: Sequence[str]) -> dict[str, list[str]]:
    """A descriptions JSON ``{class name: [sentence, ...]}`` (LaFTer/NoLA/CuPL format),
    keyed by the matching entry of ``classes`` (names matched with :func:`norm_name`).
    ``path`` may also name a built-in set (``cifar10``). Classes without descriptions
    get an empty list (templates only)."""
    raw = json.loads(descriptions_path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object {{class: [descriptions]}}")  # noqa: TRY004
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


def cde_embeddings(encoder, classes: Sequence[str], descriptions: Mapping[str, Sequence[str]]
                   | str | os.PathLike | None, *, templates: str | Sequence[str] = "simple"
                   ) -> torch.Tensor:
    """NoLA's CDE classifier (methods.md §3.2): :func:`class_embeddings` with the
    descriptions (a mapping, a JSON file or a built-in name) and the templates."""
    if isinstance(descriptions, (str, os.PathLike)):
        descriptions = read_descriptions(descriptions, classes)
    return class_embeddings(encoder, classes, templates=templates, descriptions=descriptions)
