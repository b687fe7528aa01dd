"""ops.coder_class_scores and ops.coder_affinity against float64 references.

Class scores are checked against the paper's formula written as a loop over
classes (methods.md §5.4), with the texts in random order. Tolerances:
  * scores: every cosine is within e = 16 * 2^-23 * sqrt(D) of float64, and the
    score is scale times a mean of such numbers (the kind-0 part is one dot with
    a sum of n0 unit vectors: n0 * e / denom <= e) -> |err| <= 2 * scale * e + 1e-5;
  * affinity: a cosine of two CODER vectors; through the Gram matrix the float32
    error is about D * 2^-24 relative to |x̂T̂ᵀ| |ŷT̂ᵀ| -> tol 64 * 2^-23 * sqrt(D).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from nolabels.backends import library_cpu_status, library_cuda_status, triton_status
from nolabels.ops import coder_affinity, coder_class_scores
from nolabels.reference.coder import (
    coder_affinity_reference,
    coder_class_scores_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
CPU_SKIP = pytest.mark.cpu_kernel  # skipped without the library; failed if it was expected (conftest)
TRITON_SKIP = pytest.mark.skipif(triton_status() is not None or not _INTERP,
                                 reason="triton interpreter not enabled")
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpu", id="cpu", marks=CPU_SKIP),
    pytest.param("triton", id="triton-interp", marks=TRITON_SKIP),
]


# ============================================================================= class scores
def paper_scores(x, t, cls, kind, c, scale=100.0):
    """methods.md §5.4 literally: per class, mean({cos_j : j in A_c} ∪ {max_{j in N_c} cos_j})."""
    cos = F.normalize(x.double(), dim=1, eps=1e-12) @ F.normalize(t.double(), dim=1, eps=1e-12).T
    out = torch.empty(x.shape[0], c, dtype=torch.float64)
    for k in range(c):
        a = ((cls == k) & (kind == 0)).nonzero().flatten()
        nm = ((cls == k) & (kind == 1)).nonzero().flatten()
        terms = [cos[:, a]]
        if len(nm):
            terms.append(cos[:, nm].max(dim=1, keepdim=True).values)
        out[:, k] = scale * torch.cat(terms, dim=1).mean(dim=1)
    return out


def text_bank(gen, m, c, d, dtype, syn_max=None):
    """M texts in random order; every class has >= 1 text; kinds mixed.

    syn_max: give class 0 that many kind-1 texts (uneven counts)."""
    t = torch.randn(m, d, generator=gen)
    cls = torch.randint(0, c, (m,), generator=gen)
    cls[:c] = torch.arange(c)
    kind = torch.randint(0, 2, (m,), generator=gen)
    if syn_max:
        cls[c : c + syn_max] = 0
        kind[c : c + syn_max] = 1
    perm = torch.randperm(m, generator=gen)
    return t[perm].to(dtype), cls[perm], kind[perm]


def check_scores(s, x, t, cls, kind, c, scale=100.0):
    n, d = x.shape
    assert s.shape == (n, c) and s.dtype == torch.float32
    if n == 0:
        return
    ref = paper_scores(x.cpu(), t.cpu(), cls.cpu(), kind.cpu(), c, scale)
    tol = 2 * scale * 16 * 2.0**-23 * math.sqrt(d) + 1e-5
    err = (s.cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"score error {err.max():.3g} > {tol:.3g}"
    # argmax: the reference score at our argmax is the reference max (ties legal)
    pick = ref.gather(1, s.cpu().argmax(dim=1, keepdim=True)).squeeze(1)
    assert bool((ref.max(dim=1).values - pick <= 2 * tol).all())


# (N, M, C, D)
SIZES = [(1, 1, 1, 3), (7, 23, 5, 65), (131, 401, 37, 130), (1003, 3001, 101, 67)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_scores_match_paper_formula(gen, backend, dtype, size):
    n, m, c, d = size
    if backend == "triton" and n * m > 5000:
        pytest.skip("interpreter: small sizes only")
    x = torch.randn(n, d, generator=gen).to(dtype)
    t, cls, kind = text_bank(gen, m, c, d, dtype)
    s = coder_class_scores(x, t, cls, kind, c, backend=backend)
    check_scores(s, x, t, cls, kind, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["uneven", "only_kind0", "only_kind1", "regular"])
def test_scores_text_layouts(gen, backend, layout):
    """Exercise each bank layout: uneven kind-1 counts (segmented), none of one kind,
    and the paper's regular ~15 kind-0 + ~4 kind-1 per class (slot layout)."""
    c, d = 9, 24
    x = torch.randn(13, d, generator=gen)
    if layout == "uneven":
        t, cls, kind = text_bank(gen, 60, c, d, torch.float32, syn_max=20)
    elif layout == "regular":
        cls = torch.cat([torch.arange(c).repeat_interleave(15), torch.arange(c).repeat_interleave(4)])
        kind = torch.cat([torch.zeros(15 * c, dtype=torch.long), torch.ones(4 * c, dtype=torch.long)])
        perm = torch.randperm(len(cls), generator=gen)
        cls, kind = cls[perm], kind[perm]
        t = torch.randn(len(cls), d, generator=gen)
    else:
        t, cls, _ = text_bank(gen, 40, c, d, torch.float32)
        kind = torch.full_like(cls, 0 if layout == "only_kind0" else 1)
    s = coder_class_scores(x, t, cls, kind, c, scale=7.5, backend=backend)
    check_scores(s, x, t, cls, kind, c, scale=7.5)


