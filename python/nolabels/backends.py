"""How an op declares its backends, and how a call picks one (xformers' fmha pattern).

An op is :func:`define_op` over a tuple of :class:`BackendImpl`, in priority order.
Each backend *declares* what it takes, as data: device types, dtypes, the lowest
CUDA compute capability, limits on call arguments (``max``: ``topk <= 16``;
``choices``: head dim in (16, 32, 64, 128)) and what it needs at run time (the
compiled library and which of its kernels, or Triton). :meth:`BackendImpl.not_supported_reasons`
derives every reason a call cannot run there from those fields; nothing else
decides. Dispatch (:func:`dispatch`):

* ``backend="auto"``: the first backend, in the op's order, with no reasons
  (a backend is tried only on its own device types: Triton's interpreter on CPU
  tensors is for tests, never picked by ``auto``);
* ``NOLABELS_BACKEND=<name>``: prefer that backend wherever the op has it, as if
  passed explicitly; an op without it uses ``auto``;
* an explicit backend that cannot take the call raises ``ValueError`` with every reason.

``nolabels info`` prints every op's table per visible device (``nolabels.info.backend_table``).
To add a backend: write its ``run`` (or name a library op with :func:`library` /
a Triton host function with :func:`lazy`), add one ``BackendImpl`` to the op's
``define_op`` in ``nolabels/ops/<family>.py``.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from nolabels import _lib
from nolabels.triton import interpret as triton_interpret

BackendName = Literal["auto", "torch", "cpu", "triton", "cuda"]
BACKENDS: tuple[str, ...] = ("torch", "cpu", "triton", "cuda")
Requirement = Literal["library", "triton"]
ANY_DEVICE = "*"  # in BackendImpl.devices: every device type (pure-torch backends)

# Triton's supported NVIDIA GPUs (triton README, "Supported Hardware": compute
# capability 8.0+); below, the torch backend takes the call.
TRITON_MIN_CAPABILITY: tuple[int, int] = (8, 0)


# --------------------------------------------------------------------------- probes
def triton_status() -> str | None:
    """None if Triton kernels can run somewhere, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def library_cpu_status() -> str | None:
    """None if the compiled CPU library is loaded, else why not."""
    st = _lib.STATUS
    return None if st.cpu_loaded else (st.cpu_error or "the compiled library did not load")


def _cuda_library_problem() -> str | None:
    """Why the CUDA library cannot run on any GPU here (not loaded, no GPU, old driver)."""
    st = _lib.STATUS
    if not st.cuda_loaded:
        return st.cuda_error or "the CUDA library did not load"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return _driver_problem(st.build_info)


def library_cuda_status() -> str | None:
    """None if the compiled CUDA library is loaded, a GPU is visible, the driver is new
    enough and the current GPU is one the kernels were built for; else why not."""
    return _cuda_library_problem() or _arch_problem(_lib.STATUS.build_info, None)


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


def _driver_problem(build_info: dict) -> str | None:
    nvcc = str(build_info.get("cuda_compiler_version") or "")
    if nvcc and nvcc.split(".")[0].isdigit():
        need = int(nvcc.split(".")[0]) * 1000
        have = _driver_cuda_version()
        if have is not None and have < need:
            return (f"unavailable: the driver supports CUDA {have // 1000}.{have % 1000 // 10} "
                    f"< {need // 1000}.0 required by the CUDA kernels (built with nvcc {nvcc}; "
                    "CUDA 13 needs driver >= 580 on Linux)")
    return None


def _arch_problem(build_info: dict, device: int | None) -> str | None:
    low = _min_arch(str(build_info.get("cuda_archs") or ""))
    if low is not None:
        dev = torch.cuda.current_device() if device is None else device
        cap = torch.cuda.get_device_capability(dev)
        if tuple(cap) < low:
            return (f"unavailable: GPU {torch.cuda.get_device_name(dev)} has compute capability "
                    f"{cap[0]}.{cap[1]} < {low[0]}.{low[1]} (kernels built for "
                    f"{build_info.get('cuda_archs')})")
    return None


