"""Output safety: no command overwrites or deletes a file it did not create.

Every command calls one of these before any work:

* :func:`claim_output_dir` for a directory ``--out`` (an embedding store, a tune run
  directory, the demo folder, a Parquet dataset of parts):

  - absent, or empty (our own temporary files aside): created and, except for a store
    (whose ``manifest.json`` is written by :class:`~nolabels.data.EmbeddingStore`),
    marked with ``_nolabels.json`` = ``{"nolabels": {"kind": KIND, ...}}``;
  - holding a nolabels manifest of the same kind: ours. It is resumed, or with
    ``overwrite`` the files that manifest lists (and our temporary files) are deleted,
    nothing else;
  - anything else (a non-empty folder without our manifest, or another kind's):
    :class:`~nolabels.errors.OutputExistsError` naming the folder; nothing is touched.

* :func:`claim_output_file` for a file ``--out`` (``label`` / ``predict`` / ``coder``
  predictions, ``coder-knowledge`` JSON): absent is fine; an existing file is replaced
  (atomically, by the writer) only when it is recognisably ours (:func:`is_ours_file`),
  else :class:`~nolabels.errors.OutputExistsError`, with or without ``--overwrite``.

What "ours" means for a file: Parquet whose schema metadata has the key ``nolabels``
(every Parquet writer of the package stamps it); JSON with a top-level ``nolabels`` key,
or CODER's knowledge format (``{"version": 1, "classes": {...}, ...}``); CSV whose header
is one the package writes (first column ``path``, with ``pred`` and ``label`` columns).

Directory kinds created before markers existed are recognised by their contents: a
store by ``manifest.json`` with ``format_version``, ``model`` and ``shards``; a run by
``config.json`` with ``method``, ``encoder`` and ``classes``; the demo folder by
``classes.txt`` listing the CIFAR-10 classes next to a ``cifar10/`` folder.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nolabels.errors import InputError, OutputExistsError

#: the marker file of every directory kind except a store (``manifest.json``). Its
#: leading underscore keeps Parquet dataset readers (pyarrow, DuckDB) from reading it.
MARKER = "_nolabels.json"
STORE_MANIFEST = "manifest.json"
#: the schema-metadata / JSON key that marks a file as written by nolabels.
KEY = "nolabels"
KINDS = ("store", "run", "demo", "dataset")
#: temporary files of our atomic writers: ``.NAME.tmp-XXXX`` (and ``.NAME.tmp-XXXX.npy``).
_TEMP = re.compile(r"\..+\.tmp-[^/]+")
_MAX_JSON = 64 << 20  # larger JSON files are not parsed to recognise them
_CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
            "truck"]


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of our atomic writers (``.NAME.tmp-XXXX``)."""
    return bool(_TEMP.fullmatch(name))


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_JSON:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _marker_kind(obj: Any) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get(KEY), dict):
        kind = obj[KEY].get("kind")
        return kind if isinstance(kind, str) else None
    if isinstance(obj, dict) and obj.get("format") == "nolabels-labels":
        return "dataset"  # the manifest of `nolabels label`'s Parquet dataset
    return None


def _legacy_kind(root: Path) -> str | None:
    m = _read_json(root / STORE_MANIFEST)
    if isinstance(m, dict) and {"format_version", "model", "shards"} <= set(m):
        return "store"
    c = _read_json(root / "config.json")
    if isinstance(c, dict) and {"method", "encoder", "classes"} <= set(c):
        return "run"
    classes = root / "classes.txt"
    if (root / "cifar10").is_dir() and classes.is_file():
        try:
            if classes.read_text().split() == _CIFAR10:
                return "demo"
        except (OSError, UnicodeDecodeError):
            pass
    return None


def dir_kind(path: str | os.PathLike) -> str | None:
    """The nolabels kind of directory ``path`` (``store``, ``run``, ``demo``, ``dataset``),
    or None when no nolabels manifest marks it as ours."""
    root = Path(path)
    for name in (MARKER, STORE_MANIFEST):
        kind = _marker_kind(_read_json(root / name)) if (root / name).is_file() else None
        if kind is not None:
            return kind
    return _legacy_kind(root)


def _entries(root: Path) -> list[str]:
    """Names in ``root`` other than our temporary files."""
    return sorted(n for n in os.listdir(root) if not is_temp_name(n))