def test_scores_known_values():
    # D=2, one image along e0. Class 0: kind-0 texts at 0 and 90 degrees (cos 1, 0),
    # kind-1 texts with cos 0.6 and -1 -> mean(1, 0, 0.6) = 0.5333.
    # Class 1: only a kind-1 text with cos 0 -> 0.   Class 2: only kind-0, cos -1 -> -1.
    x = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.6, 0.8], [-1.0, 0.0], [0.0, 1.0], [-5.0, 0.0]])
    cls = torch.tensor([0, 0, 0, 0, 1, 2])
    kind = torch.tensor([0, 0, 1, 1, 1, 0])
    want = torch.tensor([[100 * 1.6 / 3, 0.0, -100.0]])
    for backend in ["torch"] + (["cpu"] if library_cpu_status() is None else []):
        got = coder_class_scores(x, t, cls, kind, 3, backend=backend)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_zero_rows_non_contiguous_empty(gen, backend):
    base = torch.randn(30, 40, generator=gen)
    x = base[::2, 3:36]  # (15, 33) non-contiguous
    x[4] = 0
    t, cls, kind = text_bank(gen, 31, 6, 33, torch.float32)
    s = coder_class_scores(x, t.T.contiguous().T, cls, kind, 6, backend=backend)
    check_scores(s, x, t, cls, kind, 6)
    assert bool((s[4] == 0).all())
    e = coder_class_scores(x[:0], t, cls, kind, 6, backend=backend)
    assert e.shape == (0, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_int32_indices_and_mixed_dtypes(gen, backend):
    x = torch.randn(5, 16, generator=gen).half()
    t, cls, kind = text_bank(gen, 20, 4, 16, torch.float32)
    s = coder_class_scores(x, t, cls.int(), kind.int(), 4, backend=backend)
    check_scores(s, x, t.half(), cls, kind, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["image", "text"])
def test_scores_non_finite_raise(gen, backend, where):
    x = torch.randn(6, 8, generator=gen)
    t, cls, kind = text_bank(gen, 12, 3, 8, torch.float32)
    if where == "image":
        x[2, 5] = float("nan")
    else:
        t[7, 0] = float("inf")
    with pytest.raises(ValueError, match=f"{where}_emb contains NaN or Inf"):
        coder_class_scores(x, t, cls, kind, 3, backend=backend)


def _bank(m=6, c=3, d=8):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(m, d, generator=g)
    cls = torch.arange(m) % c
    kind = torch.tensor([0, 1] * (m // 2))
    return torch.randn(4, d, generator=g), t, cls, kind


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(cls=a["cls"] + 5), r"text_class values must be in \[0, 3\)"),
        (lambda a: a.update(cls=a["cls"] - 1), "text_class values"),
        (lambda a: a.update(kind=a["kind"] * 2), "text_kind must be 0"),
        (lambda a: a.update(c=4), r"classes \[3\]\.\.\. have no texts"),
        (lambda a: a.update(c=0), "num_classes must be an int >= 1"),
        (lambda a: a.update(c=2.0), "num_classes must be an int"),
        (lambda a: a.update(scale=0.0), "scale must be positive"),
        (lambda a: a.update(scale=float("inf")), "scale must be positive and finite"),
        (lambda a: a.update(cls=a["cls"].float()), "text_class must be an integer"),
        (lambda a: a.update(kind=a["kind"][:-1]), r"text_kind must have shape \(6,\)"),
        (lambda a: a.update(t=a["t"][:, :5]), "D mismatch"),
        (lambda a: a.update(t=a["t"][:0], cls=a["cls"][:0], kind=a["kind"][:0]), "M = 0"),
        (lambda a: a.update(x=a["x"].double()), "unsupported dtype"),
        (lambda a: a.update(x=a["x"][0]), "image_emb must be 2-D"),
        (lambda a: a.update(t=a["t"].to("meta")), "is on"),
    ],
)
def test_scores_bad_arguments(mutate, match):
    x, t, cls, kind = _bank()
    a = {"x": x, "t": t, "cls": cls, "kind": kind, "c": 3, "scale": 100.0}
    mutate(a)
    with pytest.raises(ValueError, match=match):
        coder_class_scores(a["x"], a["t"], a["cls"], a["kind"], a["c"], scale=a["scale"])


