"""Backend declaration and dispatch, shared by every op.

Each op lists its backends as :class:`BackendImpl` objects. A backend says
which calls it cannot take and why (``not_supported_reasons``, after xformers'
fmha dispatch). ``backend="auto"`` picks the first backend, in a fixed priority
order per device type, whose list of reasons is empty; an explicit backend
(or ``NOLABELS_BACKEND``) that cannot take the call raises ``ValueError`` with
every reason.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

BackendName = Literal["auto", "torch", "cpu", "triton", "cuda"]
BACKENDS: tuple[str, ...] = ("torch", "cpu", "triton", "cuda")
# Priority for backend="auto", by the device type of the inputs.
AUTO_ORDER: Mapping[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}


def triton_status() -> str | None:
    """None if Triton kernels can run somewhere, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def library_cpu_status() -> str | None:
    """None if the compiled CPU library is loaded, else why not."""
    from nolabels import _lib

    st = _lib.STATUS
    return None if st.cpu_loaded else (st.cpu_error or "the compiled library did not load")


def library_cuda_status() -> str | None:
    """None if the compiled CUDA library is loaded and a GPU is visible, else why not."""
    from nolabels import _lib

    st = _lib.STATUS
    if not st.cuda_loaded:
        return st.cuda_error or "the CUDA library did not load"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return cuda_runtime_problem(st.build_info)


def _driver_cuda_version() -> int | None:
    """The CUDA version the installed driver supports (e.g. 12040 for 12.4), or None."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
    except (OSError, AttributeError):  # no driver installed
        return None
    return v.value or None


def _min_arch(archs: str) -> tuple[int, int] | None:
    """The lowest real SM of a CMake arch list such as "80-real;90" -> (8, 0)."""
    nums = [int(a.split("-")[0]) for a in archs.replace(",", ";").split(";")
            if a.split("-")[0].isdigit()]
    return (min(nums) // 10, min(nums) % 10) if nums else None


def cuda_runtime_problem(build_info: dict, device: int | None = None) -> str | None:
    """Why the CUDA kernels cannot run on this machine's driver / GPU, or None.

    The kernels are built with CUDA's static runtime of ``cuda_compiler_version`` (needs a
    driver supporting that CUDA major version: minor-version compatibility) for the SMs of
    ``cuda_archs`` (a GPU below the lowest one cannot run them). Checked before a launch,
    so ``auto`` falls back to Triton / torch instead of failing."""
    nvcc = str(build_info.get("cuda_compiler_version") or "")
    if nvcc and nvcc.split(".")[0].isdigit():
        need = int(nvcc.split(".")[0]) * 1000
        have = _driver_cuda_version()
        if have is not None and have < need:
            return (f"unavailable: the driver supports CUDA {have // 1000}.{have % 1000 // 10} "
                    f"< {need // 1000}.0 required by the CUDA kernels (built with nvcc {nvcc}; "
                    "CUDA 13 needs driver >= 580 on Linux)")
    low = _min_arch(str(build_info.get("cuda_archs") or ""))
    if low is not None:
        dev = torch.cuda.current_device() if device is None else device
        cap = torch.cuda.get_device_capability(dev)
        if tuple(cap) < low:
            return (f"unavailable: GPU {torch.cuda.get_device_name(dev)} has compute capability "
                    f"{cap[0]}.{cap[1]} < {low[0]}.{low[1]} (kernels built for "
                    f"{build_info.get('cuda_archs')})")
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class BackendImpl:
    """One backend of one op.

    Attributes:
        name: one of :data:`BACKENDS`.
        available: returns None when the backend can run at all here, else why not.
        reasons: returns the reasons this backend cannot take a particular call
            (empty list = supported). Receives the call's arguments as a dict.
        run: the implementation; receives the call's arguments as keywords.
    """

    name: str
    available: Callable[[], str | None]
    reasons: Callable[[Mapping[str, Any]], list[str]]
    run: Callable[..., Any]

    def not_supported_reasons(self, call: Mapping[str, Any]) -> list[str]:
        why = self.available()
        if why is not None:
            return [why]
        return self.reasons(call)


def device_reasons(call_device: torch.device, name: str) -> list[str]:
    """Device rules common to every op's backends."""
    if name == "cpu" and call_device.type != "cpu":
        return [f"the cpu backend takes CPU tensors, got {call_device.type}"]
    if name == "cuda" and call_device.type != "cuda":
        return [f"the cuda backend takes CUDA tensors, got {call_device.type}"]
    if name == "triton":
        if call_device.type == "cpu" and not triton_interpret():
            return ["triton takes CPU tensors only under TRITON_INTERPRET=1 (for testing)"]
        if call_device.type not in ("cpu", "cuda"):
            return [f"triton takes CUDA tensors, got {call_device.type}"]
    return []


def reasons_for(name: str, limit_key: str | None = None, limit: int | None = None):
    """The usual ``reasons`` of a backend: the device rules of :func:`device_reasons`,
    plus ``call[limit_key] <= limit`` when the backend has such a limit (e.g. the
    top-k a kernel keeps in registers)."""

    def reasons(call: Mapping[str, Any]) -> list[str]:
        why = device_reasons(call["device"], name) if name != "torch" else []
        if limit_key is not None and limit is not None and call[limit_key] > limit:
            why.append(f"{limit_key}={call[limit_key]} > {limit}")
        return why

    return reasons


def dispatch(
    op: str,
    impls: Sequence[BackendImpl],
    backend: str,
    device: torch.device,
    call: Mapping[str, Any],
) -> BackendImpl:
    """Pick the backend for one call, or raise ``ValueError`` saying why none fits."""
    by_name = {b.name: b for b in impls}
    if backend == "auto":
        backend = os.environ.get("NOLABELS_BACKEND", "auto") or "auto"
    if backend == "auto":
        rejected = []
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if name not in by_name:
                continue
            why = by_name[name].not_supported_reasons(call)
            if not why:
                return by_name[name]
            rejected.append(f"{name}: " + "; ".join(why))
        raise ValueError(f"{op}: no backend can take this call:\n  " + "\n  ".join(rejected))
    if backend not in by_name:
        raise ValueError(
            f"{op}: unknown backend {backend!r}; expected one of 'auto', "
            + ", ".join(repr(n) for n in by_name)
        )
    why = by_name[backend].not_supported_reasons(call)
    if why:
        raise ValueError(f"{op}: backend {backend!r} cannot take this call: " + "; ".join(why))
    return by_name[backend]


OP_REGISTRY: dict[str, tuple[BackendImpl, ...]] = {}


def register_op(op: str, impls: Sequence[BackendImpl]) -> tuple[BackendImpl, ...]:
    """Record an op's backends so ``nolabels info`` can list them. Returns ``impls``."""
    OP_REGISTRY[op] = tuple(impls)
    return OP_REGISTRY[op]


def explain(impls: Sequence[BackendImpl]) -> dict[str, str]:
    """Availability of each backend of an op on this machine (for ``nolabels info``)."""
    out = {}
    for b in impls:
        why = b.available()
        out[b.name] = "available" if why is None else f"unavailable: {why}"
    return out
