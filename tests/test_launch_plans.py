"""Launch plans of every CUDA and Triton kernel against the GPU's launch limits, without a GPU.

* The sweeps run each launcher's plan (python/nolabels/launch_plans.py) over the sizes of
  benchmarks/gpu_check.sh and realistic extremes (N up to 1e8 images, C up to 21,841
  classes, M up to 1e6 texts, k up to the documented maxima, B*H up to 1e6, D up to 4096)
  and fail on any plan a GPU would reject (grid.y/z > 65,535, grid.x > 2^31-1, > 1024
  threads, shared memory over the budget).
* The CUDA plans are checked against the C++ launchers themselves: kernels/coder.cu's
  plan_* functions are called at the extreme shapes, and its launchers run in the CUDA
  simulator, whose launch log must equal the Python plans (pseudo_label.cu: in
  test_pseudo_label_cuda_sim.py).
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch
from nolabels import launch_plans as lp

ROOT = Path(__file__).parent.parent

# gpu_check.sh sizes, then extremes
NS = [1, 7, 8192, 65_535, 70_000, 200_000, 1_000_000, 10_000_000, 100_000_000]
CS = [1, 10, 100, 1000, 21_841]
MS = [1, 1000, 70_000, 1_000_000]
TEXTS_PER_CLASS = [1, 2, 80]  # few texts per class give the largest CODER row blocks
CUDA_KS = [1, 32, 64, 128, 256, 257, 512, 1024]  # 1024: coder_cuda::kMaxK
TRITON_KS = [1, 16, 100, 256]  # 256: topk_similarity_triton's maximum
DS = [16, 512, 768, 4096]
ARCHS = ["sm_80", "sm_90"]


def _check(plans, arch="sm_90"):
    bad = [v for p in plans for v in lp.violations(p, arch)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_coder_plans_fit(arch):
    for n in NS:
        for m in MS:
            for k in CUDA_KS:
                if k <= m:
                    _check(lp.cuda_topk_similarity(n, m, k), arch)
        for c in CS:
            for t in TEXTS_PER_CLASS:
                _check(lp.cuda_class_scores_bank(n, c * (1 + t), c), arch)
        for kk in (1, 1000, 21_841):
            _check(lp.cuda_affinity(n, kk, 1_000_000), arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_pseudo_label_plans_fit(arch):
    for n in NS:
        for c in CS:
            for dtype in ("float32", "float16", "bfloat16"):
                _check(lp.cuda_pseudo_label(n, c, dtype), arch)


def test_big_n_class_scores_has_more_rows_than_grid_y():
    """The case of the issue: few texts per class, N >= 65,536 -> a row block of millions of
    rows; the rows must not be on a grid axis limited to 65,535."""
    plans = list(lp.cuda_class_scores_bank(1_000_000, 20, 10))
    seg = [p for p in plans if p.kernel == "seg_reduce"]
    assert seg and max(p.grid[0] for p in seg) >= 1_000_000
    _check(plans)


def test_triton_attention_plans_fit():
    pytest.importorskip("triton")
    import torch as t

    for bh in [(1, 1), (8192, 12), (83_334, 12), (1_000_000, 1)]:  # B*H up to 1e6
        for length in (1, 50, 197, 577):
            for n_prompt in (0, 16):
                for d in (16, 32, 64, 128):
                    for dtype in (t.float32, t.bfloat16):
                        _check(lp.triton_attention(bh[0], bh[1], length, n_prompt, d, dtype))


def test_triton_coder_and_pseudo_label_plans_fit():
    pytest.importorskip("triton")
    for n in NS:
        for m in MS:
            for k in TRITON_KS:
                if k <= m:
                    for c in (1, 1000, 21_841):
                        for d in DS:
                            for kk in (1, 21_841):
                                _check(lp.triton_coder(n, m, k, c, d, kk))
        _check(lp.triton_pseudo_label(n))


def test_violations_names_each_limit():
    assert lp.violations(lp.Plan("k", (1, 65_536, 1), (128, 1, 1)))
    assert lp.violations(lp.Plan("k", (2**31, 1, 1), (128, 1, 1)))
    assert lp.violations(lp.Plan("k", (1, 1, 1), (1025, 1, 1)))
    assert lp.violations(lp.Plan("k", (1, 1, 1), (128, 1, 1), 64 * 1024))
    assert not lp.violations(lp.Plan("k", (1, 1, 1), (128, 1, 1), 200 * 1024, optin=True), "sm_90")
    assert lp.violations(lp.Plan("k", (1, 1, 1), (128, 1, 1), 200 * 1024, optin=True), "sm_80")
    assert not lp.violations(lp.Plan("k", (2**31 - 1, 65_535, 65_535), (32, 32, 1), 48 * 1024))


# ---------------------------------------------------------------- C++ plans == Python plans
sys.path.insert(0, str(Path(__file__).parent / "emulators" / "cuda_sim"))
import sim_build  # noqa: E402

_WHY_NOT = sim_build.unavailable_reason()
needs_sim = pytest.mark.skipif(_WHY_NOT is not None, reason=f"CUDA simulator: {_WHY_NOT}")

_API = r"""
extern "C" {
using namespace nolabels::coder_cuda;
// which: 0 normalize_rows(a), 1 topk_merge(a, b), 2 topk_poison(a, b), 3 seg_reduce(a, b),
// 4 rowdot_inv(a), 5 scale_clamp(a, b); out: grid x, y, z, block, smem, fits
void plan_of(int which, int64_t a, int64_t b, long long* out) {
  LaunchPlan p;
  switch (which) {
    case 0: p = plan_normalize_rows(a); break;
    case 1: p = plan_topk_merge(a, b); break;
    case 2: p = plan_topk_poison(a, b); break;
    case 3: p = plan_seg_reduce(a, b); break;
    case 4: p = plan_rowdot_inv(a); break;
    default: p = plan_scale_clamp(a, b);
  }
  const long long v[6] = {p.grid_x, p.grid_y, p.grid_z, p.block, p.smem, plan_fits(p)};
  for (int i = 0; i < 6; ++i) out[i] = v[i];
}
int launch_one(int which, int64_t a, int64_t b, float* f0, float* f1, float* f2, int64_t* idx,
               const int64_t* seg) {
  switch (which) {
    case 0: return normalize_rows(f0, kFloat32, a, 4, 4, 1, f1, true, nullptr, nullptr, nullptr);
    case 1: return topk_merge(f0, a, 1100, 1100, f1, idx, b, 0, true, nullptr);
    case 2: return topk_poison(f0, a, b, nullptr, nullptr, nullptr);
    case 3: return seg_reduce(f0, a, 2 * b, b, seg, nullptr, f1, nullptr);
    case 4: return rowdot_inv(f0, f1, a, 4, f2, nullptr);
    default: return scale_clamp(f0, a, b, f1, f2, nullptr);
  }
}
}
"""
_PY = [lp.coder_normalize_rows, lp.coder_topk_merge, lp.coder_topk_poison, lp.coder_seg_reduce,
       lp.coder_rowdot_inv, lp.coder_scale_clamp]
_ONE_ARG = {0, 4}


@pytest.fixture(scope="module")
def coder_lib():
    if _WHY_NOT is not None:
        pytest.skip(f"CUDA simulator: {_WHY_NOT}")
    return sim_build.load(ROOT / "kernels" / "coder.cu", _API)


def _py(which, a, b):
    p = _PY[which](a) if which in _ONE_ARG else _PY[which](a, b)
    return [*p.grid, p.block[0], p.dyn_smem, int(not lp.violations(p))]


@needs_sim
@pytest.mark.parametrize("which", range(6))
def test_cpp_plan_functions_equal_python_at_extremes(coder_lib, which):
    out = (ctypes.c_longlong * 6)()
    i = ctypes.c_int64
    for a in (1, 3, 8192, 70_000, 3_355_443, 100_000_000):
        for b in (1, 2, 128, 129, 256, 257, 1024, 21_841):
            coder_lib.plan_of(which, i(a), i(b), out)
            assert list(out) == _py(which, a, b), (which, a, b)


@needs_sim
@pytest.mark.parametrize("which,a,b", [(0, 9, 0), (1, 5, 3), (1, 3, 300), (1, 2, 1024), (2, 7, 5),
                                       (3, 3, 130), (4, 9, 0), (5, 7, 40)])
def test_launchers_launch_the_python_plan(coder_lib, which, a, b):
    """Run the C++ launcher in the simulator: its launch log equals the Python plan."""
    big = [torch.randn(1 << 16) for _ in range(3)]
    idx = torch.zeros(1 << 14, dtype=torch.int64)
    seg = torch.arange(b + 1, dtype=torch.int64)  # one kind-1 text per class
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    coder_lib.nolabels_sim_clear_launch_log()
    err = coder_lib.launch_one(which, ctypes.c_int64(a), ctypes.c_int64(b), *(p(t) for t in big), p(idx), p(seg))
    assert err == 0, coder_lib.nolabels_sim_error_message().decode()
    assert coder_lib.nolabels_sim_launch_count() == 1
    rec = (ctypes.c_longlong * 8)()
    coder_lib.nolabels_sim_launch_record(0, rec)
    want = _py(which, a, b)
    assert list(rec)[:7] == [*want[:3], want[3], 1, 1, want[4]] and rec[7] == 1


@needs_sim
def test_launcher_refuses_a_plan_over_the_limits(coder_lib):
    """A plan with grid.x > 2^31-1 is refused by the launcher (cudaErrorInvalidConfiguration)
    before anything is launched."""
    coder_lib.nolabels_sim_clear_launch_log()
    n = 2**31 * 4 + 8  # a warp per row, 4 rows per block: > 2^31-1 blocks
    err = coder_lib.launch_one(0, ctypes.c_int64(n), ctypes.c_int64(0), None, None, None, None, None)
    assert err == 9 and coder_lib.nolabels_sim_launch_count() == 0


# ---------------------------------------------------------------- on a GPU (gpu_check.sh)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_big_n_class_scores_with_few_texts_per_class(backend):
    """N = 70,000 images, 10 classes of 2 texts: the CUDA row block holds all 70,000 rows
    (more than grid.y's 65,535); the rows past 65,535 are checked against the reference."""
    sys.path.insert(0, str(Path(__file__).parent))
    from nolabels.backends import library_cuda_status
    from nolabels.ops import coder_class_scores
    from test_coder_ops import _INTERP, check_scores, text_bank

    if backend == "cuda" and library_cuda_status() is not None:
        pytest.skip(library_cuda_status())
    if backend == "triton" and _INTERP:
        pytest.skip("set NOLABELS_TEST_GPU=1 to compile Triton for the GPU")
    gen = torch.Generator().manual_seed(7)
    n, c, d = 70_000, 10, 64
    x = torch.randn(n, d, generator=gen)
    t, cls, kind = text_bank(gen, 2 * c, c, d, torch.float32)
    s = coder_class_scores(x.cuda(), t.cuda(), cls.cuda(), kind.cuda(), c, backend=backend)
    torch.cuda.synchronize()
    rows = torch.cat([torch.arange(0, 100), torch.arange(n - 4000, n)])
    check_scores(s[rows.cuda()], x[rows], t, cls, kind, c)
