"""Files that can be read without executing anything: tensor trees, weights, arrays.

No file nolabels reads may run code (design.md §8), so nothing here unpickles:

* a **tensor tree** (nested dicts / lists / tuples of tensors, ``None``, bools, ints,
  floats and strings: a run's tuned model, a trainer checkpoint with its optimizer and
  scheduler state, a text-embedding cache) is one ``.safetensors`` file. The tensors are
  stored under flattened keys (``optimizer/state/0/exp_avg``); the structure, every
  non-tensor value and a ``kind`` stamp are JSON in the file's safetensors metadata.
  :func:`save_tree` / :func:`load_tree` round-trip a tree exactly (dtypes, shapes,
  tuples, int dict keys, NaN/inf floats);
* **torch weight files** someone hands us (``--checkpoint``, a ``.pt`` of embeddings) go
  through :func:`load_torch_file`: ``torch.load(weights_only=True)``, which refuses any
  pickled object that is not a tensor or plain container;
* **.npy arrays** go through :func:`load_npy` (``allow_pickle=False``).

Every reader raises :class:`~nolabels.errors.CorruptFileError` naming the file (one
line) for anything that is not a valid file of its format: a pickle, a truncated file,
garbage, a tree of another ``kind``. Writes are atomic (a temporary file in the same
directory, then ``os.replace``) and create files with the process umask's mode (like
``open()``; not the 0600 of ``mkstemp``).
"""
from __future__ import annotations

import errno
import json
import math
import os
import pickle  # only for its exception type: nothing here unpickles
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nolabels.errors import CorruptFileError, MissingDependencyError

TREE_FORMAT = "nolabels.tree/1"
_FORMAT_KEY = "nolabels.format"
_KIND_KEY = "nolabels.kind"
_TREE_KEY = "nolabels.tree"
_MARKERS = ("$tensor", "$tuple", "$dict", "$float")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - a core dependency
        raise MissingDependencyError("reading/writing nolabels files needs safetensors: "
                                     "pip install safetensors") from e
    return st


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (user-facing errors are one line; terminal
    colour codes removed; torch's weights-only refusal, whose advice is to unpickle the
    file anyway, is replaced by what it means)."""
    if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
        return ("it holds pickled Python objects other than tensors and plain containers "
                "(refused: loading them could run code)")
    msg = _ANSI.sub("", str(e)).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- atomic write
def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync,
    ``os.replace``; the parent is created). The file gets the umask's mode, as
    ``open(path, "wb")`` would. The store's writer, with the parent created first."""
    from nolabels.data.store import atomic_write_bytes

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


# --------------------------------------------------------------------------- tensor trees
def _encode(x: Any, where: str, tensors: dict[str, torch.Tensor], seen: set[tuple[int, int]]) -> Any:
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else {"$float": repr(x)}
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, torch.Tensor):
        if x.is_sparse or x.layout != torch.strided:
            raise TypeError(f"save_tree: {where or '<root>'}: only dense tensors can be saved")
        t = x.detach().to("cpu")
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if (not t.is_contiguous() or ident in seen
                or (ident is not None and t.numel() * t.element_size() != ident[1])):
            t = t.contiguous().clone()  # safetensors refuses shared or partial storages
        elif ident is not None:
            seen.add(ident)
        key, n = where or "tensor", 1
        while key in tensors:
            n += 1
            key = f"{where}#{n}"
        tensors[key] = t
        return {"$tensor": key}
    if isinstance(x, tuple):
        return {"$tuple": [_encode(v, f"{where}/{i}", tensors, seen) for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, f"{where}/{i}", tensors, seen) for i, v in enumerate(x)]
    if isinstance(x, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _encode(v, f"{where}/{k}" if where else k, tensors, seen) for k, v in x.items()}
        items = []
        for k, v in x.items():
            if not (k is None or isinstance(k, (str, int, float, bool, tuple))):
                raise TypeError(f"save_tree: {where or '<root>'}: unsupported dict key {k!r}")
            items.append([_encode(k, where, {}, set()), _encode(v, f"{where}/{k}" if where else str(k),
                                                                 tensors, seen)])
        return {"$dict": items}
    raise TypeError(f"save_tree: {where or '<root>'}: cannot store a {type(x).__name__} "
                    "(only tensors, dicts, lists, tuples, None, bool, int, float, str)")


def save_tree(path: str | os.PathLike, tree: Any, *, kind: str,
              meta: Mapping[str, str] | None = None) -> None:
    """Write ``tree`` to ``path`` as one safetensors file (atomically).

    Args:
        path: the file (conventionally ``*.safetensors``).
        tree: nested dicts (any str / int / float / bool / None / tuple keys), lists and
            tuples whose leaves are tensors (any dtype safetensors supports, any device:
            saved from CPU, non-contiguous or shared ones copied) or JSON scalars.
        kind: what the file is (e.g. ``"nolabels.run-model"``); :func:`load_tree` checks it.
        meta: extra string metadata (readable by :func:`read_meta` without the tensors).
    Raises:
        TypeError: a leaf of another type (a bug in the caller, not a user error).
    """
    st = _safetensors()
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, "", tensors, set())
    md = {str(k): str(v) for k, v in (meta or {}).items()}
    md.update({_FORMAT_KEY: TREE_FORMAT, _KIND_KEY: kind,
               _TREE_KEY: json.dumps(structure, allow_nan=False, separators=(",", ":"))})
    atomic_write(path, st.save(tensors, metadata=md))


