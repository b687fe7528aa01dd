"""ops.pseudo_label and ops.select_per_class: every backend against the float64 reference.

Tolerances. Let delta bound the absolute error of one scaled logit:
  delta = scale * |x| * |w| * (16 * eps32 * sqrt(D) + eps(dtype) if the backend rounds
          logits to the input dtype, as the torch backend does for float16/bfloat16).
(|x| = |w| = 1 with normalize=True.) Then, to first order:
  * the logit at a chosen index is within 2*delta of the reference's j-th largest logit
    (ties are legal: we never compare indices),
  * |lse - lse_ref| <= delta,
  * |p - p_ref| <= p_ref * (exp(2*delta) - 1),
  * |H - H_ref| <= 2*delta * (1 + sum_c p_c |x_c - E x|).
"""
from __future__ import annotations

import math
import os

import nolabels
import pytest
import torch
from nolabels.backends import library_cpu_status, library_cuda_status, triton_status
from nolabels.ops import PseudoLabels, pseudo_label, select_per_class
from nolabels.reference.pseudo_label import reference_logits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _available_backends(device: str) -> list:
    out = [pytest.param("torch", id="torch")]
    if device == "cpu":
        out.append(
            pytest.param("cpu", id="cpu", marks=pytest.mark.cpu_kernel)  # conftest's rule
        )
        out.append(
            pytest.param("triton", id="triton-interp", marks=pytest.mark.skipif(
                triton_status() is not None or os.environ.get("TRITON_INTERPRET") != "1",
                reason="triton interpreter not enabled"))
        )
    return out


CPU_BACKENDS = _available_backends("cpu")
# (N, C, D): odd sizes, none a multiple of any block size; the big one only for fast backends.
SIZES = [(1, 1, 3), (7, 3, 65), (131, 37, 130), (1003, 1001, 67)]


def make_inputs(gen, n, c, d, dtype, device="cpu", scale_rows=False):
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(c, d, generator=gen)
    if scale_rows:  # un-normalised use: rows of very different norms
        x = x * torch.rand(n, 1, generator=gen).mul(3).add(0.1)
        w = w * torch.rand(c, 1, generator=gen).mul(3).add(0.1)
    return x.to(dtype).to(device), w.to(dtype).to(device)


def check_against_reference(pl: PseudoLabels, x, w, scale, topk, normalize, backend):
    """Assert the contract and the tolerances of the module docstring."""
    n, d = x.shape
    c = w.shape[0]
    assert pl.labels.shape == (n,) and pl.labels.dtype == torch.int64
    assert pl.probs.shape == (n, topk) and pl.probs.dtype == torch.float32
    assert pl.classes.shape == (n, topk) and pl.classes.dtype == torch.int64
    assert pl.entropy.shape == (n,) and pl.entropy.dtype == torch.float32
    assert pl.lse.shape == (n,) and pl.lse.dtype == torch.float32
    if n == 0:
        return
    xs, ws = x.cpu(), w.cpu()
    ref = reference_logits(xs, ws, scale, normalize, compute_dtype=torch.float64)  # (N, C)
    if normalize:
        mag = torch.ones(n, dtype=torch.float64)
    else:
        mag = xs.double().norm(dim=1) * ws.double().norm(dim=1).max()
    rounding = EPS[x.dtype] if backend == "torch" else 0.0
    delta = abs(scale) * mag * (16 * 2.0**-23 * math.sqrt(d) + rounding) + 1e-6  # (N,)

    classes = pl.classes.cpu()
    assert bool((classes >= 0).all()) and bool((classes < c).all())
    assert bool((pl.labels.cpu() == classes[:, 0]).all())
    if topk > 1:
        srt = classes.sort(dim=1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), "duplicate classes in a row"
    ref_sorted = ref.sort(dim=1, descending=True).values[:, :topk]
    chosen = ref.gather(1, classes)
    err = (chosen - ref_sorted).abs()
    assert bool((err <= 2 * delta[:, None]).all()), f"top-k logit error {err.max():.3g}"

    lse_ref = torch.logsumexp(ref, dim=1)
    lse_err = (pl.lse.cpu().double() - lse_ref).abs()
    assert bool((lse_err <= delta + 1e-6 * lse_ref.abs()).all()), f"lse error {lse_err.max():.3g}"

    p_ref = (chosen - lse_ref[:, None]).exp()
    p_err = (pl.probs.cpu().double() - p_ref).abs()
    p_tol = p_ref * torch.expm1(2 * delta[:, None]) + 1e-6
    assert bool((p_err <= p_tol).all()), f"probs error {p_err.max():.3g}"
    assert bool((pl.probs[:, 1:] <= pl.probs[:, :-1] * (1 + 1e-5) + 1e-7).all()), "not descending"

    logp = ref - lse_ref[:, None]
    p_all = logp.exp()
    h_ref = -(p_all * logp).sum(dim=1)
    spread = (p_all * (ref - (p_all * ref).sum(dim=1, keepdim=True)).abs()).sum(dim=1)
    h_err = (pl.entropy.cpu().double() - h_ref).abs()
    h_tol = 2 * delta * (1 + spread) + 1e-5
    assert bool((h_err <= h_tol).all()), f"entropy error {h_err.max():.3g}"


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(gen, backend, dtype, size):
    n, c, d = size
    if backend == "triton" and n * c > 50_000:
        pytest.skip("interpreter: small sizes only")
    x, w = make_inputs(gen, n, c, d, dtype)
    topk = min(3, c)
    pl = pseudo_label(x, w, topk=topk, backend=backend)
    check_against_reference(pl, x, w, 100.0, topk, True, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unnormalized_and_other_scale(gen, backend, dtype):
    x, w = make_inputs(gen, 37, 19, 33, dtype, scale_rows=True)
    pl = pseudo_label(x, w, logit_scale=7.5, topk=5, normalize=False, backend=backend)
    check_against_reference(pl, x, w, 7.5, 5, False, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("topk", [1, 2, 16])
def test_topk_values(gen, backend, topk):
    x, w = make_inputs(gen, 29, 41, 17, torch.float32)
    pl = pseudo_label(x, w, topk=topk, backend=backend)
    check_against_reference(pl, x, w, 100.0, topk, True, backend)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b.values[0] != "triton"])
