"""Argument checks shared by the ops: shapes, dtypes, devices, scalars, finiteness.

Every check raises ``ValueError`` whose message starts with the op's name and
names the argument. Checks that only read metadata run in the public wrappers
(traced by ``torch.compile``); checks that read data (finiteness) run inside the
custom ops' bodies, where they cost one reduction and are opaque to tracing.
"""
from __future__ import annotations

import math

import torch

# The floating dtypes every op and backend takes (results accumulate in float32).
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_float_tensor(op: str, name: str, t, ndim: int, layout: str = "",
                       *, optional: bool = False) -> None:
    """``t`` is a tensor of ``ndim`` dims and a :data:`SUPPORTED_DTYPES` dtype.

    ``layout`` (e.g. "(B, L, H, d)") is added to the rank message; ``optional``
    says "a torch.Tensor or None" in the type message (the caller handles None).
    """
    if not isinstance(t, torch.Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise ValueError(f"{op}: {name} must be {what}, got {type(t).__name__}")
    if t.dim() != ndim:
        shape = f" {layout}" if layout else ""
        raise ValueError(f"{op}: {name} must be {ndim}-D{shape}, got shape {tuple(t.shape)}")
    check_dtype(op, name, t)


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """``t.dtype`` is one of :data:`SUPPORTED_DTYPES`."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{op}: {name} has unsupported dtype {t.dtype}; use float32, float16 or bfloat16"
        )


def check_same_device(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """``a`` and ``b`` live on the same device."""
    if a.device != b.device:
        raise ValueError(f"{op}: {a_name} is on {a.device} but {b_name} is on {b.device}")


def check_same_dim(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """Two (rows, D) matrices have the same D."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{op}: D mismatch, {a_name} is {tuple(a.shape)} but {b_name} is {tuple(b.shape)}"
        )


def check_rows_match(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """:func:`check_same_dim` then :func:`check_same_device`."""
    check_same_dim(op, a_name, a, b_name, b)
    check_same_device(op, a_name, a, b_name, b)


def check_nonzero_dim(op: str, t: torch.Tensor) -> None:
    """The embeddings' D (last dim of ``t``) is not 0."""
    if t.shape[1] == 0:
        raise ValueError(f"{op}: embeddings have D = 0")


def check_int_in(op: str, name: str, value, lo: int, hi: int | None = None, hi_name: str = "") -> None:
    """``value`` is a Python int (not bool) in ``[lo, hi]`` (``hi`` None: no bound).

    The range message reads ``[lo, hi_name=hi]`` when ``hi_name`` is given.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{op}: {name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        top = f"{hi_name}={hi}" if hi_name else str(hi)
        raise ValueError(f"{op}: {name} must be in [{lo}, {top}], got {value}")


def check_finite_scalar(op: str, name: str, value, *, positive: bool = False) -> None:
    """``value`` is a finite number (and > 0 with ``positive``)."""
    ok = math.isfinite(float(value)) and (not positive or float(value) > 0)
    if not ok:
        need = "positive and finite" if positive else "finite"
        raise ValueError(f"{op}: {name} must be {need}, got {value}")


def check_index_vector(op: str, name: str, t, m: int, device: torch.device, of: str) -> None:
    """``t`` is an (m,) integer tensor on ``device`` (one entry per row of ``of``)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (m,):
        raise ValueError(f"{op}: {name} must have shape ({m},) (one entry per text), got {tuple(t.shape)}")
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: {name} must be an integer tensor (int64), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but {of} is on {device}")


# --------------------------------------------------------------------------- finiteness
def nonfinite_rows(t: torch.Tensor, limit: int = 5) -> list[int]:
    """The first ``limit`` row indices of a 2-D ``t`` holding NaN or Inf."""
    return (~torch.isfinite(t)).any(dim=1).nonzero().flatten()[:limit].tolist()


def all_finite(t: torch.Tensor) -> bool:
    """Exact finiteness test, fast path first: any NaN/Inf makes the float32 sum
    non-finite; only if the sum is non-finite (which finite values near float32's
    range can also cause) are the elements tested one by one."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def raise_if_nonfinite(op: str, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first tensor (2-D) with NaN/Inf and its rows."""
    for name, t in tensors.items():
        if not all_finite(t):
            raise ValueError(f"{op}: {name} contains NaN or Inf (rows {nonfinite_rows(t)}...)")
