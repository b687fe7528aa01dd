"""Embeddings to read, shard by shard, in bounded memory — ours or anyone's.

``open_embeddings(path)`` recognises four layouts and returns an :class:`EmbeddingSource`:

=================  ==========================================================================
``store``          a nolabels embedding store (``manifest.json``, ``emb_*.npy``, ``meta_*.parquet``)
``clip-retrieval`` ``img_emb/img_emb_{i}.npy`` + ``metadata/metadata_{i}.parquet`` (rows aligned;
                   an ``image_path`` or ``url`` column), as ``clip-retrieval inference`` writes
``npy``            one ``(N, D)`` ``.npy`` file, with an optional Parquet file of the same N rows
                   (``path``/``image_path``/``url`` column) next to it (``X.npy`` + ``X.parquet``)
                   or passed as ``meta=``
``parquet``        a Parquet file (or a directory of them) with an embedding list column
                   (``embedding``, ``emb``, ``img_emb`` or ``image_embedding``; or ``column=``)
=================  ==========================================================================

Every source is read in *shards*: a store shard, or a run of at most
:data:`MAX_SHARD_ROWS` rows of a larger file. :meth:`EmbeddingSource.iter_shards` yields
:class:`EmbeddingShard` objects holding that shard's rows only, read with plain positioned
reads (never a memory map of the whole file, so the resident memory of a 10M-row store is
that of one shard, not of the pages touched so far) and prefetched by a background thread
so that reading overlaps the caller's compute. Nothing concatenates the whole source.

Embeddings are returned as stored (float16 or float32); a source says whether its rows are
L2-normalised (``normalized``); consumers that need unit rows normalise on the fly
(``ops.pseudo_label`` does by default). Metadata is an Arrow table per shard with at least
``item`` (int64, the row's index in the whole source) and ``path`` (string, may be null),
and ``label`` (string, null when unknown; read only by evaluation).
"""
from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nolabels.errors import CorruptFileError, InputError, MissingDependencyError

#: Largest number of rows one shard of a big file holds (a clip-retrieval file can hold
#: millions): at D = 1024 and float16 that is 128 MiB.
MAX_SHARD_ROWS = 1 << 16

EMBEDDING_COLUMNS = ("embedding", "emb", "img_emb", "image_embedding")
PATH_COLUMNS = ("path", "image_path", "url", "filepath", "file")


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a core dependency
        raise MissingDependencyError("reading embeddings needs pyarrow: pip install pyarrow") from e
    return pa, pc, pq


# --------------------------------------------------------------------------- .npy rows
@dataclass(frozen=True)
class NpyInfo:
    """Header facts of a 2-D ``.npy`` file."""

    path: str
    rows: int
    dim: int
    dtype: np.dtype
    offset: int  # byte offset of row 0


def npy_info(path: str | os.PathLike) -> NpyInfo:
    """Parse a ``.npy`` header (no pickle, no data read) and check the file is long enough.

    Raises:
        CorruptFileError: not a ``.npy``, an object array, not 2-D, Fortran order, or shorter
            than its header says (a truncated write).
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # pragma: no cover - numpy raises first
                raise ValueError(f"npy version {version}")
            offset = f.tell()
    except (ValueError, EOFError, SyntaxError) as e:  # bad magic / header; OSErrors propagate
        raise CorruptFileError(p, f"not a readable .npy file ({e})") from e
    if dtype.hasobject:
        raise CorruptFileError(p, "holds Python objects (a pickle); refusing to read it")
    if dtype not in (np.float16, np.float32, np.float64):
        raise CorruptFileError(p, f"embeddings must be float16/32/64, not {dtype}")
    if len(shape) != 2:
        raise CorruptFileError(p, f"expected a 2-D (N, D) array, found shape {shape}")
    if fortran and shape[0] > 1 and shape[1] > 1:
        raise CorruptFileError(p, "Fortran-ordered arrays are not supported; save it C-ordered")
    need = offset + shape[0] * shape[1] * dtype.itemsize
    size = os.path.getsize(p)
    if size < need:
        raise CorruptFileError(p, f"truncated: {size} bytes, its header needs {need}")
    return NpyInfo(p, int(shape[0]), int(shape[1]), dtype, offset)


def read_npy_rows(info: NpyInfo, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a 2-D ``.npy`` as a fresh C-contiguous array (positioned
    read; memory = those rows only)."""
    n = max(0, min(stop, info.rows) - start)
    out = np.empty((n, info.dim), dtype=info.dtype)
    if n == 0:
        return out
    with open(info.path, "rb") as f:
        f.seek(info.offset + start * info.dim * info.dtype.itemsize)
        got = f.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise CorruptFileError(info.path, f"short read at row {start} ({got} of {out.nbytes} bytes)")
    return out