def cuda_runtime_problem(build_info: dict, device: int | None = None) -> str | None:
    """Why the CUDA kernels cannot run on this machine's driver / GPU, or None.

    The kernels are built with CUDA's static runtime of ``cuda_compiler_version`` (needs a
    driver supporting that CUDA major version: minor-version compatibility) for the SMs of
    ``cuda_archs`` (a GPU below the lowest one cannot run them). Checked before a launch,
    so ``auto`` falls back to Triton / torch instead of failing."""
    return _driver_problem(build_info) or _arch_problem(build_info, device)


# The lowest compute capability the compiled CUDA kernels run on: the lowest SM they
# were built for (CMakeLists.txt: NOLABELS_CUDA_ARCHS, default "80-real;90").
CUDA_MIN_CAPABILITY: tuple[int, int] = (
    _min_arch(str(_lib.STATUS.build_info.get("cuda_archs") or "")) or (8, 0)
)


# --------------------------------------------------------------------------- run helpers
class LibraryOp:
    """``run`` of a compiled-library backend: calls ``torch.ops.nolabels_C.<name>``.

    The dispatcher picks the CPU or CUDA kernel by the tensors' device; the backend
    that uses it needs that kernel in the loaded library (checked once, at import).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> Any:
        return getattr(torch.ops.nolabels_C, self.name)(*args)

    def __repr__(self) -> str:
        return f"library({self.name!r})"


class LazyFunction:
    """``run`` that imports ``module.attr`` on first call (Triton kernels are imported
    only when a Triton backend runs, so the package works without Triton)."""

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr
        self._fn: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self._fn is None:
            self._fn = getattr(importlib.import_module(self.module), self.attr)
        return self._fn(*args)

    def __repr__(self) -> str:
        return f"lazy({self.module!r}, {self.attr!r})"


def library(name: str) -> LibraryOp:
    """The ``run`` of a backend that is the compiled op ``nolabels_C::<name>``."""
    return LibraryOp(name)


def lazy(module: str, attr: str) -> LazyFunction:
    """The ``run`` of a backend implemented by ``module.attr``, imported on first use."""
    return LazyFunction(module, attr)


# Which compiled kernels the loaded libraries have, filled at define_op (import) time,
# so that the check is a dict lookup under torch.compile.
_HAS_KERNEL: dict[tuple[str, str], bool] = {}
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def _has_kernel(op: str, key: str) -> bool:
    if (op, key) not in _HAS_KERNEL:
        try:
            has = bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"nolabels_C::{op}", key))
        except RuntimeError:  # the schema is not there: a library built before this op
            has = False
        _HAS_KERNEL[(op, key)] = has
    return _HAS_KERNEL[(op, key)]


# --------------------------------------------------------------------------- backends
def _fmt_cap(cap: Sequence[int]) -> str:
    return f"{cap[0]}.{cap[1]}"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@dataclass(frozen=True)
class BackendImpl:
    """One backend of one op, declared as data.

    Attributes:
        name: one of :data:`BACKENDS`.
        run: the implementation, called with the op's arguments (see the op's module).
        devices: device types it takes ("cpu", "cuda"; :data:`ANY_DEVICE` for all).
        dtypes: floating dtypes it takes (of the call's ``dtype``).
        min_capability: lowest CUDA compute capability (major, minor) it runs on, or
            None; checked for calls on CUDA devices.
        max: upper limits on call arguments, e.g. ``{"topk": 16}`` (the call's
            ``topk`` must be <= 16).
        choices: allowed values of call arguments, e.g. ``{"head_dim": (16, 32)}``.
        needs: "library" (the compiled library of its device type, with the kernel
            of ``kernel``) and/or "triton" (importable; on CPU tensors only under
            ``TRITON_INTERPRET=1``, for tests, and never picked by ``auto``).
        kernel: the ``nolabels_C`` op whose kernel it needs; default: that of a
            :func:`library` ``run``.
        backward: for differentiable ops run as custom ops, the backward
            implementation; None where ``run`` is differentiable by torch itself.
    """

    name: str
    run: Callable[..., Any]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    min_capability: tuple[int, int] | None = None
    max: Mapping[str, int] = field(default_factory=dict)
    choices: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    needs: tuple[Requirement, ...] = ()
    kernel: str | None = None
    backward: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"backend name {self.name!r} is not one of {BACKENDS}")
        if self.kernel is None and isinstance(self.run, LibraryOp):
            object.__setattr__(self, "kernel", self.run.name)
        if "library" in self.needs and self.kernel is not None:
            for dev in self.devices:  # fill the kernel table now, not under tracing
                _has_kernel(self.kernel, _DISPATCH_KEY[dev])

    # -- derived from the fields
    def available(self) -> str | None:
        """None when what the backend ``needs`` is here (any call), else why not."""
        why = self.requirement_reasons()
        return "; ".join(why) if why else None

    def requirement_reasons(self) -> list[str]:
        why: list[str] = []
        if "triton" in self.needs:
            t = triton_status()
            if t is not None:
                why.append(t)
        if "library" in self.needs:
            for dev in self.devices:
                lib = library_cpu_status() if dev == "cpu" else _cuda_library_problem()
                if lib is not None:
                    why.append(lib)
                elif self.kernel is not None and not _has_kernel(self.kernel, _DISPATCH_KEY[dev]):
                    why.append(f"the loaded library has no {_DISPATCH_KEY[dev]} kernel for "
                               f"{self.kernel} (rebuild: scripts/dev_build.sh)")
        return why

    def takes(self, device: torch.device) -> bool:
        """``device``'s type is one of ``devices`` (what ``auto`` tries it on)."""
        return ANY_DEVICE in self.devices or device.type in self.devices

    def test_only(self, device: torch.device) -> bool:
        """Takes ``device`` only for testing (Triton's interpreter on CPU tensors)."""
        return "triton" in self.needs and device.type == "cpu" and not self.takes(device)

    def device_reasons(self, device: torch.device) -> list[str]:
        """Reasons from ``devices`` and ``min_capability`` for tensors on ``device``."""
        if not self.takes(device):
            if self.test_only(device):
                if triton_interpret():
                    return []
                return ["triton takes CPU tensors only under TRITON_INTERPRET=1 (for testing)"]
            kinds = "/".join(d.upper() for d in self.devices)
            return [f"the {self.name} backend takes {kinds} tensors, got {device.type}"]
        if device.type == "cuda" and self.min_capability is not None and torch.cuda.is_available():
            cap = tuple(torch.cuda.get_device_capability(device))
            if cap < tuple(self.min_capability):
                gpu = torch.cuda.get_device_name(device)
                return [f"{device} ({gpu}) has compute capability {_fmt_cap(cap)} < "
                        f"{_fmt_cap(self.min_capability)}, the lowest the {self.name} "
                        "backend runs on"]
        return []

    def call_reasons(self, call: Mapping[str, Any]) -> list[str]:
        """Reasons from ``dtypes``, ``max`` and ``choices`` (keys absent from ``call``
        are not checked)."""
        why: list[str] = []
        dtype = call.get("dtype")
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            why.append(f"dtype {_dtype_name(dtype)} is not one of {names}")
        for key, limit in self.max.items():
            if key in call and call[key] > limit:
                why.append(f"{key}={call[key]} > {limit}")
        for key, allowed in self.choices.items():
            if key in call and call[key] not in allowed:
                why.append(f"{key.replace('_', ' ')} {call[key]} is not one of {tuple(allowed)}")
        return why

    def not_supported_reasons(self, call: Mapping[str, Any]) -> list[str]:
        """Every reason this backend cannot take ``call`` (empty: it can).

        ``call`` holds ``device`` (torch.device) and any of ``dtype`` and the keys of
        ``max`` / ``choices``."""
        why = self.requirement_reasons()
        if "device" in call:
            why += self.device_reasons(torch.device(call["device"]))
        return why + self.call_reasons(call)

    def declared(self) -> str:
        """One line: what the backend declares (for ``nolabels info``)."""
        parts = ["any device" if ANY_DEVICE in self.devices else f"devices {'/'.join(self.devices)}"]
        if "triton" in self.needs and not self.takes(torch.device("cpu")):
            parts[0] += " (cpu under TRITON_INTERPRET=1)"
        parts.append("dtypes " + "/".join(_dtype_name(d) for d in self.dtypes))
        if self.min_capability is not None:
            parts.append(f"compute capability >= {_fmt_cap(self.min_capability)}")
        parts += [f"{k} <= {v}" for k, v in self.max.items()]
        parts += [f"{k.replace('_', ' ')} in {tuple(v)}" for k, v in self.choices.items()]
        if self.needs:
            needs = []
            for n in self.needs:
                needs.append(f"library ({self.kernel})" if n == "library" and self.kernel else n)
            parts.append("needs " + ", ".join(needs))
        return "; ".join(parts)


# --------------------------------------------------------------------------- dispatch
def preferred_backend(op: str, names: Sequence[str]) -> str:
    """``NOLABELS_BACKEND`` where the op has that backend, else "auto".

    Raises ``ValueError`` for a value that is no backend at all (a typo)."""
    pref = (os.environ.get("NOLABELS_BACKEND") or "auto").strip() or "auto"
    if pref == "auto":
        return "auto"
    if pref not in BACKENDS:
        raise ValueError(
            f"{op}: NOLABELS_BACKEND={pref!r} is not a backend; expected 'auto' or one of "
            + ", ".join(repr(n) for n in BACKENDS)
        )
    return pref if pref in names else "auto"


def dispatch(
    op: str,
    impls: Sequence[BackendImpl],
    backend: str,
    device: torch.device,
    call: Mapping[str, Any],
) -> BackendImpl:
    """Pick the backend for one call, or raise ``ValueError`` saying why none fits.

    ``impls`` in priority order; ``call`` as in :meth:`BackendImpl.not_supported_reasons`
    (its ``device`` defaults to ``device``)."""
    if "device" not in call:
        call = {**call, "device": device}
    by_name = {b.name: b for b in impls}
    if backend == "auto":
        backend = preferred_backend(op, list(by_name))
    if backend == "auto":
        for impl in impls:
            # not tried (nor probed) off its own device types
            if impl.takes(device) and not impl.not_supported_reasons(call):
                return impl
        rejected = [f"{b.name}: " + "; ".join(b.not_supported_reasons(call) or ["for tests only"])
                    for b in impls]
        raise ValueError(f"{op}: no backend can take this call:\n  " + "\n  ".join(rejected))
    if backend not in by_name:
        kind = "unknown backend" if backend not in BACKENDS else "no such backend for this op:"
        raise ValueError(
            f"{op}: {kind} {backend!r}; expected one of 'auto', "
            + ", ".join(repr(n) for n in by_name)
        )
    why = by_name[backend].not_supported_reasons(call)
    if why:
        raise ValueError(f"{op}: backend {backend!r} cannot take this call: " + "; ".join(why))
    return by_name[backend]


# --------------------------------------------------------------------------- ops
OP_REGISTRY: dict[str, tuple[BackendImpl, ...]] = {}


@dataclass(frozen=True)
class OpDef:
    """An op's name and its backends in priority order (see :func:`define_op`)."""

    name: str
    backends: tuple[BackendImpl, ...]

    def backend(self, name: str) -> BackendImpl:
        """The backend called ``name`` (``KeyError`` if the op has none)."""
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(f"{self.name}: no backend {name!r}")

    def select(self, backend: str, call: Mapping[str, Any]) -> BackendImpl:
        """:func:`dispatch` for this op; ``call["device"]`` is the inputs' device."""
        return dispatch(self.name, self.backends, backend, torch.device(call["device"]), call)

    def custom_op(self, fake: Callable[..., Any], name: str | None = None):
        """Decorator: make ``fn`` the ``torch.library`` custom op ``nolabels::<name>``
        (default: the op's name) with the fake (meta) implementation ``fake``.

        The function's last argument is the backend name, a string chosen by
        :meth:`select` outside the op, so ``torch.compile`` sees one opaque node."""

        def wrap(fn: Callable[..., Any]):
            op = torch.library.custom_op(f"nolabels::{name or self.name}", mutates_args=())(fn)
            op.register_fake(fake)
            return op

        return wrap


def define_op(name: str, backends: Sequence[BackendImpl]) -> OpDef:
    """Declare op ``name`` with ``backends`` (priority order for ``auto``); registered
    for ``nolabels info``."""
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: backend names repeat: {names}")
    op = OpDef(name, tuple(backends))
    OP_REGISTRY[name] = op.backends
    return op


def explain(impls: Sequence[BackendImpl]) -> dict[str, str]:
    """Availability of each backend of an op on this machine (whatever the call)."""
    out = {}
    for b in impls:
        why = b.available()
        out[b.name] = "available" if why is None else f"unavailable: {why}"
    return out

