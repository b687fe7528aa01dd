"""The files of one training stage: resumable checkpoint, best epoch, finished stage, log.

:func:`nolabels.methods.trainer.fit` keeps a stage ``NAME`` of a run directory ``OUT`` in

* ``OUT/checkpoints/NAME.safetensors``: everything a resume needs (trainable state,
  optimizer, scheduler, task state, position, log so far, the micro-batch chosen), written
  every ``checkpoint_every`` steps and at each epoch end;
* ``OUT/checkpoints/NAME.best.safetensors``: the trainable state of the best epoch so far
  (label-free selection), written when the best changes;
* ``OUT/checkpoints/NAME.final.safetensors``: the finished stage (the selected state and
  the result): a re-run loads it instead of training again;
* ``OUT/logs/NAME.jsonl``: one JSON object per epoch.

Each checkpoint is a tensor tree of :mod:`nolabels.data.safe_io` (safetensors + JSON, never
a pickle: a checkpoint someone hands you cannot run code), written atomically by rank 0
only. A resumable or finished checkpoint records the *config key* (the settings that must
not change between a checkpoint and its resume, see :func:`config_key`); one written with
another key is refused with :class:`InputError`. Pickled ``.pt`` checkpoints of older
versions are never loaded (their presence is logged).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nolabels import dist
from nolabels.errors import CorruptFileError, InputError

if TYPE_CHECKING:  # types only: trainer imports this module
    from nolabels.methods.selection import Selector
    from nolabels.methods.trainer import TrainTask

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
#: TrainConfig fields that may change between a checkpoint and its resume.
_NOT_IN_KEY = ("quiet", "workers", "stop_after_steps", "checkpoint_every", "auto_micro_batch",
               "memory_budget")


# --------------------------------------------------------------------------- files
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


def config_key(cfg: Any, n: int, settings: dict | None = None) -> str:
    """What must not change between a checkpoint and its resume: the fields of the
    ``TrainConfig`` ``cfg`` that define the computation, the number of samples ``n``, the
    caller's ``settings`` and the number of DDP ranks (a JSON string)."""
    d = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    d["num_samples"] = n
    d["settings"] = settings or {}
    d["world"] = dist.get_world_size() if (dist.is_distributed() and cfg.ddp) else 1
    return json.dumps(d, sort_keys=True, default=str)


def _optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Move a loaded optimizer's state tensors (not its ``step`` counters) to ``device``."""
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(device)


# --------------------------------------------------------------------------- position
def _fresh_sums() -> dict[str, Any]:
    return {"loss_sum": 0.0, "n": 0, "metrics": {}}


