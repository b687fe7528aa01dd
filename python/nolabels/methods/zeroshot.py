"""Zero-shot text classifiers: prompt-template ensembles and CDE description averaging.

For class ``c`` the texts are ``T_c = {template(c) for each template} ∪ descriptions(c)``
and the class embedding is ``w_c = normalize(mean_{t in T_c} normalize(text_encoder(t)))``
(CLIP's prompt ensemble; with descriptions it is NoLA's CDE classifier, methods.md §3.2:
``e_t = normalize(text(t))``, ``w_c = normalize(mean_{t in T_c} e_t)``; no classifier is
trained). Underscores in class names become spaces.

Descriptions are a JSON file ``{class: [sentence, ...]}`` (LaFTer/NoLA/CuPL format) or
the name of one shipped with the package: ``cifar10`` (hand-written, 10 sentences per
class, ``nolabels/methods/data/cifar10_descriptions.json``; not LLM output).

Input files are UTF-8 text (a leading byte-order mark is accepted). A file that is not
UTF-8 or not valid JSON is refused with an :class:`~nolabels.errors.InputError` naming
the file and the line (``path:LINE[:COL]: ...``); :func:`read_text`, :func:`text_lines`
and :func:`read_json` are the readers the other methods share.
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


def read_text(path: str | os.PathLike) -> str:
    """The whole of a UTF-8 text file (a leading byte-order mark is dropped).

    Raises:
        InputError: the file is not UTF-8; the message names the file, line and column.
        OSError: the file cannot be read (missing, a directory, no permission).
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # e.start: after the BOM
        at = e.start
        line = body.count(b"\n", 0, at) + 1
        col = at - (body.rfind(b"\n", 0, at) + 1) + 1
        raise InputError(f"{os.fspath(path)}:{line}:{col}: not UTF-8 text (byte "
                         f"0x{body[at]:02x}); save the file as UTF-8") from None


def text_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``(line number, line)`` for every line of a UTF-8 text file (1-based numbers; the
    line without its ``\\n`` / ``\\r\\n``). Errors as :func:`read_text`."""
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [(i, ln.rstrip("\r")) for i, ln in enumerate(lines, 1)]


def read_json(path: str | os.PathLike) -> object:
    """A UTF-8 JSON file, parsed.

    Raises:
        InputError: not UTF-8, or not valid JSON (``path:LINE:COL: not valid JSON (why)``).
        OSError: the file cannot be read.
    """
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{os.fspath(path)}:{e.lineno}:{e.colno}: not valid JSON "
                         f"({e.msg})") from None


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names, one per line, in label order (blank lines and ``#`` comments skipped).

    Raises:
        InputError: no names; two lines naming the same class (compared as
            :func:`norm_name` does: case, ``_``, ``-`` and spaces ignored, since they
            give the same prompts); a file that is not UTF-8 (file and line named).
    """
    names: list[str] = []
    first: dict[str, tuple[int, str]] = {}
    dups: list[str] = []
    for no, ln in text_lines(path):
        n = ln.strip()
        if not n or n.startswith("#"):
            continue
        key = norm_name(n)
        if key in first:
            dups.append(f"line {no} {n!r} repeats line {first[key][0]} {first[key][1]!r}")
        else:
            first[key] = (no, n)
        names.append(n)
    if not names:
        raise InputError(f"{path}: no class names (one per line; blank lines and # comments "
                         "are skipped)")
    if dups:
        more = f" (and {len(dups) - 3} more)" if len(dups) > 3 else ""
        raise InputError(f"{path}: duplicate class names: {'; '.join(dups[:3])}{more}")
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
        templates = [t for _, t in text_lines(spec) if t.strip()]
    else:
        raise InputError(f"unknown template set {spec!r}: use one of {sorted(TEMPLATES)} "
                         "or a file with one template per line")
    bad = [t for t in templates if not _is_template(t)]
    if not templates or bad:
        where = f"{spec}: " if isinstance(spec, str) and spec not in TEMPLATES else ""
        raise InputError(f"{where}templates must each contain '{{}}' (the class name) and no "
                         f"other {{field}}; bad: {bad[:3]}")
    return templates


def _is_template(t: str) -> bool:
    """``t`` has a ``{}`` and formats with one argument."""
    try:
        return "{}" in t and bool(t.format("x"))
    except (IndexError, KeyError, ValueError):
        return False


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


