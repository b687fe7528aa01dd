"""One trainer for every method (LaFTer, NoLA, LatteCLIP and their sub-stages).

A method describes *what* to train as a :class:`TrainTask`; :func:`fit` does the rest:

* **data order**: epoch ``e`` visits a permutation seeded by ``(seed, e)``; each sample
  is addressed by the key ``(epoch, position)``, so a dataset can seed its random
  augmentations per sample (:func:`sample_seed`) and the data is the same whatever
  the number of DataLoader workers;
* **steps**: a step is one optimizer update over ``batch_size`` samples (summed over
  ranks and gradient-accumulation micro-batches). The global torch RNG is re-seeded
  from ``(seed, step, rank)`` before every step, so random noise inside a step
  (LaFTer's text noise) is reproducible;
* **gradient accumulation** (``grad_accum`` micro-batches per step; DDP gradient
  sync only on the last one) and **bf16 autocast** on CUDA (``amp="auto"``);
* **checkpoint and resume**: every ``checkpoint_every`` steps and at each epoch end
  (atomic writes) the trainable state, optimizer, scheduler, task state, position
  and log go to ``OUT/checkpoints/NAME.safetensors`` (a tensor tree of
  :mod:`nolabels.data.safe_io`: safetensors + JSON, never a pickle, so a checkpoint
  someone hands you cannot run code); a re-run resumes there. Because
  data order, augmentations and step noise depend only on the seed and the
  position, an interrupted run resumed gives exactly the same parameters as an
  uninterrupted one (float32 on CPU; tested). A finished stage leaves
  ``OUT/checkpoints/NAME.final.safetensors`` and is not re-run (see
  :func:`checkpoint_path`); pickled ``.pt`` checkpoints of older versions are ignored;
* **DDP under torchrun** (``torch.distributed`` already initialised, e.g. by
  :func:`nolabels.dist.dist_session`): the module is wrapped in
  ``DistributedDataParallel`` and each rank takes its share of every global batch.
  Tiny stages can pass ``ddp=False`` to run the same computation on every rank;
* **label-free selection**: after every epoch ``task.evaluate`` returns metrics; the
  key named by ``task.criterion`` (an unlabeled score, higher is better, see
  :mod:`nolabels.methods.selection`) picks the epoch kept at the end. The initial
  model is a candidate: a fresh run first calls ``task.prepare()`` (freeze references)
  and ``task.evaluate(0)`` and logs epoch 0 (loss None); ties keep the earlier epoch,
  so a run that only degrades ends holding its initial state;
* **progress bars** (tqdm, stderr) and a **JSON log** per epoch
  (``OUT/logs/NAME.jsonl``: one object per epoch with loss, lr, seconds, samples/s,
  the criterion and any ``oracle_*`` numbers, which are reported, never used).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nolabels import dist
from nolabels.errors import CorruptFileError, InputError
from nolabels.methods.selection import Selector
from nolabels.progress import progress

AMP_MODES = ("auto", "bf16", "off")


# --------------------------------------------------------------------------- seeds
def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global CPU torch RNG seeded, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """How to train (the *what* is the :class:`TrainTask`).

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per optimizer step, over all ranks and micro-batches.
        grad_accum: micro-batches per step (each rank).
        seed: data order, augmentations and per-step noise.
        amp: "auto" (bf16 autocast on CUDA, off on CPU), "bf16" or "off".
        checkpoint_every: also checkpoint every this many steps (0: epoch ends only).
        max_grad_norm: clip the gradient norm (None: no clipping).
        drop_last: drop the last, smaller batch of an epoch.
        workers: DataLoader worker processes.
        select: "best" (the epoch with the best unlabeled criterion) or "last".
        ddp: wrap the module in DistributedDataParallel when distributed; False runs
            the same computation on every rank (for tiny stages).
        quiet: no progress bars or log lines.
        stop_after_steps: testing only: raise :class:`TrainingInterrupted` after this
            many steps (in this call), as if the process had been killed.
    """

    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 0
    amp: str = "auto"
    checkpoint_every: int = 0
    max_grad_norm: float | None = None
    drop_last: bool = False
    workers: int = 0
    select: str = "best"
    ddp: bool = True
    quiet: bool = False
    stop_after_steps: int | None = None

    def validate(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise InputError(f"bad TrainConfig: epochs={self.epochs}, batch_size="
                             f"{self.batch_size}, grad_accum={self.grad_accum}")
        if self.amp not in AMP_MODES:
            raise InputError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.select not in ("best", "last"):
            raise InputError(f"select must be 'best' or 'last', got {self.select!r}")


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after_steps`` (tests of resume)."""


