"""GPU code generation checked without a GPU: the Triton kernels compiled for sm_90/sm_80
(tests/triton_aot.py) and the resources of the CUDA library that CI builds.

Neither checks results or speed (the gpu-marked tests and benchmarks/gpu_check.sh do that
on a GPU); both fail on things that would only show up at launch on a GPU: a kernel the
real Triton compiler rejects, shared memory over a block's limit, register spills, a
missing architecture in the fat binary.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import triton_aot  # noqa: E402


def _cuobjdump() -> str | None:
    try:
        path = triton_aot._tool("cuobjdump")
    except ImportError:
        return None
    return path if os.access(path, os.X_OK) else None


def _compiled_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    return env


# --------------------------------------------------------------------------- Triton
def test_catalogue_covers_every_kernel():
    """Each @triton.jit kernel that a host wrapper launches is in the AOT catalogue."""
    import importlib

    launched = set()
    for mod in ("pseudo_label", "attention", "coder"):
        src = (HERE.parent / "python" / "nolabels" / "triton" / f"{mod}.py").read_text()
        # kernels are launched as name[grid](...), possibly through an autotuned alias
        for name in re.findall(r"\b(_[A-Za-z0-9_]+)\[", src):
            obj = getattr(importlib.import_module(f"nolabels.triton.{mod}"), name, None)
            if obj is not None and callable(obj) and name not in ("_fwd_tuned",):
                launched.add((mod, name))
        if "_fwd_tuned[" in src:
            launched.add((mod, "_fwd"))
    covered = {(c.module, c.kernel) for c in triton_aot.catalogue()}
    assert launched, "no kernel launches found: the pattern is out of date"
    assert launched <= covered, f"kernels missing from tests/triton_aot.py: {sorted(launched - covered)}"
    quick = {(c.module, c.kernel) for c in triton_aot.catalogue(quick=True)}
    assert quick, "the CI subset is empty"


@pytest.mark.parametrize("arch", [90])
def test_triton_kernels_compile_for_gpu(arch):
    """The CI subset (largest tiles, worst-case top-k, each dtype class) compiles to a
    cubin within the target's shared-memory limit and the spill budget. sm_80 and the
    full catalogue: ``python tests/triton_aot.py`` (about 4 minutes on 2 cores)."""
    pytest.importorskip("triton")
    if _cuobjdump() is None:
        pytest.skip("triton's cuobjdump is not available")
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_aot.py"), "--quick", "--arch", str(arch), "--jobs", "2"],
        capture_output=True, text=True, env=_compiled_env(), timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert re.search(r"(\d+)/\1 compiled within limits", proc.stdout), proc.stdout[-2000:]


def test_aot_checker_reports_a_broken_kernel():
    """The checker is not vacuous: a case whose tiles overflow shared memory fails."""
    case = next(c for c in triton_aot.catalogue() if c.kernel == "_mm_nt_kernel")
    big = triton_aot.Case(case.module, case.kernel, "oversized", case.types,
                          dict(case.constexprs, BLOCK_R=128, BLOCK_C=128, BLOCK_K=128), 8, 4)
    code = (
        f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import triton_aot as t;"
        "c = t.Case(**json.loads(sys.argv[1])); r = t.compile_case(c, 90);"
        "print(r.ok, r.shared, r.problems, r.error[:200])"
    )
    import json
    from dataclasses import asdict

    if _cuobjdump() is None:
        pytest.skip("triton's cuobjdump is not available")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(big))],
                          capture_output=True, text=True, env=_compiled_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("False"), proc.stdout
    assert "shared memory" in proc.stdout or "OutOfResources" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- CUDA library
def _cuda_library() -> str:
    from nolabels import _lib

    path = _lib.STATUS.cuda_path
    if not path:
        pytest.skip("the CUDA kernel library was not built (no nvcc at build time)")
    return path


def _res_usage_by_arch(lib: str) -> dict[str, dict[str, dict[str, int]]]:
    """{arch: {function: {REG, STACK, SHARED, LOCAL}}} from ``cuobjdump -res-usage``."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("triton's cuobjdump is not available")
    text = subprocess.run([tool, "-res-usage", lib], capture_output=True, text=True, check=True).stdout
    out: dict[str, dict[str, dict[str, int]]] = {}
    arch = None
    func = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Fatbin"):
            kind = line.split()[1]
            arch = None
            pending_elf = kind == "elf"
        elif line.startswith("arch =") and pending_elf:
            arch = line.split("=")[1].strip()
            out.setdefault(arch, {})
        elif line.startswith("Function ") and arch:
            func = line[len("Function "):].rstrip(":")
        elif line.startswith("REG:") and arch and func:
            out[arch][func] = {k: int(v) for k, v in (t.split(":", 1) for t in line.split())
                               if k in ("REG", "STACK", "SHARED", "LOCAL")}
            func = None
    return out


def _ptx_archs(lib: str) -> set[str]:
    tool = _cuobjdump()
    text = subprocess.run([tool, "-lptx", lib], capture_output=True, text=True).stdout
    return set(re.findall(r"sm_\d+", text))


def test_cuda_library_has_every_kernel_for_every_arch():
    """sm_80 and sm_90 machine code for each kernel, and sm_90 PTX for newer GPUs."""
    lib = _cuda_library()
    usage = _res_usage_by_arch(lib)
    assert {"sm_80", "sm_90"} <= set(usage), sorted(usage)
    assert usage["sm_80"].keys() == usage["sm_90"].keys()
    declared = set()
    for cu in (HERE.parent / "kernels").glob("*.cu"):
        declared |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", cu.read_text()))
    assert len(declared) >= 9, declared
    for arch in ("sm_80", "sm_90"):
        names = " ".join(usage[arch])  # mangled names contain the plain ones
        missing = [k for k in sorted(declared) if k not in names]
        assert not missing, f"{arch}: {missing} missing from {lib}"
    assert "sm_90" in _ptx_archs(lib)


def test_cuda_kernels_do_not_spill_or_overflow_static_shared_memory():
    lib = _cuda_library()
    usage = _res_usage_by_arch(lib)
    problems = []
    for arch, funcs in usage.items():
        for name, r in funcs.items():
            if r["STACK"] > triton_aot.STACK_BUDGET or r["LOCAL"] > 0:
                problems.append(f"{arch} {name}: stack {r['STACK']} B, local {r['LOCAL']} B")
            if r["SHARED"] > 48 * 1024:  # static shared memory cap
                problems.append(f"{arch} {name}: static shared {r['SHARED']} B > 48 KiB")
            if r["REG"] > 255:
                problems.append(f"{arch} {name}: {r['REG']} registers")
    assert not problems, "\n".join(problems)
