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
* **micro-batches that fit** (``auto_micro_batch``, on by default): the effective batch
  stays ``batch_size``; only how it is cut into micro-batches changes. Each micro-batch's
  loss is weighted by its share of the rank's batch, so for a loss that is a mean over
  the batch the accumulated gradient is the full batch's (tested to float32 rounding;
  a loss that couples samples, e.g. a contrastive one, is only approximated). The rule:

  - on the CPU the first step's first micro-batch (:data:`PROBE_SAMPLES` samples) is
    the probe: its forward counts the bytes autograd saves for backward per sample
    (``saved_tensors_hooks``; parameters and buffers excluded; no extra pass), and the
    rest of that step and every later one use micro-batches capped at
    ``floor(MEMORY_FRACTION * available / (ACTIVATION_FACTOR * bytes per sample))``
    (available: ``memory_budget``, else ``MemAvailable`` of ``/proc/meminfo`` lowered to
    the cgroup's limit). Measured on the surrogate's tower, peak RSS growth of forward + backward is
    1.03-1.27 x the saved bytes, hence the factor 2;
  - on CUDA (any device raising ``torch.OutOfMemoryError``) the step that ran out of
    memory is undone (gradients dropped, task tensors restored), the cache emptied and
    the step redone with the micro-batch halved (accumulation doubled), as
    ``accelerate.find_executable_batch_size`` does;
  - the micro-batch chosen is kept for the rest of the stage and in its checkpoints (a
    resumed run goes on with it); the log says ``micro-batch M x accumulation A =
    effective batch B``; when even one sample does not fit, :class:`InputError` says
    what to change. Under DDP the ranks take the smallest CPU size; an out-of-memory
    error is not retried (the ranks would disagree), it raises that message;
* **checkpoint and resume**: every ``checkpoint_every`` steps and at each epoch end
  (atomic writes) the trainable state, optimizer, scheduler, task state, position
  and log go to ``OUT/checkpoints/NAME.safetensors`` (a tensor tree of
  :mod:`nolabels.data.safe_io`: safetensors + JSON, never a pickle, so a checkpoint
  someone hands you cannot run code; :class:`nolabels.methods.checkpoint.Checkpointer`
  owns these files); a re-run resumes there. Because
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
import gc
import hashlib
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
from nolabels.errors import InputError
from nolabels.methods.checkpoint import CHECKPOINT_KINDS as CHECKPOINT_KINDS  # re-exported
from nolabels.methods.checkpoint import Checkpointer, Position, config_key
from nolabels.methods.checkpoint import checkpoint_path as checkpoint_path
from nolabels.methods.checkpoint import load_checkpoint_file as load_checkpoint_file
from nolabels.methods.checkpoint import save_checkpoint_file as save_checkpoint_file
from nolabels.methods.selection import Selector
from nolabels.progress import progress

AMP_MODES = ("auto", "bf16", "off")

#: CPU micro-batch sizing (see the module docstring): samples in the probe micro-batch, the
#: share of the available memory the saved activations may take, and peak memory per
#: saved byte (measured 1.03-1.27 on the surrogate's EfficientNet tower, rounded up).
PROBE_SAMPLES = 2
MEMORY_FRACTION = 0.75
ACTIVATION_FACTOR = 2.0


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
        auto_micro_batch: cut each step into micro-batches that fit in memory (sized
            on the CPU, halved on out-of-memory; see the module docstring). False: only
            ``grad_accum`` splits a step and an out-of-memory error is raised.
        memory_budget: bytes the CPU sizing may plan with instead of the measured
            available memory (None: measured).
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
    auto_micro_batch: bool = True
    memory_budget: int | None = None

    def validate(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise InputError(f"bad TrainConfig: epochs={self.epochs}, batch_size="
                             f"{self.batch_size}, grad_accum={self.grad_accum}")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise InputError(f"memory_budget must be >= 1 byte, got {self.memory_budget}")
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
    #: The loss couples the samples of a batch (a contrastive loss): a step cut into
    #: micro-batches only approximates the full batch. The CPU sizing then probes with a
    #: separate forward that trains nothing (the first step is not cut for the probe), and
    #: a plan that cuts steps is logged as an approximation.
    couples_samples: bool = False

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


def micro_split(batch: list[int], world: int, rank: int, accum: int, cap: int,
                fill: Sequence[int]) -> list[list[int]]:
    """This rank's micro-batches of one global batch, each of at most ``cap`` samples.

    The accumulation is ``max(accum, ceil(share / cap))`` (``share`` = the largest rank
    share), then :func:`split_batch` cuts the share into contiguous micro-batches (the
    last one may be smaller). ``cap`` never adds samples: only ``accum`` can top up.
    """
    share = math.ceil(len(batch) / world)
    return split_batch(batch, world, rank, max(accum, math.ceil(share / max(cap, 1))), fill)


def micro_plan(batch_size: int, world: int, accum: int, cap: int) -> tuple[int, int]:
    """(micro-batch, micro-batches per step) of a full global batch for :func:`micro_split`."""
    share = math.ceil(batch_size / world)
    a = max(accum, math.ceil(share / max(cap, 1)))
    m = math.ceil(share / a)
    return m, math.ceil(share / m)


def micro_batch_for_memory(budget_bytes: float, bytes_per_sample: float) -> int:
    """The CPU micro-batch cap: ``floor(MEMORY_FRACTION * budget / (ACTIVATION_FACTOR *
    bytes_per_sample))`` (0 when not even one sample fits; a huge number when nothing is
    saved for backward)."""
    if bytes_per_sample <= 0:
        return 1 << 62
    return int(MEMORY_FRACTION * budget_bytes // (ACTIVATION_FACTOR * bytes_per_sample))


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable`` of ``/proc/meminfo``, lowered
    to the cgroup's free share when a memory limit is set (v2 ``memory.max`` /
    ``memory.current``, v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``).
    Without ``/proc/meminfo`` (not Linux): psutil's figure when installed, else None."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            import psutil  # optional

            avail = int(psutil.virtual_memory().available)
        except ImportError:
            return None
    for limit_f, used_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                            ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                             "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            used = int(Path(used_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            avail = min(avail, max(int(limit) - used, 0))
        break
    return avail


def saved_activation_bytes(module: nn.Module, batch: Any,
                           autocast: contextlib.AbstractContextManager | None = None) -> int:
    """Bytes autograd saves for backward in one ``module(batch)`` forward (the memory a
    training step holds that grows with the micro-batch; what the CPU sizing measures on
    its probe micro-batch). Parameters and buffers of ``module`` are not counted; a
    storage saved twice counts once. The forward's effects on the global RNG and on
    BatchNorm running statistics are undone."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training and m.track_running_stats]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    counted: dict = {}
    with torch.random.fork_rng(devices=[]), _count_saved(module, counted), (
            autocast or contextlib.nullcontext()):
        out = module(batch)
    del out
    with torch.no_grad():
        for m, sd in zip(bns, saved, strict=True):
            m.load_state_dict(sd)
    return counted["bytes"]


def _too_big(name: str, where: str) -> InputError:
    return InputError(
        f"{name}: one training sample does not fit in {where}. Use a smaller model, train "
        "on cached frozen-prefix features (--cache-views A, the surrogate), --amp bf16 on a "
        "GPU, or a device with more memory (--batch-size and --grad-accum only change how "
        "many samples a step holds, not the memory one sample needs)")


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
        micro_batch: samples per micro-batch at the end (see ``auto_micro_batch``).
        accumulation: micro-batches per full step (each rank) at the end.
    """

    name: str
    history: list[dict] = field(default_factory=list)
    selected_epoch: int | None = None
    criterion: str | None = None
    best_score: float | None = None
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    micro_batch: int | None = None
    accumulation: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- amp
def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA for "auto", bf16 for "bf16", else None."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


# --------------------------------------------------------------------------- micro-batches
def _say_plan(say: Callable[[str], None], name: str, cfg: TrainConfig, world: int, cap: int,
              why: str) -> None:
    m, a = micro_plan(cfg.batch_size, world, cfg.grad_accum, cap)
    ranks = f" x {world} ranks" if world > 1 else ""
    say(f"{name}: micro-batch {m} x accumulation {a}{ranks} = effective batch "
        f"{cfg.batch_size}{why}")


def _cpu_cap(task: TrainTask, cfg: TrainConfig, world: int, full_cap: int,
             distributed: bool, per_sample: float, say: Callable[[str], None]) -> int:
    """The CPU micro-batch cap from the probe's saved bytes per sample (module docstring);
    under DDP the smallest over the ranks."""
    if cfg.memory_budget is not None:
        budget, src = cfg.memory_budget, "the memory budget"
    else:
        budget, src = available_memory(), "available memory"
    if budget is None:
        cap, why = full_cap, " (available memory unknown: not sized)"
    else:
        fits = micro_batch_for_memory(budget, per_sample)
        if fits < 1:
            raise _too_big(task.name, f"{src} ({budget / 2**30:.2f} GiB; about "
                           f"{ACTIVATION_FACTOR * per_sample / 2**30:.2f} GiB per sample)")
        cap = min(full_cap, fits)
        why = (f" (sized for {budget / 2**30:.1f} GiB of {src}: ~{per_sample / 2**20:.1f} MiB "
               "saved for backward per sample)")
    if distributed:
        t = torch.tensor([cap], dtype=torch.int64,
                         device=task.device if task.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        cap = int(t.item())
    _say_plan(say, task.name, cfg, world, cap, why)
    return cap


@contextlib.contextmanager
def _count_saved(module: nn.Module, counted: dict) -> Iterator[None]:
    """Count into ``counted["bytes"]`` the storage bytes autograd saves for backward in
    the block (``module``'s parameters and buffers excluded; a storage counted once)."""
    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested: not counted
            return t
        ptr = st.data_ptr()
        if ptr and ptr not in own:
            seen.setdefault((str(t.device), ptr), st.nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        counted["bytes"] = sum(seen.values())


def _micro(task: TrainTask, model: nn.Module, module: nn.Module, batch: Any, weight: float,
           no_sync: bool, amp_dtype: torch.dtype | None, epoch: int, step: int,
           counted: dict | None = None, after_forward: Callable[[], None] | None = None
           ) -> tuple[float, dict[str, float]]:
    """Forward and backward of one micro-batch, its loss weighted by ``weight`` (its share
    of the rank's batch; gradients accumulate); returns (loss, metrics)."""
    sync = (model.no_sync() if no_sync and isinstance(model, nn.parallel.DistributedDataParallel)
            else contextlib.nullcontext())
    ac = (torch.autocast(task.device.type, dtype=amp_dtype) if amp_dtype is not None
          else contextlib.nullcontext())
    count = _count_saved(module, counted) if counted is not None else contextlib.nullcontext()
    with sync:
        with ac, count:
            loss, metrics = model(batch)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"{task.name}: non-finite loss at epoch {epoch + 1}, step {step}")
        if after_forward is not None:
            after_forward()
        (loss.float() * weight).backward()
    task.after_micro_batch(getattr(module, "last", None))
    return float(loss.detach()), {k: float(v) for k, v in (metrics or {}).items()}


class _MicroBatcher:
    """Runs the forward and backward passes of each step as micro-batches that fit.

    Owns the micro-batch cap (None until the CPU probe sets it; module docstring), the
    DataLoader over an epoch's planned micro-batches, the CPU probe and the out-of-memory
    halving. :meth:`step` accumulates one step's gradients; the caller zeroes them before
    and takes the optimizer step after.
    """

    def __init__(self, task: TrainTask, cfg: TrainConfig, model: nn.Module,
                 opt: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
                 dataset: torch.utils.data.Dataset | None, *, world: int, rank: int,
                 distributed: bool, say: Callable[[str], None], resumed_cap: int | None) -> None:
        """``resumed_cap``: the cap a resumed checkpoint recorded (kept with
        ``auto_micro_batch``); without one a cap is chosen now (no CPU sizing: the full
        share) or by the first step's probe (CPU sizing)."""
        self.task, self.cfg, self.model, self.opt = task, cfg, model, opt
        self.module, self.amp_dtype, self.dataset = task.module, amp_dtype, dataset
        self.world, self.rank, self.distributed, self.say = world, rank, distributed, say
        self.auto = cfg.auto_micro_batch
        #: the largest micro-batch a step may take: this rank's share / ``grad_accum``
        self.full_cap = math.ceil(math.ceil(cfg.batch_size / world) / cfg.grad_accum)
        self.cap: int | None = None
        if self.auto and resumed_cap is not None:
            self.cap = resumed_cap
            self._say(" (from the checkpoint)")
        sizes = self.auto and task.device.type == "cpu" and any(
            p.requires_grad for p in self.module.parameters())
        if self.cap is None and not sizes:
            self.cap = self.full_cap  # CUDA: halved on out-of-memory; nothing to size
            self._say("")
        self._epoch, self._todo, self._fill = 0, [], []
        self._it = self._loader = self._plan_it = None
        self._biggest = 0  # the largest micro-batch the current step has started

    def plan(self) -> tuple[int, int] | None:
        """(micro-batch, micro-batches per step) of a full step (None: no cap yet)."""
        if self.cap is None:
            return None
        return micro_plan(self.cfg.batch_size, self.world, self.cfg.grad_accum, self.cap)

    def _say(self, why: str) -> None:
        _say_plan(self.say, self.task.name, self.cfg, self.world, self.cap, why)

    def _warn_coupled(self) -> None:
        self.say(f"{self.task.name}: warning: its loss couples the samples of a batch; "
                 f"micro-batches of {self.cap} approximate the full batch")

    def start_epoch(self, epoch: int, todo: list[list[int]], fill: list[int]) -> None:
        """Epoch ``epoch``'s remaining global batches ``todo`` (positions) and its order
        ``fill`` (tops up batches too small to split)."""
        self._epoch, self._todo, self._fill = epoch, todo, fill
        self._it = self._loader = None

    def end_epoch(self) -> None:
        """Drop the epoch's DataLoader (its workers stop)."""
        self._it = self._loader = None

    def step(self, i: int, step: int) -> tuple[float, dict[str, float], int] | None:
        """Forward and backward of the epoch's ``i``-th remaining batch (global step
        ``step``), gradients accumulated. Returns (the rank's mean loss, metric sums over
        its samples, its samples), or None after an out-of-memory error: the step was
        undone (gradients dropped, task tensors restored) and the cap halved; redo it.

        Raises:
            InputError: out of memory and not retried (``auto_micro_batch`` off, DDP) or
                at one sample; one sample does not fit the CPU budget.
        """
        task = self.task
        snapshot = ({k: v.detach().clone() for k, v in task.extra_tensors().items()}
                    if self.auto else None)
        self._biggest = 0
        try:
            return self._run(i, step)
        except torch.OutOfMemoryError as e:
            if not self.auto or self.distributed:
                raise InputError(
                    f"{task.name}: out of memory at micro-batch {self._biggest} ("
                    f"{'DDP: not retried, the ranks would disagree' if self.auto else 'auto_micro_batch off'}"
                    "); raise --grad-accum, lower --batch-size, use a smaller model or "
                    "--cache-views A, or a device with more memory") from e
            if self._biggest <= 1:
                raise _too_big(task.name, f"{task.device} memory") from e
            oom = self._biggest
        # the exception and its frames are gone: free, halve, redo the step
        self.opt.zero_grad(set_to_none=True)
        if snapshot:
            task.load_extra_tensors(snapshot)
        self._it = self._loader = None
        gc.collect()
        if task.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cap = (oom + 1) // 2
        self._say(f" (out of memory at micro-batch {oom}: halved, step {step} redone)")
        if task.couples_samples:
            self._warn_coupled()
        return None

    def _share(self, batch: list[int]) -> list[int]:
        """This rank's samples of global batch ``batch``."""
        return [p for m in micro_split(batch, self.world, self.rank, self.cfg.grad_accum,
                                       self.full_cap, self._fill) for p in m]

    def _probe_batch(self, probe: list[int]) -> Any:
        self._biggest = len(probe)
        return self.task.to_device(self.task.collate(
            [self.dataset[(self._epoch, p)] for p in probe]))

    def _run(self, i: int, step: int) -> tuple[float, dict[str, float], int]:
        task = self.task
        step_loss, step_metrics, micros, mine = 0.0, {}, None, None
        first = None  # the probe step's micro-batches after the probe
        if self.cap is None and task.couples_samples:
            self._probe_apart(self._todo[i])
        if self.cap is None:
            step_loss, step_metrics, first, mine = self._probe_in_step(self._todo[i], step)
            micros = first
            self._it = self._loader = None
        if self._it is None:  # (re)built at the epoch start, after sizing or halving
            self._build_loader(i, first)
        step_micros = next(self._plan_it)
        if micros is None:
            micros, mine = step_micros, sum(len(m) for m in step_micros)
        self._biggest = max([self._biggest] + [len(m) for m in micros])
        for j, m in enumerate(micros):
            lm, mm = _micro(task, self.model, self.module, task.to_device(next(self._it)),
                            len(m) / mine, j < len(micros) - 1, self.amp_dtype, self._epoch,
                            step)
            step_loss += lm * len(m) / mine
            for k, v in mm.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v * len(m)
        return step_loss, step_metrics, mine

    def _probe_apart(self, batch: list[int]) -> None:
        """CPU sizing for a loss that couples samples: a separate forward of the probe
        samples that trains nothing (no step is cut for it) sets the cap."""
        probe = self._share(batch)[:PROBE_SAMPLES]
        x = self._probe_batch(probe)
        ac = (torch.autocast(self.task.device.type, dtype=self.amp_dtype)
              if self.amp_dtype is not None else None)
        per_sample = saved_activation_bytes(self.module, x, ac) / len(probe)
        del x
        self.cap = _cpu_cap(self.task, self.cfg, self.world, self.full_cap, self.distributed,
                            per_sample, self.say)
        if self.cap < self.full_cap:
            self._warn_coupled()

    def _probe_in_step(self, batch: list[int], step: int
                       ) -> tuple[float, dict[str, float], list[list[int]], int]:
        """CPU sizing: this step's first PROBE_SAMPLES samples are the probe micro-batch
        (its forward sets the cap); returns its weighted loss and metric sums, the rest of
        the step cut by the cap, and the rank's samples in the step."""
        share = self._share(batch)
        probe, rest = share[:PROBE_SAMPLES], share[PROBE_SAMPLES:]
        x = self._probe_batch(probe)
        counted: dict = {}

        def decide() -> None:
            self.cap = _cpu_cap(self.task, self.cfg, self.world, self.full_cap,
                                self.distributed, counted["bytes"] / len(probe), self.say)

        lp, mp = _micro(self.task, self.model, self.module, x, len(probe) / len(share),
                        bool(rest), self.amp_dtype, self._epoch, step, counted, decide)
        del x
        first = split_batch(rest, 1, 0, math.ceil(len(rest) / self.cap), rest) if rest else []
        self._biggest = max([len(probe)] + [len(m) for m in first])
        return (lp * len(probe) / len(share), {k: v * len(probe) for k, v in mp.items()},
                first, len(share))

    def _build_loader(self, i: int, first: list[list[int]] | None) -> None:
        """A DataLoader over the micro-batches of batches ``todo[i:]`` (``first``: those of
        ``todo[i]``, already planned)."""
        cfg = self.cfg
        plan = [first] if first is not None else []
        plan += [micro_split(b, self.world, self.rank, cfg.grad_accum, self.cap, self._fill)
                 for b in self._todo[i + (first is not None):]]
        # (built mid-step: its base seed must not move the step's RNG)
        with torch.random.fork_rng(devices=[]):
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=_Keys([m for ms in plan for m in ms], self._epoch),
                num_workers=cfg.workers, collate_fn=self.task.collate,
                pin_memory=self.task.device.type == "cuda", persistent_workers=False)
            self._it = iter(self._loader)
        self._plan_it = iter(plan)


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
    n = task.num_samples()
    ckp = Checkpointer(out, task.name, config_key(cfg, n, settings), asdict(cfg), main=main,
                       say=say)
    ckp.note_old_pickles()
    if resume and (done := ckp.load_final(task)) is not None:  # a finished stage
        return TrainResult(**{**done, "seconds": time.perf_counter() - t0})

    # prepare -> resume
    steps_per_epoch = len(plan_epoch(n, 0, cfg.seed, cfg.batch_size, shuffle=False,
                                     drop_last=cfg.drop_last)) if n else 0
    opt = task.make_optimizer()
    sched = task.make_scheduler(opt, steps_per_epoch * cfg.epochs)
    selector = Selector(task.criterion or "last")
    result = TrainResult(task.name, criterion=task.criterion)
    task.prepare()  # the module is still in its initial state
    pos = ckp.load(task, opt, sched, selector) if resume else None
    if pos is not None:
        result.resumed_from = pos.step
    pos = pos or Position()
    amp_dtype = resolve_amp(cfg.amp, task.device)
    module = task.module
    trainable = [p for p in module.parameters() if p.requires_grad]
    model = _ddp(task) if distributed and trainable else module
    if task.criterion is not None and cfg.epochs and not pos.history and pos.step == 0:
        _epoch_zero(task, opt, selector, ckp, pos.history, say)  # a fresh run only
    mb = _MicroBatcher(task, cfg, model, opt, amp_dtype, task.dataset() if n else None,
                       world=world, rank=rank, distributed=distributed, say=say,
                       resumed_cap=pos.micro_batch)

    def checkpoint() -> None:
        pos.micro_batch = mb.cap
        ckp.save(task, opt, sched, selector, pos)

    steps_this_call = 0
    while pos.epoch < cfg.epochs:
        epoch = pos.epoch
        if pos.step_in_epoch == 0:
            task.before_epoch(epoch)
            pos.new_epoch_sums()
        batches = plan_epoch(n, epoch, cfg.seed, cfg.batch_size, drop_last=cfg.drop_last)
        todo = batches[pos.step_in_epoch:]
        module.train()
        te = time.perf_counter()
        samples = 0
        sums = pos.epoch_sums
        bar = progress(len(todo), f"{task.name} epoch {epoch + 1}/{cfg.epochs}",
                       quiet=cfg.quiet, main=main, unit="step", leave=False)
        mb.start_epoch(epoch, todo, [p for b in batches for p in b])
        i = 0
        while i < len(todo):
            torch.manual_seed(sample_seed(cfg.seed, pos.step, rank, 31337))
            opt.zero_grad(set_to_none=True)
            done = mb.step(i, pos.step)
            if done is None:
                continue  # out of memory: the micro-batch was halved, redo the step
            step_loss, step_metrics, mine = done
            for k, v in step_metrics.items():
                sums["metrics"][k] = sums["metrics"].get(k, 0.0) + v
            if cfg.max_grad_norm is not None and trainable:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
            i += 1
            pos.step += 1
            pos.step_in_epoch += 1
            steps_this_call += 1
            sums["loss_sum"] += step_loss * mine
            sums["n"] += mine
            samples += mine
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0:
                checkpoint()
            if cfg.stop_after_steps is not None and steps_this_call >= cfg.stop_after_steps:
                bar.close()
                raise TrainingInterrupted(f"{task.name}: stopped after {steps_this_call} steps "
                                          f"(step {pos.step})")
        bar.close()
        mb.end_epoch()
        # epoch end: unlabeled evaluation, selection, checkpoint, log
        module.eval()
        with torch.no_grad():
            ev = task.evaluate(epoch + 1) or {}
        plan = mb.plan()
        rec = _epoch_record(pos, ev, lr=float(opt.param_groups[0]["lr"]), te=te,
                            samples=samples * world, distributed=distributed,
                            micro_batch=None if plan is None else plan[0])
        if task.criterion is not None:
            rec["criterion"] = task.criterion
            if selector.update(epoch + 1, ev.get(task.criterion)):
                ckp.keep_best(epoch + 1, task.trainable_state())
            rec["selected_so_far"] = selector.best_epoch
        pos.history.append(rec)
        pos.epoch += 1
        pos.step_in_epoch = 0
        checkpoint()
        ckp.write_log(pos.history)
        say(_epoch_line(task, cfg.epochs, rec, ev))

    selected = _select_state(task, cfg, selector, ckp)
    result.history = pos.history
    result.selected_epoch = selected if cfg.epochs else None
    result.best_score = selector.best_score if task.criterion else None
    result.steps = pos.step
    if mb.cap is not None:
        result.micro_batch, result.accumulation = mb.plan()
    result.seconds = time.perf_counter() - t0
    ckp.save_final(task, {k: v for k, v in result.as_dict().items() if k != "seconds"})
    if task.criterion is not None and cfg.epochs:
        say(f"{task.name}: kept epoch {selected} ({task.criterion} "
            f"{selector.best_score if selector.best_score is None else round(selector.best_score, 4)}"
            f", select={cfg.select})")
    dist.barrier() if distributed else None
    return result


def _ddp(task: TrainTask) -> nn.Module:
    """``task.module`` wrapped in ``DistributedDataParallel`` (buffers not broadcast)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev_ids = [task.device.index] if task.device.type == "cuda" else None
    return DDP(task.module, device_ids=dev_ids, broadcast_buffers=False)


def _select_state(task: TrainTask, cfg: TrainConfig, selector: Selector,
                  ckp: Checkpointer) -> int:
    """Load the selected epoch's state into ``task`` (``select="best"``: the criterion's
    best epoch, kept by ``ckp``; else the last one, which it holds); that epoch."""
    selected = cfg.epochs
    if cfg.select == "best" and task.criterion is not None and selector.best_epoch is not None:
        selected = selector.best_epoch
        if ckp.best_state is not None and selected != cfg.epochs:
            task.load_trainable_state(ckp.best_state)
    return selected


def _epoch_zero(task: TrainTask, opt: torch.optim.Optimizer, selector: Selector,
                ckp: Checkpointer, history: list[dict], say: Callable[[str], None]) -> None:
    """Evaluate the initial model as epoch 0: offer it to ``selector`` (kept by ``ckp``
    when it is the best), append its record to ``history``, write the log, say it."""
    t = time.perf_counter()
    task.module.eval()
    with torch.no_grad():
        ev = task.evaluate(0) or {}
    rec: dict[str, Any] = {"epoch": 0, "step": 0, "loss": None,
                           "lr": float(opt.param_groups[0]["lr"]),
                           "seconds": round(time.perf_counter() - t, 4), **ev,
                           "criterion": task.criterion}
    best = selector.update(0, ev.get(task.criterion))
    rec["selected_so_far"] = selector.best_epoch
    if best:
        ckp.keep_best(0, task.trainable_state())
    history.append(rec)
    ckp.write_log(history)
    crit = rec.get(task.criterion)
    say(f"{task.name} epoch 0 (initial model): {task.criterion} "
        f"{'n/a' if not isinstance(crit, float) else f'{crit:.4f}'}")


def _epoch_record(pos: Position, ev: dict, *, lr: float, te: float, samples: int,
                  distributed: bool, micro_batch: int | None) -> dict[str, Any]:
    """The log record of the epoch just trained (``pos``: before it is counted finished;
    ``te``: its ``perf_counter`` start; ``samples``: over all ranks; ``ev``: its
    evaluation). The loss is the sample-weighted mean over all ranks."""
    acc = pos.epoch_sums
    totals = torch.tensor([acc["loss_sum"], float(acc["n"])], dtype=torch.float64)
    if distributed:
        totals = dist.all_gather_variable(totals[None]).sum(0)
    rec: dict[str, Any] = {
        "epoch": pos.epoch + 1, "step": pos.step,
        "loss": float(totals[0] / totals[1]) if totals[1] > 0 else None,
        "lr": lr,
        "seconds": round(time.perf_counter() - te, 4),
        "samples_per_s": round(samples / max(time.perf_counter() - te, 1e-9), 2),
        "micro_batch": micro_batch,
    }
    for k, v in acc["metrics"].items():
        rec[k] = v / max(acc["n"], 1)
    rec.update(ev)
    return rec


def _epoch_line(task: TrainTask, epochs: int, rec: dict, ev: dict) -> str:
    """The log line of a finished epoch (record ``rec``, evaluation ``ev``)."""
    crit = ""
    if task.criterion and ev.get(task.criterion) is not None:
        crit = f", {task.criterion} {ev[task.criterion]:.4f}"
    orc = "".join(f", {k} {v:.4f}" for k, v in ev.items()
                  if k.startswith("oracle_") and isinstance(v, float))
    return (f"{task.name} epoch {rec['epoch']}/{epochs}: loss "
            f"{rec['loss'] if rec['loss'] is None else round(rec['loss'], 5)}{crit}{orc}"
            f" ({rec['seconds']:.1f}s)")


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short hash of tensors' shapes and bytes (identifies a stage's data in resume keys)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- optim
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
