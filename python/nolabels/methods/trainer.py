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
import gc
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
    cap: int | None = None  # the micro-batch cap (None: not chosen yet)

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
        if cfg.auto_micro_batch and isinstance(ck.get("micro_batch"), int):
            cap = ck["micro_batch"]
            _say_plan(say, task.name, cfg, world, cap, " (from the checkpoint)")

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
            "config_key": _config_key(cfg, n, settings), "micro_batch": cap,
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
    auto = cfg.auto_micro_batch
    full_cap = math.ceil(math.ceil(cfg.batch_size / world) / cfg.grad_accum)
    if cap is None and not (auto and task.device.type == "cpu" and trainable):
        cap = full_cap  # CUDA: halved on out-of-memory; no sizing without trainables
        _say_plan(say, task.name, cfg, world, cap, "")
    while epoch < cfg.epochs:
        if step_in_epoch == 0:
            task.before_epoch(epoch)
            acc = {"loss_sum": 0.0, "n": 0, "metrics": {}}
        batches = plan_epoch(n, epoch, cfg.seed, cfg.batch_size, drop_last=cfg.drop_last)
        fill = [p for b in batches for p in b]
        todo = batches[step_in_epoch:]
        module.train()
        te = time.perf_counter()
        samples = 0
        metric_sums = acc["metrics"]
        bar = progress(len(todo), f"{task.name} epoch {epoch + 1}/{cfg.epochs}",
                       quiet=cfg.quiet, main=main, unit="step", leave=False)
        i = 0
        it = loader = None
        first: list[list[int]] | None = None  # the probe step's micro-batches after the probe
        while i < len(todo):
            torch.manual_seed(sample_seed(cfg.seed, step, rank, 31337))
            opt.zero_grad(set_to_none=True)
            snapshot = ({k: v.detach().clone() for k, v in task.extra_tensors().items()}
                        if auto else None)
            biggest = 0
            try:
                if cap is None and task.couples_samples:
                    # CPU sizing for a coupled loss: a separate probe forward (no step
                    # is cut for it), then this step runs as planned below
                    share = [p for m in micro_split(todo[i], world, rank, cfg.grad_accum,
                                                    full_cap, fill) for p in m]
                    probe = share[:PROBE_SAMPLES]
                    biggest = len(probe)
                    x = task.to_device(task.collate([dataset[(epoch, p)] for p in probe]))
                    ac = (torch.autocast(task.device.type, dtype=amp_dtype)
                          if amp_dtype is not None else None)
                    per_sample = saved_activation_bytes(module, x, ac) / len(probe)
                    del x
                    cap = _cpu_cap(task, cfg, world, full_cap, distributed, per_sample, say)
                    if cap < full_cap:
                        say(f"{task.name}: warning: its loss couples the samples of a batch; "
                            f"micro-batches of {cap} approximate the full batch")
                if cap is None:
                    # CPU sizing: this step's first PROBE_SAMPLES samples are the probe
                    # micro-batch; the rest of the step is cut by the cap it gives
                    share = [p for m in micro_split(todo[i], world, rank, cfg.grad_accum,
                                                    full_cap, fill) for p in m]
                    probe, rest = share[:PROBE_SAMPLES], share[PROBE_SAMPLES:]
                    biggest = len(probe)
                    x = task.to_device(task.collate([dataset[(epoch, p)] for p in probe]))
                    counted: dict = {}

                    def decide(counted=counted, probe=probe) -> None:
                        nonlocal cap
                        cap = _cpu_cap(task, cfg, world, full_cap, distributed,
                                       counted["bytes"] / len(probe), say)

                    lp, mp = _micro(task, model, module, x, len(probe) / len(share),
                                    bool(rest), amp_dtype, epoch, step, counted, decide)
                    del x
                    first = (split_batch(rest, 1, 0, math.ceil(len(rest) / cap), rest)
                             if rest else [])
                    biggest = max([len(probe)] + [len(m) for m in first])
                    it = loader = None
                    step_loss, step_metrics = lp * len(probe) / len(share), {
                        k: v * len(probe) for k, v in mp.items()}
                    micros, mine = first, len(share)
                else:
                    step_loss, step_metrics, micros, mine = 0.0, {}, None, None
                if it is None:  # (re)built at the epoch start, after sizing or halving
                    plan = [first] if first is not None else []
                    plan += [micro_split(b, world, rank, cfg.grad_accum, cap, fill)
                             for b in todo[i + (first is not None):]]
                    first = None
                    # (built mid-step: its base seed must not move the step's RNG)
                    with torch.random.fork_rng(devices=[]):
                        loader = torch.utils.data.DataLoader(
                            dataset, batch_sampler=_Keys([m for ms in plan for m in ms], epoch),
                            num_workers=cfg.workers, collate_fn=task.collate,
                            pin_memory=task.device.type == "cuda", persistent_workers=False)
                        it = iter(loader)
                    plan_it = iter(plan)
                step_micros = next(plan_it)
                if micros is None:
                    micros, mine = step_micros, sum(len(m) for m in step_micros)
                biggest = max([biggest] + [len(m) for m in micros])
                for j, m in enumerate(micros):
                    lm, mm = _micro(task, model, module, task.to_device(next(it)),
                                    len(m) / mine, j < len(micros) - 1, amp_dtype, epoch, step)
                    step_loss += lm * len(m) / mine
                    for k, v in mm.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + v * len(m)
            except torch.OutOfMemoryError as e:
                if not auto or distributed:
                    raise InputError(
                        f"{task.name}: out of memory at micro-batch {biggest} ("
                        f"{'DDP: not retried, the ranks would disagree' if auto else 'auto_micro_batch off'}"
                        "); raise --grad-accum, lower --batch-size, use a smaller model or "
                        "--cache-views A, or a device with more memory") from e
                if biggest <= 1:
                    raise _too_big(task.name, f"{task.device} memory") from e
                oom = biggest
            else:
                oom = 0
            if oom:  # the exception and its frames are gone: free, halve, redo the step
                opt.zero_grad(set_to_none=True)
                if snapshot:
                    task.load_extra_tensors(snapshot)
                it = loader = first = None
                gc.collect()
                if task.device.type == "cuda":
                    torch.cuda.empty_cache()
                cap = (oom + 1) // 2
                _say_plan(say, task.name, cfg, world, cap,
                          f" (out of memory at micro-batch {oom}: halved, step {step} redone)")
                if task.couples_samples:
                    say(f"{task.name}: warning: its loss couples the samples of a batch; "
                        f"micro-batches of {cap} approximate the full batch")
                continue
            for k, v in step_metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
            if cfg.max_grad_norm is not None and trainable:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
            i += 1
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
            "micro_batch": None if cap is None else micro_plan(cfg.batch_size, world,
                                                               cfg.grad_accum, cap)[0],
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
    if cap is not None:
        result.micro_batch, result.accumulation = micro_plan(cfg.batch_size, world,
                                                             cfg.grad_accum, cap)
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
         if k not in ("quiet", "workers", "stop_after_steps", "checkpoint_every",
                      "auto_micro_batch", "memory_budget")}
    d["num_samples"] = n
    d["settings"] = settings or {}
    d["world"] = dist.get_world_size() if (dist.is_distributed() and cfg.ddp) else 1
    return json.dumps(d, sort_keys=True, default=str)


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