def compact_name(name: str) -> str:
    """``name`` lower-cased with everything but letters and digits removed: the last
    resort for matching a descriptions key to a class (``BareLand``, ``baseballdiamond``
    and ``bare_land`` all give ``bareland``)."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def read_descriptions(path: str | os.PathLike, classes: Sequence[str]) -> dict[str, list[str]]:
    """A descriptions JSON ``{class name: [sentence, ...]}`` (LaFTer/NoLA/CuPL format),
    keyed by the matching entry of ``classes``. ``path`` may also name a built-in set
    (``cifar10``).

    This reads the authors' files as they ship them: LaFTer's
    ``descriptions/generic/<Dataset>.json`` and ``descriptions/tap/<Dataset>.json``
    (GPT-3 sentences, 25 per class for most sets, 50 for CIFAR) and NoLA's
    ``descriptions/generic/<Dataset>.json`` / ``k_descriptions/...`` (the same layout).
    Their keys are the dataset's folder names, so a key matches a class by
    :func:`norm_name` (case, ``_``, ``-`` and spaces ignored) and, failing that, by
    :func:`compact_name` (NoLA's ``BareLand`` or ``denseresidential`` for the classes
    ``bare land`` / ``dense residential``), when exactly one key matches. Each sentence
    is passed on as written, with runs of white space made one space and the ends
    stripped, which is what CLIP's tokenizer does to it in the authors' code (their
    files have sentences that start with ``"\\n"`` or a space).

    Every class must have a non-empty list of non-blank strings: a class without
    descriptions is an error that names it, never a silent template-only class. Keys
    that match no class are ignored (a large set can serve a subset of its classes;
    a misspelt key shows up as its class missing). Where the authors' code differs
    (it takes the class list from the keys for 397 classes), see
    ``docs/differences.md``.

    Raises:
        InputError: not a JSON object; classes without descriptions (the first few
            named, with the count, and the file); an entry that is not a list of
            non-blank strings; two keys for the same class; malformed JSON or a file
            that is not UTF-8 (file and line named).
        FileNotFoundError: no such file and no such built-in set.
    """
    file = descriptions_path(path)
    raw = read_json(file)
    if not isinstance(raw, dict):
        raise InputError(f"{file}: expected a JSON object {{class: [descriptions]}}, got a "
                         f"JSON {type(raw).__name__}")
    by_norm: dict[str, str] = {}
    for k in raw:
        other = by_norm.setdefault(norm_name(k), k)
        if other != k and any(norm_name(c) == norm_name(k) for c in classes):
            raise InputError(f"{file}: keys {other!r} and {k!r} both describe the same class")
    by_compact: dict[str, list[str]] = {}
    for k in raw:
        by_compact.setdefault(compact_name(k), []).append(k)
    out: dict[str, list[str]] = {}
    missing: list[str] = []
    for c in classes:
        key = by_norm.get(norm_name(c))
        if key is None:
            keys = by_compact.get(compact_name(c), []) if compact_name(c) else []
            if len(keys) > 1:
                raise InputError(f"{file}: keys {keys[:3]} could each describe the class {c!r}")
            key = keys[0] if keys else None
        if key is None:
            missing.append(c)
            continue
        v = raw[key]
        if (not isinstance(v, list) or not v
                or not all(isinstance(s, str) and s.strip() for s in v)):
            raise InputError(f"{file}: {key!r} must map to a non-empty list of non-blank "
                             f"strings, got {json.dumps(v)[:80]}")
        out[c] = [" ".join(s.split()) for s in v]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"{file}: no descriptions for {len(missing)} of the {len(classes)} "
                         f"classes: {shown}{more} (every class needs a list of sentences)")
    return out


def class_texts(classes: Sequence[str], templates: Sequence[str],
                descriptions: Mapping[str, Sequence[str]] | None = None) -> list[list[str]]:
    """``T_c`` for every class: filled templates, then its descriptions.

    Args:
        classes: C class names ("_" is shown as a space in the templates).
        templates: format strings with one ``{}``.
        descriptions: ``{class: [sentences]}`` keyed by the class names (an exact key, else
            one equal under :func:`norm_name`), as :func:`read_descriptions` returns.
    Returns:
        C lists of texts.
    Raises:
        InputError: ``descriptions`` given (non-empty) but some classes have none: they
            are named; a class is never silently left with its templates only.
    """
    by_norm = {norm_name(k): k for k in descriptions} if descriptions else {}
    out, missing = [], []
    for c in classes:
        name = c.replace("_", " ")
        texts = [t.format(name) for t in templates]
        if descriptions:
            key = c if c in descriptions else by_norm.get(norm_name(c))
            if key is None:
                missing.append(c)
            else:
                texts += list(descriptions[key])
        out.append(texts)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"descriptions: none for {len(missing)} of the {len(classes)} classes: "
                         f"{', '.join(repr(c) for c in missing[:5])}{more}")
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
