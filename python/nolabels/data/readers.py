"""Image sources: a folder, a text file of paths, or webdataset tar shards.

``open_source(spec)`` lists the images once, in a deterministic order, as an
:class:`ImageSource`: item ``i`` has a ``path`` (a file path, or
``SHARD.tar::MEMBER`` inside a tar shard) and an optional ``label`` (the class
folder name; **used for evaluation only**, never by a label-free method).

* directory: every image file below it (recursive, sorted). Images inside
  ``ROOT/<class>/...`` get label ``<class>``; images directly in ROOT get none.
* ``*.txt`` / ``*.lst``: one path per line (relative paths are relative to the
  list file; blank lines and ``#`` comments skipped); ``path<TAB>label`` gives a label.
* ``*.tar``, a brace pattern ``shards-{000..009}.tar``, a glob, or a directory of
  ``.tar`` files: webdataset shards. Members are grouped into samples by key
  (the member path up to the first dot of its basename); the sample's image is its
  jpg/jpeg/png/webp/... member, its label the text of a ``cls`` member if present.
  Shards must be uncompressed (random access); ``.tar.gz`` is refused with advice.

:class:`ImageDataset` decodes item ``i`` for a torch ``DataLoader``; a corrupt or
unreadable image yields an error string instead of raising, so the embedding loop
skips it and records the reason.

File names that are not valid UTF-8 are kept exactly: ``paths`` holds them as
``os.fsdecode`` strings (undecodable bytes as lone surrogates, PEP 383), which
``open()`` accepts. Parquet has no such strings, so every Parquet file of the package
stores a path in two columns (:func:`path_columns`): ``path`` (UTF-8 text; each byte
that is not valid UTF-8 written as ``\\xNN``, for display) and ``path_bytes`` (the
exact bytes of the name, only where ``path`` is not exact, else null).
:func:`paths_from_columns` gives the exact strings back.

Input fingerprints (detecting changed inputs on resume): :meth:`ImageSource.fingerprint`
hashes the item paths and labels (a file added, removed or renamed); with
``--fingerprint stat`` (the default of ``embed``) each store shard also records
:meth:`ImageSource.stat_fingerprint` of its items (size and mtime of every file, or of
the tar shard), and a resumed ``embed`` re-embeds the shards whose files changed.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nolabels.data.transforms import decode_image
from nolabels.errors import InputError, MissingDependencyError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


@dataclass
class ImageSource:
    """A fixed, ordered list of images.

    Attributes:
        kind: "folder" | "list" | "tar".
        root: what the user passed.
        paths: item paths (``SHARD.tar::MEMBER`` for tar members).
        labels: class-folder (or ``cls``) label per item, or None (evaluation only).
        tar_ranges: for tar items, (shard index, byte offset, size) per item.
        shards: the tar shard files.
    """

    kind: str
    root: str
    paths: list[str]
    labels: list[str | None]
    tar_ranges: list[tuple[int, int, int]] | None = None
    shards: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return any(lab is not None for lab in self.labels)

    def read_bytes(self, i: int) -> bytes:
        """The encoded bytes of item ``i`` (raises OSError if unreadable)."""
        if self.tar_ranges is None:
            with open(self.paths[i], "rb") as f:
                return f.read()
        shard, offset, size = self.tar_ranges[i]
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"truncated tar member ({len(data)} of {size} bytes)")
        return data

    def fingerprint(self) -> str:
        """SHA-256 over the item paths and labels: detects an added, removed or renamed
        input on resume (not a file changed under the same name: :meth:`stat_fingerprint`)."""
        h = hashlib.sha256()
        for p, lab in zip(self.paths, self.labels):
            h.update(p.encode("utf-8", "surrogateescape"))
            h.update(b"\t" + (lab or "").encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()

    def stat_fingerprint(self, items: Iterable[int]) -> str:
        """A hash of the size and modification time (ns) of the files of ``items`` (for tar
        members: of their shard file), with their paths: changes when a file is replaced or
        edited under the same name. A file that cannot be stat'ed counts as "missing"."""
        h = hashlib.blake2b(digest_size=16)
        cache: dict[str, str] = {}
        for i in items:
            f = self.shards[self.tar_ranges[i][0]] if self.tar_ranges is not None else self.paths[i]
            if f not in cache:
                try:
                    st = os.stat(f)
                    cache[f] = f"{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    cache[f] = "missing"
            h.update(self.paths[i].encode("utf-8", "surrogateescape") + b"\0"
                     + cache[f].encode() + b"\n")
        return h.hexdigest()

    def describe(self) -> dict:
        """JSON facts for the store manifest."""
        return {"kind": self.kind, "root": self.root, "num_items": len(self),
                "fingerprint": self.fingerprint(), "has_labels": self.has_labels}

    def subset(self, n: int) -> ImageSource:
        """The first ``n`` items."""
        return ImageSource(self.kind, self.root, self.paths[:n], self.labels[:n],
                           None if self.tar_ranges is None else self.tar_ranges[:n], self.shards)


