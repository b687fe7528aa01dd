"""``nolabels info``: what this installation can do, and why not."""
from __future__ import annotations

import platform
import sys

import torch

from nolabels import _lib
from nolabels.backends import OP_REGISTRY
from nolabels.triton import interpret as triton_interpret


def visible_devices() -> list[torch.device]:
    """The CPU, then every visible CUDA device."""
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


def backend_table(devices: list[torch.device] | None = None) -> dict[str, dict[str, dict]]:
    """Per op, per backend (in ``auto``'s order): what it declares, and per device every
    reason it cannot run there (an empty list: it can, for calls within its limits)."""
    import nolabels.ops  # noqa: F401 - importing the ops defines them

    devs = visible_devices() if devices is None else list(devices)
    table: dict[str, dict[str, dict]] = {}
    for op, impls in OP_REGISTRY.items():
        table[op] = {
            b.name: {
                "declares": b.declared(),
                "devices": {str(d): b.not_supported_reasons({"device": d}) for d in devs},
            }
            for b in impls
        }
    return table


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
        "backends": backend_table(),
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
    w("backends  per op, in the order backend=\"auto\" tries them; per device: ok, or every reason")
    for op, table in d["backends"].items():
        w(f"op {op}:")
        for name, entry in table.items():
            w(f"  {name:7s} {entry['declares']}")
            for dev, why in entry["devices"].items():
                w(f"    {dev:8s} " + ("ok" if not why else "no: " + "; ".join(why)))
    return d
