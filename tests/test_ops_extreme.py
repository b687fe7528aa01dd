"""Ops on extreme inputs: every CPU-available backend against float64 (issue 11, part D).

* Rows whose squared norm over- or underflows float32 (max-abs entry 1e19, 1e30, 3e38 and
  1e-30) must normalise to what float64 gives: the same unit vector, or for a row below
  the eps (1e-12) the same ``x / eps``. Checked with each op's own float64 checker
  (tests/test_pseudo_label.py, test_topk_similarity.py, test_coder_ops.py): the float64
  logit/similarity at each chosen index, never the index itself.
* prompt_attention: NaN in q makes exactly that output row NaN on every backend.
* select_per_class: each malformed argument is an InputError naming it.
The CUDA kernels are checked on the same inputs through the simulator
(test_pseudo_label_cuda_sim.py, test_coder_cuda_sim.py).
"""
from __future__ import annotations

import os

import pytest
import torch
from nolabels.backends import triton_status
from nolabels.errors import InputError
from nolabels.ops import (
    PseudoLabels,
    coder_affinity,
    coder_class_scores,
    prompt_attention,
    pseudo_label,
    select_per_class,
    topk_similarity,
)
from nolabels.reference.attention import prompt_attention_naive
from test_coder_ops import check_affinity, check_scores, text_bank
from test_pseudo_label import check_against_reference
from test_topk_similarity import check as check_topk

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpu", id="cpu", marks=pytest.mark.cpu_kernel),  # conftest's rule
    pytest.param("triton", id="triton-interp", marks=pytest.mark.skipif(
        triton_status() is not None or not _INTERP, reason="triton interpreter not enabled")),
]
# Max-abs entry of the scaled rows: squared norms overflow float32 (1e19 with D >= 4),
# the norm itself overflows (3e38), products of two such rows overflow (1e19 x 1e19),
# and a row far below the normalisation eps whose squares underflow (1e-30).
SCALES = [1e19, 1e30, 3e38, 1e-30]
WHICH = ["first", "second", "both"]  # which operand's rows are scaled
# bfloat16 has float32's exponent range (float16 cannot hold these values).
DTYPES = [torch.float32, torch.bfloat16]


