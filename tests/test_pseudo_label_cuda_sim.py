"""kernels/pseudo_label.cu checked without a GPU: its unchanged source compiled for the CPU
against tests/emulators/cuda_sim (one std::thread per CUDA thread, real barriers, the
tensor-core and cp.async instructions of kernels/ptx.cuh modelled from the PTX ISA) and
called through its host entry point ``launch_pseudo_label``, against the float64 reference
with the tolerances of test_pseudo_label.py.

Both cp.async completion models are built (copies landing at the wait, the latest the ISA
allows, and at issue, the earliest): a missing wait or a stage overwritten while another
warp still reads it changes the results in one of them. A ThreadSanitizer build checks
the shared-memory synchronisation. Not checked: timing, the real ex2.approx/mma rounding
(last bits), the stable-ABI host launcher (csrc/cuda/pseudo_label_cuda.cpp).
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch
from nolabels.ops import PseudoLabels

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(Path(__file__).parent / "emulators" / "cuda_sim"))
sys.path.insert(0, str(Path(__file__).parent))
import sim_build  # noqa: E402
from test_pseudo_label import check_against_reference, make_inputs  # noqa: E402

_WHY_NOT = sim_build.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"CUDA simulator: {_WHY_NOT}")

_API = r"""
extern "C" int sim_pseudo_label(const void* image, int64_t N, int64_t D, int64_t s0, int64_t s1,
                                const void* cls, int64_t C, int64_t c0, int64_t c1, int dtype,
                                float scale, int topk, int normalize, float* colscale, float* probs,
                                int64_t* classes, float* entropy, float* lse) {
  nolabels::cuda::PseudoLabelArgs a;
  a.image = image; a.N = N; a.D = D; a.img_s0 = s0; a.img_s1 = s1;
  a.cls = cls; a.C = C; a.cls_s0 = c0; a.cls_s1 = c1;
  a.dtype = static_cast<nolabels::cuda::PLDtype>(dtype);
  a.scale = scale; a.topk = topk; a.normalize = normalize != 0;
  a.colscale = colscale; a.probs = probs; a.classes = classes; a.entropy = entropy; a.lse = lse;
  return nolabels::cuda::launch_pseudo_label(a, nullptr);
}
"""
_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CU = ROOT / "kernels" / "pseudo_label.cu"


@pytest.fixture(scope="module", params=["wait", "issue"], ids=["cp.async@wait", "cp.async@issue"])
def lib(request):
    defines = ("SIM_CP_ASYNC_AT_ISSUE",) if request.param == "issue" else ()
    return sim_build.load(CU, _API, defines)


def pseudo_label_sim(lib, x, w, *, scale=100.0, topk=1, normalize=True) -> PseudoLabels:
    n, d = x.shape
    c = w.shape[0]
    colscale = torch.empty(2 * c + 4)[: 2 * c]  # workspace: 2 C floats, 16-byte aligned (fresh)
    probs = torch.full((n, topk), -7.0)
    classes = torch.full((n, topk), -7, dtype=torch.int64)
    entropy = torch.full((n,), -7.0)
    lse = torch.full((n,), -7.0)
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    i = ctypes.c_int64
    err = lib.sim_pseudo_label(p(x), i(n), i(d), i(x.stride(0)), i(x.stride(1)), p(w), i(c),
                               i(w.stride(0)), i(w.stride(1)), _CODE[x.dtype], ctypes.c_float(scale),
                               topk, int(normalize), p(colscale), p(probs), p(classes), p(entropy), p(lse))
    assert err == 0, f"launch_pseudo_label returned {err}: {lib.nolabels_sim_error_message().decode()}"
    return PseudoLabels(classes[:, 0].clone(), probs, classes, entropy, lse)


# (N, C, D): odd sizes; 300 rows = 3 CTAs (the last partial), C over three 128-class tiles,
# D over several 32-wide (tensor core) / 16-wide (fp32) k-tiles. 16-bit rows take the
# cp.async loader only when 16-byte aligned (D % 8 == 0: the D = 72 case), the register
# gather otherwise.
SIZES = [(1, 1, 3), (7, 3, 65), (300, 261, 67), (259, 300, 72)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(lib, gen, dtype, size):
    n, c, d = size
    x, w = make_inputs(gen, n, c, d, dtype)
    topk = min(3, c)
    check_against_reference(pseudo_label_sim(lib, x, w, topk=topk), x, w, 100.0, topk, True, "cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_strided_inputs_take_the_gather_path(lib, gen, dtype):
    """Non-unit column stride / odd pitch: the register-gather loader, not cp.async."""
    x, w = make_inputs(gen, 150, 140, 41, dtype)
    xt = x.t().contiguous().t()  # column-major
    wp = torch.cat([w, w[:, :3]], dim=1)[:, :41]  # row pitch 44: not 16-byte aligned rows
    for xx, ww in ((xt, w), (x, wp)):
        check_against_reference(pseudo_label_sim(lib, xx, ww, topk=4), xx, ww, 100.0, 4, True, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("topk", [1, 16])
def test_topk_bounds_and_raw_inner_products(lib, gen, dtype, topk):
    x, w = make_inputs(gen, 131, 37, 50, dtype, scale_rows=True)
    for normalize, scale in ((True, 100.0), (False, 3.0)):
        pl = pseudo_label_sim(lib, x, w, scale=scale, topk=topk, normalize=normalize)
        check_against_reference(pl, x, w, scale, topk, normalize, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_ties_zero_rows_and_non_finite_rows(lib, gen, dtype):
    x, w = make_inputs(gen, 20, 9, 24, dtype)
    w[5] = w[2]  # exact tie: class 2 must come before class 5
    x[3] = w[2]
    x[7] = 0  # zero row: uniform probabilities
    x[11, 4] = float("nan")
    pl = pseudo_label_sim(lib, x, w, topk=3)
    assert pl.classes[3, :2].tolist() == [2, 5]
    torch.testing.assert_close(pl.probs[7], torch.full((3,), 1 / 9), rtol=1e-5, atol=1e-6)
    assert torch.isnan(pl.lse[11]) and torch.isnan(pl.entropy[11]) and torch.isnan(pl.probs[11]).all()
    ok = [r for r in range(20) if r != 11]
    check_against_reference(PseudoLabels(*(t[ok] for t in pl)), x[ok], w, 100.0, 3, True, "cuda")


_RACE_MAIN = r"""
#include <cstdio>
#include <vector>
int main() {
  using namespace nolabels::cuda;
  const int64_t N = 140, C = 150, D = 40;  // 2 CTAs, 2 n-tiles, 2 k-tiles: every pipeline stage reused
  for (int dt = 0; dt < 3; ++dt) {
    std::vector<uint32_t> buf(N * D + C * D);
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = (dt == 0) ? 0x3f800000u + (i * 2654435761u % 4096)
                                                               : 0x3c003c00u + (i * 40503u % 256);
    const size_t es = dt == 0 ? 4 : 2;
    auto* base = reinterpret_cast<unsigned char*>(buf.data());
    std::vector<float> colscale(2 * C), probs(N * 4), entropy(N), lse(N);
    std::vector<int64_t> classes(N * 4);
    PseudoLabelArgs a;
    a.image = base; a.N = N; a.D = D; a.img_s0 = D; a.img_s1 = 1;
    a.cls = base + N * D * es; a.C = C; a.cls_s0 = D; a.cls_s1 = 1;
    a.dtype = static_cast<PLDtype>(dt); a.scale = 10.f; a.topk = 4;
    a.colscale = colscale.data(); a.probs = probs.data(); a.classes = classes.data();
    a.entropy = entropy.data(); a.lse = lse.data();
    if (launch_pseudo_label(a, nullptr) != 0) return 1;
  }
  std::printf("done\n");
  return 0;
}
"""


@pytest.mark.parametrize("mode", ["wait", "issue"])
def test_kernels_are_race_free_under_thread_sanitizer(mode):
    """Shared-memory synchronisation of the pipelined tensor-core and fp32 kernels and of
    the colscale pre-pass, with each CUDA thread a real thread under ThreadSanitizer."""
    defines = ("SIM_CP_ASYNC_AT_ISSUE",) if mode == "issue" else ()
    sim_build.assert_race_free(CU, _RACE_MAIN, defines)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_degenerate_shapes_and_overflowing_norms(lib, gen, dtype):
    """D = 1 (one zero-padded k-tile), C = 1, and a row whose float32 sum of squares
    overflows although every entry is finite (the slow, rescaled norm path)."""
    for n, c, d in ((5, 4, 1), (9, 1, 20)):
        x, w = make_inputs(gen, n, c, d, dtype)
        check_against_reference(pseudo_label_sim(lib, x, w, topk=1), x, w, 100.0, 1, True, "cuda")
    x, w = make_inputs(gen, 12, 7, 33, dtype)
    x[4] = x[4] * 1e20  # |x|^2 ~ 1e41: inf in float32, the norm itself ~3e20 is finite
    pl = pseudo_label_sim(lib, x, w, topk=2)
    assert torch.isfinite(pl.lse).all()
    check_against_reference(pl, x, w, 100.0, 2, True, "cuda")



@pytest.mark.parametrize("which", ["image", "class", "both"])
@pytest.mark.parametrize("s", [1e19, 1e30, 3e38, 1e-30], ids=lambda s: f"{s:g}")
def test_float32_rows_of_any_magnitude(lib, gen, which, s):
    """float32 rows with max-abs entry 1e19 .. 3e38 (squared norm, norm or dot products
    beyond float32) or 1e-30 normalise as in float64 inside the kernel: it pre-scales
    them by powers of two (class rows in the colscale pre-pass, image rows by
    restarting the CTA)."""
    from test_ops_extreme import mixed, scaled

    x = scaled(gen, 150, 40, s if which != "class" else 1.0)  # 2 CTAs
    w = scaled(gen, 70, 40, s if which != "image" else 1.0)  # 2 n-tiles
    x[7], w[3] = scaled(gen, 2, 40, 1.0)  # ordinary rows next to them
    pl = pseudo_label_sim(lib, x, w, topk=3)
    check_against_reference(pl, x, w, 100.0, 3, True, "cuda")
    if which == "image":  # every magnitude in one CTA
        x = mixed(gen, 130, 40)
        check_against_reference(pseudo_label_sim(lib, x, w, topk=2), x, w, 100.0, 2, True, "cuda")


def test_bfloat16_rows_out_of_range_are_reported(lib, gen):
    """bf16 rows are not pre-scaled: a row of norm >= 2^96 gets NaN lse (only that row),
    a class of norm >= 2^30 NaN in every row; everything below stays exact."""
    from test_ops_extreme import scaled

    x = scaled(gen, 20, 24, 1.0, torch.bfloat16)
    w = scaled(gen, 9, 24, 1.0, torch.bfloat16)
    x[3] = scaled(gen, 1, 24, 3e38, torch.bfloat16)
    x[5] = scaled(gen, 1, 24, 1e25, torch.bfloat16)  # |x|^2 overflows, the norm does not: exact
    pl = pseudo_label_sim(lib, x, w, topk=2)
    assert torch.isnan(pl.lse).tolist() == [r == 3 for r in range(20)]
    ok = [r for r in range(20) if r != 3]
    check_against_reference(PseudoLabels(*(t[ok] for t in pl)), x[ok], w, 100.0, 2, True, "cuda")
    w[4] = scaled(gen, 1, 24, 1e10, torch.bfloat16)
    assert torch.isnan(pseudo_label_sim(lib, x, w, topk=2).lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_with_this_kernel_matches_float64_at_any_magnitude(lib, gen, monkeypatch, dtype):
    """The op (nolabels.ops.pseudo_label) with this kernel as its cuda backend: rows the
    kernel reports (bf16 out of range) are recomputed from float32 unit rows."""
    import dataclasses
    import importlib

    from test_ops_extreme import mixed

    pl_mod = importlib.import_module("nolabels.ops.pseudo_label")  # the module, not the function

    def run(image, cls, scale, topk, normalize):
        out = pseudo_label_sim(lib, image.contiguous(), cls.contiguous(), scale=scale, topk=topk,
                               normalize=normalize)
        return out.probs, out.classes, out.entropy, out.lse

    op = pl_mod.PSEUDO_LABEL
    sim = tuple(dataclasses.replace(b, run=run) if b.name == "cuda" else b for b in op.backends)
    monkeypatch.setattr(pl_mod, "PSEUDO_LABEL", dataclasses.replace(op, backends=sim))
    x, w = mixed(gen, 40, 24, dtype), mixed(gen, 11, 24, dtype)
    probs, classes, entropy, lse = pl_mod._pseudo_label_op(x, w, 100.0, 3, True, "cuda")
    got = PseudoLabels(classes[:, 0].clone(), probs, classes, entropy, lse)
    check_against_reference(got, x, w, 100.0, 3, True, "cuda")


_RACE_MAIN_SCALED = r"""
#include <cstdio>
#include <vector>
int main() {
  using namespace nolabels::cuda;
  // fp32, 2 CTAs x 2 n-tiles x 2 k-tiles; CTA 0 holds a row with entries >= 2^32 (it
  // restarts with pre-scaled rows: the rowpre stores and the re-primed stage 0) and
  // class 3 is pre-scaled (colpre).
  const int64_t N = 140, C = 70, D = 20;
  std::vector<float> x(N * D), w(C * D);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 1.f + static_cast<float>(i * 2654435761u % 4096) / 4096.f;
  for (size_t i = 0; i < w.size(); ++i) w[i] = 1.f - static_cast<float>(i * 40503u % 1024) / 512.f;
  for (int64_t k = 0; k < D; ++k) x[5 * D + k] *= 3e37f, w[3 * D + k] *= 1e30f;
  std::vector<float> colscale(2 * C), probs(N * 4), entropy(N), lse(N);
  std::vector<int64_t> classes(N * 4);
  PseudoLabelArgs a;
  a.image = x.data(); a.N = N; a.D = D; a.img_s0 = D; a.img_s1 = 1;
  a.cls = w.data(); a.C = C; a.cls_s0 = D; a.cls_s1 = 1;
  a.dtype = PLDtype::kFloat32; a.scale = 10.f; a.topk = 4;
  a.colscale = colscale.data(); a.probs = probs.data(); a.classes = classes.data();
  a.entropy = entropy.data(); a.lse = lse.data();
  if (launch_pseudo_label(a, nullptr) != 0) return 1;
  for (int64_t r = 0; r < N; ++r) if (!(lse[r] == lse[r])) return 2;  // NaN: not handled in-kernel
  std::printf("done\n");
  return 0;
}
"""


def test_prescaled_restart_is_race_free_under_thread_sanitizer():
    """The fp32 kernel's restart with pre-scaled rows (extra barriers, stage 0 re-staged)."""
    sim_build.assert_race_free(CU, _RACE_MAIN_SCALED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_launches_equal_the_python_launch_plans(lib, gen, dtype):
    """launch_pseudo_label's launches, as the simulator logged them (it also enforces the
    limits: the 16-bit kernels' 66 KB of shared memory need the opt-in attribute), equal
    nolabels.launch_plans.cuda_pseudo_label: the sweep in test_launch_plans.py checks the
    plans the kernels really get."""
    from nolabels import launch_plans as lp

    x, w = make_inputs(gen, 300, 261, 72, dtype)
    lib.nolabels_sim_clear_launch_log()
    pseudo_label_sim(lib, x, w, topk=3)
    rec = (ctypes.c_longlong * 8)()
    got = []
    for i in range(lib.nolabels_sim_launch_count()):
        lib.nolabels_sim_launch_record(i, rec)
        got.append(list(rec))
    want = [[*p.grid, *p.block, p.dyn_smem, 1] for p in lp.cuda_pseudo_label(300, 261, str(dtype)[6:])]
    assert got == want