def test_topk_larger_than_register_limit(gen, backend):
    x, w = make_inputs(gen, 13, 70, 9, torch.float32)
    pl = pseudo_label(x, w, topk=70, backend=backend)  # topk == C
    check_against_reference(pl, x, w, 100.0, 70, True, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(gen, backend):
    base_x = torch.randn(40, 90, generator=gen)
    base_w = torch.randn(31, 20, generator=gen)
    x = base_x[::3, 5:66:2]  # (14, 31), strides (270, 2)
    w = base_w.T  # (20, 31), column-major: strides (1, 20)
    assert not x.is_contiguous() and not w.is_contiguous()
    pl = pseudo_label(x, w, topk=3, backend=backend)
    check_against_reference(pl, x, w, 100.0, 3, True, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_rows_give_uniform(gen, backend):
    x, w = make_inputs(gen, 6, 5, 11, torch.float32)
    x[2] = 0
    x[4] = 0
    pl = pseudo_label(x, w, topk=2, backend=backend)
    for i in (2, 4):
        assert torch.allclose(pl.probs[i], torch.full((2,), 0.2), atol=1e-6)
        assert math.isclose(pl.entropy[i].item(), math.log(5), rel_tol=1e-5)
        assert math.isclose(pl.lse[i].item(), math.log(5), rel_tol=1e-5)
    assert bool(torch.isfinite(pl.probs).all())
    check_against_reference(pl, x, w, 100.0, 2, True, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(gen, backend):
    x = torch.empty(0, 8)
    w = torch.randn(3, 8, generator=gen)
    pl = pseudo_label(x, w, topk=2, backend=backend)
    assert pl.probs.shape == (0, 2) and pl.labels.shape == (0,)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_cast_class_emb(gen, backend):
    x, _ = make_inputs(gen, 9, 4, 16, torch.bfloat16)
    w = torch.randn(4, 16, generator=gen)
    pl = pseudo_label(x, w, topk=2, backend=backend)
    check_against_reference(pl, x, w.to(torch.bfloat16), 100.0, 2, True, backend)


# ----------------------------------------------------------------------------- cpu tiling
# The cpu kernel takes row blocks of 512 (C <= 512) or 2048 rows and column tiles of <= 4096
# classes; topk <= 16 uses a lane-maximum bound, 17..32 the running k-th value, above 32
# a partial sort; float32 rows with unit column stride feed the GEMM in place unless a
# row of the block is extreme (then the block is copied, extreme rows scaled by 2^-e).
# Each case runs on the AVX-512 epilogue (where the CPU has it) and on the portable one.
CPU_ONLY = pytest.mark.skipif(library_cpu_status() is not None, reason=str(library_cpu_status()))
EPILOGUES = [pytest.param(False, id="avx512-if-any"), pytest.param(True, id="portable")]


@CPU_ONLY
@pytest.mark.parametrize("portable", EPILOGUES)
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_rows_not_a_multiple_of_the_block(gen, monkeypatch, portable, threads):
    if portable:
        monkeypatch.setenv("NOLABELS_NO_AVX512", "1")
    x, w = make_inputs(gen, 4099 + 2048 * (threads - 1), 37, 16, torch.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pl = pseudo_label(x, w, topk=3, backend="cpu")
    finally:
        torch.set_num_threads(old)
    check_against_reference(pl, x, w, 100.0, 3, True, "cpu")


@CPU_ONLY
@pytest.mark.parametrize("portable", EPILOGUES)
@pytest.mark.parametrize("topk", [1, 3, 16, 17, 32, 33])
def test_cpu_classes_span_several_column_tiles(gen, monkeypatch, portable, topk):
    if portable:
        monkeypatch.setenv("NOLABELS_NO_AVX512", "1")
    x, w = make_inputs(gen, 21, 9001, 8, torch.float32)  # 3 column tiles of 3001 / 3000
    x[3] = w[8999] * 2.0  # best classes in the last tile, the first and the middle
    x[4] = w[2]
    x[5] = w[4500] + w[4501]
    pl = pseudo_label(x, w, topk=topk, logit_scale=20.0, backend="cpu")
    check_against_reference(pl, x, w, 20.0, topk, True, "cpu")
    assert pl.labels[3].item() == 8999 and pl.labels[4].item() == 2


@CPU_ONLY
@pytest.mark.parametrize("portable", EPILOGUES)
def test_cpu_topk_up_to_c(gen, monkeypatch, portable):
    if portable:
        monkeypatch.setenv("NOLABELS_NO_AVX512", "1")
    x, w = make_inputs(gen, 2100, 45, 12, torch.float32)
    for topk in (16, 32, 33, 45):
        pl = pseudo_label(x, w, topk=topk, backend="cpu")
        check_against_reference(pl, x, w, 100.0, topk, True, "cpu")


@CPU_ONLY
def test_cpu_row_strided_float32_in_place_and_extreme_rows_in_one_block(gen):
    base = torch.randn(4500, 40, generator=gen)
    x = base[:, 3:35]  # unit column stride, row stride 40: fed to the GEMM in place
    w = torch.randn(29, 32, generator=gen)
    plain = pseudo_label(x, w, topk=4, backend="cpu")
    check_against_reference(plain, x, w, 100.0, 4, True, "cpu")
    # Extreme rows in the second block only: that block is copied, the first is not.
    y = x.clone()
    rows = torch.tensor([2100, 2500, 4499])
    y[rows[0]] *= 2.0**126
    y[rows[1]] *= 2.0**-110
    y[rows[2]] = 0.0
    pl = pseudo_label(y, w, topk=4, backend="cpu")
    check_against_reference(pl, y, w, 100.0, 4, True, "cpu")
    # Cosine is scale-free down to the normalisation eps (1e-12): the 2^126 row keeps its
    # labels; the 2^-110 row (norm far below eps) and the zero row give uniform ones.
    same = torch.ones(4500, dtype=torch.bool)
    same[rows[1:]] = False
    torch.testing.assert_close(pl.probs[same], plain.probs[same], rtol=1e-5, atol=1e-6)
    assert torch.equal(pl.classes[same], plain.classes[same])
    for r in rows[1:]:
        assert torch.allclose(pl.probs[r], torch.full((4,), 1 / 29), atol=1e-6)


@CPU_ONLY
def test_cpu_expanded_rows_in_place(gen):
    """Row stride 0 (an expanded row) also feeds the GEMM in place."""
    x = torch.randn(1, 64, generator=gen).expand(700, 64)
    w = torch.randn(30, 64, generator=gen)
    pl = pseudo_label(x, w, topk=3, backend="cpu")
    check_against_reference(pl, x, w, 100.0, 3, True, "cpu")
    assert bool((pl.classes == pl.classes[0]).all())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["image_nan", "image_inf", "class_nan"])
def test_non_finite_inputs_raise(gen, backend, where):
    x, w = make_inputs(gen, 10, 4, 8, torch.float32)
    if where == "image_nan":
        x[3, 2] = float("nan")
    elif where == "image_inf":
        x[7, 0] = float("inf")
    else:
        w[1, 1] = float("nan")
    name = "class_emb" if where.startswith("class") else "image_emb"
    with pytest.raises(ValueError, match=name):
        pseudo_label(x, w, backend=backend)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(3, 7)), "D mismatch"),
        (lambda: (torch.randn(4, 8), torch.randn(0, 8)), "C = 0"),
        (lambda: (torch.randn(4, 8, 2), torch.randn(3, 8)), "image_emb must be 2-D"),
        (lambda: (torch.randn(4, 8), torch.randn(8)), "class_emb must be 2-D"),
        (lambda: (torch.randn(4, 8).double(), torch.randn(3, 8)), "unsupported dtype"),
        (lambda: (torch.randint(0, 3, (4, 8)), torch.randn(3, 8)), "unsupported dtype"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 8, device="meta")), "different|is on"),
    ],
)
def test_bad_shapes_dtypes_devices(make, match):
    x, w = make()
    with pytest.raises(ValueError, match=match):
        pseudo_label(x, w)


