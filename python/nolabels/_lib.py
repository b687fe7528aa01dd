"""Loading of the compiled kernel libraries (LibTorch stable ABI).

``_C`` holds the op schemas and the CPU kernels; ``_C_cuda`` the CUDA kernels
and is loaded only when torch itself has CUDA, so a CPU-only torch still gets
the CPU kernels. Nothing here raises: failures are recorded and reported by
``nolabels.info()`` and by the backends that need the library.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

_PKG = Path(__file__).resolve().parent


@dataclass
class LibraryStatus:
    """Where each library is and why it did not load, if it did not."""

    cpu_path: str | None = None
    cpu_error: str | None = None
    cuda_path: str | None = None
    cuda_error: str | None = None
    build_info: dict = field(default_factory=dict)

    @property
    def cpu_loaded(self) -> bool:
        return self.cpu_path is not None and self.cpu_error is None

    @property
    def cuda_loaded(self) -> bool:
        return self.cuda_path is not None and self.cuda_error is None


def _find(stem: str) -> Path | None:
    """Path of nolabels/<stem>.so: where the import system finds ``nolabels.<stem>``
    (this also follows an editable install's redirect), else next to this file."""
    try:
        spec = importlib.util.find_spec(f"nolabels.{stem}")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and spec.origin.endswith(".so"):
        return Path(spec.origin)
    hits = sorted(_PKG.glob(f"{stem}.so"))
    return hits[0] if hits else None


def _load() -> LibraryStatus:
    st = LibraryStatus()
    lib = _find("_C")
    info_file = (lib.parent if lib else _PKG) / "_build_info.json"
    if info_file.exists():
        try:
            st.build_info = json.loads(info_file.read_text())
        except ValueError:
            pass
    if os.environ.get("NOLABELS_NO_LIBRARY") == "1":
        st.cpu_error = st.cuda_error = "disabled by NOLABELS_NO_LIBRARY=1"
        return st
    path = _find("_C")
    if path is None:
        st.cpu_error = f"no compiled library in {_PKG} (package installed without building?)"
        st.cuda_error = st.cpu_error
        return st
    st.cpu_path = str(path)
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        st.cpu_error = f"failed to load {path.name}: {e}"
        st.cuda_error = "the CPU library did not load"
        return st
    cpath = _find("_C_cuda")
    if cpath is None:
        st.cuda_error = "library built without CUDA kernels (nvcc was not found at build time)"
    elif torch.version.cuda is None:
        st.cuda_path = str(cpath)
        st.cuda_error = "torch was built without CUDA"
    else:
        st.cuda_path = str(cpath)
        try:
            torch.ops.load_library(str(cpath))
        except (OSError, RuntimeError) as e:
            st.cuda_error = f"failed to load {cpath.name}: {e}"
    return st


STATUS: LibraryStatus = _load()