def open_source(spec: str | os.PathLike | Sequence[str]) -> ImageSource:
    """List the images of ``spec`` (see the module docstring).

    Args:
        spec: a directory, a ``.txt``/``.lst`` list file, a ``.tar`` shard, a brace or
            glob pattern of shards, or a Python list of image paths.
    Raises:
        FileNotFoundError: nothing there, or no images found.
        ValueError: compressed tar shards.
    """
    if not isinstance(spec, (str, os.PathLike)):
        paths = [os.path.abspath(p) for p in spec]
        return ImageSource("list", "<list>", paths, [None] * len(paths))
    s = os.fspath(spec)
    if os.path.isdir(s):
        src = _folder(s)
        if len(src):
            return src
        tars = sorted(glob.glob(os.path.join(s, "*.tar")))
        if tars:
            return _tar_shards(s, tars)
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {s!r}")
    low = s.lower()
    if low.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        raise InputError(
            f"{s}: compressed tar shards cannot be read by offset; decompress them first "
            f"(e.g. `gunzip -k {s}` gives a .tar, or `tar -xzf {s}` and pass the folder)"
        )
    if low.endswith((".txt", ".lst")) and os.path.isfile(s):
        return _list_file(s)
    if ".tar" in low:
        shards = _expand_shards(s)
        if not shards:
            raise FileNotFoundError(f"no tar shards match {s!r}")
        return _tar_shards(s, shards)
    if os.path.isfile(s) and Path(s).suffix.lower() in IMAGE_EXTENSIONS:
        return ImageSource("list", s, [os.path.abspath(s)], [None])
    raise FileNotFoundError(
        f"{s!r} is not a directory, a .txt/.lst list of paths, or .tar shards"
    )


def _real_dir(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: the directory itself
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _folder(root: str) -> ImageSource:
    """Every image below ``root``. Symlinked directories are followed, but each real
    directory (st_dev, st_ino) is walked once, under its first path in sorted order, so a
    symlink loop or two links to one folder do not list its images again."""
    root_p = Path(root)
    found: list[tuple[str, str | None]] = []
    seen = {_real_dir(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            key = _real_dir(os.path.join(dirpath, d))
            if key is not None and key not in seen:
                seen.add(key)
                keep.append(d)
        dirnames[:] = keep
        rel = Path(dirpath).relative_to(root_p)
        label = display_text(rel.parts[0]) if rel.parts else None
        for fn in sorted(filenames):
            if Path(fn).suffix.lower() in IMAGE_EXTENSIONS and not fn.startswith("."):
                found.append((os.path.join(dirpath, fn), label))
    found.sort(key=lambda t: t[0])
    return ImageSource("folder", root, [p for p, _ in found], [lab for _, lab in found])


def _list_file(path: str) -> ImageSource:
    base = os.path.dirname(os.path.abspath(path))
    paths, labels = [], []
    # surrogateescape: a listed name that is not valid UTF-8 keeps its exact bytes
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            p, _, lab = line.partition("\t")
            p = p.strip()
            paths.append(p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)))
            labels.append(display_text(lab.strip()) or None)
    if not paths:
        raise FileNotFoundError(f"{path}: no paths listed")
    return ImageSource("list", path, paths, labels)


def display_text(s: str) -> str:
    """``s`` as valid UTF-8 text: each undecodable byte of an ``os.fsdecode`` string (a
    lone surrogate) written as ``\\xNN``. The identity for ordinary strings."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_columns(paths: Sequence[str]) -> dict:
    """The Parquet columns of ``paths`` (see the module docstring): ``{"path": string
    (display text), "path_bytes": binary (exact bytes where ``path`` is not exact, else
    null)}`` as pyarrow arrays of len(paths)."""
    import pyarrow as pa

    shown = [display_text(p) for p in paths]
    raw = [None if s is p or s == p else p.encode("utf-8", "surrogateescape")
           for s, p in zip(shown, paths)]
    return {"path": pa.array(shown, pa.string()), "path_bytes": pa.array(raw, pa.binary())}


def paths_from_columns(path: Sequence[str], path_bytes: Sequence[bytes | None] | None) -> list[str]:
    """The exact path strings from the columns of :func:`path_columns` (``path_bytes``
    None: a file written before that column existed, whose paths are exact)."""
    if path_bytes is None:
        return list(path)
    return [p if b is None else b.decode("utf-8", "surrogateescape")
            for p, b in zip(path, path_bytes)]


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion (the ``braceexpand`` package), as webdataset shard lists
    are written: ``a-{000..002}.tar`` -> [a-000.tar, a-001.tar, a-002.tar] (zero padding
    kept), ``{x,y}`` alternatives, nested and combined; a pattern without braces -> itself.
    """
    try:
        from braceexpand import braceexpand
    except ImportError as e:
        raise MissingDependencyError("shard lists with braces need braceexpand: "
                                     "pip install 'nolabels[data]'") from e
    return list(braceexpand(pattern, escape=False))


def _expand_shards(spec: str) -> list[str]:
    out: list[str] = []
    for p in expand_braces(spec):
        if any(c in p for c in "*?["):
            out.extend(sorted(glob.glob(p)))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"tar shard {p!r} does not exist")
    return out


