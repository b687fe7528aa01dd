"""ops.topk_similarity: every backend against the float64 reference.

Checks (ties are legal, so indices are never compared directly):
  * the float64 similarity at each returned index equals the float64 j-th
    largest similarity within ``tol`` (the selection is right),
  * each returned value equals the float64 similarity at its index within ``tol``,
  * indices are distinct, in range, values descending.
tol = mag * 16 * 2^-23 * sqrt(D) + 1e-7, mag = 1 (cosine) or |q| max|key| (inner product):
float32 accumulation of a D-term dot product of float32-rounded normalised rows.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from nolabels.backends import library_cpu_status, library_cuda_status, triton_status
from nolabels.ops import topk_similarity

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INTERP = os.environ.get("TRITON_INTERPRET") == "1"

CPU_SKIP = pytest.mark.cpu_kernel  # skipped without the library; failed if it was expected (conftest)
TRITON_SKIP = pytest.mark.skipif(triton_status() is not None or not _INTERP,
                                 reason="triton interpreter not enabled")
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpu", id="cpu", marks=CPU_SKIP),
    pytest.param("cpu-exact", id="cpu-exact", marks=CPU_SKIP),  # NOLABELS_TOPK_FILTER=off
    pytest.param("triton", id="triton-interp", marks=TRITON_SKIP),
]


@pytest.fixture
def run(monkeypatch):
    """Call the op with a backend id; 'cpu' forces the bf16-filter path, 'cpu-exact' the float32 one."""

    def call(q, keys, k, backend, **kw):
        if backend.startswith("cpu"):
            monkeypatch.setenv("NOLABELS_TOPK_FILTER", "off" if backend == "cpu-exact" else "on")
            backend = "cpu"
        return topk_similarity(q, keys, k, backend=backend, **kw)

    return call


def sims64(q, keys, normalize=True):
    q, keys = q.double(), keys.double()
    if normalize:
        q, keys = F.normalize(q, dim=1, eps=1e-12), F.normalize(keys, dim=1, eps=1e-12)
    return q @ keys.T


def check(values, indices, q, keys, k, normalize=True):
    n, d = q.shape
    m = keys.shape[0]
    assert values.shape == (n, k) and values.dtype == torch.float32
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    if n == 0:
        return
    s = sims64(q.cpu(), keys.cpu(), normalize)
    idx = indices.cpu()
    assert bool((idx >= 0).all()) and bool((idx < m).all())
    srt = idx.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "duplicate indices in a row"
    if normalize:
        mag = torch.ones(n, 1, dtype=torch.float64)
    else:
        mag = q.cpu().double().norm(dim=1, keepdim=True) * keys.cpu().double().norm(dim=1).max()
    tol = mag * 16 * 2.0**-23 * math.sqrt(d) + 1e-7
    chosen = s.gather(1, idx)
    best = s.topk(k, dim=1).values
    err = (chosen - best).abs()
    assert bool((err <= tol).all()), f"selection error {err.max():.3g}"
    verr = (values.cpu().double() - chosen).abs()
    assert bool((verr <= tol).all()), f"value error {verr.max():.3g}"
    v = values.cpu()
    assert bool((v[:, 1:] <= v[:, :-1]).all()), "values not descending"


def inputs(gen, n, m, d, dtype, scale_rows=False):
    q = torch.randn(n, d, generator=gen)
    keys = torch.randn(m, d, generator=gen)
    if scale_rows:
        q = q * torch.rand(n, 1, generator=gen).mul(3).add(0.1)
        keys = keys * torch.rand(m, 1, generator=gen).mul(3).add(0.1)
    return q.to(dtype), keys.to(dtype)


# (N, M, D, k): odd sizes, none a multiple of a block size; M > 1024 spans several CPU tiles.
SIZES = [(1, 1, 3, 1), (7, 13, 65, 5), (131, 1001, 67, 17), (1003, 5003, 130, 10)]
TRITON_MAX_WORK = 7 * 200  # the interpreter is slow: N * M at most this


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(gen, run, backend, dtype, size):
    n, m, d, k = size
    if backend == "triton" and n * m > TRITON_MAX_WORK:
        pytest.skip("interpreter: small sizes only")
    q, keys = inputs(gen, n, m, d, dtype)
    v, i = run(q, keys, k, backend)
    check(v, i, q, keys, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inner_product(gen, run, backend):
    q, keys = inputs(gen, 6, 150, 33, torch.float32, scale_rows=True)
    v, i = run(q, keys, 7, backend, normalize=False)
    check(v, i, q, keys, 7, normalize=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 64])
def test_various_k(gen, run, backend, k):
    q, keys = inputs(gen, 5, 150, 17, torch.float32)
    v, i = run(q, keys, k, backend)
    check(v, i, q, keys, k)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k_1024_and_k_equals_m(gen, run, backend, dtype):
    q, keys = inputs(gen, 9, 3001, 40, dtype)
    v, i = run(q, keys, 1024, backend)
    check(v, i, q, keys, 1024)
    v, i = run(q, keys[:700], 700, backend)  # k == M: every key, sorted
    check(v, i, q, keys[:700], 700)
    assert sorted(i[0].tolist()) == list(range(700))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(gen, run, backend):
    base_q = torch.randn(40, 90, generator=gen)
    base_k = torch.randn(31, 300, generator=gen)
    q = base_q[::3, 5:66:2]  # (14, 31)
    keys = base_k.T  # (300, 31) column-major
    assert not q.is_contiguous() and not keys.is_contiguous()
    v, i = run(q, keys, 4, backend)
    check(v, i, q, keys, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(gen, run, backend):
    q, keys = inputs(gen, 5, 60, 12, torch.float32)
    q[1] = 0
    keys[7] = 0
    v, i = run(q, keys, 3, backend)
    check(v, i, q, keys, 3)
    assert bool((v[1] == 0).all())
    assert bool(torch.isfinite(v).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_prefer_lower_index(gen, run, backend):
    # 6 distinct keys, each repeated: exactly equal similarities.
    base = torch.randn(6, 16, generator=gen)
    keys = base.repeat(25, 1)  # key j equals key j % 6
    q = torch.randn(4, 16, generator=gen)
    v, i = run(q, keys, 5, backend)
    check(v, i, q, keys, 5)
    if backend != "torch":  # torch.topk's order among ties is unspecified
        best = sims64(q, base).argmax(dim=1)
        # the five best are the five first copies of the best key: j = best + 6 t
        assert i.tolist() == [[b + 6 * t for t in range(5)] for b in best.tolist()]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] not in ("triton",)])
def test_near_ties_below_bf16_resolution(gen, run, backend):
    """Keys that differ by far less than bfloat16's resolution: a bf16-only ranking
    would be arbitrary; the cpu filter path must re-score them exactly."""
    d, m = 256, 3000
    # cos(q, key_j) = 0.5 + 1e-5 * perm(j): distinct, 1e-5 apart (>> float32 error,
    # << bfloat16's spacing of 2^-9 near 0.5), in a randomly rotated basis.
    c = 0.5 + 1e-5 * torch.randperm(m, generator=gen).double()
    planar = torch.zeros(m, d, dtype=torch.float64)
    planar[:, 0], planar[:, 1] = c, (1 - c * c).sqrt()
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    keys = (planar @ rot).float()
    e = torch.zeros(2, d, dtype=torch.float64)
    e[0, 0] = 1.0
    e[1, 0], e[1, 2] = 1.0, 0.3  # same order of cosines, scaled
    q = (e @ rot).float()
    v, i = run(q, keys, 20, backend)
    s = sims64(q, keys)
    want = s.topk(20, dim=1).values
    assert (want[:, :-1] - want[:, 1:]).min() > 5e-6  # distinct: the right set is unique
    check(v, i, q, keys, 20)
    assert torch.equal(i.sort(dim=1).values, s.topk(20, dim=1).indices.sort(dim=1).values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queries_and_mixed_dtypes(gen, run, backend):
    keys = torch.randn(20, 8, generator=gen)
    v, i = run(torch.empty(0, 8), keys, 3, backend)
    assert v.shape == (0, 3) and i.shape == (0, 3)
    q = torch.randn(3, 8, generator=gen).bfloat16()
    v, i = run(q, keys, 3, backend)  # keys cast to bfloat16
    check(v, i, q, keys.bfloat16(), 3)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy on inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q_nan", "q_inf", "k_nan", "k_inf"])
def test_non_finite_inputs_raise(gen, run, backend, where):
    q, keys = inputs(gen, 6, 40, 8, torch.float32)
    if where == "q_nan":
        q[3, 2] = float("nan")
    elif where == "q_inf":
        q[5, 0] = float("-inf")
    elif where == "k_nan":
        keys[33, 1] = float("nan")
    else:
        keys[2, 4] = float("inf")
    name = "queries" if where.startswith("q") else "keys"
    with pytest.raises(ValueError, match=name):
        run(q, keys, 3, backend)


@pytest.mark.parametrize(
    "make, k, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(5, 8)), 6, r"k must be in \[1, M=5\]"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8)), 0, "k must be in"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8)), 2.0, "k must be an int"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8)), True, "k must be an int"),
        (lambda: (torch.randn(4, 8), torch.randn(0, 8)), 1, "M = 0"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 7)), 1, "D mismatch"),
        (lambda: (torch.randn(4), torch.randn(5, 8)), 1, "queries must be 2-D"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8, 1)), 1, "keys must be 2-D"),
        (lambda: (torch.randn(4, 8).double(), torch.randn(5, 8)), 1, "unsupported dtype"),
        (lambda: (torch.randn(4, 8), torch.randint(0, 2, (5, 8))), 1, "unsupported dtype"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8, device="meta")), 1, "is on"),
        (lambda: ([[1.0]], torch.randn(5, 8)), 1, "must be a torch.Tensor"),
    ],
)
def test_bad_arguments(make, k, match):
    q, keys = make()
    with pytest.raises(ValueError, match=match):
        topk_similarity(q, keys, k)


def test_backend_limits_and_reasons():
    q, keys = torch.randn(2, 8), torch.randn(300, 8)
    with pytest.raises(ValueError, match="cuda"):
        topk_similarity(q, keys, 3, backend="cuda")
    if triton_status() is None and _INTERP:
        with pytest.raises(ValueError, match="k=257 > 256"):
            topk_similarity(q, keys, 257, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        topk_similarity(q, keys, 3, backend="faiss")


def test_auto_picks_cpu_library():
    from nolabels.backends import dispatch
    from nolabels.ops.coder import TOPK_IMPLS

    call = {"device": torch.device("cpu"), "dtype": torch.float32, "k": 1000}
    chosen = dispatch("topk_similarity", TOPK_IMPLS, "auto", torch.device("cpu"), call).name
    assert chosen == ("cpu" if library_cpu_status() is None else "torch")


# ----------------------------------------------------------------------------- compile
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=CPU_SKIP)])
def test_torch_compile_fullgraph(gen, backend):
    q, keys = inputs(gen, 9, 50, 12, torch.float32)

    def f(a, b):
        v, i = topk_similarity(a * 2.0, b, 4, backend=backend)
        return v.sum(dim=1), i

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, keys)
    want = f(q, keys)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_opcheck_custom_op(gen):
    from nolabels.ops.coder import _topk_op

    q, keys = inputs(gen, 9, 20, 6, torch.float32)
    backend = "cpu" if library_cpu_status() is None else "torch"
    torch.library.opcheck(_topk_op, (q, keys, 3, True, backend),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# CUDA: k = 10 and 200 take the register warp select (Q = 1, 8), k = 1024 the shared-memory
# block select; the kernels' source is also run on the CPU by test_coder_cuda_sim.py.
@pytest.mark.parametrize("size", SIZES + [(4099, 100_003, 512, 10), (513, 30_011, 128, 200),
                                          (257, 20_011, 96, 1024)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_reference(gen, backend, dtype, size):
    if backend == "cuda" and library_cuda_status() is not None:
        pytest.skip(library_cuda_status())
    if backend == "triton" and _INTERP:
        pytest.skip("set NOLABELS_TEST_GPU=1 to compile Triton for the GPU")
    n, m, d, k = size
    if backend == "triton" and k > 256:
        pytest.skip("triton: k <= 256")
    q, keys = inputs(gen, n, m, d, dtype)
    q, keys = q.cuda(), keys.cuda()
    v, i = topk_similarity(q, keys, k, backend=backend)
    assert v.device.type == "cuda"
    rows = torch.randperm(n, generator=gen)[:200].cuda()  # the float64 check is (rows, M)
    check(v[rows], i[rows], q[rows], keys, k)
    v, i = topk_similarity(q[:50], keys, min(k, 7), normalize=False, backend=backend)
    check(v, i, q[:50], keys, min(k, 7), normalize=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_edge_cases(gen, backend):
    if backend == "cuda" and library_cuda_status() is not None:
        pytest.skip(library_cuda_status())
    if backend == "triton" and _INTERP:
        pytest.skip("set NOLABELS_TEST_GPU=1 to compile Triton for the GPU")
    base = torch.randn(6, 16, generator=gen)
    keys = base.repeat(25, 1).cuda()
    q = torch.randn(4, 16, generator=gen).cuda()
    _, i = topk_similarity(q, keys, 5, backend=backend)
    best = sims64(q.cpu(), base).argmax(dim=1)
    assert i.cpu().tolist() == [[b + 6 * t for t in range(5)] for b in best.tolist()]
    q2 = q.clone()
    q2[1, 1] = float("nan")
    with pytest.raises(ValueError, match="queries"):
        topk_similarity(q2, keys, 3, backend=backend)
    k2 = keys.clone()
    k2[100, 0] = float("inf")
    with pytest.raises(ValueError, match="keys"):
        topk_similarity(q, k2, 3, backend=backend)
    assert topk_similarity(q[:0], keys, 2, backend=backend)[0].shape == (0, 2)