def test_scores_reference_is_the_paper_formula(gen):
    """The chunked dense reference (the torch backend) equals the loop, in float64."""
    x = torch.randn(17, 12, generator=gen)
    t, cls, kind = text_bank(gen, 50, 7, 12, torch.float32, syn_max=5)
    ref = coder_class_scores_reference(x, t, cls, kind, 7, compute_dtype=torch.float64, max_elems=100)
    torch.testing.assert_close(ref, paper_scores(x, t, cls, kind, 7), atol=1e-10, rtol=1e-10)


# ============================================================================= affinity
def check_affinity(a, x, y, t):
    n, d = x.shape
    k = y.shape[0]
    assert a.shape == (n, k) and a.dtype == torch.float32
    if n == 0 or k == 0:
        return
    ref = coder_affinity_reference(x.cpu(), y.cpu(), t.cpu(), compute_dtype=torch.float64)
    tol = 64 * 2.0**-23 * math.sqrt(d) + 1e-6
    err = (a.cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"affinity error {err.max():.3g} > {tol:.3g}"


# (N, K, M, D): M < D, M > D, M over one CPU Gram tile (4096), D split for the symmetric Gram.
AFF_SIZES = [(1, 1, 1, 3), (7, 5, 23, 65), (131, 37, 401, 130), (203, 101, 5003, 260)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", AFF_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_affinity_matches_reference(gen, backend, dtype, size):
    n, k, m, d = size
    if backend == "triton" and (n + k) * m * d > 2_000_000:
        pytest.skip("interpreter: small sizes only")
    x = torch.randn(n, d, generator=gen).to(dtype)
    y = torch.randn(k, d, generator=gen).to(dtype)
    t = torch.randn(m, d, generator=gen).to(dtype)
    a = coder_affinity(x, y, t, backend=backend)
    check_affinity(a, x, y, t)


def test_affinity_reference_is_dense_coder_cosine(gen):
    x, y, t = (torch.randn(s, 10, generator=gen) for s in (6, 4, 30))
    cx = F.normalize(F.normalize(x.double(), dim=1) @ F.normalize(t.double(), dim=1).T, dim=1)
    cy = F.normalize(F.normalize(y.double(), dim=1) @ F.normalize(t.double(), dim=1).T, dim=1)
    ref = coder_affinity_reference(x, y, t, compute_dtype=torch.float64, max_elems=7)
    torch.testing.assert_close(ref, cx @ cy.T, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_affinity_edge_cases(gen, backend):
    x = torch.randn(8, 20, generator=gen)
    y = torch.randn(5, 20, generator=gen)
    t = torch.randn(40, 20, generator=gen)
    x[3] = 0
    y[1] = 0
    t[2] = 0
    a = coder_affinity(x[:, :17], y.T.contiguous().T[:, :17], t[:, :17], backend=backend)
    check_affinity(a, x[:, :17], y[:, :17], t[:, :17])
    assert bool((a[3] == 0).all()) and bool((a[:, 1] == 0).all())
    # self-affinity of non-zero rows is 1
    s = coder_affinity(x, x, t, backend=backend)
    keep = torch.arange(8) != 3
    torch.testing.assert_close(s.diagonal()[keep], torch.ones(7), atol=1e-5, rtol=0)
    assert coder_affinity(x[:0], y, t, backend=backend).shape == (0, 5)
    assert coder_affinity(x, y[:0], t, backend=backend).shape == (8, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["x", "y", "text_emb"])
def test_affinity_non_finite_raise(gen, backend, which):
    args = {"x": torch.randn(4, 8, generator=gen), "y": torch.randn(3, 8, generator=gen),
            "text_emb": torch.randn(9, 8, generator=gen)}
    args[which][1, 2] = float("nan")
    with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
        coder_affinity(args["x"], args["y"], args["text_emb"], backend=backend)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(3, 7), torch.randn(9, 8)), "D mismatch"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 8), torch.randn(9, 7)), "D mismatch"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 8), torch.randn(0, 8)), "M = 0"),
        (lambda: (torch.randn(4, 8).double(), torch.randn(3, 8), torch.randn(9, 8)), "unsupported dtype"),
        (lambda: (torch.randn(4, 8), torch.randn(3), torch.randn(9, 8)), "y must be 2-D"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 8, device="meta"), torch.randn(9, 8)), "is on"),
    ],
)
def test_affinity_bad_arguments(make, match):
    x, y, t = make()
    with pytest.raises(ValueError, match=match):
        coder_affinity(x, y, t)


