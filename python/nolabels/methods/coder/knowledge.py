"""CODER's expert knowledge: the :class:`Knowledge` JSON bundle and importers of the
authors' ``expert_knowledge/`` bundle (plain-data pickles read without running code).

Follows methods.md §5.2 and YCaigogogo/CVPR24-CODER ``CODER/CODER.py`` (what it reads).
"""
from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nolabels.errors import CorruptFileError, InputError


@dataclass
class Knowledge:
    """CODER's expert knowledge for one dataset.

    JSON schema (``Knowledge.load`` / ``save``)::

        {
          "version": 1,
          "dataset": "cifar10",                     # optional: selects templates and τ
          "classes": {
            "<class name>": {
              "attributes": ["<visual feature>", ...],       # kind-0 texts
              "analogous":  ["<visually similar object>", ...],   # kind-0 texts
              "synonyms":   ["<other name>", ...]            # kind-1 texts (with the name)
            },
            ...
          },
          "ovo": {                                   # optional: one-vs-one attributes
            "<class c1>": {"<class c2>": ["<feature of c1 that differs from c2>", ...]}
          }
        }

    Every list may be empty or missing; a class missing from ``classes`` has only its name.
    Class names are matched exactly (after replacing "_" by " " on both sides).
    """

    classes: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    ovo: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    dataset: str | None = None

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("_", " ").strip()

    @classmethod
    def from_dict(cls, d: Mapping) -> Knowledge:
        if not isinstance(d, Mapping):
            raise InputError("knowledge: the top level must be a JSON object")
        raw = d.get("classes", {})
        if not isinstance(raw, Mapping):
            raise InputError("knowledge: 'classes' must map class names to objects")
        classes = {}
        for name, entry in raw.items():
            if not isinstance(entry, Mapping):
                raise InputError(f"knowledge: classes[{name!r}] must be an object")
            out = {}
            for k in ("attributes", "analogous", "synonyms"):
                v = entry.get(k, [])
                if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                    raise InputError(f"knowledge: classes[{name!r}][{k!r}] must be a list of strings")
                out[k] = [s.strip() for s in v if s.strip()]
            unknown = set(entry) - {"attributes", "analogous", "synonyms"}
            if unknown:
                raise InputError(f"knowledge: classes[{name!r}] has unknown keys {sorted(unknown)}")
            classes[cls._key(name)] = out
        ovo = {}
        for c1, inner in (d.get("ovo") or {}).items():
            if not isinstance(inner, Mapping):
                raise InputError(f"knowledge: ovo[{c1!r}] must map class names to lists")
            for c2, attrs in inner.items():
                if not isinstance(attrs, list) or not all(isinstance(s, str) for s in attrs):
                    raise InputError(f"knowledge: ovo[{c1!r}][{c2!r}] must be a list of strings")
                ovo.setdefault(cls._key(c1), {})[cls._key(c2)] = [s.strip() for s in attrs if s.strip()]
        return cls(classes=classes, ovo=ovo, dataset=d.get("dataset"))

    def to_dict(self) -> dict:
        return {"version": 1, "dataset": self.dataset, "classes": self.classes, "ovo": self.ovo}

    @classmethod
    def load(cls, path: str | os.PathLike) -> Knowledge:
        """Read a knowledge JSON file (UTF-8). Raises :class:`InputError` naming the file
        (and the line, for malformed JSON or text that is not UTF-8)."""
        from nolabels.methods.zeroshot import read_json

        d = read_json(path)
        try:
            return cls.from_dict(d)
        except InputError as e:
            raise InputError(f"{os.fspath(path)}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        tmp = Path(f"{path}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def entry(self, name: str) -> dict[str, list[str]]:
        return self.classes.get(self._key(name), {"attributes": [], "analogous": [], "synonyms": []})

    def unknown_classes(self, class_names: Sequence[str]) -> list[str]:
        """Names in the knowledge that are not in ``class_names`` (likely typos)."""
        known = {self._key(c) for c in class_names}
        bad = [c for c in self.classes if c not in known]
        for c1, inner in self.ovo.items():
            bad += [c for c in [c1, *inner] if c not in known and c not in bad]
        return bad


def load_example_knowledge(name: str = "cifar10") -> Knowledge:
    """The hand-written example knowledge shipped with the package (``cifar10``)."""
    path = Path(__file__).resolve().parent.parent / "data" / f"{name}_knowledge.json"
    if not path.exists():
        raise InputError(f"no example knowledge named {name!r} (looked for {path})")
    return Knowledge.load(path)


# --------------------------------------------------------------------------- the authors' bundle
#: The authors' knowledge bundle (``expert_knowledge.zip`` from their README): part ->
#: (folder, file extension). ``CODER/CODER.py`` reads ``attribute/<dataset>.pkl`` and
#: ``simile_class/<dataset>.pkl`` (pickled lists, one list of strings per class in the
#: order of ``datasets/class_name/<dataset>.txt``), ``synonym/<dataset>.json`` (a list,
#: one ``{"syno": [names]}`` per class, same order) and ``ovo_attribute/<dataset>.json``
#: (``{class1: {class2: [attributes of class1]}}``, keyed by the raw class names).
AUTHORS_PARTS: dict[str, tuple[str, str]] = {
    "attributes": ("attribute", ".pkl"), "analogous": ("simile_class", ".pkl"),
    "synonyms": ("synonym", ".json"), "ovo": ("ovo_attribute", ".json"),
}
#: Constructors a plain-data pickle may name (protocol 2 pickles sets this way).
_SAFE_GLOBALS = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
                 ("__builtin__", "frozenset"), ("builtins", "list"), ("builtins", "tuple"),
                 ("builtins", "dict")}


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, tuples, sets, strings and numbers only: any other class
    or function named in the file is refused, so reading it cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            import builtins

            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}; only plain lists, dicts and "
                                     "strings are read (nothing in the file is executed)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("has persistent references; only plain data is read")