@pytest.mark.parametrize("topk", [0, -1, 4, 2.0, True])
def test_bad_topk(topk):
    with pytest.raises(ValueError, match="topk"):
        pseudo_label(torch.randn(4, 8), torch.randn(3, 8), topk=topk)


def test_bad_backend_lists_reasons():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="unknown backend"):
        pseudo_label(x, w, backend="tpu")
    with pytest.raises(ValueError, match="cuda"):
        pseudo_label(x, w, backend="cuda")  # CPU tensors: the reason names the device


def test_env_override(monkeypatch):
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    monkeypatch.setenv("NOLABELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend 'cuda' cannot take"):
        pseudo_label(x, w)
    monkeypatch.setenv("NOLABELS_BACKEND", "torch")
    pseudo_label(x, w)


def test_auto_prefers_cpu_library():
    from nolabels.backends import dispatch
    from nolabels.ops.pseudo_label import BACKEND_IMPLS

    call = {"device": torch.device("cpu"), "dtype": torch.float32, "topk": 1}
    chosen = dispatch("pseudo_label", BACKEND_IMPLS, "auto", torch.device("cpu"), call).name
    assert chosen == ("cpu" if library_cpu_status() is None else "torch")


# ----------------------------------------------------------------------------- compile
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.cpu_kernel)])
def test_torch_compile_fullgraph(gen, backend):
    x, w = make_inputs(gen, 21, 5, 12, torch.float32)

    def f(a, b):
        pl = pseudo_label(a * 2.0, b, topk=2, backend=backend)
        return pl.probs.sum(dim=1) + pl.entropy, pl.labels

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, got_labels = compiled(x, w)
    want, want_labels = f(x, w)
    torch.testing.assert_close(got, want)
    assert torch.equal(got_labels, want_labels)