# ============================================================================= compile
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=CPU_SKIP)])
def test_torch_compile_fullgraph(gen, backend):
    x = torch.randn(9, 12, generator=gen)
    t, cls, kind = text_bank(gen, 30, 5, 12, torch.float32)

    def f(a, txt):
        s = coder_class_scores(a * 2.0, txt, cls, kind, 5, backend=backend)
        return s.argmax(dim=1), coder_affinity(a, a[:3], txt, backend=backend).sum(dim=1)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, t)
    want = f(x, t)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_opcheck_custom_ops(gen):
    from nolabels.ops.coder import _affinity_op, _scores_op

    backend = "cpu" if library_cpu_status() is None else "torch"
    x = torch.randn(9, 6, generator=gen)
    t, cls, kind = text_bank(gen, 14, 3, 6, torch.float32)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(_scores_op, (x, t, cls, kind, 3, 100.0, backend), test_utils=utils)
    torch.library.opcheck(_affinity_op, (x, x[:4], t, backend), test_utils=utils)


# ============================================================================= GPU
def _gpu_backend_or_skip(backend):
    if backend == "cuda" and library_cuda_status() is not None:
        pytest.skip(library_cuda_status())
    if backend == "triton" and _INTERP:
        pytest.skip("set NOLABELS_TEST_GPU=1 to compile Triton for the GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_scores_and_affinity(gen, backend, dtype):
    _gpu_backend_or_skip(backend)
    for n, m, c, d in SIZES + [(2049, 19_000, 1000, 512)]:
        x = torch.randn(n, d, generator=gen).to(dtype)
        t, cls, kind = text_bank(gen, m, c, d, dtype, syn_max=3 if c > 1 else None)
        s = coder_class_scores(x.cuda(), t.cuda(), cls.cuda(), kind.cuda(), c, backend=backend)
        rows = torch.arange(min(n, 300))
        check_scores(s[: len(rows)], x[rows], t, cls, kind, c)
    for n, k, m, d in AFF_SIZES + [(2000, 1600, 15_000, 512)]:
        x, y, t = (torch.randn(s, d, generator=gen).to(dtype) for s in (n, k, m))
        a = coder_affinity(x.cuda(), y.cuda(), t.cuda(), backend=backend)
        check_affinity(a, x, y, t)
    x = torch.randn(6, 8, generator=gen).cuda()
    x[1, 1] = float("nan")
    t, cls, kind = text_bank(gen, 12, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="image_emb"):
        coder_class_scores(x, t.cuda(), cls.cuda(), kind.cuda(), 3, backend=backend)


def test_finiteness_check_fast_path_is_exact():
    from nolabels.ops.coder import _all_finite

    assert _all_finite(torch.full((10, 3), 3e38))  # the float32 sum overflows; values are finite
    assert _all_finite(torch.empty(0, 4))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(7, 5)
        t[3, 2] = bad
        assert not _all_finite(t)
        assert not _all_finite(t.bfloat16())
    t = torch.zeros(4, 4)
    t[0, 0], t[1, 1] = float("inf"), float("-inf")  # sums to NaN
    assert not _all_finite(t)
