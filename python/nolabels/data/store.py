"""The embedding store: embeddings computed once, read by every method.

Layout of a store directory (design.md §8)::

    manifest.json           "nolabels": {"kind": "store"}, model (spec, model_id,
                            preprocessing, dim), source (kind, root, num_items,
                            fingerprint, fingerprint_mode), shard_size, the shards
                            done (rows, failed, emb_bytes, meta_bytes, emb_blake2b,
                            meta_blake2b, stat_fingerprint), failed images with
                            reasons, complete
    emb_00000.npy           (rows, D) float16, rows L2-normalised
    meta_00000.parquet      one row per *input item* of the shard: path, item
                            (index in the input list), row (row in emb_*.npy,
                            -1 if the image failed), label (class folder; for
                            evaluation only), error (reason, or null), path_bytes
                            (the exact name where ``path`` is not exact, see
                            :mod:`nolabels.data.readers`); its schema metadata
                            ``nolabels`` records the shard's rows, emb_bytes,
                            emb_blake2b and stat_fingerprint

Shard ``i`` holds the input items ``[i * shard_size, (i + 1) * shard_size)``. Every
file is written to a temporary name and renamed (atomic on POSIX), with the mode
``open()`` would give it (0666 less the umask); ``emb`` is written before ``meta``, so
a shard is committed exactly when its meta file exists. A killed job therefore loses
at most the shards in flight, and a re-run computes only the shards without a meta
file: nothing is lost or duplicated. Under ``torchrun`` each rank writes its own
shards and rank 0 alone writes the manifest (from the meta files' records).

Integrity: :meth:`EmbeddingStore.verify_shard` checks a committed shard against
what was recorded when it was written (sizes, the ``.npy`` header, the meta rows,
BLAKE2b checksums); a resumed ``embed`` verifies every committed shard and re-embeds
a bad one. Every reader checks sizes and headers (cheap) and raises
:class:`~nolabels.errors.CorruptFileError` naming the file it could not read. Stores
written before these records existed stay readable: missing records are "unknown"
and only the ``.npy`` header and the meta rows are checked.

A store directory is claimed with :func:`nolabels.data.outputs.claim_output_dir`: a
non-empty folder without a store manifest is refused, and ``overwrite`` deletes only
the files the manifest lists (``manifest.json``, ``emb_i``/``meta_i`` for
``i < num_shards``) and our temporary files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nolabels.errors import (
    CorruptFileError,
    IncompleteError,
    InputError,
    MissingDependencyError,
    OutputExistsError,
    StoreMismatchError,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHARD_FILE = re.compile(r"(?:emb_(\d+)\.npy|meta_(\d+)\.parquet)")
_REDO = "re-run the same `nolabels embed` command to re-embed it"


def _require_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependencyError(
            "the embedding store needs pyarrow: pip install 'nolabels[data]'") from e
    return pa, pq


# --------------------------------------------------------------------------- atomic writes
def _open_temp(path: Path) -> tuple[int, Path]:
    """Create ``.NAME.tmp-XXXX`` next to ``path`` with ``O_EXCL`` and mode 0666: the kernel
    applies the umask, as for any file ``open()`` creates (``mkstemp`` would give 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported by this file system: the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename).
    The file gets the umask's mode, like one ``open(path, "wb")`` creates."""
    path = Path(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _atomic_write_with(path: Path, writer: Callable[[str], None], fsync: bool = True) -> None:
    """``writer(tmp)`` writes the file at the temporary path ``tmp``; then fsync and rename
    onto ``path``. The temp file is created first (umask mode), so ``writer`` truncates it.

    ``fsync=False`` skips both fsyncs: the rename is still atomic for other processes, but
    after a power loss the file may be empty or torn. Only for files whose caller verifies
    them on resume and syncs them later (:func:`fsync_files`), e.g. ``label``'s parts."""
    path = Path(path)
    fd, tmp = _open_temp(path)
    os.close(fd)
    try:
        writer(os.fspath(tmp))
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def fsync_files(paths: Iterable[str | os.PathLike]) -> None:
    """fsync each file, then each distinct parent directory (durability for files written
    with ``fsync=False``; by then most of their pages are usually on disk already)."""
    dirs = set()
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        dirs.add(Path(p).parent)
    for d in dirs:
        _fsync_dir(d)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in ``.npy`` format (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def atomic_write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    def w(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    _atomic_write_with(Path(path), w)


def atomic_write_parquet(path: str | os.PathLike, table, *, fsync: bool = True,
                         **options: Any) -> None:
    """``pyarrow.parquet.write_table(table, path, **options)`` atomically (``fsync``: see
    :func:`_atomic_write_with`)."""
    _, pq = _require_pyarrow()
    _atomic_write_with(Path(path), lambda tmp: pq.write_table(table, tmp, **options), fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (ASCII; lone surrogates of undecodable file names are
    escaped as ``\\udcXX`` and read back exactly by Python) to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# --------------------------------------------------------------------------- checks
def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """BLAKE2b-128 (hex) of a file, streamed."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` from a ``.npy`` file's header (reads a few hundred
    bytes). Raises :class:`CorruptFileError` naming the file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (ValueError, EOFError, SyntaxError) as e:
        raise CorruptFileError(path, f"not a valid .npy file ({e})") from e
    if dtype.hasobject:
        raise CorruptFileError(path, "holds Python objects (a pickle); refusing to read it")
    return tuple(shape), dtype, offset


class EmbeddingStore:
    """A directory of float16 embedding shards + Parquet metadata + ``manifest.json``.

    Open an existing store with ``EmbeddingStore(path)``; create or resume one with
    :meth:`create_or_resume`. Read it with :meth:`load` (all rows in input order)
    or :meth:`load_shards`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        mf = self.root / MANIFEST
        if not mf.is_file():
            raise FileNotFoundError(f"{self.root} is not an embedding store (no {MANIFEST})")
        try:
            manifest = json.loads(mf.read_bytes())
        except ValueError as e:
            raise CorruptFileError(mf, f"not valid JSON ({e})") from e
        if not isinstance(manifest, dict) or "model" not in manifest:
            raise CorruptFileError(mf, "not a nolabels store manifest")
        self.manifest: dict[str, Any] = manifest
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{self.root}: unsupported store format "
                             f"{self.manifest.get('format_version')!r}")

    # ------------------------------------------------------------------ creation
    @classmethod
    def create_or_resume(cls, root: str | os.PathLike, *, model: dict, source: dict,
                         shard_size: int, overwrite: bool = False) -> EmbeddingStore:
        """Create a store, or reopen it to resume.

        Args:
            model: ``Encoder.describe()`` (must contain ``model_id`` and ``dim``).
            source: ``ImageSource.describe()`` (``num_items``, ``fingerprint``; optional
                ``fingerprint_mode``).
            shard_size: input items per shard.
            overwrite: delete an existing store's files (only those its manifest lists)
                and start again.
        Raises:
            OutputExistsError: ``root`` is a non-empty folder that is not a store, or a
                file there would be overwritten that the old manifest does not list.
            StoreMismatchError: an existing store was made with another model,
                input or shard size (and ``overwrite`` is False).
        """
        from nolabels.data.outputs import check_output_dir, claim_output_dir, listed_files

        root = Path(root)
        if shard_size < 1:
            raise InputError(f"shard_size must be >= 1, got {shard_size}")
        state = check_output_dir(root, "store")
        if state == "ours" and not overwrite:
            store = cls(root)
            m = store.manifest
            want = {"model_id": model["model_id"], "fingerprint": source["fingerprint"],
                    "num_items": source["num_items"], "shard_size": shard_size}
            have = {"model_id": m["model"]["model_id"], "fingerprint": m["source"]["fingerprint"],
                    "num_items": m["source"]["num_items"], "shard_size": m["shard_size"]}
            diff = [k for k in want if want[k] != have[k]]
            if diff:
                raise StoreMismatchError(
                    f"{root} already holds a store made with a different "
                    + ", ".join(f"{k} ({have[k]!r}, now {want[k]!r})" for k in diff)
                    + ". Use another --out, or --overwrite to start again."
                )
            store.clean_temporaries()
            return store
        num_items = int(source["num_items"])
        num_shards = (num_items + shard_size - 1) // shard_size
        # Before deleting anything: shard files of the new layout that the old manifest
        # does not list are not ours (a user's emb_00007.npy); refuse rather than replace them.
        listed = {p.name for p in listed_files(root, "store")} if state == "ours" else set()
        clash = sorted(n for n in (os.listdir(root) if state != "absent" else [])
                       if (hit := _SHARD_FILE.fullmatch(n)) and n not in listed
                       and int(hit.group(1) or hit.group(2)) < num_shards)
        if clash:
            raise OutputExistsError(
                f"{root}: {', '.join(clash[:3])}{' ...' if len(clash) > 3 else ''} would be "
                "overwritten but no store manifest lists them; refusing (nothing was deleted). "
                "Move them away or choose another --out")
        claim_output_dir(root, "store", overwrite=overwrite)
        manifest = {
            "nolabels": {"kind": "store"},
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": model,
            "dtype": "float16",
            "normalized": True,
            "dim": int(model["dim"]),
            "source": source,
            "shard_size": int(shard_size),
            "num_shards": num_shards,
            "shards": [],
            "num_rows": 0,
            "failed": [],
            "complete": num_items == 0,
        }
        atomic_write_json(root / MANIFEST, manifest)
        return cls(root)

    def clean_temporaries(self) -> None:
        """Remove temporary files left by a killed writer."""
        for p in self.root.glob(".*.tmp-*"):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ layout
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["source"]["num_items"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def emb_path(self, i: int) -> Path:
        return self.root / f"emb_{i:05d}.npy"

    def meta_path(self, i: int) -> Path:
        return self.root / f"meta_{i:05d}.parquet"

    def shard_items(self, i: int) -> range:
        """The input item indices of shard ``i``."""
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_items))

    def shard_done(self, i: int) -> bool:
        """A shard is committed when its meta file exists (written after its emb file).
        Whether its files are intact is :meth:`verify_shard`'s question."""
        return self.meta_path(i).is_file() and self.emb_path(i).is_file()

    def pending_shards(self) -> list[int]:
        """Shards not yet committed, in order."""
        return [i for i in range(self.num_shards) if not self.shard_done(i)]

    def _entry(self, i: int) -> dict:
        for s in self.manifest.get("shards", []):
            if s.get("index") == i:
                return s
        return {}

    # ------------------------------------------------------------------ writing
    def write_shard(self, i: int, emb: np.ndarray, items: Sequence[int], paths: Sequence[str],
                    labels: Sequence[str | None], failed: Iterable[tuple[int, str, str | None, str]],
                    *, stat_fingerprint: str | None = None) -> dict:
        """Commit shard ``i`` atomically.

        Args:
            emb: (R, D) embeddings of the good images (any float dtype; stored as
                float16 after L2 normalisation), in the order of ``items``.
            items, paths, labels: R item indices (ascending), paths, labels.
            failed: (item, path, label, reason) of the images that could not be read.
            stat_fingerprint: :meth:`ImageSource.stat_fingerprint` of the shard's items,
                recorded so that a resume notices files changed under the same names.
        Returns:
            the shard's manifest entry: ``index``, ``rows``, ``failed`` (list of
            ``{"item", "path", "reason"}``), ``emb_bytes``, ``meta_bytes``,
            ``emb_blake2b``, ``meta_blake2b`` and ``stat_fingerprint`` (if given).
        """
        pa, pq = _require_pyarrow()
        from nolabels.data.readers import display_text, path_columns

        emb = np.asarray(emb, dtype=np.float32).reshape(len(items), -1) if len(items) else \
            np.zeros((0, self.dim), np.float32)
        if emb.shape[1] != self.dim:
            raise InputError(f"shard {i}: embeddings have D={emb.shape[1]}, store has {self.dim}")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb16 = (emb / np.maximum(norms, 1e-12)).astype(np.float16)
        failed = sorted(failed)
        rows = [(int(it), p, lab, r, None) for r, (it, p, lab) in enumerate(zip(items, paths, labels))]
        rows += [(int(it), p, lab, -1, reason) for it, p, lab, reason in failed]
        rows.sort()
        expect = list(self.shard_items(i))
        if [r[0] for r in rows] != expect:
            raise InputError(f"shard {i}: items {[r[0] for r in rows][:5]}... do not cover "
                             f"{expect[0]}..{expect[-1]}")
        pcols = path_columns([r[1] for r in rows])
        table = pa.table({
            "path": pcols["path"],
            "item": pa.array([r[0] for r in rows], pa.int64()),
            "row": pa.array([r[3] for r in rows], pa.int64()),
            "label": pa.array([None if r[2] is None else display_text(r[2]) for r in rows],
                              pa.string()),
            "error": pa.array([None if r[4] is None else display_text(r[4]) for r in rows],
                              pa.string()),
            "path_bytes": pcols["path_bytes"],
        })
        emb_data = npy_bytes(emb16)
        record: dict[str, Any] = {"index": i, "rows": len(items), "emb_bytes": len(emb_data),
                                  "emb_blake2b": _digest(emb_data)}
        if stat_fingerprint is not None:
            record["stat_fingerprint"] = stat_fingerprint
        table = table.replace_schema_metadata(
            {"nolabels": json.dumps({"kind": "store-shard", **record})})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        meta_data = sink.getvalue().to_pybytes()
        atomic_write_bytes(self.emb_path(i), emb_data)
        atomic_write_bytes(self.meta_path(i), meta_data)
        return {**record, "meta_bytes": len(meta_data), "meta_blake2b": _digest(meta_data),
                "failed": [{"item": it, "path": p, "reason": reason} for it, p, _, reason in failed]}

    def commit(self, entry: dict) -> None:
        """Record one committed shard (from :meth:`write_shard`) in the manifest.

        For single-writer runs; under torchrun rank 0 calls :meth:`refresh_manifest`.
        """
        m = self.manifest
        items = self.shard_items(entry["index"])
        shards = [s for s in m["shards"] if s["index"] != entry["index"]]
        shards.append({**{k: v for k, v in entry.items() if k != "failed"},
                       "failed": len(entry["failed"])})
        failed = [f for f in m["failed"] if f["item"] not in items] + entry["failed"]
        self._write_manifest(shards, failed)

    def refresh_manifest(self) -> dict:
        """Rebuild the manifest's shard list from the committed shards on disk (their
        meta files' records and sizes).

        Call from one process only (rank 0 after a barrier). Returns the manifest.
        """
        shards: list[dict] = []
        all_failed: list[dict] = []
        for i in range(self.num_shards):
            if not self.shard_done(i):
                continue
            data = self._meta_bytes(i)
            d, record = self._parse_meta(i, data, ["path", "item", "row", "error", "path_bytes"])
            failed = [{"item": it, "path": p, "reason": e}
                      for p, it, r, e in zip(d["path"], d["item"], d["row"], d["error"]) if r < 0]
            entry = {k: v for k, v in record.items() if k != "kind"}
            entry.update(index=i, rows=sum(r >= 0 for r in d["row"]), failed=len(failed),
                         meta_bytes=len(data), meta_blake2b=_digest(data))
            old = self._entry(i)
            if old.get("emb_blake2b") and "emb_blake2b" not in entry:
                entry.update({k: old[k] for k in ("emb_bytes", "emb_blake2b") if k in old})
            shards.append(entry)
            all_failed.extend(failed)
        self._write_manifest(shards, all_failed)
        return self.manifest

    def _write_manifest(self, shards: list[dict], failed: list[dict]) -> None:
        m = self.manifest
        m["shards"] = sorted(shards, key=lambda s: s["index"])
        m["num_rows"] = sum(s["rows"] for s in shards)
        m["failed"] = sorted(failed, key=lambda f: f["item"])
        m["complete"] = len(shards) == self.num_shards
        atomic_write_json(self.root / MANIFEST, m)

    # ------------------------------------------------------------------ integrity
    def shard_record(self, i: int) -> dict:
        """What was recorded when shard ``i`` was written: its manifest entry, else (a shard
        committed by another rank of a killed run) its meta file's ``nolabels`` metadata;
        ``{}`` for a store written before these records existed."""
        entry = self._entry(i)
        if "emb_bytes" in entry or not self.meta_path(i).is_file():
            return dict(entry)
        try:
            _, pq = _require_pyarrow()
            md = pq.read_schema(self.meta_path(i)).metadata or {}
            rec = json.loads(md.get(b"nolabels", b"{}"))
        except Exception:  # noqa: BLE001 - unreadable: verify_shard says why
            return dict(entry)
        return {**entry, **rec} if isinstance(rec, dict) else dict(entry)

    def verify_shard(self, i: int, *, checksum: bool = True) -> str | None:
        """Why committed shard ``i`` is not intact, or None if it is.

        Checks the meta file (size and checksum as recorded, readable Parquet, one row
        per input item of the shard, rows 0..R-1), the ``.npy`` header (float16,
        (R, D)), the emb file's size (header + R·D·2 bytes, and as recorded) and, with
        ``checksum``, the BLAKE2b of both files (reads them). Missing records (an older
        store) are skipped.
        """
        emb_p, meta_p = self.emb_path(i), self.meta_path(i)
        if not self.shard_done(i):
            return "not committed"
        entry = self._entry(i)
        try:
            data = self._meta_bytes(i)
        except CorruptFileError as e:
            return str(e)
        if "meta_bytes" in entry and len(data) != entry["meta_bytes"]:
            return (f"{meta_p.name} has {len(data)} bytes, {entry['meta_bytes']} were written "
                    "(truncated or replaced)")
        if checksum and entry.get("meta_blake2b") and _digest(data) != entry["meta_blake2b"]:
            return f"{meta_p.name}: checksum mismatch (the file changed after it was written)"
        try:
            d, record = self._parse_meta(i, data, ["item", "row"])
            rows = self._check_meta_rows(i, d)
            info = {**record, **{k: v for k, v in entry.items() if k in ("emb_bytes", "emb_blake2b")}}
            self._check_emb(i, rows, info.get("emb_bytes"))
        except CorruptFileError as e:
            return str(e)
        if checksum and info.get("emb_blake2b"):
            try:
                if file_digest(emb_p) != info["emb_blake2b"]:
                    return f"{emb_p.name}: checksum mismatch (the file changed after it was written)"
            except OSError as e:
                return f"{emb_p.name}: unreadable ({e})"
        return None

    def discard_shard(self, i: int) -> None:
        """Uncommit shard ``i`` (its meta file first, then its emb file) so that ``embed``
        computes it again."""
        for p in (self.meta_path(i), self.emb_path(i)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        m = self.manifest
        items = self.shard_items(i)
        self._write_manifest([s for s in m["shards"] if s["index"] != i],
                             [f for f in m["failed"] if f["item"] not in items])

    def verify_committed(self, *, checksum: bool = True,
                         stat_fingerprint: Callable[[range], str] | None = None
                         ) -> list[tuple[int, str]]:
        """Verify every committed shard (:meth:`verify_shard`) and, given
        ``stat_fingerprint`` (items -> fingerprint of their files now), compare it with
        the one recorded; discard the shards that fail (:meth:`discard_shard`).

        Returns:
            ``(shard, reason)`` of each discarded shard; ``embed`` then re-embeds them.
        """
        bad: list[tuple[int, str]] = []
        for i in range(self.num_shards):
            if not self.shard_done(i):
                continue
            why = self.verify_shard(i, checksum=checksum)
            if why is None and stat_fingerprint is not None:
                rec = self.shard_record(i).get("stat_fingerprint")
                if rec is not None and rec != stat_fingerprint(self.shard_items(i)):
                    why = ("its images changed since they were embedded (file size or "
                           "modification time)")
            if why is not None:
                self.discard_shard(i)
                bad.append((i, why))
        return bad

    # ------------------------------------------------------------------ reading helpers
    def _meta_bytes(self, i: int) -> bytes:
        p = self.meta_path(i)
        try:
            return p.read_bytes()
        except OSError as e:
            raise CorruptFileError(p, f"unreadable ({e.strerror or e}); {_REDO}") from e

    def _parse_meta(self, i: int, source: bytes | None, columns: Sequence[str]
                    ) -> tuple[dict[str, list], dict]:
        """The ``columns`` of meta file ``i`` (those present; ``path`` exact, from
        ``path_bytes``) and its ``nolabels`` record. ``source``: the file's bytes, or
        None to read it."""
        pa, pq = _require_pyarrow()
        from nolabels.data.readers import paths_from_columns

        p = self.meta_path(i)
        try:
            f = pq.ParquetFile(pa.BufferReader(source) if source is not None else p)
            names = f.schema_arrow.names
            want = [c for c in columns if c in names]
            if "path" in want and "path_bytes" in names and "path_bytes" not in want:
                want.append("path_bytes")
            d = f.read(columns=want).to_pydict()
            md = f.schema_arrow.metadata or {}
            record = json.loads(md[b"nolabels"]) if b"nolabels" in md else {}
        except Exception as e:  # noqa: BLE001 - any reader failure names the file
            raise CorruptFileError(p, f"not a readable Parquet file ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}); {_REDO}") from e
        missing = [c for c in columns if c not in names and c != "path_bytes"]
        if missing:
            raise CorruptFileError(p, f"has no column(s) {missing}; {_REDO}")
        if "path" in d:
            d["path"] = paths_from_columns(d["path"], d.pop("path_bytes", None))
        else:
            d.pop("path_bytes", None)
        return d, record if isinstance(record, dict) else {}

    def _check_meta_rows(self, i: int, d: dict[str, list]) -> int:
        """The number of good rows R of meta ``d``; raises unless it has one row per input
        item of shard ``i`` and its good rows are 0..R-1."""
        p = self.meta_path(i)
        if sorted(d["item"]) != list(self.shard_items(i)):
            raise CorruptFileError(p, f"does not list the items of shard {i}; {_REDO}")
        good = [r for r in d["row"] if r >= 0]
        if good != list(range(len(good))):
            raise CorruptFileError(p, f"rows are not 0..{len(good) - 1}; {_REDO}")
        return len(good)

    def _check_emb(self, i: int, rows: int, recorded_bytes: int | None) -> None:
        """Cheap checks of emb file ``i``: header says float16 (rows, D); size agrees."""
        p = self.emb_path(i)
        try:
            size = p.stat().st_size
        except OSError as e:
            raise CorruptFileError(p, f"unreadable ({e.strerror or e}); {_REDO}") from e
        shape, dtype, offset = npy_header(p)
        if dtype != np.float16 or shape != (rows, self.dim):
            raise CorruptFileError(p, f"holds {dtype} {shape}, expected float16 ({rows}, "
                                      f"{self.dim}); {_REDO}")
        expect = offset + rows * self.dim * 2
        if size != expect:
            raise CorruptFileError(p, f"has {size} bytes, its header needs {expect} "
                                      f"(truncated); {_REDO}")
        if recorded_bytes is not None and size != recorded_bytes:
            raise CorruptFileError(p, f"has {size} bytes, {recorded_bytes} were written; {_REDO}")

    # ------------------------------------------------------------------ reading
    def load_shards(self, shards: Iterable[int] | None = None, *, mmap: bool = False
                    ) -> tuple[np.ndarray, dict[str, list]]:
        """Embeddings and metadata of the good rows of ``shards`` (default: all committed).

        Returns:
            ``emb`` (R, D) float16, rows L2-normalised, in input order; ``meta``: dict
            of R-long lists ``path`` (exact, see :mod:`nolabels.data.readers`), ``item``
            (index in the input), ``label`` (class folder or None; for evaluation only).
        Raises:
            CorruptFileError: a shard file is unreadable, truncated or inconsistent
                (naming it).
        """
        if shards is None:
            shards = [i for i in range(self.num_shards) if self.shard_done(i)]
        embs, meta = [], {"path": [], "item": [], "label": []}
        for i in sorted(shards):
            if not self.shard_done(i):
                raise FileNotFoundError(f"{self.root}: shard {i} is not committed; re-run embed")
            d, record = self._parse_meta(i, None, ["path", "item", "row", "label"])
            rows = self._check_meta_rows(i, d)
            recorded = self._entry(i).get("emb_bytes", record.get("emb_bytes"))
            self._check_emb(i, rows, recorded)
            try:
                e = np.load(self.emb_path(i), mmap_mode="r" if mmap else None, allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise CorruptFileError(self.emb_path(i), f"unreadable ({err}); {_REDO}") from err
            ok = [j for j, r in enumerate(d["row"]) if r >= 0]
            embs.append(e)
            for k, col in meta.items():
                col.extend(d[k][j] for j in ok)
        emb = np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float16)
        return emb, meta

    def load_meta(self, shards: Iterable[int] | None = None) -> dict[str, list]:
        """Metadata of the good rows (as :meth:`load_shards`) without reading embeddings."""
        if shards is None:
            shards = [i for i in range(self.num_shards) if self.shard_done(i)]
        meta: dict[str, list] = {"path": [], "item": [], "label": []}
        for i in sorted(shards):
            d, _ = self._parse_meta(i, None, ["path", "item", "row", "label"])
            ok = [j for j, r in enumerate(d["row"]) if r >= 0]
            for k, col in meta.items():
                col.extend(d[k][j] for j in ok)
        return meta

    def load(self) -> tuple[np.ndarray, dict[str, list]]:
        """All rows (see :meth:`load_shards`); raises if the store is incomplete."""
        pending = self.pending_shards()
        if pending:
            raise IncompleteError(
                f"{self.root}: {len(pending)} of {self.num_shards} shards are not embedded yet; "
                "re-run the same `nolabels embed` command to finish (it resumes)"
            )
        return self.load_shards()

    @property
    def failed(self) -> list[dict]:
        """Images that could not be read: ``{"item", "path", "reason"}``."""
        return list(self.manifest.get("failed", []))

    def __repr__(self) -> str:
        m = self.manifest
        return (f"EmbeddingStore({str(self.root)!r}, model={m['model']['model_id']!r}, "
                f"rows={m['num_rows']}, dim={m['dim']}, shards={len(m['shards'])}/{m['num_shards']}, "
                f"failed={len(m['failed'])})")


__all__ = ["EmbeddingStore", "StoreMismatchError", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_npy", "atomic_write_parquet", "file_digest", "npy_bytes", "npy_header"]
