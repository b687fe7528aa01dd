"""torch.distributed helpers: every long loop runs unchanged under ``torchrun``.

``with dist_session(device) as ctx:`` initialises the default process group from
torchrun's environment (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``) when
``WORLD_SIZE > 1`` — NCCL for CUDA devices, gloo for CPU — and tears it down at the
end if it created it. Without torchrun everything degrades to rank 0 of 1, and
the collectives below become identities.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, and its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def get_rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto": this rank's GPU (``cuda:LOCAL_RANK``) if CUDA is available, else CPU.
    A bare "cuda" becomes ``cuda:LOCAL_RANK`` under torchrun."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if env_world_size() > 1 else torch.cuda.current_device())
    return dev


@contextlib.contextmanager
def dist_session(device: str | torch.device | None = None,
                 timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Initialise torch.distributed from the torchrun environment if needed.

    Args:
        device: "auto"/None, "cpu", "cuda", "cuda:N".
        timeout_s: collective timeout.
    Yields:
        a :class:`DistContext`. Backend: NCCL if the device is CUDA, else gloo.
    """
    dev = resolve_device(device)
    created = False
    if env_world_size() > 1 and tdist.is_available() and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                 **({"device_id": dev} if dev.type == "cuda" else {}))
        created = True
    if is_distributed():
        ctx = DistContext(tdist.get_rank(), tdist.get_world_size(),
                          int(os.environ.get("LOCAL_RANK", "0")), dev, tdist.get_backend())
    else:
        ctx = DistContext(0, 1, 0, dev, None)
    ok = False
    try:
        yield ctx
        ok = True
    finally:
        if created and tdist.is_initialized():
            # All ranks leave together: a rank that tears gloo down while a peer
            # is still mid-collective makes the peer abort ("terminate called
            # without an active exception"). Skipped on error, where a peer may
            # never arrive.
            if ok:
                tdist.barrier()
            tdist.destroy_process_group()


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if is_distributed():
        tdist.barrier()


def _collective_device(t: torch.Tensor) -> torch.device:
    # NCCL needs CUDA tensors; gloo takes CPU tensors.
    if is_distributed() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_variable(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every rank, in rank order.

    Args:
        t: (n_r, ...) on any device; n_r may differ between ranks (and be 0);
            the trailing shape and dtype must agree.
    Returns:
        (sum_r n_r, ...) on ``t``'s device; ``t`` itself when not distributed.
    """
    if not is_distributed():
        return t
    dev = _collective_device(t)
    world = tdist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    tdist.all_gather(sizes, n)
    sizes_l = [int(s) for s in sizes]
    biggest = max(sizes_l)
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    out = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_l)]).to(t.device)


def all_gather_strings(items: list[str | None]) -> list[str | None]:
    """Concatenate every rank's list of strings (or None), in rank order, without pickle.

    Sent as one UTF-8 byte tensor plus lengths (-1 for None) through
    :func:`all_gather_variable`; for bounded lists (e.g. the selected rows' paths).
    """
    if not is_distributed():
        return list(items)
    raw = [b"" if s is None else s.encode("utf-8", "surrogatepass") for s in items]
    lens = torch.tensor([-1 if s is None else len(b) for s, b in zip(items, raw)],
                        dtype=torch.int64)
    data = torch.frombuffer(bytearray(b"".join(raw)), dtype=torch.uint8) if any(raw) \
        else torch.empty(0, dtype=torch.uint8)
    all_lens = all_gather_variable(lens).tolist()
    all_data = all_gather_variable(data).numpy().tobytes()
    out: list[str | None] = []
    at = 0
    for n in all_lens:
        if n < 0:
            out.append(None)
        else:
            out.append(all_data[at:at + n].decode("utf-8", "surrogatepass"))
            at += n
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled; for small objects), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_max(x: float) -> float:
    """The maximum of a Python float over ranks."""
    if not is_distributed():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())
