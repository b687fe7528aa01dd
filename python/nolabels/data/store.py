"""The embedding store: embeddings computed once, read by every method.

Layout of a store directory (design.md §8)::

    manifest.json           model (spec, model_id, preprocessing, dim), source
                            (kind, root, num_items, fingerprint), shard_size,
                            shards done, failed images with reasons, complete
    emb_00000.npy           (rows, D) float16, rows L2-normalised
    meta_00000.parquet      one row per *input item* of the shard: path, item
                            (index in the input list), row (row in emb_*.npy,
                            -1 if the image failed), label (class folder; for
                            evaluation only), error (reason, or null)

Shard ``i`` holds the input items ``[i * shard_size, (i + 1) * shard_size)``. Every
file is written to a temporary name and renamed (atomic on POSIX); ``emb`` is
written before ``meta``, so a shard is committed exactly when its meta file
exists. A killed job therefore loses at most the shards in flight, and a re-run
computes only the shards without a meta file: nothing is lost or duplicated.
Under ``torchrun`` each rank writes its own shards and rank 0 alone writes the
manifest.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nolabels.errors import IncompleteError, InputError, MissingDependencyError, StoreMismatchError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _require_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependencyError("the embedding store needs pyarrow: pip install 'nolabels[data]'") from e
    return pa, pq


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
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


def _atomic_write_with(path: Path, writer) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    def w(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    _atomic_write_with(Path(path), w)


def atomic_write_parquet(path: str | os.PathLike, table) -> None:
    """``pyarrow.parquet.write_table`` to ``path`` atomically."""
    _, pq = _require_pyarrow()
    _atomic_write_with(Path(path), lambda tmp: pq.write_table(table, tmp))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


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
        self.manifest: dict[str, Any] = json.loads(mf.read_text())
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
            source: ``ImageSource.describe()`` (``num_items``, ``fingerprint``).
            shard_size: input items per shard.
            overwrite: delete an existing store's shards and start again.
        Raises:
            StoreMismatchError: an existing store was made with another model,
                input or shard size (and ``overwrite`` is False).
        """
        root = Path(root)
        if shard_size < 1:
            raise InputError(f"shard_size must be >= 1, got {shard_size}")
        root.mkdir(parents=True, exist_ok=True)
        mf = root / MANIFEST
        if mf.exists() and not overwrite:
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
        if overwrite:
            for p in root.iterdir():
                if re.fullmatch(r"(emb_\d+\.npy|meta_\d+\.parquet|manifest\.json|\..*\.tmp-.*)",
                                p.name):
                    p.unlink()
        num_items = int(source["num_items"])
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": model,
            "dtype": "float16",
            "normalized": True,
            "dim": int(model["dim"]),
            "source": source,
            "shard_size": int(shard_size),
            "num_shards": (num_items + shard_size - 1) // shard_size,
            "shards": [],
            "num_rows": 0,
            "failed": [],
            "complete": num_items == 0,
        }
        atomic_write_json(mf, manifest)
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
        """A shard is committed when its meta file exists (written after its emb file)."""
        return self.meta_path(i).is_file() and self.emb_path(i).is_file()

    def pending_shards(self) -> list[int]:
        """Shards not yet committed, in order."""
        return [i for i in range(self.num_shards) if not self.shard_done(i)]

    # ------------------------------------------------------------------ writing
    def write_shard(self, i: int, emb: np.ndarray, items: Sequence[int], paths: Sequence[str],
                    labels: Sequence[str | None], failed: Iterable[tuple[int, str, str | None, str]]
                    ) -> dict:
        """Commit shard ``i`` atomically.

        Args:
            emb: (R, D) embeddings of the good images (any float dtype; stored as
                float16 after L2 normalisation), in the order of ``items``.
            items, paths, labels: R item indices (ascending), paths, labels.
            failed: (item, path, label, reason) of the images that could not be read.
        Returns:
            the shard's manifest entry ``{"index", "rows", "failed"}``.
        """
        pa, _ = _require_pyarrow()
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
        table = pa.table({
            "path": pa.array([r[1] for r in rows], pa.string()),
            "item": pa.array([r[0] for r in rows], pa.int64()),
            "row": pa.array([r[3] for r in rows], pa.int64()),
            "label": pa.array([r[2] for r in rows], pa.string()),
            "error": pa.array([r[4] for r in rows], pa.string()),
        })
        atomic_write_npy(self.emb_path(i), emb16)
        atomic_write_parquet(self.meta_path(i), table)
        return {"index": i, "rows": len(items),
                "failed": [{"item": it, "path": p, "reason": reason} for it, p, _, reason in failed]}

    def commit(self, entry: dict) -> None:
        """Record one committed shard (from :meth:`write_shard`) in the manifest.

        For single-writer runs; under torchrun rank 0 calls :meth:`refresh_manifest`.
        """
        m = self.manifest
        items = self.shard_items(entry["index"])
        shards = [s for s in m["shards"] if s["index"] != entry["index"]]
        shards.append({"index": entry["index"], "rows": entry["rows"],
                       "failed": len(entry["failed"])})
        failed = [f for f in m["failed"] if f["item"] not in items] + entry["failed"]
        self._write_manifest(shards, failed)

    def refresh_manifest(self) -> dict:
        """Rebuild the manifest's shard list from the committed shards on disk.

        Call from one process only (rank 0 after a barrier). Returns the manifest.
        """
        _, pq = _require_pyarrow()
        shards: list[dict] = []
        all_failed: list[dict] = []
        for i in range(self.num_shards):
            if not self.shard_done(i):
                continue
            t = pq.read_table(self.meta_path(i), columns=["path", "item", "row", "error"])
            d = t.to_pydict()
            failed = [{"item": it, "path": p, "reason": e}
                      for p, it, r, e in zip(d["path"], d["item"], d["row"], d["error"]) if r < 0]
            shards.append({"index": i, "rows": sum(r >= 0 for r in d["row"]),
                           "failed": len(failed)})
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

    # ------------------------------------------------------------------ reading
    def load_shards(self, shards: Iterable[int] | None = None, *, mmap: bool = False
                    ) -> tuple[np.ndarray, dict[str, list]]:
        """Embeddings and metadata of the good rows of ``shards`` (default: all committed).

        Returns:
            ``emb`` (R, D) float16, rows L2-normalised, in input order; ``meta``: dict
            of R-long lists ``path``, ``item`` (index in the input), ``label``
            (class folder or None; for evaluation only).
        """
        _, pq = _require_pyarrow()
        if shards is None:
            shards = [i for i in range(self.num_shards) if self.shard_done(i)]
        embs, meta = [], {"path": [], "item": [], "label": []}
        for i in sorted(shards):
            if not self.shard_done(i):
                raise FileNotFoundError(f"{self.root}: shard {i} is not committed; re-run embed")
            e = np.load(self.emb_path(i), mmap_mode="r" if mmap else None)
            d = pq.read_table(self.meta_path(i)).to_pydict()
            ok = [j for j, r in enumerate(d["row"]) if r >= 0]
            if [d["row"][j] for j in ok] != list(range(e.shape[0])):
                raise InputError(f"{self.root}: shard {i}: meta rows do not match emb rows")
            embs.append(e)
            for k, col in meta.items():
                col.extend(d[k][j] for j in ok)
        emb = np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float16)
        return emb, meta

    def load_meta(self, shards: Iterable[int] | None = None) -> dict[str, list]:
        """Metadata of the good rows (as :meth:`load_shards`) without reading embeddings."""
        _, pq = _require_pyarrow()
        if shards is None:
            shards = [i for i in range(self.num_shards) if self.shard_done(i)]
        meta: dict[str, list] = {"path": [], "item": [], "label": []}
        for i in sorted(shards):
            d = pq.read_table(self.meta_path(i), columns=["path", "item", "row", "label"]).to_pydict()
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
