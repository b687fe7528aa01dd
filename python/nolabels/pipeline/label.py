"""Streaming pseudo-labels: any embeddings in, a Parquet dataset out, in bounded memory.

``label(EMB, classes, OUT)`` reads the embeddings shard by shard
(:func:`nolabels.data.sources.open_embeddings`: a nolabels store, clip-retrieval's
``img_emb/`` + ``metadata/``, a ``.npy`` or a Parquet embedding column), labels each
shard with ``ops.pseudo_label`` and writes it as one Parquet *part*. A reader thread
prefetches the next shard and a writer thread writes the previous part, so I/O overlaps
the kernel.

Output ``OUT`` (a directory)::

    part-00000.parquet ...   one per input shard, atomic each, rows in input order
    _selected.parquet        NoLA's confident subset (with --select-per-class): item, path,
                             label, class_name, confidence
    _nolabels.json           classes, model, templates, logit scale, top-k, selection size,
                             the input, the parts done (rows, bytes) and ``complete``

Names starting with ``_`` are skipped by pyarrow.dataset/pandas, so ``OUT`` reads as one
table: ``pyarrow.dataset.dataset(OUT)``, ``pandas.read_parquet(OUT)``,
``duckdb.sql("FROM 'OUT/part-*.parquet'")``, ``polars.scan_parquet("OUT/part-*.parquet")``.
The selection lives in its own small file (rather than a ``selected`` column in every
part) so that selecting never rewrites the parts; join on ``item``.

``OUT`` ending in ``.parquet`` writes one file instead, for small runs: the same
columns plus ``selected`` (bool); the parts are made in a hidden folder next to it and
concatenated part by part at the end.

Part columns: ``path`` string, ``item`` int64 (row in the input), ``label`` int64,
``class_name`` string, ``confidence`` float32, ``topk_classes`` list<int64>,
``topk_probs`` list<float32>, ``entropy`` float32, ``true_class`` string (class folder,
null if unknown; read only by ``eval``). Schema metadata key ``nolabels`` holds the run
settings (as ``_nolabels.json``).

Resume: a re-run with the same settings computes only the parts missing (a part is
done when it exists and its footer says it holds the shard's rows); the selection is
re-merged from the parts' top-k columns. Other settings in an existing ``OUT`` are
refused (:class:`~nolabels.errors.StoreMismatchError`) unless ``overwrite``.

Under ``torchrun`` rank r labels shards r, r + W, ... and writes their parts; only the
selection candidates (at most C·K rows per rank, ``ops.select_per_class`` is mergeable)
are all-gathered; rank 0 writes ``_selected.parquet`` and the manifest.

Peak memory: O(prefetch · shard + C·D + C·K), independent of the number of rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nolabels.errors import InputError, StoreMismatchError
from nolabels.progress import Log, progress

DEFAULT_TOPK = 5
#: rows per ``ops.pseudo_label`` call: bounds the float32 copy of a large shard.
CHUNK_ROWS = 1 << 16
MANIFEST = "_nolabels.json"
SELECTED = "_selected.parquet"
FORMAT = "nolabels-labels"
FORMAT_VERSION = 1
#: columns of a part written with Parquet dictionary encoding (few distinct values)
PART_DICTIONARY = ["class_name", "true_class"]


@dataclass
class LabelReport:
    """What :func:`label` wrote (the same numbers on every rank).

    Attributes:
        out: the output directory or file.
        rows: rows labelled in total (all parts).
        num_classes: C.
        selected: size of the confident subset (None without ``select_per_class``).
        model_id: the text model's id.
        parts: parts in the output; ``computed``: parts computed by this call.
        seconds: wall time of this call.
    """

    out: str
    rows: int
    num_classes: int
    selected: int | None
    model_id: str
    parts: int
    computed: int
    seconds: float


def part_path(out: Path, i: int) -> Path:
    return out / f"part-{i:05d}.parquet"


# --------------------------------------------------------------------------- output dir
def _settings(info: dict) -> dict:
    """The manifest fields that must agree for a resume to be valid."""
    keys = ("classes_sha256", "model_id", "templates", "descriptions_sha256", "logit_scale",
            "topk", "select_per_class", "source", "classifier_sha256", "normalize")
    return {k: info.get(k) for k in keys}


def _read_manifest(out: Path) -> dict | None:
    mf = out / MANIFEST
    if not mf.is_file():
        return None
    try:
        m = json.loads(mf.read_text())
    except ValueError as e:
        from nolabels.errors import CorruptFileError

        raise CorruptFileError(mf, f"not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return None
    return m


def _claim_dir(out: Path, info: dict, num_parts: int, overwrite: bool) -> None:
    """Make ``out`` ours (rank 0 only).

    Absent or empty: created, with a manifest saying which parts it will hold (so a killed
    run is recognised and resumed). Our labels with the same settings: resumed. Ours with
    other settings: :class:`StoreMismatchError`, or with ``overwrite`` exactly the files the
    old manifest lists are deleted. Anything else (a folder of the user's): refused,
    nothing touched (:func:`nolabels.data.outputs.check_output_dir`).
    """
    from nolabels.data.outputs import check_output_dir, is_temp_name
    from nolabels.data.store import atomic_write_json

    state = check_output_dir(out, "dataset")  # raises OutputExistsError if not ours
    old = _read_manifest(out) if state == "ours" else None
    if old is not None and _settings(old) != _settings(info):
        if not overwrite:
            diff = [k for k, v in _settings(info).items() if _settings(old).get(k) != v]
            raise StoreMismatchError(
                f"{out} holds labels made with different settings ({', '.join(diff)}); "
                "use another --out, or --overwrite to replace them")
        for i in range(int(old.get("num_parts", 0))):
            part_path(out, i).unlink(missing_ok=True)
        (out / SELECTED).unlink(missing_ok=True)
        for n in os.listdir(out):
            if is_temp_name(n):
                (out / n).unlink(missing_ok=True)
        (out / MANIFEST).unlink()
        old = None
    if old is None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MANIFEST, {**info, "num_parts": num_parts, "parts": {},
                                           "complete": False})


def _part_ok(path: Path, rows: int) -> bool:
    """A part is done when it exists and its footer holds ``rows`` rows."""
    if not path.is_file():
        return False
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows == rows
    except Exception:
        return False


# --------------------------------------------------------------------------- tables
def _part_table(shard, names_arr, pl, info_json: str):
    import pyarrow as pa
    import pyarrow.compute as pc

    n, k = pl.classes.shape
    cls = pl.classes.numpy()
    prob = pl.probs.numpy().astype(np.float32, copy=False)
    lab = pa.array(cls[:, 0] if n else np.zeros(0, np.int64), pa.int64())
    meta = shard.meta
    cols = {
        "path": meta.column("path"),
        "item": meta.column("item"),
        "label": lab,
        "class_name": pc.take(names_arr, lab),
        "confidence": pa.array(prob[:, 0] if n else np.zeros(0, np.float32), pa.float32()),
        "topk_classes": pa.FixedSizeListArray.from_arrays(pa.array(cls.reshape(-1), pa.int64()), k)
        .cast(pa.list_(pa.int64())),
        "topk_probs": pa.FixedSizeListArray.from_arrays(pa.array(prob.reshape(-1), pa.float32()), k)
        .cast(pa.list_(pa.float32())),
        "entropy": pa.array(pl.entropy.numpy().astype(np.float32, copy=False), pa.float32()),
        "true_class": meta.column("label"),
    }
    if "path_bytes" in meta.column_names and meta.column("path_bytes").null_count < n:
        cols["path_bytes"] = meta.column("path_bytes")  # exact bytes of non-UTF-8 names
    t = pa.table(cols)
    return t.replace_schema_metadata({"nolabels": info_json})


def labels_table(paths: Sequence[str], true_class: Sequence[str | None], names: Sequence[str],
                 items: torch.Tensor, classes: torch.Tensor, probs: torch.Tensor,
                 entropy: torch.Tensor, info: dict, selected_ids: torch.Tensor | None = None):
    """A labels table (the part schema) from Python lists, for small in-memory results
    (``predict``): ``items`` (N,) int64, ``classes``/``probs`` (N, k), ``entropy`` (N,)."""
    import pyarrow as pa

    from nolabels.data.readers import path_columns

    pcols = path_columns(list(paths))
    n, k = classes.shape
    cls_np, prob_np = classes.numpy(), probs.numpy().astype(np.float32)
    cols = {
        "path": pcols["path"],  # a name that is not UTF-8: \\xNN text, exact in path_bytes
        "item": pa.array(items.numpy(), pa.int64()),
        "label": pa.array(cls_np[:, 0] if n else [], pa.int64()),
        "class_name": pa.array([names[c] for c in cls_np[:, 0]] if n else [], pa.string()),
        "confidence": pa.array(prob_np[:, 0] if n else [], pa.float32()),
        "topk_classes": pa.FixedSizeListArray.from_arrays(pa.array(cls_np.reshape(-1), pa.int64()), k)
        .cast(pa.list_(pa.int64())),
        "topk_probs": pa.FixedSizeListArray.from_arrays(pa.array(prob_np.reshape(-1), pa.float32()), k)
        .cast(pa.list_(pa.float32())),
        "entropy": pa.array(entropy.numpy().astype(np.float32), pa.float32()),
    }
    if selected_ids is not None:
        cols["selected"] = pa.array(np.isin(items.numpy(), selected_ids.numpy()), pa.bool_())
    cols["true_class"] = pa.array(list(true_class), pa.string())
    if pcols["path_bytes"].null_count < n:
        cols["path_bytes"] = pcols["path_bytes"]
    return pa.table(cols).replace_schema_metadata({"nolabels": json.dumps(info)})


class _Writer:
    """Writes parts on a thread (bounded queue) so Parquet encoding overlaps compute."""

    def __init__(self, depth: int = 2) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written: set[Path] = set()  # parts committed by this writer
        self.t = threading.Thread(target=self._run, name="nolabels-part-writer", daemon=True)
        self.t.start()

    def _run(self) -> None:
        from nolabels.data.store import atomic_write_parquet

        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error is None:
                try:
                    # dictionary pages only where values repeat: cheaper to encode, smaller.
                    # No fsync per part (it stalls this thread on the disk): parts are
                    # synced together before the manifest says "complete", and a resumed
                    # run re-checks every part's footer.
                    atomic_write_parquet(job[0], job[1], use_dictionary=PART_DICTIONARY,
                                         fsync=False)
                    self.written.add(job[0])
                except BaseException as e:  # re-raised in the caller by put()/close()
                    self.error = e

    def put(self, path: Path, table) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((path, table))

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------- selection
def _pa():
    import pyarrow

    return pyarrow


class _Candidates:
    """NoLA's per-class selection, merged incrementally: memory O(C·K + buffer).

    ``ops.select_per_class`` is mergeable (selecting on the union of two row sets' selected
    rows equals selecting on the union of the row sets), so rows are buffered and, whenever
    the buffer holds more than ``flush_rows``, re-selected together with the running
    candidates, which never exceed C·K rows.

    Before buffering, rows that can never be selected are dropped (exact, see
    :meth:`_can_matter`): once every class has K confident rows, almost every new row is,
    so the buffer and the re-selections stay small. The ``path`` of each candidate is kept
    with it, so the selected rows' table needs no second pass over the parts.
    """

    def __init__(self, k: int, num_classes: int, flush_rows: int | None = None) -> None:
        self.k, self.C = k, num_classes
        self.R = min(3, num_classes)  # ranks the selection's fallback looks at
        # bars are refreshed at every flush: about as often as the candidates could turn over
        self.flush_rows = flush_rows or max(k * num_classes, 1 << 12)
        self.ids = torch.empty(0, dtype=torch.int64)
        self.cls = torch.empty(0, self.R, dtype=torch.int64)
        self.prob = torch.empty(0, self.R, dtype=torch.float32)
        self.paths = _pa().array([], _pa().string())  # Arrow strings, aligned with ids
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]] = []
        self._pending_rows = 0
        self._need: torch.Tensor | None = None  # (R, C) bars a new row must reach
        self.dropped = 0  # rows the prefilter proved irrelevant

    def _select(self, ids, cls, prob) -> torch.Tensor:
        """Positions (into ``ids``, sorted ascending) of the selected rows."""
        from nolabels import ops

        z = torch.zeros(ids.shape[0])
        pl = ops.PseudoLabels(cls[:, 0], prob, cls, z, z)
        sel = ops.select_per_class(pl, self.k, row_ids=ids, num_classes=self.C)
        return torch.searchsorted(ids, sel.indices) if ids.numel() else sel.indices

    def _bars(self) -> torch.Tensor:
        """(R, C): a row whose rank-r class is c can only ever be selected through that rank
        if its rank-r probability is >= ``bars[r, c]``.

        Rank 1: the K-th best top-1 probability of class c seen so far (K rows that beat it
        already exist, and rows are only ever added). Rank r > 1: +inf once any row has
        class c at a rank < r (the fallback to rank r then never happens), else the K-th
        best rank-r probability. The candidates hold every row these bars depend on (the
        top K of each class at each rank its selection reaches), and bars from a subset of
        the rows seen are only lower, so the test never drops a row that could matter.
        """
        C, K = self.C, self.k
        bars = torch.full((self.R, C), float("-inf"))
        seen_earlier = torch.zeros(C, dtype=torch.bool)
        for r in range(self.R):
            c, p = self.cls[:, r], self.prob[:, r]
            cnt = torch.bincount(c, minlength=C)
            o = torch.argsort(p, descending=True, stable=True)
            o = o[torch.argsort(c[o], stable=True)]  # by class, best first within a class
            cs, ps = c[o], p[o]
            pos = torch.arange(cs.numel()) - (torch.cumsum(cnt, 0) - cnt)[cs]
            kth = pos == K - 1
            bars[r, cs[kth]] = ps[kth]
            bars[r, seen_earlier] = float("inf")
            seen_earlier |= cnt > 0
        return bars

    def _can_matter(self, cls: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """(N,) bool: rows that are not provably outside every future selection (ties kept)."""
        if self._need is None:
            return torch.ones(cls.shape[0], dtype=torch.bool)
        keep = prob[:, 0] >= self._need[0, cls[:, 0]]
        for r in range(1, self.R):
            keep |= prob[:, r] >= self._need[r, cls[:, r]]
        return keep

    def add(self, ids: torch.Tensor, cls: torch.Tensor, prob: torch.Tensor,
            paths: Any = None) -> None:
        """Rows with unique int64 ``ids`` (N,) and their top-3 ``cls``/``prob`` (N, >=3);
        ``paths``: their paths (a pyarrow string array or a list, None entries allowed;
        default all None)."""
        if ids.numel() == 0:
            return
        pa = _pa()
        if paths is None:
            paths = pa.nulls(ids.numel(), pa.string())
        elif not isinstance(paths, pa.Array):
            paths = pa.array(list(paths), pa.string())
        ids, cls, prob = ids.to(torch.int64), cls[:, :self.R].to(torch.int64), \
            prob[:, :self.R].float()
        keep = self._can_matter(cls, prob)
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            self.dropped += ids.numel() - idx.numel()
            ids, cls, prob = ids[idx], cls[idx], prob[idx]
            paths = paths.take(pa.array(idx.numpy()))
        if ids.numel() == 0:
            return
        self._pending.append((ids, cls, prob, paths))
        self._pending_rows += ids.numel()
        if self._pending_rows >= self.flush_rows:
            self.flush()

    merge = add

    def flush(self) -> None:
        """Re-select the running candidates together with the buffered rows."""
        if not self._pending:
            return
        ids = torch.cat([self.ids, *(p[0] for p in self._pending)])
        cls = torch.cat([self.cls, *(p[1] for p in self._pending)])
        prob = torch.cat([self.prob, *(p[2] for p in self._pending)])
        paths = _pa().concat_arrays([self.paths, *(p[3] for p in self._pending)])
        self._pending, self._pending_rows = [], 0
        o = torch.argsort(ids)
        keep = o[self._select(ids[o], cls[o], prob[o])]
        keep = keep[torch.argsort(ids[keep])]  # candidates are kept sorted by id
        self.ids, self.cls, self.prob = ids[keep], cls[keep], prob[keep]
        self.paths = paths.take(_pa().array(keep.numpy()))
        self._need = self._bars()

    def selection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row ids, the class each was selected for)``, by row id."""
        from nolabels import ops

        self.flush()
        z = torch.zeros(self.ids.shape[0])
        sel = ops.select_per_class(ops.PseudoLabels(self.cls[:, 0], self.prob, self.cls, z, z),
                                   self.k, row_ids=self.ids, num_classes=self.C)
        o = torch.argsort(sel.indices)
        return sel.indices[o], sel.labels[o]


def _candidates_from_part(path: Path):
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["item", "path", "topk_classes", "topk_probs"])
    n = t.num_rows
    if n == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, 3, dtype=torch.int64), \
            torch.empty(0, 3), []
    cls = t.column("topk_classes").combine_chunks().flatten().to_numpy().reshape(n, -1)
    prob = t.column("topk_probs").combine_chunks().flatten().to_numpy().reshape(n, -1)
    return (torch.from_numpy(t.column("item").to_numpy().copy()),
            torch.from_numpy(cls[:, :3].copy()), torch.from_numpy(prob[:, :3].copy()),
            t.column("path").combine_chunks())