# --------------------------------------------------------------------------- sources
@dataclass
class EmbeddingShard:
    """One unit of streaming work.

    Attributes:
        index: the shard's index in its source (output part ``part-{index:05d}``).
        emb: (R, D) float16/float32/float64, C-contiguous, owned (not a view of a map).
        meta: Arrow table of R rows: ``item`` int64, ``path`` string, ``label`` string.
        files: the files this shard was read from (for error messages).
    """

    index: int
    emb: np.ndarray
    meta: Any  # pyarrow.Table
    files: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return int(self.emb.shape[0])


@dataclass
class _Piece:
    """A shard's recipe: rows [start, stop) of an npy file, metadata from a reader."""

    emb: NpyInfo | None
    start: int
    stop: int
    item0: int
    meta_file: str | None = None
    extra: dict = field(default_factory=dict)


class EmbeddingSource:
    """Base class: a sequence of shards of (embeddings, metadata).

    Attributes:
        kind: "store" | "clip-retrieval" | "npy" | "parquet".
        root: what the user passed.
        dim: D.
        num_rows: total rows (None if unknown without reading everything).
        model_id, model_spec: the model that made the embeddings, when the source records it.
        normalized: rows are known to be L2-normalised.
    """

    kind: str = "?"

    def __init__(self, root: str, dim: int, *, model_id: str | None = None,
                 model_spec: str | None = None, normalized: bool = False,
                 checkpoint: str | None = None) -> None:
        self.root = root
        self.dim = int(dim)
        self.model_id = model_id
        self.model_spec = model_spec
        self.checkpoint = checkpoint
        self.normalized = normalized
        self._pieces: list[_Piece] = []

    # subclasses fill self._pieces and override _meta()
    @property
    def num_shards(self) -> int:
        return len(self._pieces)

    @property
    def num_rows(self) -> int:
        return sum(p.stop - p.start for p in self._pieces)

    def shard_rows(self, i: int) -> int:
        p = self._pieces[i]
        return p.stop - p.start

    def describe(self) -> dict:
        """JSON facts for an output manifest (what was labelled)."""
        return {"kind": self.kind, "root": self.root, "dim": self.dim, "num_shards": self.num_shards,
                "num_rows": self.num_rows, "model_id": self.model_id}

    def read_shard(self, i: int) -> EmbeddingShard:
        """Shard ``i`` (reads only its rows)."""
        p = self._pieces[i]
        emb = read_npy_rows(p.emb, p.start, p.stop) if p.emb is not None else self._emb(p)
        meta = self._meta(p, emb.shape[0])
        if meta.num_rows != emb.shape[0]:
            raise CorruptFileError(p.meta_file or self.root,
                                   f"{meta.num_rows} metadata rows for {emb.shape[0]} embeddings")
        files = tuple(f for f in ((p.emb.path if p.emb else None), p.meta_file) if f)
        return EmbeddingShard(i, emb, meta, files)

    def iter_shards(self, indices: Iterable[int] | None = None, *,
                    prefetch: int = 2) -> Iterator[EmbeddingShard]:
        """Yield shards in the given order, reading up to ``prefetch`` ahead on a thread.

        Memory: at most ``prefetch + 1`` shards at a time.
        """
        order = list(range(self.num_shards) if indices is None else indices)
        if prefetch <= 0 or len(order) <= 1:
            for i in order:
                yield self.read_shard(i)
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def worker() -> None:
            try:
                for i in order:
                    if stop.is_set():
                        return
                    q.put(("ok", self.read_shard(i)))
                q.put(("end", None))
            except BaseException as e:  # handed to the consumer, re-raised there
                q.put(("err", e))

        t = threading.Thread(target=worker, name="nolabels-shard-reader", daemon=True)
        t.start()
        try:
            while True:
                kind, val = q.get()
                if kind == "end":
                    return
                if kind == "err":
                    raise val
                yield val
        finally:
            stop.set()
            while t.is_alive():  # unblock a worker waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)

    # hooks
    def _emb(self, p: _Piece) -> np.ndarray:  # pragma: no cover - overridden where used
        raise NotImplementedError

    def _meta(self, p: _Piece, n: int):
        pa, _, _ = _pa()
        items = np.arange(p.item0, p.item0 + n, dtype=np.int64)
        return pa.table({"item": items, "path": pa.nulls(n, pa.string()),
                         "label": pa.nulls(n, pa.string())})

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.root!r}, rows={self.num_rows}, dim={self.dim}, "
                f"shards={self.num_shards}, model={self.model_id!r})")


