"""What every tuned method shares: its input (:class:`TuneData`), the label-free /
oracle boundary (:class:`Oracle`), batched evaluation under torchrun, and the run
directory (``RUN/config.json``, ``RUN/model.safetensors``, ``RUN/summary.json``).

Label boundary: the class folders of the inputs are turned into an :class:`Oracle`
when the data is loaded; a method only ever calls ``oracle.report(rows, pred)`` to
*log* an accuracy (under an ``oracle_`` key). Nothing else reads them.

Run directory (written by every ``tune``; read by :func:`nolabels.pipeline.predict.predict`):

================  ==========================================================
config.json       method, model spec / id / checkpoint, classes, templates,
                  descriptions, hyper-parameters, student, selection criterion
model.safetensors the tuned state: ``{"method", "head": {"weight", "scale",
                  "normalize"}, "student": {...} | None, "visual": {...} | None}``,
                  a tensor tree (:mod:`nolabels.data.safe_io`: safetensors + JSON
                  structure; nothing in a run directory is a pickle)
summary.json      selected epochs and criterion values, stage timings, the
                  oracle numbers (marked), notes (e.g. the surrogate is not CLIP)
logs/*.jsonl      one JSON object per epoch and stage (the trainer's log)
checkpoints/      resumable trainer checkpoints (a re-run resumes; safetensors)
================  ==========================================================

A run directory from an older nolabels (a pickled ``model.pt``) is refused with a
one-line error, never unpickled: re-run ``nolabels tune``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nolabels import dist
from nolabels.errors import CorruptFileError, IncompleteError, InputError
from nolabels.methods.selection import DEFAULT_HELDOUT_FRACTION, holdout_split, oracle_accuracy
from nolabels.methods.trainer import TrainConfig


@dataclass
class RunSettings:
    """The training-run settings every tuning method's config shares (LaFTer, NoLA and
    LatteCLIP configs derive from it and override the defaults that differ)."""

    epochs: int = 50
    batch_size: int = 512
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    seed: int = 0
    grad_accum: int = 1
    amp: str = "auto"
    workers: int = 0
    checkpoint_every: int = 0
    select: str = "best"
    eval_batch_size: int = 128

    def train_config(self, quiet: bool = False) -> TrainConfig:
        """The :class:`TrainConfig` of the method's main training stage."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           seed=self.seed, amp=self.amp, workers=self.workers,
                           checkpoint_every=self.checkpoint_every, select=self.select, quiet=quiet)