def _tar_shards(root: str, shards: list[str]) -> ImageSource:
    for s in shards:
        if not s.lower().endswith(".tar"):
            raise InputError(f"{s}: only uncompressed .tar shards are supported")
    paths, labels, ranges = [], [], []
    for si, shard in enumerate(shards):
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        order: list[str] = []
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                if base.startswith("."):
                    continue
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = os.path.join(d, stem)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext.lower()] = m
            f = tf.fileobj
            for key in order:
                members = samples[key]
                img = next((members[e] for e in _TAR_IMAGE_EXTS if e in members), None)
                if img is None:
                    continue
                label = None
                cls = members.get("cls")
                if cls is not None and cls.size < 4096:
                    f.seek(cls.offset_data)
                    label = f.read(cls.size).decode("utf-8", "replace").strip() or None
                paths.append(f"{shard}::{img.name}")
                labels.append(label)
                ranges.append((si, img.offset_data, img.size))
    if not paths:
        raise FileNotFoundError(f"no image samples in tar shards {shards[:3]}...")
    return ImageSource("tar", root, paths, labels, ranges, [os.path.abspath(s) for s in shards])


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over an :class:`ImageSource`.

    ``ds[i]`` -> ``(i, image, error)``: ``image`` is ``transform(PIL RGB)`` (for
    encoders: (3, H, W) float32) and ``error`` None, or ``image`` None and ``error``
    the reason the item could not be read or decoded.
    """

    def __init__(self, source: ImageSource, transform: Callable[[object], torch.Tensor]) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            img = decode_image(self.source.read_bytes(i))
            return i, self.transform(img), None
        except Exception as e:  # noqa: BLE001 - any failure is recorded, never fatal
            msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(e))  # no memory addresses: reproducible
            return i, None, f"{type(e).__name__}: {msg}"[:500]


@dataclass
class Batch:
    """A collated batch: ``images`` (B, 3, H, W) of the good items ``index`` (B,) int64,
    and ``failed``: list of (item index, reason)."""

    index: torch.Tensor
    images: torch.Tensor | None
    failed: list[tuple[int, str]]

    def all_items(self) -> list[int]:
        return sorted(self.index.tolist() + [i for i, _ in self.failed])

    def pin_memory(self) -> Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate(samples: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    """DataLoader collate_fn for :class:`ImageDataset`: stack the good ones, list the bad."""
    good = [(i, x) for i, x, err in samples if err is None]
    failed = [(i, err) for i, _, err in samples if err is not None]
    index = torch.tensor([i for i, _ in good], dtype=torch.int64)
    images = torch.stack([x for _, x in good]) if good else None
    return Batch(index, images, failed)


def default_workers(device_type: str = "cpu") -> int:
    """DataLoader workers for "auto".

    CPU: one worker per two cores, 1 to 4. Even on 2 cores one worker beats decoding
    in the main process: there every small tensor op of the preprocessing enters
    torch's 2-thread OpenMP pool, which is slow when the cores are busy
    (bench_pipeline.py: surrogate 7.7 vs 5.3 img/s on a loaded 2-core machine;
    decode alone 133 vs 18 img/s). CUDA: up to 8 workers feed the GPU.
    """
    n = os.cpu_count() or 1
    if device_type == "cuda":
        return max(1, min(8, n - 1))
    return max(1, min(4, n // 2))