@dataclass
class Position:
    """Where a stage's training stands (what a resume checkpoint holds besides the states).

    Attributes:
        step: optimizer steps done in total.
        epoch: epochs finished (the 0-based index of the epoch under way).
        step_in_epoch: steps done in the epoch under way.
        history: one log record per finished epoch (epoch 0: the initial model).
        epoch_sums: running sums of the epoch under way: ``loss_sum`` (loss x samples),
            ``n`` (samples of this rank), ``metrics`` (name -> value x samples).
        micro_batch: the micro-batch cap the run had chosen (None: none yet).
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    epoch_sums: dict[str, Any] = field(default_factory=_fresh_sums)
    micro_batch: int | None = None

    def new_epoch_sums(self) -> None:
        """Zero the running sums (at the start of an epoch)."""
        self.epoch_sums = _fresh_sums()


# --------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Reads and writes the files of one stage (module docstring); with ``out=None`` it
    writes nothing and only keeps the best state in memory.

    Attributes:
        resume_path, best_path, final_path, log_path: the stage's files (None without
            ``out``).
        key: the config key a checkpoint must carry to be loaded (:func:`config_key`).
        best_state: the trainable state of the best epoch so far (None: none kept), set by
            :meth:`keep_best` and, for a resumed run, by :meth:`load`.
    """

    def __init__(self, out: str | os.PathLike | None, name: str, key: str, config: dict, *,
                 main: bool = True, say: Callable[[str], None] | None = None) -> None:
        """
        Args:
            out: the run directory (None: in memory only).
            name: the stage (file names).
            key: the config key of this run (:func:`config_key`).
            config: the ``TrainConfig`` as a dict (recorded in the checkpoints).
            main: this process writes the files (rank 0).
            say: a ``print``-like function for the log lines.
        """
        self.out = Path(out) if out is not None else None
        self.name, self.key, self.config, self.main = name, key, config, main
        self.say = say or (lambda _m: None)
        self.resume_path = self.best_path = self.final_path = self.log_path = None
        if self.out is not None:
            self.resume_path = checkpoint_path(self.out, name)
            self.best_path = checkpoint_path(self.out, name, "best")
            self.final_path = checkpoint_path(self.out, name, "final")
            self.log_path = self.out / "logs" / f"{name}.jsonl"
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def _writes(self) -> bool:
        return self.out is not None and self.main

    def note_old_pickles(self) -> None:
        """Log (rank 0) the pickled ``.pt`` checkpoints of an older nolabels that are ignored."""
        if not self._writes:
            return
        d = self.out / "checkpoints"
        old = [f"{self.name}{x}.pt" for x in ("", ".final", ".best")
               if (d / f"{self.name}{x}.pt").is_file()]
        if old:
            self.say(f"{self.name}: ignoring {old} in {d} (pickled checkpoints of an older "
                     "nolabels are never loaded)")

    def _checked(self, path: Path, which: str, what: str) -> dict:
        tree = load_checkpoint_file(path, which)
        if tree.get("config_key") != self.key:
            raise InputError(f"{path} was written by a run with different settings "
                             f"({tree.get('config')}); use another --out or delete {what}")
        return tree

    # finished stage -------------------------------------------------------------
    def load_final(self, task: TrainTask) -> dict | None:
        """Load a finished stage's selected state into ``task``; its ``TrainResult`` as a
        dict (without ``seconds``), or None when the stage has not finished.

        Raises:
            InputError: it was written with another config key.
            CorruptFileError: the file is not such a checkpoint.
        """
        if self.final_path is None or not self.final_path.is_file():
            return None
        fin = self._checked(self.final_path, "final", "the run")
        task.load_trainable_state(fin["state"])
        r = fin["result"]
        self.say(f"{self.name}: already trained (epoch {r['selected_epoch']} kept); "
                 f"loaded {self.final_path}")
        return r

    def save_final(self, task: TrainTask, result: dict) -> None:
        """Write the finished stage: ``task``'s trainable state and ``result`` (a
        ``TrainResult`` dict without ``seconds``)."""
        if self._writes:
            save_checkpoint_file(self.final_path, "final", {
                "state": task.trainable_state(), "result": result, "config": self.config,
                "config_key": self.key})

    # resume -----------------------------------------------------------------------
    def load(self, task: TrainTask, opt: torch.optim.Optimizer, sched: Any,
             selector: Selector) -> Position | None:
        """Restore a resume checkpoint into ``task`` (trainable and extra state), ``opt``
        (moved to ``task.device``), ``sched`` (may be None) and ``selector``, and the best
        epoch's state into :attr:`best_state`; the position to go on from, or None when
        there is no checkpoint.

        Raises:
            InputError: it was written with another config key.
            CorruptFileError: a file is not such a checkpoint.
        """
        if self.resume_path is None or not self.resume_path.is_file():
            return None
        ck = self._checked(self.resume_path, "resume", "the checkpoint")
        task.load_trainable_state(ck["state"])
        opt.load_state_dict(ck["optimizer"])
        _optimizer_to(opt, task.device)
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        task.load_extra_state(ck.get("extra", {}))
        mb = ck.get("micro_batch")
        pos = Position(ck["step"], ck["epoch"], ck["step_in_epoch"], ck["history"],
                       ck["epoch_sums"], mb if isinstance(mb, int) else None)
        selector.load_state_dict(ck["selector"])
        self.say(f"{self.name}: resuming at epoch {pos.epoch + 1}, step {pos.step} from "
                 f"{self.resume_path}")
        if selector.best_epoch is not None and self.best_path.is_file():
            self.best_state = load_checkpoint_file(self.best_path, "best")["state"]
        return pos

    def save(self, task: TrainTask, opt: torch.optim.Optimizer, sched: Any, selector: Selector,
             pos: Position) -> None:
        """Write the resume checkpoint (atomic; rank 0 only) at position ``pos``."""
        if not self._writes:
            return
        save_checkpoint_file(self.resume_path, "resume", {
            "state": task.trainable_state(), "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "extra": task.extra_state(), "step": pos.step, "epoch": pos.epoch,
            "step_in_epoch": pos.step_in_epoch, "history": pos.history,
            "epoch_sums": pos.epoch_sums, "selector": selector.state_dict(),
            "config": self.config, "config_key": self.key, "micro_batch": pos.micro_batch,
        })

    # best epoch and log -------------------------------------------------------------
    def keep_best(self, epoch: int, state: dict[str, torch.Tensor]) -> None:
        """``state`` (a trainable state) is the best epoch's so far: keep it in
        :attr:`best_state` and write the best-state file."""
        self.best_state = state
        if self._writes:
            save_checkpoint_file(self.best_path, "best", {"epoch": epoch, "state": state})

    def write_log(self, history: list[dict]) -> None:
        """Rewrite the JSON log (one object per epoch record) atomically."""
        if not self._writes:
            return
        from nolabels.data.store import atomic_write_bytes

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(h, sort_keys=False) + "\n" for h in history)
        atomic_write_bytes(self.log_path, text.encode())