class IndexDataset(torch.utils.data.Dataset):
    """Items ``0..n-1`` as 0-d int64 tensors (also for the trainer's ``(epoch, i)`` keys):
    for stages whose module holds all its data and only needs step or row indices."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        return torch.tensor(key[1] if isinstance(key, tuple) else key)


class Oracle:
    """True class indices (``-1`` unknown) used **only** to report accuracy."""

    def __init__(self, truth: Sequence[int] | None) -> None:
        self._truth = None if truth is None else torch.as_tensor(truth, dtype=torch.int64)

    @property
    def available(self) -> bool:
        return self._truth is not None and bool((self._truth >= 0).any())

    def report(self, rows: torch.Tensor, pred: torch.Tensor) -> float | None:
        """Accuracy of ``pred`` on data rows ``rows`` (None without ground truth)."""
        if self._truth is None:
            return None
        return oracle_accuracy(pred.cpu(), self._truth[rows.cpu()])


@dataclass
class TuneData:
    """The unlabeled images a method is tuned on.

    Attributes:
        source: the :class:`nolabels.data.ImageSource` the pixels are read from.
        items: source item of each data row (N).
        paths: path of each row.
        emb: (N, D) float32 store embeddings of the weak view (frozen encoder).
        model_id: the encoder that made ``emb``.
        train: rows trained on; ``heldout``: the unlabeled held-out rows (selection).
        oracle: reporting only.
        store: the store directory.
    """

    source: Any
    items: list[int]
    paths: list[str]
    emb: torch.Tensor
    model_id: str
    train: torch.Tensor
    heldout: torch.Tensor
    oracle: Oracle
    store: str

    @property
    def n(self) -> int:
        return len(self.items)


def class_index(labels: Sequence[str | None], classes: Sequence[str]) -> list[int]:
    """Class-folder names -> class indices (-1 when missing or not a class)."""
    from nolabels.methods.zeroshot import norm_name

    idx = {norm_name(c): i for i, c in enumerate(classes)}
    return [-1 if lab is None else idx.get(norm_name(lab), -1) for lab in labels]


def reopen_source(store) -> Any:
    """The image source a store was embedded from (checked by fingerprint)."""
    from nolabels.data import open_source

    src = store.manifest["source"]
    root = src.get("root")
    pattern = any(c in str(root) for c in "{*?[")
    if not root or root == "<list>" or (not pattern and not os.path.exists(str(root))):
        raise FileNotFoundError(
            f"{store.root}: the images it was embedded from ({root!r}) are not available; "
            "methods that train through the image tower need the pixels")
    source = open_source(root)
    n = int(src["num_items"])
    if len(source) > n:  # embedded with --limit: the first n items
        source = source.subset(n)
    if source.fingerprint() != src["fingerprint"]:
        raise InputError(f"{store.root}: the images under {root!r} changed since they were "
                         "embedded (fingerprint mismatch); re-run `nolabels embed`")
    return source


def load_tune_data(store_dir: str | os.PathLike, classes: Sequence[str], *,
                   heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0,
                   need_pixels: bool = True) -> TuneData:
    """Read an embedding store into a :class:`TuneData` (split seeded by ``seed``)."""
    from nolabels.data import EmbeddingStore

    st = EmbeddingStore(store_dir)
    pending = st.pending_shards()
    if pending:
        raise IncompleteError(f"{st.root}: {len(pending)} shards are not embedded yet; re-run "
                           "`nolabels embed` to finish")
    emb, meta = _read_store_rows(store_dir)
    source = reopen_source(st) if need_pixels else None
    train, held = holdout_split(len(meta["item"]), heldout_fraction, seed)
    return TuneData(source=source, items=meta["item"], paths=meta["path"], emb=emb,
                    model_id=st.model["model_id"], train=train, heldout=held,
                    oracle=Oracle(class_index(meta["label"], classes)), store=str(st.root))


def _read_store_rows(store_dir: str | os.PathLike) -> tuple[torch.Tensor, dict[str, list]]:
    """All rows of a store as one (N, D) float32 tensor, filled shard by shard (peak: the
    tensor + one float16 shard; no float16 copy of the whole store), and their metadata."""
    from nolabels.data.readers import paths_from_columns
    from nolabels.data.sources import StoreSource

    src = StoreSource(store_dir)
    emb = torch.empty(src.num_rows, src.dim, dtype=torch.float32)
    meta: dict[str, list] = {"item": [], "path": [], "label": []}
    at = 0
    for sh in src.iter_shards(prefetch=1):
        emb[at:at + sh.rows] = torch.from_numpy(sh.emb)
        at += sh.rows
        m = sh.meta
        meta["item"] += m.column("item").to_pylist()
        meta["path"] += paths_from_columns(
            m.column("path").to_pylist(),
            m.column("path_bytes").to_pylist() if "path_bytes" in m.column_names else None)
        meta["label"] += m.column("label").to_pylist()
    return emb, meta


def aligned_store_features(store_dir: str | os.PathLike, items: Sequence[int]) -> torch.Tensor:
    """(N, D') float32 rows of another store (e.g. DINO features) for ``items``."""
    from nolabels.data import EmbeddingStore

    st = EmbeddingStore(store_dir)
    emb, meta = _read_store_rows(store_dir)
    pos = {int(i): j for j, i in enumerate(meta["item"])}
    missing = [i for i in items if int(i) not in pos]
    if missing:
        raise InputError(f"{st.root}: no embedding for items {missing[:5]} (failed or "
                         "embedded from other images)")
    idx = torch.as_tensor([pos[int(i)] for i in items], dtype=torch.int64)
    return emb[idx]


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def map_rows(fn: Callable[[Any], torch.Tensor], dataset, positions: Sequence[int], *,
             batch_size: int = 64, workers: int = 0, device: torch.device | None = None,
             key_epoch: int = 0, collate=None) -> torch.Tensor:
    """``fn(batch)`` over ``dataset[(key_epoch, p)]`` for ``positions``, concatenated in order.

    Under torchrun each rank maps a contiguous share and the results are gathered,
    so every rank returns the full result.
    """
    positions = list(positions)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = -(-len(positions) // world) if positions else 0
    mine = positions[rank * share:(rank + 1) * share]
    outs = []
    if mine:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=[(key_epoch, p) for p in mine],
            num_workers=workers, collate_fn=collate)
        for b in loader:
            if device is not None:
                b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
            outs.append(fn(b).cpu())
    local = torch.cat(outs) if outs else None
    if world == 1:
        return local if local is not None else torch.empty(0)
    if local is None:
        # shape probe so the gather has the right trailing shape and dtype
        probe = fn(next(iter(torch.utils.data.DataLoader(
            dataset, batch_size=1, sampler=[(key_epoch, positions[0])], collate_fn=collate))))
        local = probe.cpu()[:0]
    return dist.all_gather_variable(local)


# --------------------------------------------------------------------------- run dir
RUN_MODEL_FILE = "model.safetensors"
RUN_MODEL_KIND = "nolabels.run-model"
_LEGACY_RUN_MODEL = "model.pt"


def save_run(out: str | os.PathLike, config: dict, model: dict, summary: dict) -> None:
    """Write ``config.json``, ``model.safetensors`` and ``summary.json`` (rank 0, atomically).

    ``model`` is a tensor tree (see :func:`nolabels.data.safe_io.save_tree`)."""
    if dist.get_rank() != 0:
        return
    from nolabels.data.safe_io import save_tree
    from nolabels.data.store import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tree(out / RUN_MODEL_FILE, model, kind=RUN_MODEL_KIND)
    atomic_write_json(out / "config.json", _jsonable(config))
    atomic_write_json(out / "summary.json", _jsonable(summary))


def load_run(run: str | os.PathLike) -> tuple[dict, dict]:
    """``(config, model state)`` of a run directory (nothing in it is executed).

    Raises:
        FileNotFoundError: not a finished run (config.json / model.safetensors missing).
        CorruptFileError: a run of an older nolabels (pickled model.pt), or a damaged
            config.json / model.safetensors.
    """
    from nolabels.data.safe_io import load_tree

    run = Path(run)
    model_p, config_p = run / RUN_MODEL_FILE, run / "config.json"
    if not model_p.is_file() and (run / _LEGACY_RUN_MODEL).is_file():
        raise CorruptFileError(run / _LEGACY_RUN_MODEL,
                               "a run directory of an older nolabels (a pickled model.pt is "
                               "never loaded: it could run code); re-run `nolabels tune`")
    if not config_p.is_file() or not model_p.is_file():
        raise FileNotFoundError(f"{run} is not a finished `nolabels tune` run "
                                f"(config.json / {RUN_MODEL_FILE} missing)")
    try:
        config = json.loads(config_p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(config_p, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CorruptFileError(config_p, "not a JSON object")
    model = load_tree(model_p, kind=RUN_MODEL_KIND)
    if not isinstance(model, dict):
        raise CorruptFileError(model_p, "does not hold a model dict")
    return config, model


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def encoder_info(encoder) -> dict:
    """What a run records about its encoder."""
    d = {"spec": encoder.spec, "model_id": encoder.model_id, "checkpoint": encoder.checkpoint,
         "dim": encoder.dim, "logit_scale": encoder.logit_scale}
    note = getattr(encoder, "not_clip", None)
    if note:
        d["note"] = note
    return d