def _split(info: NpyInfo, item0: int, meta_file: str | None, max_rows: int,
           **extra: Any) -> list[_Piece]:
    out = []
    for a in range(0, info.rows, max_rows):
        b = min(a + max_rows, info.rows)
        out.append(_Piece(info, a, b, item0 + a, meta_file, {"file_row0": a, **extra}))
    if info.rows == 0:
        out.append(_Piece(info, 0, 0, item0, meta_file, {"file_row0": 0, **extra}))
    return out


def _read_meta_rows(path: str, start: int, stop: int, columns: Sequence[str] | None = None):
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    _, _, pq = _pa()
    try:
        f = pq.ParquetFile(path)
        md = f.metadata
        groups, a0, first = [], 0, None
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if a0 + n > start and a0 < stop:
                groups.append(g)
                first = a0 if first is None else first
            a0 += n
        cols = [c for c in (columns or []) if c in f.schema_arrow.names] or None
        if not groups:
            return f.schema_arrow.empty_table().select(cols) if cols else f.schema_arrow.empty_table()
        t = f.read_row_groups(groups, columns=cols)
    except CorruptFileError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on bad files
        raise CorruptFileError(path, f"not a readable Parquet file ({e})") from e
    return t.slice(start - first, stop - start)


def _check_rows(meta: str | os.PathLike, info: NpyInfo) -> None:
    """The Parquet file ``meta`` must hold exactly the rows of the ``.npy`` ``info``."""
    _, _, pq = _pa()
    try:
        n_meta = pq.ParquetFile(meta).metadata.num_rows
    except Exception as ex:
        raise CorruptFileError(meta, f"not a readable Parquet file ({ex})") from ex
    if n_meta != info.rows:
        raise CorruptFileError(meta, f"{n_meta} rows, but {os.path.basename(info.path)} holds "
                               f"{info.rows}")


def _path_column(table, names: Sequence[str] = PATH_COLUMNS):
    pa, pc, _ = _pa()
    for c in names:
        if c in table.column_names:
            col = table.column(c)
            return col if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) \
                else pc.cast(col, pa.string())
    return pa.nulls(table.num_rows, pa.string())


class StoreSource(EmbeddingSource):
    """A nolabels embedding store: shard ``i`` = ``emb_i.npy`` + the good rows of ``meta_i``."""

    kind = "store"

    def __init__(self, root: str | os.PathLike) -> None:
        from nolabels.data.store import EmbeddingStore

        st = EmbeddingStore(root)
        self.store = st
        pending = st.pending_shards()
        if pending:
            from nolabels.errors import IncompleteError

            raise IncompleteError(
                f"{st.root}: {len(pending)} of {st.num_shards} shards are not embedded yet; "
                "re-run the same `nolabels embed` command to finish (it resumes)")
        m = st.model
        super().__init__(os.fspath(root), st.dim, model_id=m.get("model_id"),
                         model_spec=m.get("spec"), normalized=True, checkpoint=m.get("checkpoint"))
        for i in range(st.num_shards):
            info = npy_info(st.emb_path(i))
            if info.dim != st.dim:
                raise CorruptFileError(info.path, f"D={info.dim}, the store says {st.dim}")
            self._pieces.append(_Piece(info, 0, info.rows, -1, os.fspath(st.meta_path(i)),
                                       {"shard": i}))

    @property
    def num_rows(self) -> int:
        return sum(p.emb.rows for p in self._pieces)

    def _meta(self, p: _Piece, n: int):
        pa, pc, pq = _pa()
        try:
            t = pq.read_table(p.meta_file)
        except Exception as e:
            raise CorruptFileError(p.meta_file, f"not a readable Parquet file ({e})") from e
        if "row" not in t.column_names or "item" not in t.column_names:
            raise CorruptFileError(p.meta_file, "no 'row'/'item' columns: not a store meta file")
        if t.column("row").null_count or (t.num_rows and pc.min(t.column("row")).as_py() < 0):
            t = t.filter(pc.greater_equal(t.column("row"), 0))  # rows of failed images
        rows = t.column("row").to_numpy()
        if rows.shape[0] != n or (n and not np.array_equal(rows, np.arange(n))):
            raise CorruptFileError(p.meta_file, f"its rows do not match the {n} rows of "
                                   f"{os.path.basename(p.emb.path)}")
        keep = {"item": t.column("item"), "path": _path_column(t, ("path",)),
                "label": (t.column("label") if "label" in t.column_names
                          else pa.nulls(n, pa.string()))}
        for c in t.column_names:  # anything else the store keeps per row (e.g. raw path bytes)
            if c not in keep and c not in ("row", "error"):
                keep[c] = t.column(c)
        return pa.table(keep)