def label(embeddings: str | os.PathLike, classes: str | os.PathLike | Sequence[str],
          out: str | os.PathLike, *, model: str | None = None,
          descriptions: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
          templates: str | Sequence[str] = "simple", select_per_class: int | None = None,
          topk: int | None = None, logit_scale: float | None = None,
          checkpoint: str | None = None, device: str | None = "auto",
          backend: str = "auto", overwrite: bool = False, quiet: bool = False,
          encoder: Any = None, meta: str | os.PathLike | None = None,
          column: str | None = None, prefetch: int | None = None) -> LabelReport:
    """Pseudo-label every row of ``embeddings`` against ``classes`` (streaming).

    Args:
        embeddings: a nolabels store, a clip-retrieval folder, a ``.npy`` (N, D) or a
            Parquet file/folder with an embedding column (:func:`open_embeddings`).
        classes: a classes.txt (one name per line) or a list of C names.
        out: output directory (Parquet dataset), or a ``.parquet`` file for small runs.
        model: the text model (``nolabels.models`` spec); default the store's. Needed for
            embeddings nolabels did not make; its dim must match theirs.
        descriptions: ``{class: [sentences]}`` or its JSON: CDE class embeddings.
        templates: template set name (``simple``, ``imagenet7``, ``cifar``, ``none``),
            a file with one template per line, or a list.
        select_per_class: K for NoLA's confident subset (``ops.select_per_class``).
        topk: classes kept per row, 1 to C (default ``min(5, C)``; at least 3 are kept
            when selecting, for the fallback ranks).
        logit_scale: softmax temperature, > 0; default the model's (CLIP: 100).
        checkpoint: the model's local weights file (default: the one the store records).
        device: "auto" | "cpu" | "cuda" | "cuda:N".
        backend: ``ops.pseudo_label`` backend.
        overwrite: replace labels made with other settings in ``out`` (only our files).
        quiet: no logs or progress bars.
        encoder: an already loaded :class:`~nolabels.models.Encoder`.
        meta, column: see :func:`open_embeddings` (``.npy`` metadata, Parquet column).
        prefetch: shards read ahead on a thread (default: about two kernel calls' worth).
    Returns:
        a :class:`LabelReport`.
    """
    from nolabels import dist
    from nolabels.data.sources import open_embeddings
    from nolabels.methods.zeroshot import (
        class_embeddings,
        read_classes,
        read_descriptions,
        resolve_templates,
    )
    from nolabels.models import load_encoder

    if select_per_class is not None and (isinstance(select_per_class, bool)
                                         or int(select_per_class) < 1):
        raise InputError(f"--select-per-class {select_per_class}: must be >= 1")
    if topk is not None and topk < 1:
        raise InputError(f"--topk {topk}: must be between 1 and the number of classes")
    if logit_scale is not None and not 0 < logit_scale < float("inf"):
        raise InputError(f"--logit-scale {logit_scale}: must be a finite number > 0")
    t0 = time.perf_counter()
    out_arg = Path(out)
    with dist.dist_session(device) as ctx:
        log = Log(quiet, ctx.is_main)
        src = open_embeddings(embeddings, meta=meta, column=column)
        names = read_classes(classes) if isinstance(classes, (str, os.PathLike)) else list(classes)
        if not names:
            raise InputError("no class names")
        if topk is not None and topk > len(names):
            where = f" in {classes}" if isinstance(classes, (str, os.PathLike)) else ""
            raise InputError(f"--topk {topk}: must be between 1 and the {len(names)} "
                             f"classes{where}")
        desc = None
        if descriptions is not None:
            desc = (read_descriptions(descriptions, names)
                    if isinstance(descriptions, (str, os.PathLike)) else dict(descriptions))
        tmpl = resolve_templates(templates)

        spec = model or src.model_spec
        if encoder is None:
            if spec is None:
                raise InputError(f"{embeddings}: these embeddings do not say which model made "
                                 "them; pass --model SPEC (its text tower labels them)")
            ck = checkpoint or (src.checkpoint if model is None else None)
            encoder = load_encoder(spec, checkpoint=ck, device=ctx.device)
        else:
            encoder.to(ctx.device)
        if src.model_id is not None and encoder.model_id != src.model_id:
            raise InputError(f"{embeddings} was embedded with {src.model_id} but the model "
                             f"loaded is {encoder.model_id}; pass the same model/--checkpoint")
        if not encoder.has_text:
            raise InputError(f"{spec} has no text encoder: zero-shot labels need a CLIP-like "
                             "model (openclip:... or surrogate:effnet-lite0+minilm)")
        if encoder.dim != src.dim:
            raise InputError(f"{embeddings}: embeddings have D={src.dim} but {encoder.model_id} "
                             f"embeds texts in D={encoder.dim}; pass the model that made them")
        if getattr(encoder, "not_clip", None):
            log.note(encoder.not_clip)
        scale = float(encoder.logit_scale if logit_scale is None else logit_scale)
        cls_emb = class_embeddings(encoder, names, templates=tmpl, descriptions=desc)
        C = len(names)
        k = min(max(DEFAULT_TOPK if topk is None else topk, 3 if select_per_class else 1), C)

        info = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "classes": names,
            "classes_sha256": hashlib.sha256("\n".join(names).encode("utf-8",
                                                                      "surrogatepass")).hexdigest(),
            "model_id": encoder.model_id, "model_spec": getattr(encoder, "spec", spec),
            "templates": tmpl,
            "descriptions": (os.fspath(descriptions) if isinstance(descriptions, (str, os.PathLike))
                             else ("inline" if descriptions is not None else None)),
            "descriptions_sha256": (None if desc is None else hashlib.sha256(
                json.dumps(desc, sort_keys=True).encode()).hexdigest()),
            "logit_scale": scale, "topk": k, "select_per_class": select_per_class,
            "source": {key: v for key, v in src.describe().items() if key != "root"},
            "input": os.fspath(embeddings), "backend": backend,
            "note": getattr(encoder, "not_clip", None),
            "how": (f"{len(tmpl)} templates" + (" + CDE descriptions" if desc else "")),
        }
        return label_source(src, cls_emb.to(ctx.device), out_arg, info, scale=scale, topk=k,
                            normalize=True, select_per_class=select_per_class,
                            backend=backend, overwrite=overwrite, quiet=quiet,
                            prefetch=prefetch, t0=t0)


