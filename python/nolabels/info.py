"""``nolabels info``: what this installation can do, and why not."""
from __future__ import annotations

import platform
import sys

import torch

from nolabels import _lib
from nolabels.backends import triton_interpret


def _op_tables() -> dict[str, tuple]:
    import nolabels.ops  # noqa: F401 - importing the ops registers them
    from nolabels.backends import OP_REGISTRY

    return dict(OP_REGISTRY)


def info_dict() -> dict:
    """Everything ``info()`` prints, as a dict (JSON-serialisable)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001 - report any import failure
        triton_version = f"not importable ({type(e).__name__}: {e})"
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB")
    st = _lib.STATUS
    ops = {}
    for op, impls in _op_tables().items():
        ops[op] = {}
        for b in impls:
            why = b.available()
            if why is not None:
                ops[op][b.name] = f"unavailable: {why}"
            elif b.name == "triton" and not torch.cuda.is_available() and not triton_interpret():
                ops[op][b.name] = "importable, but no CUDA device (CPU tensors run only under TRITON_INTERPRET=1)"
            else:
                ops[op][b.name] = "available"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": triton_interpret(),
        "cpu_threads": torch.get_num_threads(),
        "devices": devices or ["cpu only (no CUDA device visible)"],
        "library": {
            "cpu": st.cpu_path if st.cpu_loaded else f"not loaded: {st.cpu_error}",
            "cuda": st.cuda_path if st.cuda_loaded else f"not loaded: {st.cuda_error}",
            "built_with_torch": st.build_info.get("torch_build_version"),
            "cuda_compiler": st.build_info.get("cuda_compiler_version") or None,
            "cuda_archs": st.build_info.get("cuda_archs") or None,
        },
        "backends": ops,
    }


def info(file=None) -> dict:
    """Print versions, devices, the kernel library and every backend's status.

    Returns the same facts as a dict.
    """
    d = info_dict()
    out = file or sys.stdout
    w = lambda s="": print(s, file=out)  # noqa: E731
    w(f"nolabels  python {d['python']}  torch {d['torch']} (CUDA {d['torch_cuda']})  triton {d['triton']}")
    w(f"platform  {d['platform']}  cpu threads {d['cpu_threads']}")
    w("devices   " + "; ".join(d["devices"]))
    lib = d["library"]
    w(f"library   cpu:  {lib['cpu']}")
    w(f"          cuda: {lib['cuda']}")
    w(f"          built with torch {lib['built_with_torch']}, nvcc {lib['cuda_compiler']}, archs {lib['cuda_archs']}")
    if d["triton_interpret"]:
        w("          TRITON_INTERPRET=1: Triton kernels run on the CPU (slow; for testing)")
    for op, table in d["backends"].items():
        w(f"op {op}:")
        for name, status in table.items():
            w(f"  {name:7s} {status}")
    return d