def _decode(x: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors, used) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        (mark, v), = x.items()
        if mark == "$tensor":
            if not isinstance(v, str) or v not in tensors:
                raise ValueError(f"the structure names a tensor {v!r} the file does not hold")
            used.add(v)
            return tensors[v]
        if mark == "$tuple":
            if not isinstance(v, list):
                raise ValueError("a $tuple entry is not a list")
            return tuple(_decode(e, tensors, used) for e in v)
        if mark == "$float":
            if v not in ("nan", "inf", "-inf"):
                raise ValueError(f"bad $float {v!r}")
            return float(v)
        if mark == "$dict":
            if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
                raise ValueError("a $dict entry is not a list of pairs")
            return {_decode(k, tensors, used): _decode(e, tensors, used) for k, e in v}
    if any(k.startswith("$") for k in x):
        raise ValueError(f"unknown marker among keys {sorted(x)[:3]}")
    return {k: _decode(v, tensors, used) for k, v in x.items()}


def _read_safetensors(path: Path, *, tensors: bool = True
                      ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; CorruptFileError if it is not one."""
    _safetensors()
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = dict(f.metadata() or {})
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means "not this format"
        raise CorruptFileError(path, f"not a valid safetensors file ({error_summary(e)})") from None
    return md, out


def read_meta(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (without reading its tensors).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptFileError: not a safetensors file.
    """
    return _read_safetensors(Path(path), tensors=False)[0]


def load_tree(path: str | os.PathLike, *, kind: str | None = None) -> Any:
    """The tree :func:`save_tree` wrote to ``path`` (tensors on the CPU).

    Args:
        path: the file.
        kind: the ``kind`` it must have been written with (None: any).
    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptFileError: not a nolabels tensor-tree file (a pickle, truncated, garbage,
            another format or another kind); nothing in it is executed.
    """
    path = Path(path)
    md, tensors = _read_safetensors(path)
    if md.get(_FORMAT_KEY) != TREE_FORMAT or _TREE_KEY not in md:
        raise CorruptFileError(path, "a safetensors file but not one nolabels wrote "
                                     f"(no {_FORMAT_KEY}={TREE_FORMAT} metadata)")
    if kind is not None and md.get(_KIND_KEY) != kind:
        raise CorruptFileError(path, f"holds a {md.get(_KIND_KEY)!r}, not a {kind!r}")
    try:
        used: set[str] = set()
        tree = _decode(json.loads(md[_TREE_KEY]), tensors, used)
    except Exception as e:  # noqa: BLE001
        raise CorruptFileError(path, f"damaged nolabels file ({error_summary(e)})") from None
    if used != set(tensors):
        raise CorruptFileError(path, f"damaged nolabels file ({len(set(tensors) - used)} "
                                     "tensors not in its structure)")
    return tree


def tree_kind(path: str | os.PathLike) -> str | None:
    """The ``kind`` stamp of a tensor-tree file (None: a safetensors file of another origin)."""
    return read_meta(path).get(_KIND_KEY)


# --------------------------------------------------------------------------- foreign files
def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers
    only, never arbitrary pickled objects.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptFileError: not a torch file, truncated, or a pickle of anything else
            (nothing in it is executed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except IsADirectoryError:
        raise
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        why = error_summary(e)
        if not why.startswith("it holds pickled"):
            why = f"not a readable torch file ({why})"
        raise CorruptFileError(path, why) from None


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of any safetensors file, on the CPU.

    Raises:
        CorruptFileError: not a valid safetensors file.
    """
    md, tensors = _read_safetensors(Path(path))
    return tensors, md


def load_npy(path: str | os.PathLike, *, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load(path, allow_pickle=False)``: a plain ``.npy`` array, never a pickle.

    Raises:
        CorruptFileError: not a valid ``.npy`` file (truncated, a pickled object array,
            garbage).
    """
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - ValueError, EOFError, OSError, ...
        raise CorruptFileError(path, f"not a valid .npy array ({error_summary(e)})") from None
    if not isinstance(arr, np.ndarray):
        close = getattr(arr, "close", None)
        if close is not None:
            close()
        raise CorruptFileError(path, "not a single .npy array")
    return arr


__all__ = ["TREE_FORMAT", "atomic_write", "error_summary", "save_tree", "load_tree", "read_meta", "tree_kind",
           "load_torch_file", "load_safetensors", "load_npy"]
