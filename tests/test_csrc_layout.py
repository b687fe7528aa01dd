"""The C++ sources keep one copy of each shared piece (issue 14):

* every op schema (``m.def``) of nolabels_C is in csrc/registration.cpp, every
  ``m.impl`` names one of them, and the loaded libraries carry a kernel for each
  CPU implementation a csrc/*_cpu.cpp file registers;
* one ``mm_out`` (csrc/common.h), one row loader (csrc/rows.h), one
  normalisation eps (csrc/norm_eps.h) equal to the Python side's.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
KERNELS = REPO / "kernels"


def _sources(*roots: Path) -> list[Path]:
    return sorted(p for r in roots for p in r.rglob("*")
                  if p.suffix in (".cpp", ".h", ".cu", ".cuh") and p.is_file())


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def _defs(text: str) -> list[str]:
    return re.findall(r'\bm\.def\(\s*"([A-Za-z_0-9]+)\(', text)


def _impls(text: str) -> list[tuple[str, str]]:
    """(dispatch key, op name) of every m.impl in a file's STABLE_TORCH_LIBRARY_IMPL blocks."""
    out = []
    for key, body in re.findall(r"STABLE_TORCH_LIBRARY_IMPL\(\s*nolabels_C\s*,\s*(\w+)\s*,\s*m\s*\)"
                                r"\s*\{(.*?)\n\}", text, re.S):
        out += [(key, name) for name in re.findall(r'\bm\.impl\(\s*"([A-Za-z_0-9]+)"', body)]
    return out


def test_schemas_are_all_in_registration_cpp():
    where = {_rel(p): _defs(p.read_text()) for p in _sources(CSRC, KERNELS)}
    assert [f for f, d in where.items() if d] == ["csrc/registration.cpp"]
    schemas = where["csrc/registration.cpp"]
    assert len(schemas) == len(set(schemas)) >= 5
    impls = [(f, k, n) for p in _sources(CSRC) for k, n in _impls(p.read_text())
             for f in [_rel(p)]]
    assert {n for _, _, n in impls} == set(schemas)  # no stray impl, no schema without one
    assert all(k == "CPU" for f, k, _ in impls if not f.startswith("csrc/cuda/"))
    assert all(k == "CUDA" for f, k, _ in impls if f.startswith("csrc/cuda/"))


def test_the_impl_parser_sees_every_block():
    """_impls reads each IMPL block separately (so the checks above can fail)."""
    text = ('STABLE_TORCH_LIBRARY_IMPL(nolabels_C, CPU, m) {\n  m.impl("a", f);\n}\n'
            'STABLE_TORCH_LIBRARY_IMPL(nolabels_C, CUDA, m) {\n  m.impl("b", g);\n'
            '  m.impl("c", h);\n}\n')
    assert _impls(text) == [("CPU", "a"), ("CUDA", "b"), ("CUDA", "c")]
    assert _defs('m.def("x(Tensor a) -> Tensor");\n  m.def("y(int k) -> Tensor");') == ["x", "y"]


def test_one_op_per_cpu_file():
    """The CODER ops are split: each csrc/*_cpu.cpp registers the CPU kernel of exactly
    one op, named after the file."""
    files = sorted(CSRC.glob("*_cpu.cpp"))
    per_file = {p.name: [n for _, n in _impls(p.read_text())] for p in files}
    ops = {name: impls for name, impls in per_file.items() if impls}
    assert ops == {f"{impls[0]}_cpu.cpp": impls for impls in ops.values()}
    assert all(len(impls) == 1 for impls in ops.values())
    assert {"pseudo_label_cpu.cpp", "topk_similarity_cpu.cpp", "coder_class_scores_cpu.cpp",
            "coder_affinity_cpu.cpp"} <= set(ops)


def test_one_mm_out():
    hits = [_rel(p) for p in _sources(CSRC, KERNELS)
            if re.search(r"\bvoid\s+mm_out\s*\(", p.read_text())]
    assert hits == ["csrc/common.h"]


def test_one_row_loader():
    """Only csrc/rows.h turns a strided float32/float16/bfloat16 row into float32 for
    the CPU ops (the CUDA launchers in csrc/cuda/ pass the dtype on to the kernels)."""
    hits = [_rel(p) for p in _sources(CSRC) if not _rel(p).startswith("csrc/cuda/")
            and re.search(r"case\s+ScalarType::BFloat16", p.read_text())]
    assert hits == ["csrc/rows.h"]
    users = [p.name for p in sorted(CSRC.glob("*.cpp")) if re.search(r"\bload_row\(", p.read_text())]
    assert {"pseudo_label_cpu.cpp", "coder_rows_cpu.cpp"} <= set(users)


def _eps_literals(text: str) -> list[str]:
    return re.findall(r"\b1e-12f?\b|\b1\.0e-12f?\b", text)


def test_one_norm_eps_and_python_agrees():
    from nolabels.reference.normalize import NORM_EPS

    hits = {_rel(p): _eps_literals(p.read_text()) for p in _sources(CSRC, KERNELS)}
    assert {f: h for f, h in hits.items() if h} == {"csrc/norm_eps.h": ["1e-12", "1e-12f"]}
    header = (CSRC / "norm_eps.h").read_text()
    value = float(re.search(r"constexpr double kNormEps = ([0-9.e+-]+);", header).group(1))
    assert value == NORM_EPS
    triton_common = (REPO / "python" / "nolabels" / "triton" / "_common.py").read_text()
    assert float(re.search(r"NORM_EPS\b.*?constexpr\(([0-9.e+-]+)\)", triton_common).group(1)) == value
    # The kernels take the shared constant, not a copy.
    for cu in ("coder.cu", "pseudo_label.cu"):
        text = (KERNELS / cu).read_text()
        assert '#include "norm_eps.h"' in text and "kNormEpsF" in text, cu


@pytest.mark.cpu_kernel
def test_loaded_library_has_every_schema_and_cpu_kernel():
    from nolabels import _lib

    assert _lib.STATUS.cpu_loaded
    schemas = _defs((CSRC / "registration.cpp").read_text())
    cpu = {n for p in CSRC.glob("*_cpu.cpp") for k, n in _impls(p.read_text()) if k == "CPU"}
    for name in schemas:
        assert hasattr(torch.ops.nolabels_C, name), name
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key(f"nolabels_C::{name}", "CPU")
        assert has_cpu == (name in cpu), name
    if _lib.STATUS.cuda_loaded:
        cuda = {n for p in (CSRC / "cuda").glob("*.cpp") for k, n in _impls(p.read_text())}
        for name in cuda:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nolabels_C::{name}", "CUDA")
