"""The compiled libraries load on glibc 2.28 (the manylinux_2_28 floor of torch's wheels).

Reads the dynamic section and the version requirements (.gnu.version_r) of the
installed _C.so / _C_cuda.so: no glibc version newer than 2.28 may be required
(csrc/compat/glibc_compat.cpp pins them), and the libraries that hold the
pinned functions before glibc 2.34 must be DT_NEEDED.
"""
from __future__ import annotations

import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from nolabels import _lib

GLIBC_FLOOR = (2, 28)
SHT_DYNAMIC = 6
SHT_GNU_VERNEED = 0x6FFFFFFE
DT_NEEDED = 1

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="the glibc pinning is for Linux x86_64",
)


def _cstr(data: bytes, off: int) -> str:
    return data[off : data.index(b"\0", off)].decode()


def elf_requirements(path: str) -> tuple[list[str], dict[str, set[str]]]:
    """DT_NEEDED names and, per library file, the symbol versions an ELF64
    little-endian shared object requires (from .gnu.version_r)."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not ELF64 LE"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed: list[str] = []
    versions: dict[str, set[str]] = {}
    for _name, typ, _flags, _addr, off, size, link, info, _align, _entsize in sections:
        strtab_off = sections[link][4]
        if typ == SHT_DYNAMIC:
            for pos in range(off, off + size, 16):
                tag, val = struct.unpack_from("<qQ", data, pos)
                if tag == DT_NEEDED:
                    needed.append(_cstr(data, strtab_off + val))
        elif typ == SHT_GNU_VERNEED:
            pos = off
            for _ in range(info):
                _ver, cnt, file_, aux, nxt = struct.unpack_from("<HHIII", data, pos)
                names = versions.setdefault(_cstr(data, strtab_off + file_), set())
                apos = pos + aux
                for _ in range(cnt):
                    _hash, _fl, _other, name, anext = struct.unpack_from("<IHHII", data, apos)
                    names.add(_cstr(data, strtab_off + name))
                    apos += anext
                pos += nxt
    return needed, versions


def _glibc(version: str) -> tuple[int, ...] | None:
    if not version.startswith("GLIBC_") or not version[6:7].isdigit():
        return None  # GLIBC_PRIVATE, GLIBCXX_*, GCC_*, ...
    return tuple(int(p) for p in version[6:].split("."))


def _built_libraries() -> list[str]:
    st = _lib.STATUS
    libs = [p for p in (st.cpu_path, st.cuda_path) if p and os.path.exists(p)]
    return libs


LIBS = _built_libraries()


@pytest.mark.skipif(not LIBS, reason="no compiled library in this install")
@pytest.mark.parametrize("lib", LIBS, ids=[os.path.basename(p) for p in LIBS])
def test_requires_no_glibc_newer_than_2_28(lib):
    _, versions = elf_requirements(lib)
    newer = sorted(
        f"{v} ({f})"
        for f, vs in versions.items()
        for v in vs
        if (g := _glibc(v)) is not None and g > GLIBC_FLOOR
    )
    assert not newer, f"{os.path.basename(lib)} needs glibc > 2.28: {newer}"


@pytest.mark.skipif(not LIBS, reason="no compiled library in this install")
@pytest.mark.parametrize("lib", LIBS, ids=[os.path.basename(p) for p in LIBS])
def test_needs_the_pre_2_34_glibc_libraries(lib):
    # dlopen@GLIBC_2.2.5 is in libdl.so.2, pthread_create@GLIBC_2.2.5 in
    # libpthread.so.0, shm_open@GLIBC_2.2.5 in librt.so.1 on glibc < 2.34.
    needed, _ = elf_requirements(lib)
    missing = {"libpthread.so.0", "libdl.so.2", "librt.so.1"} - set(needed)
    assert not missing, f"{os.path.basename(lib)}: DT_NEEDED lacks {sorted(missing)} ({needed})"


@pytest.mark.skipif(not LIBS, reason="no compiled library in this install")
def test_every_pinned_symbol_binds_at_load():
    """LD_BIND_NOW resolves every imported function, the pinned old versions
    included, when the library loads (not just the ones a test happens to call)."""
    code = (
        "import torch\n"
        "from nolabels import _lib\n"
        "st = _lib.STATUS\n"
        "assert st.cpu_loaded, st.cpu_error\n"
        "if st.cuda_path and torch.version.cuda:\n"
        "    assert st.cuda_loaded, st.cuda_error\n"
    )
    env = dict(os.environ, LD_BIND_NOW="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