def scaled(gen, n, d, s, dtype=torch.float32):
    """(n, d) random rows with max-abs entry s (exactly representable scaling: no Inf)."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = x / x.abs().amax(dim=1, keepdim=True) * s
    return x.to(dtype)


def mixed(gen, n, d, dtype=torch.float32):
    """Rows of every magnitude interleaved (one block of a fused kernel sees all of them)."""
    mags = [1.0, 1e19, 3e38, 1e-30, 1e30, 0.0, 5e-13, 1e-3]
    x = torch.cat([scaled(gen, 1, d, mags[i % len(mags)]) for i in range(n)])
    return x.to(dtype)


def pair(gen, n, m, d, s, which, dtype):
    a = scaled(gen, n, d, s if which in ("first", "both") else 1.0, dtype)
    b = scaled(gen, m, d, s if which in ("second", "both") else 1.0, dtype)
    return a, b


# =========================================================================== pseudo_label
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("s", SCALES, ids=lambda s: f"{s:g}")
def test_pseudo_label_scaled_rows(gen, backend, dtype, which, s):
    x, w = pair(gen, 23, 19, 40, s, which, dtype)
    pl = pseudo_label(x, w, topk=3, backend=backend)
    check_against_reference(pl, x, w, 100.0, 3, True, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pseudo_label_mixed_magnitudes(gen, backend):
    x = mixed(gen, 40, 33)
    w = mixed(gen, 17, 33)
    w[5] = scaled(gen, 1, 33, 1.0)  # not only zero/tiny classes at the odd positions
    pl = pseudo_label(x, w, topk=2, backend=backend)
    check_against_reference(pl, x, w, 100.0, 2, True, backend)
    assert bool(torch.isfinite(pl.lse).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pseudo_label_scaling_a_row_changes_nothing(gen, backend):
    """Cosine is scale-free: a row times 2^62 or 2^-100 gets the same pseudo-labels."""
    x = scaled(gen, 12, 24, 1.0)
    w = scaled(gen, 7, 24, 1.0)
    base = pseudo_label(x, w, topk=3, backend=backend)
    for f in (2.0**62, 2.0**126):
        pl = pseudo_label(x * f, w * 2.0**-20, topk=3, backend=backend)
        torch.testing.assert_close(pl.probs, base.probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pl.entropy, base.entropy, rtol=1e-5, atol=1e-6)


# =========================================================================== topk_similarity
@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("cpu-exact", id="cpu-exact",
                                                             marks=pytest.mark.cpu_kernel)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("s", SCALES, ids=lambda s: f"{s:g}")
def test_topk_scaled_rows(gen, monkeypatch, backend, dtype, which, s):
    if backend.startswith("cpu"):
        monkeypatch.setenv("NOLABELS_TOPK_FILTER", "off" if backend == "cpu-exact" else "on")
        backend = "cpu"
    q, keys = pair(gen, 9, 70, 36, s, which, dtype)
    v, i = topk_similarity(q, keys, 5, backend=backend)
    check_topk(v, i, q, keys, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_mixed_magnitudes(gen, backend):
    q = mixed(gen, 20, 30)
    keys = torch.cat([mixed(gen, 40, 30), scaled(gen, 40, 30, 1.0)])
    v, i = topk_similarity(q, keys, 6, backend=backend)
    check_topk(v, i, q, keys, 6)


# =========================================================================== coder_class_scores
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("s", SCALES, ids=lambda s: f"{s:g}")
def test_class_scores_scaled_rows(gen, backend, dtype, which, s):
    t, cls, kind = text_bank(gen, 30, 6, 20, torch.float32, syn_max=3)
    x, tt = pair(gen, 11, 30, 20, s, which, dtype)
    t = (t / t.abs().amax(dim=1, keepdim=True)).to(dtype) if which == "first" else tt
    out = coder_class_scores(x, t, cls, kind, 6, backend=backend)
    check_scores(out, x, t, cls, kind, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_scores_mixed_magnitudes(gen, backend):
    _, cls, kind = text_bank(gen, 40, 7, 26, torch.float32, syn_max=4)
    x, t = mixed(gen, 30, 26), mixed(gen, 40, 26)
    t[t.abs().amax(dim=1) == 0] = 1.0  # zero texts are allowed but say nothing
    out = coder_class_scores(x, t, cls, kind, 7, backend=backend)
    check_scores(out, x, t, cls, kind, 7)


# =========================================================================== coder_affinity
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", ["x", "y", "text", "all"])
@pytest.mark.parametrize("s", SCALES, ids=lambda s: f"{s:g}")
def test_affinity_scaled_rows(gen, backend, dtype, which, s):
    def rows(n, name):
        return scaled(gen, n, 18, s if which in (name, "all") else 1.0, dtype)

    x, y, t = rows(9, "x"), rows(6, "y"), rows(25, "text")
    a = coder_affinity(x, y, t, backend=backend)
    check_affinity(a, x, y, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_affinity_mixed_magnitudes(gen, backend):
    x, y, t = mixed(gen, 19, 21), mixed(gen, 13, 21), mixed(gen, 31, 21)
    a = coder_affinity(x, y, t, backend=backend)
    check_affinity(a, x, y, t)
    assert bool(torch.isfinite(a).all())


# =========================================================================== attention
ATTN_BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton-interp", marks=pytest.mark.skipif(
        triton_status() is not None or not _INTERP, reason="triton interpreter not enabled")),
]


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prompts", [0, 3])
def test_attention_nan_query_row_gives_nan_row(gen, backend, dtype, prompts):
    """IEEE propagation: a NaN anywhere in q[b, i, h] makes out[b, i, h, :] NaN and
    touches no other output row (they match the float64 reference)."""
    b, n, h, d = 2, 9, 2, 16
    q, k, v = (torch.randn(b, n, h, d, generator=gen).to(dtype) for _ in range(3))
    pk = pv = None
    if prompts:
        pk, pv = (torch.randn(prompts, h, d, generator=gen).to(dtype) for _ in range(2))
    bad = torch.zeros(b, n, h, dtype=torch.bool)
    for bi, i, hi, j in [(0, 1, 0, 3), (1, 4, 1, 0), (1, 8, 0, 15), (0, 1, 1, 7)]:
        q[bi, i, hi, j] = float("nan")
        bad[bi, i, hi] = True
    out = prompt_attention(q, k, v, pk, pv, backend=backend)
    assert bool(out[bad].isnan().all()), "a NaN query row must give a NaN output row"
    assert not bool(out[~bad].isnan().any()), "NaN leaked into other rows"
    ref, _ = prompt_attention_naive(*(t.double() if t is not None else None
                                      for t in (q.nan_to_num(0.0), k, v, pk, pv)))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out[~bad].double(), ref[~bad], atol=tol, rtol=tol)
    # The rest of the documented contract: a NaN key poisons its (b, h); a NaN value
    # component poisons that component of every row of its (b, h).
    q = q.nan_to_num(0.0)
    k[1, 2, 0, 5] = float("nan")
    v[0, 3, 1, 7] = float("nan")
    out = prompt_attention(q, k, v, pk, pv, backend=backend)
    nan = out.isnan()
    assert bool(nan[1, :, 0].all()) and bool(nan[0, :, 1, 7].all())
    assert int(nan.sum()) == n * d + n


# =========================================================================== select_per_class
def _pl(classes, probs):
    classes = torch.as_tensor(classes)
    probs = torch.as_tensor(probs, dtype=torch.float32)
    n = classes.shape[0]
    return PseudoLabels(classes[:, 0].clone(), probs, classes, torch.zeros(n), torch.zeros(n))


GOOD = ([[0, 2], [1, 0], [2, 1]], [[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_classes": 2}, r"num_classes.*class 2"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 3.0}, "num_classes"),
        ({"pl": _pl([[0, 2], [-1, 0], [2, 1]], GOOD[1])}, r"pl\.classes.*negative"),
        ({"pl": _pl(torch.tensor(GOOD[0]).float(), GOOD[1])}, r"pl\.classes.*integer"),
        ({"pl": _pl(GOOD[0], [[0.9, 0.1], [float("nan"), 0.4], [0.7, 0.3]])}, r"pl\.probs.*NaN"),
        ({"row_ids": torch.tensor([0.0, 1.5, 2.0])}, r"row_ids.*integer"),
        ({"row_ids": [0, 1, 2]}, r"row_ids.*torch.Tensor"),
    ],
)
def test_select_per_class_bad_arguments(kw, match):
    args = {"pl": _pl(*GOOD), "k": 1}
    args.update(kw)
    pl, k = args.pop("pl"), args.pop("k")
    with pytest.raises(InputError, match=match):
        select_per_class(pl, k, **args)



@pytest.mark.cpu_kernel
@pytest.mark.parametrize("backend", ["cpu", "cpu-exact"])
def test_cpu_rows_near_float32_max_normalise_to_full_precision(gen, monkeypatch, backend):
    """A row of norm above ~8.5e37 has 1/|x| below FLT_MIN: a float32 factor keeps only
    ~18 bits there. The same rows scaled by 2^-100 (an exact power of two, ordinary
    magnitudes) must give the same similarities and scores to float32 rounding."""
    monkeypatch.setenv("NOLABELS_TOPK_FILTER", "off" if backend == "cpu-exact" else "on")
    big = scaled(gen, 40, 512, 3e38)
    small = big * 2.0**-100
    v_big, _ = topk_similarity(big, big, 1, backend="cpu")
    v_small, _ = topk_similarity(small, small, 1, backend="cpu")
    assert float((v_big - v_small).abs().max()) <= 5e-7
    t, cls, kind = text_bank(gen, 30, 6, 512, torch.float32, syn_max=3)
    s_big = coder_class_scores(big, t, cls, kind, 6, scale=1.0, backend="cpu")
    s_small = coder_class_scores(small, t, cls, kind, 6, scale=1.0, backend="cpu")
    assert float((s_big - s_small).abs().max()) <= 5e-7
