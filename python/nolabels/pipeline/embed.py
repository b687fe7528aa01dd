"""Images -> embedding store (the work behind ``nolabels embed``).

Resumable: re-running the same command after a crash or kill computes only the
shards that were not committed. Under ``torchrun --nproc-per-node N -m nolabels
embed ...`` rank r embeds shards r, r + N, ... of the same store.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nolabels.data.readers import default_workers
from nolabels.progress import Log, progress

DEFAULT_BATCH_SIZE = 64
DEFAULT_SHARD_SIZE = 4096


def embed_amp_dtype(amp: str, device: Any) -> Any:
    """The autocast dtype of :func:`embed`'s ``amp`` on ``device`` (None: no autocast)."""
    import torch

    if amp == "off" or (amp == "auto" and getattr(device, "type", device) != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class EmbedReport:
    """What one ``embed`` call did (on this rank; ``rows``/``failed`` are store totals)."""

    store: str
    model_id: str
    rows: int
    failed: list[dict]
    complete: bool
    images_done: int
    seconds: float
    images_per_s: float
    model_seconds: float
    wait_seconds: float
    shards_written: int
    rank: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class ShardBatches:
    """Batch sampler: batches of up to ``batch_size`` items, never crossing a shard,
    over the given shards in order. Batch composition is then the same whatever the
    number of ranks, so embeddings are identical to a single-process run."""

    def __init__(self, shards: list[range], batch_size: int) -> None:
        self.batches = [list(r[i:i + batch_size]) for r in shards
                        for i in range(0, len(r), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def embed(images: Any, model: Any, out: str | os.PathLike, *, checkpoint: str | None = None,
          batch_size: int = DEFAULT_BATCH_SIZE, workers: int | str = "auto",
          device: str | None = "auto", shard_size: int = DEFAULT_SHARD_SIZE,
          overwrite: bool = False, quiet: bool = False, limit: int | None = None,
          fingerprint: str = "stat", amp: str = "auto") -> EmbedReport:
    """Embed every image of ``images`` with ``model`` into the store at ``out``.

    Args:
        images: a folder, list file, tar shard(s) (see :func:`nolabels.data.open_source`)
            or an :class:`~nolabels.data.ImageSource`.
        model: a model spec (``openclip:ViT-B-32/laion2b_s34b_b79k``,
            ``surrogate:effnet-lite0+minilm``, ...) or a loaded :class:`~nolabels.models.Encoder`.
        checkpoint: local weights file for the model spec.
        batch_size: images per forward pass.
        workers: DataLoader worker processes, or "auto".
        device: "auto" (this rank's GPU if any, else CPU), "cpu", "cuda", "cuda:N".
        shard_size: input items per store shard (the unit of resumption).
        overwrite: discard an existing store at ``out``.
        quiet: no progress bar / logs.
        limit: only the first ``limit`` images.
        fingerprint: how a resume notices changed inputs. ``"stat"`` (default): each
            shard records the size and modification time of its files; a resumed run
            re-embeds the shards whose files changed (and, in any mode, every committed
            shard whose files fail verification). ``"paths"``: only added, removed or
            renamed files are noticed (the store is refused), no per-file ``stat``.
        amp: autocast for the image tower: "auto" (bfloat16 on a CUDA device that supports
            it, else float16 on CUDA; off on the CPU), "bf16", "fp16" or "off". Embeddings
            are stored as float16 anyway. On CUDA, convolutional encoders
            (``channels_last = True``) also get channels-last inputs and weights.
    Raises:
        OutputExistsError: ``out`` is a non-empty folder that is not a store (nothing
            there is touched, even with ``overwrite``).
    Returns:
        an :class:`EmbedReport`. Unreadable images are skipped and listed in
        ``report.failed`` and in the store's manifest.
    """
    import torch

    from nolabels import dist
    from nolabels.data import (
        EmbeddingStore,
        ImageDataset,
        ImageSource,
        collate,
        open_source,
    )
    from nolabels.data.outputs import check_output_dir
    from nolabels.errors import InputError
    from nolabels.models import Encoder, load_encoder

    if fingerprint not in ("stat", "paths"):
        raise InputError(f"fingerprint must be 'stat' or 'paths', got {fingerprint!r}")
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise InputError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")
    check_output_dir(out, "store")  # before any work: a folder that is not a store is refused
    t_start = time.perf_counter()
    with dist.dist_session(device) as ctx:
        log = Log(quiet, ctx.is_main)
        source = images if isinstance(images, ImageSource) else open_source(images)
        if limit is not None:
            source = source.subset(limit)
        log(f"{len(source)} images from {source.root} ({source.kind})"
            + (f", rank {ctx.rank} of {ctx.world_size}" if ctx.distributed else ""))
        enc = model if isinstance(model, Encoder) else load_encoder(
            model, checkpoint=checkpoint, device=ctx.device)
        if isinstance(model, Encoder):
            enc.to(ctx.device)
        if getattr(enc, "not_clip", None):
            log.note(enc.not_clip)
        amp_dtype = embed_amp_dtype(amp, ctx.device)
        channels_last = ctx.device.type == "cuda" and getattr(enc, "channels_last", False)
        if channels_last:
            for m in enc.modules():
                m.to(memory_format=torch.channels_last)
        log(f"model {enc.model_id} (D={enc.dim}) on {ctx.device}"
            + (f", {str(amp_dtype).replace('torch.', '')} autocast" if amp_dtype else "")
            + (", channels-last" if channels_last else ""))

        err: BaseException | None = None
        redo: list[tuple[int, str]] = []
        stat_fp = source.stat_fingerprint if fingerprint == "stat" else None
        if ctx.is_main:
            try:
                store = EmbeddingStore.create_or_resume(
                    out, model=enc.describe(),
                    source={**source.describe(), "fingerprint_mode": fingerprint},
                    shard_size=shard_size, overwrite=overwrite)
                if store.num_shards - len(store.pending_shards()):
                    t_v = time.perf_counter()
                    redo = store.verify_committed(checksum=True, stat_fingerprint=stat_fp)
                    log(f"verified the committed shards in {time.perf_counter() - t_v:.1f}s")
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                err = e
        err = dist.broadcast_object(err)
        if err is not None:
            raise err
        if not ctx.is_main:
            store = EmbeddingStore(out)
        for s, why in redo:
            log(f"shard {s} ({store.emb_path(s).name}): {why}; re-embedding it")
        pending = store.pending_shards()
        mine = [s for s in pending if s % ctx.world_size == ctx.rank]
        done_before = store.num_shards - len(pending)
        if done_before:
            log(f"resuming: {done_before} of {store.num_shards} shards already done")
        ranges = [store.shard_items(s) for s in mine]
        total = sum(len(r) for r in ranges)

        n_workers = default_workers(ctx.device.type) if workers == "auto" else int(workers)
        loader = torch.utils.data.DataLoader(
            ImageDataset(source, enc.transform),
            batch_sampler=ShardBatches(ranges, batch_size),
            num_workers=n_workers,
            collate_fn=collate,
            pin_memory=ctx.device.type == "cuda",
            prefetch_factor=4 if n_workers > 0 else None,
            persistent_workers=False,
        )
        bufs: dict[int, dict[str, list]] = {}
        left = {s: len(store.shard_items(s)) for s in mine}
        n_failed = 0
        done = 0
        written = 0
        model_s = wait_s = 0.0
        bar = progress(total, "embed", quiet=quiet or not total, main=ctx.is_main)
        t_loop = time.perf_counter()
        t_wait = time.perf_counter()
        for batch in loader:
            wait_s += time.perf_counter() - t_wait
            items = batch.all_items()
            shard = items[0] // store.shard_size
            b = bufs.setdefault(shard, {"items": [], "emb": [], "failed": []})
            if batch.images is not None:
                t0 = time.perf_counter()
                x = batch.images  # pinned on CUDA: encode_image copies it non-blocking
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with (torch.autocast(ctx.device.type, dtype=amp_dtype) if amp_dtype is not None
                      else contextlib.nullcontext()):
                    e = enc.encode_image(x)
                e = e.to("cpu", torch.float32).numpy()
                model_s += time.perf_counter() - t0
                b["items"].extend(batch.index.tolist())
                b["emb"].append(e)
            b["failed"].extend(batch.failed)
            n_failed += len(batch.failed)
            left[shard] -= len(items)
            if left[shard] == 0:
                _write(store, shard, bufs.pop(shard), source, single=not ctx.distributed,
                       stat_fingerprint=stat_fp)
                written += 1
            done += len(items)
            bar.update(len(items))
            if batch.failed:
                bar.set_postfix(failed=n_failed)
            t_wait = time.perf_counter()
        bar.close()
        loop_s = time.perf_counter() - t_loop
        if bufs:
            raise RuntimeError(f"internal error: shards {sorted(bufs)} were not completed")
        dist.barrier()
        if ctx.is_main:
            store.refresh_manifest()
        dist.barrier()
        if not ctx.is_main:
            store = EmbeddingStore(out)
        m = store.manifest
        report = EmbedReport(
            store=str(store.root), model_id=enc.model_id, rows=m["num_rows"],
            failed=store.failed, complete=store.complete, images_done=done,
            seconds=time.perf_counter() - t_start,
            images_per_s=done / loop_s if loop_s > 0 else 0.0,
            model_seconds=model_s, wait_seconds=wait_s, shards_written=written,
            rank=ctx.rank, world_size=ctx.world_size, extra={"workers": n_workers,
                                                             "batch_size": batch_size,
                                                             "reembedded": redo},
        )
        if ctx.is_main and not quiet:
            if not pending:
                log(f"nothing to do: all {store.num_shards} shards of {store.root} were "
                    "already embedded")
            elif done:  # the rate of the images embedded by this run only
                log(f"embedded {done} images in {loop_s:.1f}s ({report.images_per_s:.1f} img/s "
                    f"on rank 0; model {model_s:.1f}s, waiting for data {wait_s:.1f}s)")
        if ctx.is_main and report.failed:
            print(f"nolabels embed: {len(report.failed)} image(s) could not be read and were "
                  f"skipped (listed in {store.root}/manifest.json):", file=sys.stderr)
            for f in report.failed[:10]:
                print(f"  {f['path']}: {f['reason']}", file=sys.stderr)
            if len(report.failed) > 10:
                print(f"  ... and {len(report.failed) - 10} more", file=sys.stderr)
        return report


def _write(store, shard: int, b: dict, source, *, single: bool,
           stat_fingerprint: Any = None) -> None:
    import numpy as np

    order = np.argsort(np.asarray(b["items"], dtype=np.int64), kind="stable")
    items = [b["items"][j] for j in order]
    emb = np.concatenate(b["emb"])[order] if b["emb"] else np.zeros((0, store.dim), np.float32)
    failed = [(i, source.paths[i], source.labels[i], reason) for i, reason in b["failed"]]
    entry = store.write_shard(shard, emb, items, [source.paths[i] for i in items],
                              [source.labels[i] for i in items], failed,
                              stat_fingerprint=None if stat_fingerprint is None
                              else stat_fingerprint(store.shard_items(shard)))
    if single:
        store.commit(entry)


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_SHARD_SIZE", "EmbedReport", "default_workers", "embed"]