def read_plain_pickle(path: str | os.PathLike) -> object:
    """A pickle of plain data (lists, dicts, tuples, sets, strings, numbers), read without
    running anything. Raises :class:`~nolabels.errors.CorruptFileError` naming the file
    for anything else."""
    data = Path(path).read_bytes()
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CorruptFileError(os.fspath(path), f"not a plain-data pickle: {e}") from None


def _authors_root(root: Path) -> Path:
    if not root.is_dir():
        raise InputError(f"{root}: not a folder (the authors' knowledge is the folder "
                         "expert_knowledge/ with attribute/, simile_class/, synonym/, "
                         "ovo_attribute/)")
    if not any((root / d).is_dir() for d, _ in AUTHORS_PARTS.values()) and \
            (root / "expert_knowledge").is_dir():
        root = root / "expert_knowledge"
    return root


def authors_datasets(root: str | os.PathLike) -> list[str]:
    """The data-set names (file stems) present in an authors' knowledge folder."""
    base = _authors_root(Path(root))
    names = set()
    for folder, ext in AUTHORS_PARTS.values():
        if (base / folder).is_dir():
            names |= {f.name[: -len(ext)] for f in (base / folder).iterdir()
                      if f.is_file() and f.name.endswith(ext)}
    return sorted(names)


def _authors_file(base: Path, folder: str, ext: str, dataset: str) -> Path | None:
    d = base / folder
    if not d.is_dir():
        return None
    stem = "ImageNet" if dataset == "ImageNet-V2" else dataset  # CODER.py reads ImageNet's
    exact = d / f"{stem}{ext}"
    if exact.is_file():
        return exact
    from nolabels.methods.zeroshot import compact_name

    hits = [f for f in sorted(d.iterdir()) if f.is_file() and f.name.endswith(ext)
            and compact_name(f.name[: -len(ext)]) == compact_name(stem)]
    if len(hits) > 1:
        raise InputError(f"{d}: {[h.name for h in hits]} all match the data set {dataset!r}")
    return hits[0] if hits else None


def _string_list(v: object, where: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (set, frozenset)):
        v = sorted(v)
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise InputError(f"{where}: expected a list of strings, got {type(v).__name__}")
    return list(v)