def label_source(src: Any, weight: torch.Tensor, out: str | os.PathLike, info: dict, *,
                 scale: float, topk: int, normalize: bool = True,
                 select_per_class: int | None = None, backend: str = "auto",
                 overwrite: bool = False, quiet: bool = False, prefetch: int | None = None,
                 t0: float | None = None) -> LabelReport:
    """Label every shard of an open :class:`~nolabels.data.sources.EmbeddingSource` with a
    given class matrix and write ``label``'s output (directory or ``.parquet``).

    Call inside :func:`nolabels.dist.dist_session` (every rank). ``weight`` (C, D) on the
    compute device; ``scale``/``normalize`` as in ``ops.pseudo_label``; ``topk`` (<= C)
    classes kept per row; ``info``: the run settings (at least ``classes``, ``model_id``;
    the keys of ``_settings`` decide whether an existing output can be resumed).
    ``predict`` uses this with a tuned classifier.
    """
    from nolabels import dist, ops

    t0 = time.perf_counter() if t0 is None else t0
    ctx_rank, ctx_world = dist.get_rank(), dist.get_world_size()
    is_main = ctx_rank == 0
    device = weight.device
    names = list(info["classes"])
    C = len(names)
    k = topk
    log = Log(quiet, is_main)
    out_arg = Path(out)
    # a .parquet name, or an existing file (replaced only if `label` wrote it), is one file
    single_file = out_arg.suffix in (".parquet", ".pq") or out_arg.is_file()
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, **info}
    info_json = json.dumps({kk: v for kk, v in info.items() if kk != "format_version"})

    if single_file:
        from nolabels.data.outputs import claim_output_file

        claim_output_file(out_arg)  # an existing file is replaced only if it is ours
        out_dir = out_arg.with_name(f".{out_arg.name}.parts")
    else:
        out_dir = out_arg
    # Rank 0 claims the output; every rank raises its error (no two ranks mkdir/delete).
    from nolabels.data.outputs import on_main_rank

    on_main_rank(_claim_dir, out_dir, info, src.num_shards, overwrite)

    mine = [s for s in range(src.num_shards) if s % ctx_world == ctx_rank]
    todo = [s for s in mine if not _part_ok(part_path(out_dir, s), src.shard_rows(s))]
    where = f" on rank {ctx_rank} of {ctx_world}" if ctx_world > 1 else ""
    how = info.get("how") or "a given classifier"
    log(f"labelling {src.num_rows} rows in {src.num_shards} shards ({src.kind}){where} x "
        f"{C} classes ({how}, D={src.dim}, logit_scale={scale:g}); "
        f"{len(mine) - len(todo)} of my {len(mine)} parts already done")

    import pyarrow as pa

    names_arr = pa.array(names, pa.string())
    cand = _Candidates(select_per_class, C) if select_per_class else None
    w = weight
    bar = progress(sum(src.shard_rows(s) for s in todo), "labelling", quiet=quiet,
                   main=is_main, unit="row")
    # Small shards (a store's are 4,096 rows) are labelled in groups of about CHUNK_ROWS
    # rows: one kernel call per group, not per shard (small GEMMs leave the cores idle),
    # then split back into one part per shard. Read-ahead covers one group.
    if prefetch is None:
        typical = max(1, min((src.shard_rows(s) for s in todo), default=CHUNK_ROWS))
        prefetch = max(2, min(32, CHUNK_ROWS // typical + 1))
    writer = _Writer(depth=prefetch)  # a group's parts queue while the next one computes
    staging: dict[str, torch.Tensor] = {}  # one reused float32 buffer (CPU)

    def group_rows(group: list, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the group as float32 on ``device``."""
        # float32 on every device: the class matrix is float32, and float16 storage is
        # only a storage format (rows were rounded once already)
        if device.type != "cpu":
            x16 = group[0].emb if len(group) == 1 else np.concatenate([g.emb for g in group])
            return torch.from_numpy(x16[a:b]).to(device).float()
        # CPU: cast each shard's rows straight into a reused buffer (one pass, no
        # concatenated copy, no fresh pages per call)
        buf = staging.get("x")
        if buf is None or buf.shape[0] < b - a or buf.shape[1] != src.dim:
            buf = staging["x"] = torch.empty(max(b - a, CHUNK_ROWS), src.dim)
        at = 0
        for g in group:
            lo, hi = max(a, at), min(b, at + g.rows)
            if lo < hi:
                buf[lo - a:hi - a].copy_(torch.from_numpy(g.emb[lo - at:hi - at]))
            at += g.rows
        return buf[:b - a]

    def run_group(group: list) -> None:
        total = sum(g.rows for g in group)
        outs = []
        for a in range(0, total, CHUNK_ROWS):
            x = group_rows(group, a, min(total, a + CHUNK_ROWS))
            outs.append(ops.pseudo_label(x, w, logit_scale=scale, topk=k,
                                         normalize=normalize, backend=backend))
            bar.update(x.shape[0])
        if outs:
            pl = ops.PseudoLabels(*(torch.cat(f).cpu() for f in zip(*outs)))
        else:
            pl = ops.PseudoLabels(torch.empty(0, dtype=torch.int64), torch.empty(0, k),
                                  torch.empty(0, k, dtype=torch.int64), torch.empty(0),
                                  torch.empty(0))
        at = 0
        for g in group:
            sub = ops.PseudoLabels(*(f[at:at + g.rows] for f in pl))
            at += g.rows
            writer.put(part_path(out_dir, g.index), _part_table(g, names_arr, sub, info_json))
        if cand is not None and total:  # one call per group: the prefilter is vectorised
            ids = torch.from_numpy(np.concatenate(
                [g.meta.column("item").to_numpy() for g in group]).astype(np.int64, copy=False))
            paths = pa.concat_arrays([c for g in group for c in g.meta.column("path").chunks])
            cand.add(ids, pl.classes, pl.probs, paths)

    try:
        group: list = []
        rows_in_group = 0
        for shard in src.iter_shards(todo, prefetch=prefetch):
            group.append(shard)
            rows_in_group += shard.rows
            if rows_in_group >= CHUNK_ROWS:
                run_group(group)
                group, rows_in_group = [], 0
            del shard
        if group:
            run_group(group)
        del group
    finally:
        bar.close()
        writer.close()
    from nolabels.data.store import fsync_files

    fsync_files(sorted(writer.written))
    if cand is not None:  # parts done by an earlier run contribute from their columns
        for s in mine:
            if s not in todo:
                cand.merge(*_candidates_from_part(part_path(out_dir, s)))

    n_sel = None
    if cand is not None:
        cand.flush()
        g_ids = dist.all_gather_variable(cand.ids)
        g_cls = dist.all_gather_variable(cand.cls)
        g_prob = dist.all_gather_variable(cand.prob)
        g_paths = dist.all_gather_strings(cand.paths.to_pylist())
        final = _Candidates(select_per_class, C)
        final.add(g_ids, g_cls, g_prob, g_paths)
        final.flush()
        n_sel = int(final.ids.numel())
    dist.barrier()
    rows = sum(src.shard_rows(s) for s in range(src.num_shards))
    if is_main:

        if cand is not None:
            sel_table = _selected_table(final, names_arr, info_json)
            from nolabels.data.store import atomic_write_parquet

            atomic_write_parquet(out_dir / SELECTED, sel_table)
        parts_done = {}
        for s in range(src.num_shards):
            p = part_path(out_dir, s)
            # parts this process just wrote are known; others (earlier runs, other ranks)
            # are checked on disk
            if p not in writer.written and not _part_ok(p, src.shard_rows(s)):
                raise RuntimeError(f"internal error: part {p} is missing after labelling")
            parts_done[str(s)] = {"file": p.name, "rows": src.shard_rows(s),
                                  "bytes": p.stat().st_size}
        manifest = {**info, "num_parts": src.num_shards, "parts": parts_done,
                    "num_rows": rows, "selected": (
            {"file": SELECTED, "rows": n_sel} if cand is not None else None),
            "complete": True}
        from nolabels.data.store import atomic_write_json

        atomic_write_json(out_dir / MANIFEST, manifest)
        if single_file:
            _concat_to_file(out_dir, out_arg, src.num_shards, cand is not None)
            shutil.rmtree(out_dir)
        log(f"wrote {rows} labels to {out_arg}"
            + (f" ({n_sel} selected, at most {select_per_class} per class)"
               if n_sel is not None else ""))
    dist.barrier()
    return LabelReport(os.fspath(out_arg), rows, C, n_sel, info["model_id"], src.num_shards,
                       len(todo), time.perf_counter() - t0)


def _selected_table(final: _Candidates, names_arr, info_json: str):
    """item, path, label (top-1), class_name, confidence, selected_for (the class the row
    was picked for: its top-1, or rank 2/3 for a class nobody's top-1) of the selected
    rows, by item; everything comes from the candidates (no pass over the parts)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sel_ids, sel_for = final.selection()
    pos = torch.searchsorted(final.ids, sel_ids)  # final.ids is sorted
    if sel_ids.numel() and not torch.equal(final.ids[pos], sel_ids):
        raise RuntimeError("internal error: selected rows are not among the candidates")
    top1 = pa.array(final.cls[pos, 0].numpy(), pa.int64())
    t = pa.table({
        "item": pa.array(sel_ids.numpy(), pa.int64()),
        "path": final.paths.take(pa.array(pos.numpy())),
        "label": top1,
        "class_name": pc.take(names_arr, top1),
        "confidence": pa.array(final.prob[pos, 0].numpy(), pa.float32()),
        "selected_for": pa.array(sel_for.numpy(), pa.int64()),
    })
    return t.replace_schema_metadata({"nolabels": info_json})


def _concat_to_file(out_dir: Path, out_file: Path, num_parts: int, with_selected: bool) -> None:
    """Stream the parts into one file (+ ``selected``), atomically."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from nolabels.data.store import _atomic_write_with

    sel = None
    if with_selected:
        sel = pq.read_table(out_dir / SELECTED, columns=["item"]).column("item").combine_chunks()

    # parts differ only in whether they carry path_bytes (non-UTF-8 names): union schema
    has_bytes = any("path_bytes" in pq.read_schema(part_path(out_dir, s)).names
                    for s in range(num_parts))

    def write(tmp: str) -> None:
        import pyarrow as pa

        writer = None
        try:
            for s in range(num_parts):
                t = pq.read_table(part_path(out_dir, s))
                if has_bytes and "path_bytes" not in t.column_names:
                    t = t.append_column("path_bytes", pa.nulls(t.num_rows, pa.binary()))
                if sel is not None:
                    t = t.append_column("selected", pc.is_in(t.column("item"), value_set=sel))
                    # selected before true_class (and path_bytes), as the file had it
                    tail = [c for c in ("true_class", "path_bytes") if c in t.column_names]
                    t = t.select([c for c in t.column_names if c not in tail] + tail)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, t.schema)
                writer.write_table(t)
            if writer is None:
                raise RuntimeError("internal error: no parts to concatenate")
        finally:
            if writer is not None:
                writer.close()

    out_file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_with(out_file, write)


__all__ = ["LabelReport", "label", "labels_table", "part_path", "MANIFEST", "SELECTED"]