def test_opcheck_custom_op(gen):
    from nolabels.ops.pseudo_label import _pseudo_label_op

    x, w = make_inputs(gen, 9, 4, 6, torch.float32)
    backend = "cpu" if library_cpu_status() is None else "torch"
    torch.library.opcheck(_pseudo_label_op, (x, w, 100.0, 2, True, backend),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES + [(4099, 1000, 512)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_reference(gen, backend, dtype, size):
    if backend == "cuda" and library_cuda_status() is not None:
        pytest.skip(library_cuda_status())
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set NOLABELS_TEST_GPU=1 to compile Triton for the GPU")
    n, c, d = size
    x, w = make_inputs(gen, n, c, d, dtype, device="cuda")
    for topk in (1, min(3, c)):
        pl = pseudo_label(x, w, topk=topk, backend=backend)
        assert pl.probs.device.type == "cuda"
        check_against_reference(pl, x, w, 100.0, topk, True, backend)
    pl = pseudo_label(x, w, topk=min(5, c), normalize=False, logit_scale=0.5, backend=backend)
    check_against_reference(pl, x, w, 0.5, min(5, c), False, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_edge_cases(gen, backend):
    if backend == "cuda" and library_cuda_status() is not None:
        pytest.skip(library_cuda_status())
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set NOLABELS_TEST_GPU=1 to compile Triton for the GPU")
    x, w = make_inputs(gen, 300, 70, 96, torch.float16, device="cuda")
    x[5] = 0
    pl = pseudo_label(x[::2, 1:], w[:, 1:], topk=16, backend=backend)  # non-contiguous
    check_against_reference(pl, x[::2, 1:], w[:, 1:], 100.0, 16, True, backend)
    assert pseudo_label(x[:0], w, backend=backend).probs.shape == (0, 1)
    x[7, 3] = float("nan")
    with pytest.raises(ValueError, match="image_emb"):
        pseudo_label(x, w, backend=backend)


# ----------------------------------------------------------------------------- selection
def brute_force_select(classes, probs, k, fallback=True, row_ids=None):
    """NoLA's rule written as loops, straight from methods.md section 3.3."""
    n, kk = classes.shape
    row_ids = list(range(n)) if row_ids is None else row_ids.tolist()
    classes, probs = classes.tolist(), probs.tolist()
    num_classes = max(max(r) for r in classes) + 1
    ranks = min(3, kk) if fallback else 1
    out, seen = [], set()
    for c in range(num_classes):
        for r in range(ranks):
            rows = [i for i in range(n) if classes[i][r] == c]
            if rows:
                rows.sort(key=lambda i: (-probs[i][r], row_ids[i]))
                for i in rows[:k]:
                    if row_ids[i] not in seen:
                        seen.add(row_ids[i])
                        out.append((row_ids[i], c))
                break
    return out


def random_pl(gen, n, c, topk=3, skew=True):
    logits = torch.randn(n, c, generator=gen) * 3
    if skew:  # make some classes never top-1 so the fallbacks are exercised
        logits[:, : max(1, c // 4)] -= 4
    p = logits.softmax(1)
    probs, classes = p.topk(topk, dim=1)
    probs = (probs * 64).round() / 64  # ties in probability on purpose
    return PseudoLabels(classes[:, 0].clone(), probs, classes, torch.zeros(n), torch.zeros(n))


@pytest.mark.parametrize("n, c, k", [(1, 1, 1), (50, 7, 3), (400, 23, 5), (300, 40, 50)])
@pytest.mark.parametrize("fallback", [True, False])
def test_select_matches_brute_force(gen, n, c, k, fallback):
    pl = random_pl(gen, n, c, topk=min(3, c))
    sel = select_per_class(pl, k, fallback_ranks=fallback)
    got = sorted(zip(sel.indices.tolist(), sel.labels.tolist()))
    want = sorted(brute_force_select(pl.classes, pl.probs, k, fallback))
    assert got == want


def test_select_fallback_case():
    # class 2 is nobody's top-1; rows 1 and 3 rank it second -> selected with label 2.
    classes = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0]])
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.5, 0.4, 0.1]])
    pl = PseudoLabels(classes[:, 0], probs, classes, torch.zeros(4), torch.zeros(4))
    sel = select_per_class(pl, 1)
    # class 0 -> row 0 (0.9), class 1 -> row 2 (0.8), class 2 -> row 3 (0.4 > 0.3)
    assert sel.indices.tolist() == [0, 2, 3] and sel.labels.tolist() == [0, 1, 2]
    sel = select_per_class(pl, 1, fallback_ranks=False)
    assert sel.indices.tolist() == [0, 2] and sel.labels.tolist() == [0, 1]
    # k=2: class 2 takes rows 3 and 1; row 1 is also top-1 of class 0 -> kept once, as 0
    sel = select_per_class(pl, 2)
    assert sorted(zip(sel.indices.tolist(), sel.labels.tolist())) == [(0, 0), (1, 0), (2, 1), (3, 1)]


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_select_is_mergeable(gen, shards):
    n, c, k = 500, 17, 6
    pl = random_pl(gen, n, c)
    full = select_per_class(pl, k, num_classes=c)
    perm = torch.randperm(n, generator=gen)
    kept = []
    for part in perm.chunk(shards):
        s = select_per_class(pl.take(part), k, row_ids=part, num_classes=c)
        kept.append(s.indices)
    union = torch.cat(kept)
    merged = select_per_class(pl.take(union), k, row_ids=union, num_classes=c)
    assert torch.equal(merged.indices, full.indices)
    assert torch.equal(merged.labels, full.labels)


def test_select_bad_k():
    pl = random_pl(torch.Generator().manual_seed(0), 10, 3)
    for k in (0, -2, 1.5):
        with pytest.raises(ValueError, match="k must be"):
            select_per_class(pl, k)


def test_select_end_to_end_with_op(gen):
    x, w = make_inputs(gen, 200, 9, 32, torch.float32)
    pl = pseudo_label(x, w, topk=3)
    sel = select_per_class(pl, 4)
    got = sorted(zip(sel.indices.tolist(), sel.labels.tolist()))
    assert got == sorted(brute_force_select(pl.classes, pl.probs, 4))


def test_info_reports_backends(capsys):
    d = nolabels.info()
    out = capsys.readouterr().out
    assert "pseudo_label" in out and "torch" in out
    assert set(d["backends"]["pseudo_label"]) == {"torch", "cpu", "triton", "cuda"}