# --------------------------------------------------------------------------- task
class TrainTask:
    """What to train. Subclasses set :attr:`module` and override the hooks they need.

    Attributes:
        name: stage name (checkpoint and log file names).
        module: an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, metrics)``
            (a scalar tensor and a dict of floats); its parameters with
            ``requires_grad`` are trained (and saved).
        criterion: the key of :meth:`evaluate`'s result used for selection (an
            unlabeled score, higher is better), or None (keep the last epoch).
        device: where the module lives.
    """

    name: str = "train"
    module: nn.Module
    criterion: str | None = None
    device: torch.device = torch.device("cpu")

    # data ---------------------------------------------------------------
    train_ds: torch.utils.data.Dataset | None = None

    def num_samples(self) -> int:
        """Training samples per epoch (default: the dataset's length)."""
        return len(self.dataset())  # type: ignore[arg-type]

    def dataset(self) -> torch.utils.data.Dataset:
        """A map-style dataset indexed by keys ``(epoch, position)`` (default: ``train_ds``)."""
        if self.train_ds is None:
            raise NotImplementedError(f"{type(self).__name__}: set train_ds or override dataset()")
        return self.train_ds

    def collate(self, items: list) -> Any:
        return torch.utils.data.default_collate(items)

    def to_device(self, batch: Any) -> Any:
        """Move a collated batch to :attr:`device`."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    # optimisation -------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def make_scheduler(self, opt: torch.optim.Optimizer, total_steps: int):
        """A per-step LR scheduler, or None (constant LR)."""
        return None

    # hooks ----------------------------------------------------------------
    def before_epoch(self, epoch: int) -> None:
        """Called at the start of epoch ``epoch`` (0-based), not when resuming mid-epoch."""

    def after_micro_batch(self, out: Any) -> None:
        """Called after each micro-batch's backward with what ``module.forward`` cached."""

    def prepare(self) -> None:
        """Called once by :func:`fit` before a checkpoint is loaded or a step is taken (the
        module holds its initial, epoch-0 state): freeze label-free references here (e.g.
        the epoch-0 teacher's held-out labels). Not called for a finished stage."""

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """Metrics after epoch ``epoch`` (0: the initial model, before training): the
        criterion, ``oracle_*`` reports."""
        return {}

    # state ------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tuned state: parameters with ``requires_grad`` plus :meth:`extra_tensors`."""
        sd = {k: v.detach().clone() for k, v in self.module.named_parameters() if v.requires_grad}
        for k, v in self.extra_tensors().items():
            sd[f"extra.{k}"] = v.detach().clone()
        return sd

    def load_trainable_state(self, sd: dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        extra = {}
        with torch.no_grad():
            for k, v in sd.items():
                if k.startswith("extra."):
                    extra[k[6:]] = v
                else:
                    params[k].copy_(v.to(params[k].device, params[k].dtype))
        if extra:
            self.load_extra_tensors(extra)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tuned tensors that are not parameters (LatteCLIP's prototypes)."""
        return {}

    def load_extra_tensors(self, d: dict[str, torch.Tensor]) -> None:
        pass

    def extra_state(self) -> dict:
        """Resume state that is not part of the tuned model (e.g. epoch snapshots)."""
        return {}

    def load_extra_state(self, d: dict) -> None:
        pass


# --------------------------------------------------------------------------- batching
def plan_epoch(n: int, epoch: int, seed: int, batch_size: int, *, shuffle: bool = True,
               drop_last: bool = False) -> list[list[int]]:
    """The global batches (lists of positions) of one epoch."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            sample_seed(seed, epoch, 104729))).tolist()
    else:
        order = list(range(n))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size and len(batches) > 1:
        batches.pop()
    return batches


def split_batch(batch: list[int], world: int, rank: int, accum: int,
                fill: Sequence[int]) -> list[list[int]]:
    """This rank's micro-batches of one global batch.

    Rank r takes positions r, r + world, ...; its share is cut into ``accum``
    contiguous micro-batches. A global batch too small to give every rank and
    micro-batch at least one sample is topped up from ``fill`` (the epoch order).
    """
    need = world * accum
    if len(batch) < need:
        batch = list(batch) + [fill[i % len(fill)] for i in range(need - len(batch))]
    mine = batch[rank::world]
    size = math.ceil(len(mine) / accum)
    return [mine[i:i + size] for i in range(0, len(mine), size)]


class _Keys(torch.utils.data.Sampler):
    """Batch sampler over micro-batches of ``(epoch, position)`` keys."""

    def __init__(self, micro: list[list[int]], epoch: int) -> None:
        self.micro, self.epoch = micro, epoch

    def __iter__(self):
        for m in self.micro:
            yield [(self.epoch, p) for p in m]

    def __len__(self) -> int:
        return len(self.micro)


# --------------------------------------------------------------------------- result
@dataclass
class TrainResult:
    """What :func:`fit` did.

    Attributes:
        name: the stage.
        history: one dict per epoch (as in the JSON log).
        selected_epoch: the epoch whose state the module holds at the end.
        criterion: the selection criterion (None: last epoch).
        best_score: its value at ``selected_epoch``.
        steps: optimizer steps done in total.
        seconds: wall time of this call.
        resumed_from: the step a checkpoint resumed from (None: fresh start).
    """

    name: str
    history: list[dict] = field(default_factory=list)
    selected_epoch: int | None = None
    criterion: str | None = None
    best_score: float | None = None
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- io
CHECKPOINT_KINDS = {"resume": "nolabels.trainer-checkpoint", "final": "nolabels.trainer-final",
                    "best": "nolabels.trainer-best"}
_CHECKPOINT_SUFFIX = {"resume": ".safetensors", "final": ".final.safetensors",
                      "best": ".best.safetensors"}
_CHECKPOINT_KEYS = {
    "resume": ("state", "optimizer", "step", "epoch", "step_in_epoch", "history", "epoch_sums",
               "selector", "config_key"),
    "final": ("state", "result", "config_key"),
    "best": ("epoch", "state"),
}


def checkpoint_path(out: str | os.PathLike, name: str, which: str = "resume") -> Path:
    """``OUT/checkpoints/NAME{.safetensors,.final.safetensors,.best.safetensors}``: the
    resumable checkpoint, the finished stage, or the best epoch's state of stage ``name``."""
    return Path(out) / "checkpoints" / f"{name}{_CHECKPOINT_SUFFIX[which]}"


def save_checkpoint_file(path: str | os.PathLike, which: str, tree: dict) -> None:
    """Write a trainer checkpoint ``tree`` (see :func:`checkpoint_path`) atomically."""
    from nolabels.data.safe_io import save_tree

    save_tree(path, tree, kind=CHECKPOINT_KINDS[which])


def load_checkpoint_file(path: str | os.PathLike, which: str) -> dict:
    """A trainer checkpoint written by :func:`save_checkpoint_file` (tensors on the CPU).

    Raises:
        CorruptFileError: not such a checkpoint (a pickle, truncated, another kind,
            entries missing); nothing in the file is executed.
    """
    from nolabels.data.safe_io import load_tree

    tree = load_tree(path, kind=CHECKPOINT_KINDS[which])
    missing = [k for k in _CHECKPOINT_KEYS[which] if not isinstance(tree, dict) or k not in tree]
    if missing:
        raise CorruptFileError(path, f"a trainer checkpoint without {missing}")
    return tree


def _write_log(path: Path, history: list[dict]) -> None:
    from nolabels.data.store import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(h, sort_keys=False) + "\n" for h in history)
    atomic_write_bytes(path, text.encode())


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA for "auto", bf16 for "bf16", else None."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def _optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(device)


# --------------------------------------------------------------------------- fit
def fit(task: TrainTask, cfg: TrainConfig, out: str | os.PathLike | None = None, *,
        log: Callable[[str], None] | None = None, resume: bool = True,
        settings: dict | None = None) -> TrainResult:
    """Train ``task`` as configured; the module ends holding the selected epoch's state.

    Args:
        task: the :class:`TrainTask`.
        cfg: the :class:`TrainConfig`.
        out: run directory for checkpoints and logs (None: in memory only).
        log: a ``print``-like function for progress lines (rank 0).
        resume: continue from ``out``'s checkpoint of this stage if there is one.
        settings: what else defines the run (method hyper-parameters, a digest of the
            data, see :func:`tensor_digest`); a checkpoint or finished stage written
            with other settings is refused instead of silently reused.
    Returns:
        a :class:`TrainResult`.
    """
    cfg.validate()
    t0 = time.perf_counter()
    distributed = dist.is_distributed() and cfg.ddp
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main = dist.get_rank() == 0
    say = (log if (log is not None and main and not cfg.quiet) else (lambda _m: None))
    out_p = Path(out) if out is not None else None
    ckpt_path = checkpoint_path(out_p, task.name) if out_p else None
    final_path = checkpoint_path(out_p, task.name, "final") if out_p else None
    log_path = out_p / "logs" / f"{task.name}.jsonl" if out_p else None

    module = task.module
    result = TrainResult(task.name, criterion=task.criterion)

    if out_p is not None and main:
        old = [f"{task.name}{x}.pt" for x in ("", ".final", ".best")
               if (out_p / "checkpoints" / f"{task.name}{x}.pt").is_file()]
        if old:
            say(f"{task.name}: ignoring {old} in {out_p / 'checkpoints'} (pickled checkpoints of "
                "an older nolabels are never loaded)")

    # A finished stage: load its selected state and return.
    if resume and final_path is not None and final_path.is_file():
        fin = load_checkpoint_file(final_path, "final")
        if fin.get("config_key") != _config_key(cfg, task.num_samples(), settings):
            raise InputError(
                f"{final_path} was written by a run with different settings "
                f"({fin.get('config')}); use another --out or delete the run")
        task.load_trainable_state(fin["state"])
        r = fin["result"]
        say(f"{task.name}: already trained (epoch {r['selected_epoch']} kept); "
            f"loaded {final_path}")
        return TrainResult(**{**r, "seconds": time.perf_counter() - t0})

    n = task.num_samples()
    steps_per_epoch = len(plan_epoch(n, 0, cfg.seed, cfg.batch_size, shuffle=False,
                                     drop_last=cfg.drop_last)) if n else 0
    total_steps = steps_per_epoch * cfg.epochs
    opt = task.make_optimizer()
    sched = task.make_scheduler(opt, total_steps)
    selector = Selector(task.criterion or "last")
    step, epoch, step_in_epoch = 0, 0, 0
    history: list[dict] = []
    acc: dict[str, Any] = {"loss_sum": 0.0, "n": 0, "metrics": {}}  # running epoch sums

    task.prepare()  # the module is still in its initial state
    if resume and ckpt_path is not None and ckpt_path.is_file():
        ck = load_checkpoint_file(ckpt_path, "resume")
        if ck.get("config_key") != _config_key(cfg, n, settings):
            raise InputError(
                f"{ckpt_path} was written by a run with different settings "
                f"({ck.get('config')}); use another --out or delete the checkpoint")
        task.load_trainable_state(ck["state"])
        opt.load_state_dict(ck["optimizer"])
        _optimizer_to(opt, task.device)
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        task.load_extra_state(ck.get("extra", {}))
        step, epoch, step_in_epoch = ck["step"], ck["epoch"], ck["step_in_epoch"]
        history = ck["history"]
        acc = ck["epoch_sums"]
        selector.load_state_dict(ck["selector"])
        result.resumed_from = step
        say(f"{task.name}: resuming at epoch {epoch + 1}, step {step} from {ckpt_path}")

    amp_dtype = resolve_amp(cfg.amp, task.device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    model: nn.Module = module
    if distributed and trainable:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev_ids = [task.device.index] if task.device.type == "cuda" else None
        model = DDP(module, device_ids=dev_ids, broadcast_buffers=False)

    def save_checkpoint() -> None:
        if ckpt_path is None or not main:
            return
        save_checkpoint_file(ckpt_path, "resume", {
            "state": task.trainable_state(), "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "extra": task.extra_state(), "step": step, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "history": history, "epoch_sums": acc,
            "selector": selector.state_dict(), "config": asdict(cfg),
            "config_key": _config_key(cfg, n, settings),
        })

    best_path = checkpoint_path(out_p, task.name, "best") if out_p else None
    best_state: dict | None = None
    if best_path is not None and best_path.is_file() and selector.best_epoch is not None:
        best_state = load_checkpoint_file(best_path, "best")["state"]

    if task.criterion is not None and cfg.epochs and not history and step == 0:
        # epoch 0: the initial model is a candidate (a fresh run only; a resumed one has it)
        rec0 = _initial_record(task, opt, selector)
        if rec0.pop("_best"):
            best_state = task.trainable_state()
            if best_path is not None and main:
                save_checkpoint_file(best_path, "best", {"epoch": 0, "state": best_state})
        history.append(rec0)
        if log_path is not None and main:
            _write_log(log_path, history)
        crit = rec0.get(task.criterion)
        say(f"{task.name} epoch 0 (initial model): {task.criterion} "
            f"{'n/a' if not isinstance(crit, float) else f'{crit:.4f}'}")

    dataset = task.dataset() if n else None
    steps_this_call = 0
    while epoch < cfg.epochs:
        if step_in_epoch == 0:
            task.before_epoch(epoch)
            acc = {"loss_sum": 0.0, "n": 0, "metrics": {}}
        batches = plan_epoch(n, epoch, cfg.seed, cfg.batch_size, drop_last=cfg.drop_last)
        fill = [p for b in batches for p in b]
        todo = batches[step_in_epoch:]
        micro_all = [split_batch(b, world, rank, cfg.grad_accum, fill) for b in todo]
        flat = [m for ms in micro_all for m in ms]
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Keys(flat, epoch), num_workers=cfg.workers,
            collate_fn=task.collate, pin_memory=task.device.type == "cuda",
            persistent_workers=False)
        it = iter(loader)
        module.train()
        te = time.perf_counter()
        samples = 0
        metric_sums = acc["metrics"]
        bar = progress(len(todo), f"{task.name} epoch {epoch + 1}/{cfg.epochs}",
                       quiet=cfg.quiet, main=main, unit="step", leave=False)
        for micros in micro_all:
            torch.manual_seed(sample_seed(cfg.seed, step, rank, 31337))
            opt.zero_grad(set_to_none=True)
            mine = sum(len(m) for m in micros)
            step_loss = 0.0
            for j, m in enumerate(micros):
                batch = task.to_device(next(it))
                sync = (contextlib.nullcontext() if not isinstance(model, nn.parallel.DistributedDataParallel)
                        or j == len(micros) - 1 else model.no_sync())
                ac = (torch.autocast(task.device.type, dtype=amp_dtype) if amp_dtype is not None
                      else contextlib.nullcontext())
                with sync:
                    with ac:
                        loss, metrics = model(batch)
                    if not torch.isfinite(loss.detach()):
                        raise FloatingPointError(
                            f"{task.name}: non-finite loss at epoch {epoch + 1}, step {step}")
                    (loss.float() * (len(m) / mine)).backward()
                task.after_micro_batch(getattr(module, "last", None))
                step_loss += float(loss.detach()) * len(m) / mine
                for k, v in (metrics or {}).items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * len(m)
            if cfg.max_grad_norm is not None and trainable:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            step_in_epoch += 1
            steps_this_call += 1
            acc["loss_sum"] += step_loss * mine
            acc["n"] += mine
            samples += mine
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_checkpoint()
            if cfg.stop_after_steps is not None and steps_this_call >= cfg.stop_after_steps:
                bar.close()
                raise TrainingInterrupted(f"{task.name}: stopped after {steps_this_call} steps "
                                          f"(step {step})")
        bar.close()
        del it, loader
        # epoch end: unlabeled evaluation, selection, log, checkpoint
        module.eval()
        with torch.no_grad():
            ev = task.evaluate(epoch + 1) or {}
        totals = torch.tensor([acc["loss_sum"], float(acc["n"])], dtype=torch.float64)
        if distributed:
            totals = dist.all_gather_variable(totals[None]).sum(0)
        rec: dict[str, Any] = {
            "epoch": epoch + 1, "step": step,
            "loss": float(totals[0] / totals[1]) if totals[1] > 0 else None,
            "lr": float(opt.param_groups[0]["lr"]),
            "seconds": round(time.perf_counter() - te, 4),
            "samples_per_s": round(samples * world / max(time.perf_counter() - te, 1e-9), 2),
        }
        for k, v in metric_sums.items():
            rec[k] = v / max(acc["n"], 1)
        rec.update(ev)
        if task.criterion is not None:
            rec["criterion"] = task.criterion
            if selector.update(epoch + 1, ev.get(task.criterion)):
                best_state = task.trainable_state()
                if best_path is not None and main:
                    save_checkpoint_file(best_path, "best", {"epoch": epoch + 1, "state": best_state})
            rec["selected_so_far"] = selector.best_epoch
        history.append(rec)
        epoch += 1
        step_in_epoch = 0
        save_checkpoint()
        if log_path is not None and main:
            _write_log(log_path, history)
        crit = ""
        if task.criterion and ev.get(task.criterion) is not None:
            crit = f", {task.criterion} {ev[task.criterion]:.4f}"
        orc = "".join(f", {k} {v:.4f}" for k, v in ev.items()
                      if k.startswith("oracle_") and isinstance(v, float))
        say(f"{task.name} epoch {epoch}/{cfg.epochs}: loss "
            f"{rec['loss'] if rec['loss'] is None else round(rec['loss'], 5)}{crit}{orc}"
            f" ({rec['seconds']:.1f}s)")

    # the selected state
    selected = cfg.epochs
    if cfg.select == "best" and task.criterion is not None and selector.best_epoch is not None:
        selected = selector.best_epoch
        if best_state is not None and selected != cfg.epochs:
            task.load_trainable_state(best_state)
    result.history = history
    result.selected_epoch = selected if cfg.epochs else None
    result.best_score = selector.best_score if task.criterion else None
    result.steps = step
    result.seconds = time.perf_counter() - t0
    if final_path is not None and main:
        save_checkpoint_file(final_path, "final", {
            "state": task.trainable_state(),
            "result": {k: v for k, v in result.as_dict().items() if k != "seconds"},
            "config": asdict(cfg), "config_key": _config_key(cfg, n, settings)})
    if task.criterion is not None and cfg.epochs:
        say(f"{task.name}: kept epoch {selected} ({task.criterion} "
            f"{selector.best_score if selector.best_score is None else round(selector.best_score, 4)}"
            f", select={cfg.select})")
    dist.barrier() if distributed else None
    return result


def _initial_record(task: TrainTask, opt: torch.optim.Optimizer, selector: Selector) -> dict:
    """Evaluate the initial model as epoch 0 and offer it to ``selector``; the log record
    (``_best``: whether it became the best, popped by the caller)."""
    t = time.perf_counter()
    task.module.eval()
    with torch.no_grad():
        ev = task.evaluate(0) or {}
    rec: dict[str, Any] = {"epoch": 0, "step": 0, "loss": None,
                           "lr": float(opt.param_groups[0]["lr"]),
                           "seconds": round(time.perf_counter() - t, 4), **ev,
                           "criterion": task.criterion}
    rec["_best"] = selector.update(0, ev.get(task.criterion))
    rec["selected_so_far"] = selector.best_epoch
    return rec


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short hash of tensors' shapes and bytes (identifies a stage's data in resume keys)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _config_key(cfg: TrainConfig, n: int, settings: dict | None = None) -> str:
    """What must not change between a checkpoint and its resume."""
    d = {k: v for k, v in asdict(cfg).items()
         if k not in ("quiet", "workers", "stop_after_steps", "checkpoint_every")}
    d["num_samples"] = n
    d["settings"] = settings or {}
    d["world"] = dist.get_world_size() if (dist.is_distributed() and cfg.ddp) else 1
    return json.dumps(d, sort_keys=True, default=str)


# --------------------------------------------------------------------------- losses / optim
def label_smoothing_ce(logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """LaFTer/NoLA's label-smoothed CE (methods.md §1.5), averaged over the batch:
    ``eps * mean_c(-log p_c) + (1 - eps) * (-log p_y)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    smooth = -logp.mean(dim=-1)
    return ((1.0 - eps) * nll + eps * smooth).mean()


def adamw_no_bias_decay(named_params: Sequence[tuple[str, nn.Parameter]], lr: float,
                        weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8
                        ) -> torch.optim.AdamW:
    """AdamW with two groups (methods.md §1.4): names containing ``bias`` get no weight
    decay, everything else (prompts, norm weights, classifier) gets ``weight_decay``."""
    decay = [p for n, p in named_params if p.requires_grad and "bias" not in n]
    no_decay = [p for n, p in named_params if p.requires_grad and "bias" in n]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