def check_output_dir(path: str | os.PathLike, kind: str) -> str:
    """Check, without touching anything, that directory ``--out`` may be used for ``kind``.

    Returns:
        ``"absent"``, ``"empty"`` or ``"ours"``.
    Raises:
        OutputExistsError: ``path`` is a file, or a non-empty folder without a nolabels
            manifest of this kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    root = Path(path)
    if not root.exists() and not root.is_symlink():
        return "absent"
    if not root.is_dir():
        raise OutputExistsError(f"{root} exists and is not a directory; refusing to replace it "
                                "(choose another --out)")
    if not _entries(root):
        return "empty"
    have = dir_kind(root)
    if have is None:
        what = STORE_MANIFEST if kind == "store" else MARKER
        raise OutputExistsError(
            f"{root} is not empty and is not a nolabels {kind} (no nolabels {what}); refusing "
            "to write into it or delete anything there. Choose a new or empty --out directory")
    if have != kind:
        raise OutputExistsError(f"{root} holds a nolabels {have}, not a {kind}; refusing to "
                                "write into it. Choose another --out directory")
    return "ours"


def mark_output_dir(path: str | os.PathLike, kind: str, files: Iterable[str] = ()) -> None:
    """Write (or extend) the ``_nolabels.json`` marker of a directory of ``kind``.

    ``files`` are names (relative to ``path``) that the directory's writer created and that
    ``--overwrite`` may delete; they are added to those already listed.
    """
    from nolabels.data.store import atomic_write_json

    if kind == "store":
        raise ValueError("a store is marked by its manifest.json")
    root = Path(path)
    obj = _read_json(root / MARKER)
    info = obj[KEY] if _marker_kind(obj) == kind else {
        "kind": kind, "format_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": []}
    listed = list(info.get("files", []))
    new = [f for f in files if f not in listed]
    if obj is not None and _marker_kind(obj) == kind and not new:
        return
    info["files"] = listed + new
    atomic_write_json(root / MARKER, {KEY: info})


def listed_files(path: str | os.PathLike, kind: str) -> list[Path]:
    """The files of directory ``path`` that its nolabels manifest lists (existing or not):
    what ``--overwrite`` may delete, besides our temporary files."""
    root = Path(path)
    if kind == "store":
        m = _read_json(root / STORE_MANIFEST)
        if not isinstance(m, dict):
            return []
        n = int(m.get("num_shards", 0))
        names = [STORE_MANIFEST]
        names += [f"emb_{i:05d}.npy" for i in range(n)] + [f"meta_{i:05d}.parquet" for i in range(n)]
        return [root / f for f in names]
    obj = _read_json(root / MARKER)
    names = list(obj[KEY].get("files", [])) if _marker_kind(obj) == kind else []
    out = []
    for name in names:
        p = Path(name)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            continue  # a marker never lists anything outside its directory
        out.append(root / p)
    return out + [root / MARKER]


def claim_output_dir(path: str | os.PathLike, kind: str, *, overwrite: bool = False) -> Path:
    """Make ``path`` the output directory of ``kind`` (see the module docstring).

    Args:
        kind: ``store``, ``run``, ``demo`` or ``dataset``.
        overwrite: for a directory that is ours, delete the files its manifest lists and
            our temporary files first (nothing else: a user's file there survives).
    Returns:
        the directory, which exists afterwards.
    Raises:
        OutputExistsError: the directory is not ours (nothing was touched).
    """
    root = Path(path)
    state = check_output_dir(root, kind)
    if state == "ours" and overwrite:
        for p in listed_files(root, kind):
            if p.is_file() or p.is_symlink():
                p.unlink()
        for n in os.listdir(root):
            if is_temp_name(n) and (root / n).is_file():
                (root / n).unlink()
        state = "empty"
    root.mkdir(parents=True, exist_ok=True)
    if kind != "store" and state != "ours":
        mark_output_dir(root, kind)
    elif kind != "store" and not (root / MARKER).is_file():
        mark_output_dir(root, kind)  # a directory recognised by its contents gets a marker
    return root


def on_main_rank(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only (under torchrun), re-raising its exception on every rank;
    every rank returns rank 0's result."""
    from nolabels import dist

    result = err = None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            err = e
    err, result = dist.broadcast_object((err, result))
    if err is not None:
        raise err
    return result


# --------------------------------------------------------------------------- files
def _parquet_is_ours(path: Path) -> bool:
    try:
        import pyarrow.parquet as pq

        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - not Parquet, unreadable, or no pyarrow: not ours
        return False
    return KEY.encode() in meta


def _json_is_ours(path: Path) -> bool:
    obj = _read_json(path)
    if not isinstance(obj, dict):
        return False
    if KEY in obj:
        return True
    # CODER's knowledge format (nolabels.methods.coder.Knowledge.to_dict)
    return (obj.get("version") == 1 and isinstance(obj.get("classes"), dict)
            and set(obj) <= {"version", "dataset", "classes", "ovo"})


def _csv_is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = f.readline(1 << 16).rstrip("\r\n").split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return header[:1] == ["path"] and {"pred", "label"} <= set(header)


def is_ours_file(path: str | os.PathLike) -> bool:
    """Whether the existing file ``path`` was written by nolabels (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        return False
    suffix = p.suffix.lower()
    if suffix == ".json":
        return _json_is_ours(p)
    if suffix == ".csv":
        return _csv_is_ours(p)
    return _parquet_is_ours(p)


def check_output_file(path: str | os.PathLike) -> bool:
    """Check that file ``--out`` may be written. Returns whether it exists (and is ours).

    Raises:
        OutputExistsError: it exists and is not a nolabels output (or is a directory).
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return False
    if p.is_dir():
        raise OutputExistsError(f"{p} is a directory; --out must name a file")
    if not is_ours_file(p):
        raise OutputExistsError(
            f"{p} exists and was not written by nolabels; refusing to overwrite it (with or "
            "without --overwrite). Choose another --out, or move the file away")
    return True


def claim_output_file(path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Check file ``--out`` before any work (see the module docstring).

    Args:
        overwrite: whether an existing nolabels output may be replaced (the commands
            replace their own outputs by default).
    Returns:
        the path. Its parent directory is created.
    Raises:
        OutputExistsError: it exists and is not ours, or is ours and ``overwrite`` is False.
    """
    p = Path(path)
    if check_output_file(p) and not overwrite:
        raise OutputExistsError(f"{p} already exists; pass --overwrite to replace it")
    if p.name in ("", ".", ".."):
        raise InputError(f"--out {os.fspath(path)!r} must name a file")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


__all__ = ["KEY", "KINDS", "MARKER", "check_output_dir", "check_output_file",
           "claim_output_dir", "claim_output_file", "dir_kind", "is_ours_file", "is_temp_name",
           "listed_files", "mark_output_dir", "on_main_rank"]