class ClipRetrievalSource(EmbeddingSource):
    """``img_emb/img_emb_{i}.npy`` + ``metadata/metadata_{i}.parquet`` (clip-retrieval)."""

    kind = "clip-retrieval"

    def __init__(self, root: str | os.PathLike, *, max_rows: int = MAX_SHARD_ROWS) -> None:
        r = Path(root)
        embs = sorted((r / "img_emb").glob("img_emb_*.npy"), key=_file_number)
        if not embs:
            raise InputError(f"{r}: no img_emb/img_emb_*.npy files (clip-retrieval layout)")
        infos = [npy_info(e) for e in embs]
        dims = {i.dim for i in infos}
        if len(dims) != 1:
            raise InputError(f"{r}: img_emb files disagree on D: {sorted(dims)}")
        super().__init__(os.fspath(root), dims.pop(), normalized=False)
        item0 = 0
        for e, info in zip(embs, infos):
            meta = r / "metadata" / f"metadata_{_file_number(e)}.parquet"
            if not meta.is_file():
                raise InputError(f"{e}: no matching {meta}")
            _check_rows(meta, info)
            self._pieces += _split(info, item0, os.fspath(meta), max_rows)
            item0 += info.rows

    def _meta(self, p: _Piece, n: int):
        pa, _, _ = _pa()
        a = p.extra["file_row0"]
        t = _read_meta_rows(p.meta_file, a, a + n)
        label = t.column("label") if "label" in t.column_names else pa.nulls(n, pa.string())
        return pa.table({"item": np.arange(p.item0, p.item0 + n, dtype=np.int64),
                         "path": _path_column(t), "label": label})


class NpySource(EmbeddingSource):
    """One ``(N, D)`` ``.npy`` (+ optional Parquet of N rows with paths / labels)."""

    kind = "npy"

    def __init__(self, path: str | os.PathLike, *, meta: str | os.PathLike | None = None,
                 max_rows: int = MAX_SHARD_ROWS) -> None:
        info = npy_info(path)
        super().__init__(os.fspath(path), info.dim, normalized=False)
        if meta is None:
            side = Path(path).with_suffix(".parquet")
            meta = side if side.is_file() else None
        if meta is not None:
            _check_rows(meta, info)
        self._pieces = _split(info, 0, None if meta is None else os.fspath(meta), max_rows)

    def _meta(self, p: _Piece, n: int):
        if p.meta_file is None:
            return super()._meta(p, n)
        return ClipRetrievalSource._meta(self, p, n)  # same rule: aligned rows + path column


