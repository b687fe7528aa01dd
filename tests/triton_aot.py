"""Ahead-of-time compilation of every Triton kernel for real GPU targets, without a GPU.

Run: python tests/triton_aot.py [--quick] [--arch 90 80] [--jobs 2] [--json out.json]
(TRITON_INTERPRET must be unset), or through tests/test_gpu_codegen.py.

Why. CI has no GPU, so the Triton kernels run there only under ``TRITON_INTERPRET=1``,
which accepts programs the real compiler rejects (tl.dot shapes, layouts, tl.topk/tl.join
lowering, unsupported dtype mixes) and says nothing about resources. This module compiles
each kernel with the launch parameters the host wrappers really use on a GPU (the config
tables are imported from the kernel modules, not copied) through triton's own pipeline
down to a cubin for sm_90 / sm_80, then reads the resources:

  * shared memory (``metadata.shared``, dynamic) against the per-block opt-in limit of the
    target (H100: 227 KiB, A100: 163 KiB) -- over it, the launch fails on a GPU;
  * registers and stack frame (spills) from ``cuobjdump -res-usage`` (shipped with triton).

Specialisation: pointers 16-byte aligned and innermost strides equal to 1 (the contiguous
case the wrappers arrange), all other integers plain (odd sizes), as triton would
specialise such a launch. What it cannot check: results and timing (GPU tests and
benchmarks/gpu_check.sh do that).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Per-block shared-memory limits (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {90: 232448, 80: 166912}
# Stack frame (mostly spills) we accept per thread; a kernel over it is a regression.
STACK_BUDGET = 1024

_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass
class Case:
    """One kernel specialisation: what a GPU launch of the host wrapper compiles."""

    module: str  # module under nolabels.triton
    kernel: str  # attribute name of the @triton.jit function
    label: str
    types: dict[str, str]  # non-constexpr argument -> triton type ("*bf16", "i32", "fp32")
    constexprs: dict[str, object]  # constexpr arguments and specialised-to-1 strides
    num_warps: int = 4
    num_stages: int = 3
    quick: bool = True  # part of the CI subset


@dataclass
class Result:
    label: str
    arch: int
    ok: bool
    seconds: float
    shared: int = 0
    regs: int = 0
    stack: int = 0
    error: str = ""
    problems: list[str] = field(default_factory=list)


def _ptr(dtype: str) -> str:
    return "*" + _TORCH_TO_TRITON.get(dtype, dtype)


# --------------------------------------------------------------------------- catalogue
def _pseudo_label_cases() -> list[Case]:
    from nolabels.triton import pseudo_label as m

    out = []
    for dtype, configs in (("float32", m._CONFIGS_F32), ("bfloat16", m._CONFIGS_LOWP), ("float16", m._CONFIGS_LOWP)):
        for i, cfg in enumerate(configs):
            for topk in (1, 16):
                types = {
                    "X": _ptr(dtype), "W": _ptr(dtype), "P": "*fp32", "I": "*i64", "H": "*fp32", "L": "*fp32",
                    "N": "i32", "C": "i32", "D": "i32", "stride_xn": "i32", "stride_wc": "i32", "scale": "fp32",
                }
                const = dict(cfg.kwargs, stride_xd=1, stride_wd=1, NORMALIZE=True, TOPK=topk,
                             KPAD=max(2, 1 << (topk - 1).bit_length()), IS_FP32=dtype == "float32", UPCAST=False)
                out.append(Case("pseudo_label", "_fwd", f"pseudo_label {dtype} cfg{i} {cfg.kwargs} topk={topk}",
                                types, const, cfg.num_warps, cfg.num_stages,
                                quick=(dtype != "float16" and topk == 16)))
    return out


def _attention_cases() -> list[Case]:
    import torch
    from nolabels.triton import attention as m

    out = []
    seq = ["s_qb", "s_ql", "s_qh", "s_kb", "s_kl", "s_kh", "s_vb", "s_vl", "s_vh"]
    prm = ["s_pkp", "s_pkh", "s_pvp", "s_pvh"]
    for dtype in ("float32", "bfloat16", "float16"):
        tdt = getattr(torch, dtype)
        lowp_quick = dtype != "float16"
        for hd in m.HEAD_DIMS:
            f32 = m._f32_dots(tdt)
            # forward
            cfg = m.fwd_config(hd, tdt)
            types = {a: _ptr(dtype) for a in ("Q", "K", "V", "PK", "PV", "Out")}
            types.update({"Lse": "*fp32", "H": "i32", "L": "i32", "P": "i32", "qk_scale": "fp32"})
            types.update({s: "i32" for s in seq + prm + ["s_ob", "s_ol", "s_oh"]})
            const = {"HEAD_DIM": hd, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "F32": f32, "RNE": False}
            out.append(Case("attention", "_fwd", f"attention._fwd {dtype} d={hd} {cfg}", types, const,
                            cfg["num_warps"], cfg["num_stages"], quick=lowp_quick))
            # backward preprocess (delta = rowsum(dO * O))
            types = {"Out": _ptr(dtype), "DO": _ptr(dtype), "Delta": "*fp32", "H": "i32", "L": "i32"}
            types.update({s: "i32" for s in ("s_ob", "s_ol", "s_oh", "s_db", "s_dl", "s_dh")})
            out.append(Case("attention", "_bwd_preprocess", f"attention._bwd_preprocess {dtype} d={hd}", types,
                            {"HEAD_DIM": hd, "BLOCK_M": m.PRE_BLOCK}, 4, 1, quick=False))
            # backward
            cfg = m.bwd_config(hd, tdt)
            types = {a: _ptr(dtype) for a in ("Q", "K", "V", "PK", "PV", "DO", "DQ", "DK", "DV")}
            types.update({a: "*fp32" for a in ("Lse", "Delta", "DPK", "DPV")})
            types.update({s: "i32" for s in seq + prm + ["s_db", "s_dl", "s_dh"]})
            types.update({f"s_d{t}{x}": "i32" for t in "qkv" for x in "blh"})
            types.update({a: "i32" for a in ("B", "H", "L", "P", "batches_per_group", "n_prompt_programs")})
            types.update({"sm_scale": "fp32", "qk_scale": "fp32"})
            const = {"HEAD_DIM": hd, "BLOCK_OUTER": cfg["BLOCK_OUTER"], "BLOCK_INNER": cfg["BLOCK_INNER"],
                     "F32": f32, "RNE": False}
            out.append(Case("attention", "_bwd", f"attention._bwd {dtype} d={hd} {cfg}", types, const,
                            cfg["num_warps"], cfg["num_stages"], quick=lowp_quick))
    return out


def _coder_cases() -> list[Case]:
    from nolabels.triton import coder as m

    out = []
    for dtype in ("float32", "bfloat16", "float16"):
        out.append(Case("coder", "_row_inv_norm_kernel", f"coder._row_inv_norm_kernel {dtype}",
                        {"X": _ptr(dtype), "OUT": "*fp32", "R": "i32", "D": "i32", "stride_r": "i32"},
                        {"stride_d": 1, "SQUARE": True, "BLOCK_R": 32, "BLOCK_D": 128}, 4, 3, quick=False))
        for k in (1, 16, 64, 100, 256):
            kp = max(16, 1 << (k - 1).bit_length())
            meta = m.topk_meta(kp)
            types = {"Q": _ptr(dtype), "K": _ptr(dtype), "OUT": "*i64", "N": "i32", "M": "i32", "D": "i32",
                     "m_per_split": "i32", "stride_qn": "i32", "stride_km": "i32"}
            const = {"stride_qd": 1, "stride_kd": 1, "NORMALIZE": True, "TOPK": k, "KP": kp, "S": 8,
                     "IS_FP32": dtype == "float32", "UPCAST": False,
                     **{key: v for key, v in meta.items() if key.startswith("BLOCK")}}
            out.append(Case("coder", "_topk_kernel", f"coder._topk_kernel {dtype} k={k} {meta}", types, const,
                            meta["num_warps"], meta["num_stages"], quick=(dtype != "float16" and k in (16, 256))))
        meta = m.SCORES_META
        out.append(Case("coder", "_scores_kernel", f"coder._scores_kernel {dtype}",
                        {"X": _ptr(dtype), "S0": "*fp32", "PAD": "*fp32", "N1": "*i64", "OUT": "*fp32",
                         "N": "i32", "C": "i32", "D": "i32", "P": "i32", "stride_xn": "i32"},
                        {"stride_xd": 1, **{key: v for key, v in meta.items() if key.startswith("BLOCK")}},
                        meta["num_warps"], meta["num_stages"], quick=dtype == "bfloat16"))
        out.append(Case("coder", "_rowdot_kernel", f"coder._rowdot_kernel {dtype}",
                        {"U": "*fp32", "X": _ptr(dtype), "XF": "*fp32", "OUT": "*fp32", "R": "i32", "D": "i32",
                         "stride_xr": "i32"}, {"stride_xd": 1, "BLOCK_R": 32, "BLOCK_D": 128}, 4, 3, quick=False))
    meta = m.MM_META
    for flags in ((False, False, True), (True, False, False), (True, True, False)):
        out.append(Case("coder", "_mm_nt_kernel", f"coder._mm_nt_kernel rs/cs/ks={flags}",
                        {"A": "*fp32", "B": "*fp32", "OUT": "*fp32", "RS": "*fp32", "CS": "*fp32", "KS": "*fp32",
                         "R": "i32", "Cn": "i32", "Kd": "i32", "stride_ar": "i32", "stride_ak": "i32",
                         "stride_bc": "i32", "stride_bk": "i32"},
                        {"HAS_RS": flags[0], "HAS_CS": flags[1], "HAS_KS": flags[2],
                         **{key: v for key, v in meta.items() if key.startswith("BLOCK")}},
                        meta["num_warps"], meta["num_stages"], quick=flags == (True, True, False)))
    return out


def catalogue(quick: bool = False) -> list[Case]:
    """Every GPU specialisation of every Triton kernel (``quick``: the CI subset)."""
    cases = _pseudo_label_cases() + _attention_cases() + _coder_cases()
    return [c for c in cases if c.quick] if quick else cases


# --------------------------------------------------------------------------- compile
def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _res_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the single function in a cubin, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            return int(fields["REG"]), int(fields["STACK"])
    raise RuntimeError(f"no resource line in cuobjdump output:\n{text}")


def compile_case(case: Case, arch: int) -> Result:
    """Compile one case for ``sm_<arch>`` and check its resources (never raises)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(f"nolabels.triton.{case.module}"), case.kernel)
        if not hasattr(fn, "arg_names"):
            raise RuntimeError("kernel is interpreted: unset TRITON_INTERPRET")
        missing = [a for a in fn.arg_names if a not in case.types and a not in case.constexprs]
        unknown = [a for a in list(case.types) + list(case.constexprs) if a not in fn.arg_names]
        if missing or unknown:
            raise RuntimeError(f"catalogue out of date: missing {missing}, unknown {unknown}")
        sig = {a: ("constexpr" if a in case.constexprs else case.types[a]) for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in case.constexprs and case.types[a].startswith("*")}
        src = ASTSource(fn, sig, dict(case.constexprs), attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        regs, stack = _res_usage(k.asm["cubin"])
        res = Result(case.label, arch, True, time.perf_counter() - t0, int(k.metadata.shared), regs, stack)
        if res.shared > SMEM_LIMIT[arch]:
            res.problems.append(f"shared memory {res.shared} B > sm_{arch} limit {SMEM_LIMIT[arch]} B")
        if res.stack > STACK_BUDGET:
            res.problems.append(f"stack frame {res.stack} B > budget {STACK_BUDGET} B (register spills)")
        if res.problems:
            res.ok = False
        return res
    except Exception as e:  # noqa: BLE001 -- reported per case
        msg = f"{type(e).__name__}: {e}"
        return Result(case.label, arch, False, time.perf_counter() - t0, error=msg[-2000:])


def _run_one(args: tuple[int, int, bool]) -> Result:
    index, arch, quick = args
    return compile_case(catalogue(quick)[index], arch)


def run(archs: list[int], quick: bool, jobs: int) -> list[Result]:
    n = len(catalogue(quick))
    work = [(i, a, quick) for a in archs for i in range(n)]
    if jobs <= 1:
        return [_run_one(w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_run_one, work))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset only")
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, help="write the per-case results here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = run(a.arch, a.quick, a.jobs)
    bad = [r for r in results if not r.ok]
    for r in results:
        status = "ok  " if r.ok else "FAIL"
        print(f"{status} sm_{r.arch} {r.seconds:5.1f}s smem={r.shared:6d} regs={r.regs:3d} stack={r.stack:4d}  {r.label}")
        for p in r.problems:
            print(f"       {p}")
        if r.error:
            print("       " + r.error.replace("\n", "\n       "))
    print(f"{len(results) - len(bad)}/{len(results)} compiled within limits in {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
