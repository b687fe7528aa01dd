"""Compile a .cu file's unchanged source for the CPU against the sim.h headers (tests only).

``load(cu, api)`` rewrites each launch ``kernel<<<grid, block, smem, stream>>>(args)`` into
``sim::launch(kernel, sim::LaunchCfg(grid, block, smem, stream), args)`` (the only CUDA syntax g++ cannot
read), appends ``api`` (extern "C" wrappers for ctypes), builds a shared library with g++
-std=c++20 (cached by content hash) and returns it as a ``ctypes.CDLL``.
``executable(cu, main)`` builds a program instead, with ThreadSanitizer by default.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)


_DYN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];")


def rewrite_launches(src: str) -> str:
    """The two CUDA constructs g++ cannot read: launches and dynamic shared memory."""
    out = _LAUNCH.sub(lambda m: f"sim::launch({m.group(1)}, sim::LaunchCfg({m.group(2)}), ", src)
    out = _DYN_SMEM.sub(lambda m: f"{m.group(1)}* {m.group(2)} = "
                        f"reinterpret_cast<{m.group(1)}*>(sim::dynamic_smem());", out)
    if "<<<" in out or "extern __shared__" in out:
        raise ValueError("a kernel launch or dynamic shared array was not rewritten")
    return out


@functools.cache
def unavailable_reason() -> str | None:
    """Why the simulator cannot be built here (None when it can): it needs g++ with C++20
    ``<barrier>`` (GCC 11 or newer)."""
    if shutil.which("g++") is None:
        return "g++ not found"
    probe = "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text(probe)
        proc = subprocess.run(["g++", "-std=c++20", "-pthread", str(src), "-o", str(Path(d) / "probe")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        return f"g++ cannot build C++20 <barrier> (GCC >= 11 needed): {proc.stderr.strip()[-200:]}"
    return None


def _compile(cu: Path, extra: str, *, shared: bool, tsan: bool, defines: tuple[str, ...] = ()) -> Path:
    if shutil.which("g++") is None:
        raise RuntimeError("g++ not found")
    # #line: compiler messages and synccheck reports name the .cu file and its own lines
    src = f'#line 1 "{cu}"\n' + rewrite_launches(cu.read_text()) + '\n#line 1 "test-api"\n' + extra
    headers = "".join(p.read_text() for p in sorted(HERE.glob("*.h")))
    key = hashlib.sha256((src + headers + str((shared, tsan, defines))).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "nolabels_cuda_sim"
    cache.mkdir(exist_ok=True)
    out = cache / f"{cu.stem}_{key}{'.so' if shared else '.bin'}"
    if not out.exists():
        cpp = cache / f"{cu.stem}_{key}.cpp"
        cpp.write_text(src)
        flags = ["-fsanitize=thread", "-O1", "-g"] if tsan else ["-O2"]
        if shared:
            flags += ["-fPIC", "-shared"]
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        # -I order: this folder's ptx.cuh and CUDA headers shadow the real ones; csrc/
        # last (the kernels include csrc/norm_eps.h, as the CMake CUDA target allows).
        cmd = ["g++", "-std=c++20", *flags, *(f"-D{d}" for d in defines), "-pthread", "-w",
               f"-I{HERE}", f"-I{cu.parent}", f"-I{HERE.parents[2] / 'csrc'}", str(cpp),
               "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed:\n{proc.stderr[-6000:]}")
        tmp.replace(out)
    return out


def load(cu: Path, api: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The kernels of ``cu`` plus ``api`` (extern "C" wrappers) as a library for ctypes;
    ``defines``: preprocessor macros (e.g. ptx.cuh's SIM_CP_ASYNC_AT_ISSUE)."""
    lib = ctypes.CDLL(str(_compile(cu, api, shared=True, tsan=False, defines=defines)))
    lib.nolabels_sim_error_message.restype = ctypes.c_char_p  # what failed the last launch
    return lib


def executable(cu: Path, main: str, *, tsan: bool = True, defines: tuple[str, ...] = ()) -> Path:
    """The kernels of ``cu`` plus ``main`` (a C++ main) as a program, by default built with
    ThreadSanitizer: running it is a data-race check of the kernels' shared-memory use
    (like compute-sanitizer's racecheck), since each CUDA thread is a real thread here."""
    return _compile(cu, main, shared=False, tsan=tsan, defines=defines)


def assert_race_free(cu: Path, main: str, defines: tuple[str, ...] = (), timeout: int = 900) -> None:
    """Build ``main`` with the kernels of ``cu`` under ThreadSanitizer, run it, and fail on any
    race report or on a run that does not end by printing ``done`` (pytest-skips when the
    compiler has no TSan runtime)."""
    import pytest

    try:
        exe = executable(cu, main, defines=defines)
    except RuntimeError as e:
        if "sanitize" in str(e).lower() or "tsan" in str(e).lower():
            pytest.skip(f"ThreadSanitizer unavailable: {str(e)[-300:]}")
        raise
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout,
                          env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr[-6000:]
    assert proc.returncode == 0 and proc.stdout.strip() == "done", (proc.returncode, proc.stdout, proc.stderr[-3000:])