class ParquetEmbeddingSource(EmbeddingSource):
    """Parquet file(s) with an embedding list column; a shard is a run of row groups."""

    kind = "parquet"

    def __init__(self, path: str | os.PathLike, *, column: str | None = None,
                 max_rows: int = MAX_SHARD_ROWS) -> None:
        pa, _, pq = _pa()
        p = Path(path)
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        if not files:
            raise InputError(f"{p}: no .parquet files")
        dim, item0 = None, 0
        pieces = []
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:
                raise CorruptFileError(f, f"not a readable Parquet file ({e})") from e
            names = pf.schema_arrow.names
            col = column or next((c for c in EMBEDDING_COLUMNS if c in names), None)
            if col is None or col not in names:
                raise InputError(f"{f}: no embedding column (looked for "
                                 f"{column or ', '.join(EMBEDDING_COLUMNS)}); pass column=")
            typ = pf.schema_arrow.field(col).type
            if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)
                    or pa.types.is_fixed_size_list(typ)) or not pa.types.is_floating(typ.value_type):
                raise InputError(f"{f}: column {col!r} is {typ}, not a list of floats")
            md = pf.metadata
            g0, rows = 0, 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if rows and rows + n > max_rows:
                    pieces.append(_Piece(None, 0, rows, item0, os.fspath(f),
                                         {"groups": list(range(g0, g)), "column": col}))
                    item0 += rows
                    g0, rows = g, 0
                rows += n
            if rows or not pieces:
                pieces.append(_Piece(None, 0, rows, item0, os.fspath(f),
                                     {"groups": list(range(g0, md.num_row_groups)), "column": col}))
                item0 += rows
            if dim is None and md.num_rows:
                first = pf.read_row_group(0, columns=[col]).column(0)
                dim = len(first[0].as_py()) if len(first) else None
        if dim is None:
            raise InputError(f"{p}: no embeddings")
        super().__init__(os.fspath(path), dim, normalized=False)
        self._pieces = pieces
        self._cache: tuple[int, Any] | None = None

    def _table(self, p: _Piece):
        _, _, pq = _pa()
        try:
            return pq.ParquetFile(p.meta_file).read_row_groups(p.extra["groups"])
        except Exception as e:
            raise CorruptFileError(p.meta_file, f"not a readable Parquet file ({e})") from e

    def read_shard(self, i: int) -> EmbeddingShard:
        pa, pc, _ = _pa()
        p = self._pieces[i]
        t = self._table(p)
        col = t.column(p.extra["column"]).combine_chunks()
        if col.null_count:
            raise CorruptFileError(p.meta_file, f"{col.null_count} null embeddings")
        if pa.types.is_fixed_size_list(col.type):
            flat = col.flatten()
        else:
            lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if lens.size and (lens.min() != self.dim or lens.max() != self.dim):
                raise CorruptFileError(p.meta_file, f"embeddings of lengths {lens.min()}..{lens.max()}, "
                                       f"expected {self.dim}")
            flat = col.flatten()
        emb = np.array(flat.to_numpy(zero_copy_only=False).reshape(-1, self.dim), order="C")
        n = emb.shape[0]
        label = t.column("label") if "label" in t.column_names else pa.nulls(n, pa.string())
        meta = pa.table({"item": np.arange(p.item0, p.item0 + n, dtype=np.int64),
                         "path": _path_column(t), "label": label})
        return EmbeddingShard(i, emb, meta, (p.meta_file,))


def _file_number(p: Path) -> int:
    digits = "".join(ch for ch in p.stem.rsplit("_", 1)[-1] if ch.isdigit())
    return int(digits) if digits else -1


def detect_layout(path: str | os.PathLike) -> str:
    """Which layout ``path`` is: "store", "clip-retrieval", "npy" or "parquet"."""
    p = Path(path)
    if p.is_dir():
        if (p / "manifest.json").is_file():
            try:
                m = json.loads((p / "manifest.json").read_text())
            except (ValueError, OSError) as e:
                raise CorruptFileError(p / "manifest.json", f"not valid JSON ({e})") from e
            if isinstance(m, dict) and "format_version" in m and "shards" in m:
                return "store"
        if (p / "img_emb").is_dir():
            return "clip-retrieval"
        if any(p.glob("*.parquet")):
            return "parquet"
        raise InputError(f"{p}: not an embedding store, a clip-retrieval folder (img_emb/, "
                         "metadata/) or a folder of Parquet files with an embedding column")
    if not p.exists():
        raise FileNotFoundError(2, "No such file or directory", os.fspath(p))
    if p.suffix == ".npy":
        return "npy"
    if p.suffix == ".parquet":
        return "parquet"
    raise InputError(f"{p}: expected an embedding store, a clip-retrieval folder, a .npy or a "
                     ".parquet file")


def open_embeddings(path: str | os.PathLike, *, meta: str | os.PathLike | None = None,
                    column: str | None = None, max_rows: int = MAX_SHARD_ROWS) -> EmbeddingSource:
    """Open embeddings in any supported layout (see the module docstring).

    Args:
        path: a store directory, a clip-retrieval folder, a ``.npy`` or a ``.parquet``.
        meta: for a ``.npy``: a Parquet file of its rows (paths, labels).
        column: for Parquet: the embedding column's name.
        max_rows: most rows per shard of a large file.
    """
    kind = detect_layout(path)
    if kind == "store":
        return StoreSource(path)
    if kind == "clip-retrieval":
        return ClipRetrievalSource(path, max_rows=max_rows)
    if kind == "npy":
        return NpySource(path, meta=meta, max_rows=max_rows)
    return ParquetEmbeddingSource(path, column=column, max_rows=max_rows)


__all__ = ["EmbeddingShard", "EmbeddingSource", "MAX_SHARD_ROWS", "ClipRetrievalSource",
           "NpySource", "ParquetEmbeddingSource", "StoreSource", "detect_layout", "npy_info",
           "open_embeddings", "read_npy_rows"]