def _per_class(value: object, class_names: Sequence[str], file: Path) -> list[list[str]]:
    """One list of strings per class from a list in class order, or a dict keyed by
    class position or class name."""
    C = len(class_names)
    if isinstance(value, (list, tuple)):
        if len(value) != C:
            raise InputError(f"{file}: {len(value)} entries, but {C} classes were given (the "
                             "entries follow the order of the authors' datasets/class_name/"
                             "<dataset>.txt: pass that list as --classes)")
        return [_string_list(v, f"{file}: entry {i} ({class_names[i]!r})")
                for i, v in enumerate(value)]
    if isinstance(value, dict):
        keys = {Knowledge._key(c): i for i, c in enumerate(class_names)}
        out: list[list[str]] = [[] for _ in range(C)]
        for k, v in value.items():
            i = k if isinstance(k, int) else keys.get(Knowledge._key(str(k)))
            if i is None or not 0 <= i < C:
                raise InputError(f"{file}: key {k!r} is not a class position or name")
            out[i] = _string_list(v, f"{file}: {k!r}")
        return out
    raise InputError(f"{file}: expected a list (one entry per class), got {type(value).__name__}")


def read_authors_knowledge(root: str | os.PathLike, dataset: str,
                           class_names: Sequence[str]) -> Knowledge:
    """CODER's knowledge from the authors' bundle (``expert_knowledge/``, their README's
    download), for one data set.

    Args:
        root: the ``expert_knowledge`` folder (or the folder that holds it).
        dataset: the authors' data-set name, the file stem (``caltech-101``, ``DTD``,
            ``eurosat``, ``food-101``, ``oxford-pet``, ``ImageNet``, ...; matched
            ignoring case and punctuation; ``ImageNet-V2`` reads ImageNet's files, as the
            authors do). It also selects the templates and τ.
        class_names: the C class names **in the order of the authors'
            ``datasets/class_name/<dataset>.txt``** (the pickles are positional lists).

    Returns:
        the :class:`Knowledge` (attributes, analogous classes, synonyms, one-vs-one
        attributes; a part whose file is absent stays empty).

    Raises:
        InputError: no part of the bundle for ``dataset`` (the data sets present are
            named); a list whose length is not C; one-vs-one keys that are not classes
            are kept and reported by :meth:`Knowledge.unknown_classes`.
        CorruptFileError: a pickle that is not plain data (nothing in it is executed),
            or malformed JSON.
    """
    from nolabels.methods.zeroshot import read_json

    base = _authors_root(Path(root))
    files = {part: _authors_file(base, folder, ext, dataset)
             for part, (folder, ext) in AUTHORS_PARTS.items()}
    if not any(files.values()):
        raise InputError(f"{base}: no knowledge for the data set {dataset!r} (present: "
                         f"{', '.join(authors_datasets(base)) or 'none'})")
    per_class: dict[str, list[list[str]]] = {}
    for part in ("attributes", "analogous"):
        if files[part] is not None:
            per_class[part] = _per_class(read_plain_pickle(files[part]), class_names, files[part])
    if files["synonyms"] is not None:
        raw = read_json(files["synonyms"])
        if isinstance(raw, list):
            raw = [e.get("syno") if isinstance(e, dict) else e for e in raw]
        per_class["synonyms"] = _per_class(raw, class_names, files["synonyms"])
    ovo: dict = {}
    if files["ovo"] is not None:
        ovo = read_json(files["ovo"])
        if not isinstance(ovo, dict):
            raise InputError(f"{files['ovo']}: expected {{class1: {{class2: [attributes]}}}}")
    classes = {c: {part: lists[i] for part, lists in per_class.items()}
               for i, c in enumerate(class_names)}
    try:
        return Knowledge.from_dict({"dataset": dataset, "classes": classes, "ovo": ovo})
    except InputError as e:
        raise InputError(f"{base} ({dataset}): {e}") from None


def load_knowledge(path: str | os.PathLike, class_names: Sequence[str] | None = None,
                   dataset: str | None = None) -> Knowledge:
    """A knowledge JSON (:meth:`Knowledge.load`) or, for a folder, the authors' bundle
    (:func:`read_authors_knowledge`; needs ``class_names``, and ``dataset`` unless the
    folder holds one data set only)."""
    if not os.path.isdir(path):
        return Knowledge.load(path)
    if class_names is None:
        raise InputError(f"{path}: the authors' knowledge lists follow their class order: "
                         "pass --classes (their datasets/class_name/<dataset>.txt)")
    if dataset is None:
        present = authors_datasets(path)
        if len(present) != 1:
            raise InputError(f"{path}: pass --dataset (present: {', '.join(present) or 'none'})")
        dataset = present[0]
    return read_authors_knowledge(path, dataset, class_names)
