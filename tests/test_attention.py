"""ops.prompt_attention: every backend against the float64 reference, forward and all five gradients.

Tolerances (FlashAttention's rule). For float16/bfloat16 the error of ours against
the float64 reference must be at most 2x the error of plain PyTorch computing the
same attention in the low precision (``prompt_attention_naive(upcast=False)``:
matmuls and softmax output in the input dtype, like FlashAttention's
``attention_ref(upcast=False)``), plus a small floor of eps(dtype)/8 relative to
the tensor's magnitude (max errors of a few hundred elements are noisy). For
float32 the error must be below 1e-5 relative to the tensor's magnitude (ours is
~1e-7; a wrong mask, segment or reduction is O(1)).

Under ``TRITON_INTERPRET=1`` the Triton kernels run on the CPU at small sizes
with small blocks (16/32), so L = 7, 50, 66 and P = 5, 37 all end in partial
blocks, and L = 50, 66 and P = 37 span several.
"""
from __future__ import annotations

import os

import pytest
import torch
from nolabels.backends import triton_status
from nolabels.ops import prompt_attention
from nolabels.reference.attention import (
    prompt_attention_naive,
    prompt_attention_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
NAMES = ("out", "dq", "dk", "dv", "dprompt_k", "dprompt_v")

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_interp = pytest.mark.skipif(
    triton_status() is not None or not INTERP, reason="triton interpreter not enabled"
)


def make_inputs(gen, b, n, h, d, p, dtype, device="cpu", prompts=True):
    """q, k, v (B, L, H, d), prompt_k, prompt_v (P, H, d) or None, dout; in ``dtype``."""
    q, k, v = (torch.randn(b, n, h, d, generator=gen) for _ in range(3))
    # larger logits than randn/sqrt(d): a peaked softmax exercises the online max
    q = q * 2.0
    if prompts:
        pk, pv = (torch.randn(p, h, d, generator=gen) for _ in range(2))
    else:
        pk = pv = None
    dout = torch.randn(b, n, h, d, generator=gen)
    cast = lambda t: None if t is None else t.to(dtype).to(device)
    return [cast(t) for t in (q, k, v, pk, pv)], cast(dout)


def run_with_grads(fn, inputs, dout):
    """(out, *grads of the five inputs) with the grads of absent prompts None."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wrt, dout, allow_unused=True, materialize_grads=True))
    return [out] + [None if t is None else next(grads) for t in leaves]


def reference_results(inputs, dout, upcast_low=False):
    """float64 ground truth, and (if asked) torch's own low-precision results."""
    inputs64 = [None if t is None else t.double() for t in inputs]  # float64 leaves and grads
    ref = run_with_grads(prompt_attention_reference, inputs64, dout.double())
    low = None
    if upcast_low:
        low = run_with_grads(lambda *a: prompt_attention_naive(*a, upcast=False)[0], inputs, dout)
    return ref, low


def assert_close_to_reference(got, ref, low, dtype, what=""):
    for name, g, r, lo in zip(NAMES, got, ref, low if low is not None else [None] * 6):
        if r is None:
            assert g is None, name
            continue
        assert g is not None, name
        assert g.shape == r.shape, (name, g.shape, r.shape)
        assert g.dtype == dtype, (name, g.dtype)
        if r.numel() == 0:
            continue
        assert bool(torch.isfinite(g).all()), f"{what} {name}: non-finite"
        mag = r.abs().max().item()
        err = (g.double() - r).abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-5 * mag + 1e-12, f"{what} {name}: err {err:.3g} vs |ref| {mag:.3g}"
        else:
            err_pt = (lo.double() - r).abs().max().item()
            bound = 2 * err_pt + EPS[dtype] / 8 * mag
            assert err <= bound, (
                f"{what} {name}: err {err:.3g} > 2 x torch's {err_pt:.3g} + floor "
                f"(|ref| {mag:.3g})"
            )


# ----------------------------------------------------------------------------- triton (interpreter)
@needs_interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("p", [0, 1, 5])
@pytest.mark.parametrize("n", [7, 50, 66])
def test_triton_matches_float64_reference(gen, n, p, d, dtype):
    inputs, dout = make_inputs(gen, 2, n, 2, d, p, dtype)
    got = run_with_grads(lambda *a: prompt_attention(*a, backend="triton"), inputs, dout)
    ref, low = reference_results(inputs, dout, upcast_low=dtype != torch.float32)
    assert_close_to_reference(got, ref, low, dtype, f"L={n} P={p} d={d}")


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_without_prompts_and_lse(gen, dtype):
    """prompt_k = prompt_v = None (VPT-shallow); the saved log-sum-exp is right."""
    from nolabels.ops.attention import _fwd_op

    inputs, dout = make_inputs(gen, 2, 19, 3, 16, 0, dtype, prompts=False)
    got = run_with_grads(lambda *a: prompt_attention(*a, backend="triton"), inputs, dout)
    ref, low = reference_results(inputs, dout, upcast_low=dtype != torch.float32)
    assert_close_to_reference(got, ref, low, dtype, "no prompts")
    pk, pv = (torch.randn(4, 3, 16, generator=gen).to(dtype) for _ in range(2))
    q, k, v = inputs[:3]
    _, lse = _fwd_op(q, k, v, pk, pv, 0.3, "triton")
    _, lse_ref = prompt_attention_naive(q.double(), k.double(), v.double(), pk.double(),
                                        pv.double(), scale=0.3)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 19)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)


@needs_interp
def test_triton_many_prompt_blocks_and_batch_groups(gen, monkeypatch):
    """P = 37 spans two prompt blocks; 2 batch groups of 2 and 1 images in the prompt reduction."""
    import nolabels.triton.attention as tri

    monkeypatch.setattr(tri, "MAX_PROMPT_GROUPS", 2)
    assert tri.prompt_groups(3) == (2, 2)
    inputs, dout = make_inputs(gen, 3, 23, 2, 32, 37, torch.float32)
    got = run_with_grads(lambda *a: prompt_attention(*a, backend="triton", scale=0.2), inputs, dout)
    ref = run_with_grads(
        lambda *a: prompt_attention_reference(*a, scale=0.2),
        [t.double() for t in inputs], dout.double(),
    )
    assert_close_to_reference(got, ref, None, torch.float32, "P=37")


@needs_interp
def test_triton_strided_inputs(gen):
    """q, k, v as views of a packed (B, L, 3, H, d) projection; non-contiguous dout and prompts."""
    b, n, h, d, p = 2, 21, 2, 32, 6
    qkv = torch.randn(b, n, 3, h, d, generator=gen, dtype=torch.float32)
    pkv = torch.randn(p, 2, h, d, generator=gen)
    inputs = [qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], pkv[:, 0], pkv[:, 1]]
    assert not inputs[0].is_contiguous() and not inputs[3].is_contiguous()
    dout = torch.randn(b, h, n, d, generator=gen).transpose(1, 2)  # (B, L, H, d), strided
    got = run_with_grads(lambda *a: prompt_attention(*a, backend="triton"), inputs, dout)
    ref, _ = reference_results(inputs, dout)
    assert_close_to_reference(got, ref, None, torch.float32, "strided")


@needs_interp
def test_triton_float32_deterministic(gen):
    inputs, dout = make_inputs(gen, 3, 17, 2, 16, 5, torch.float32)
    a = run_with_grads(lambda *t: prompt_attention(*t, backend="triton"), inputs, dout)
    b = run_with_grads(lambda *t: prompt_attention(*t, backend="triton"), inputs, dout)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


@needs_interp
def test_triton_mixed_prompt_dtype_and_empty(gen):
    """float32 prompts with bfloat16 tokens are cast (grads come back float32); B = 0 and L = 0 work."""
    inputs, dout = make_inputs(gen, 2, 9, 2, 16, 3, torch.bfloat16)
    inputs[3], inputs[4] = inputs[3].float(), inputs[4].float()
    got = run_with_grads(lambda *a: prompt_attention(*a, backend="triton"), inputs, dout)
    assert got[0].dtype == torch.bfloat16
    assert got[4].dtype == torch.float32 and got[5].dtype == torch.float32
    ref, _ = reference_results(inputs, dout)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, atol=0.05, rtol=0.05)
    for b, n in ((0, 5), (2, 0)):
        inputs, dout = make_inputs(gen, b, n, 2, 16, 3, torch.float32)
        got = run_with_grads(lambda *a: prompt_attention(*a, backend="triton"), inputs, dout)
        assert got[0].shape == (b, n, 2, 16)
        assert torch.equal(got[4], torch.zeros(3, 2, 16))


# ----------------------------------------------------------------------------- torch backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0, 5])
def test_torch_backend_matches_float64_reference(gen, p, dtype):
    inputs, dout = make_inputs(gen, 3, 50, 2, 32, p, dtype)
    got = run_with_grads(lambda *a: prompt_attention(*a, backend="torch"), inputs, dout)
    ref, low = reference_results(inputs, dout, upcast_low=dtype != torch.float32)
    assert_close_to_reference(got, ref, low, dtype, "torch")


def test_torch_backend_empty(gen):
    for b, n in ((0, 5), (2, 0)):
        inputs, dout = make_inputs(gen, b, n, 2, 16, 3, torch.float32)
        got = run_with_grads(lambda *a: prompt_attention(*a, backend="torch"), inputs, dout)
        assert got[0].shape == (b, n, 2, 16)
        assert torch.equal(got[4], torch.zeros(3, 2, 16))


def test_reference_gradcheck(gen):
    inputs, _ = make_inputs(gen, 2, 5, 2, 4, 3, torch.float64)
    leaves = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(
        lambda *a: prompt_attention_reference(*a, scale=0.7), leaves, eps=1e-6, atol=1e-5
    )
    assert torch.autograd.gradcheck(
        lambda *a: prompt_attention_naive(*a, scale=0.7)[0], leaves, eps=1e-6, atol=1e-5
    )


def test_prompts_are_shared_keys_and_values(gen):
    """The op equals attention over [prompts ‖ tokens] written with explicit per-image loops."""
    inputs, _ = make_inputs(gen, 2, 6, 3, 8, 4, torch.float64)
    q, k, v, pk, pv = inputs
    out = prompt_attention_reference(q, k, v, pk, pv)
    for b in range(2):
        for h in range(3):
            kk = torch.cat([pk[:, h], k[b, :, h]])
            vv = torch.cat([pv[:, h], v[b, :, h]])
            w = torch.softmax(q[b, :, h] @ kk.T / 8**0.5, dim=-1)
            torch.testing.assert_close(out[b, :, h], w @ vv)


# ----------------------------------------------------------------------------- bad inputs
def _bad_cases():
    q = torch.randn(2, 5, 3, 8)
    pk = torch.randn(4, 3, 8)
    return [
        ("q", {"q": q[0]}),
        ("k", {"k": torch.randn(2, 6, 3, 8)}),
        ("v", {"v": torch.randn(2, 5, 3, 4)}),
        ("k", {"k": q.half()}),
        ("q", {"q": q.double(), "k": q.double(), "v": q.double()}),
        ("q", {"q": q.int(), "k": q.int(), "v": q.int()}),
        ("q", {"q": [1.0]}),
        ("d = 0", {"q": q[..., :0], "k": q[..., :0], "v": q[..., :0]}),
        ("both", {"prompt_k": pk, "prompt_v": None}),
        ("prompt_k", {"prompt_k": torch.randn(4, 2, 8), "prompt_v": torch.randn(4, 2, 8)}),
        ("prompt_v", {"prompt_k": pk, "prompt_v": torch.randn(4, 3)}),
        ("differ", {"prompt_k": pk, "prompt_v": torch.randn(5, 3, 8)}),
        ("prompt_k", {"prompt_k": pk.double(), "prompt_v": pk.double()}),
        ("scale", {"scale": float("nan")}),
        ("scale", {"scale": "big"}),
        ("unknown backend", {"backend": "nope"}),
    ]


@pytest.mark.parametrize("match,kw", _bad_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_value_error(match, kw):
    q = torch.randn(2, 5, 3, 8)
    args = {"q": q, "k": q.clone(), "v": q.clone(), "prompt_k": None, "prompt_v": None}
    args.update(kw)
    extra = {key: args.pop(key) for key in ("scale", "backend") if key in args}
    with pytest.raises(ValueError, match=match):
        prompt_attention(args["q"], args["k"], args["v"], args["prompt_k"], args["prompt_v"], **extra)


def test_backend_reasons(monkeypatch):
    q = torch.randn(1, 3, 1, 24)
    with pytest.raises(ValueError, match="head dim 24"):
        prompt_attention(q, q, q, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        prompt_attention(q[..., :16], q[..., :16], q[..., :16], backend="triton")
    # auto on the CPU takes the torch backend
    out = prompt_attention(q, q, q)
    torch.testing.assert_close(out, prompt_attention_reference(q, q, q))


def test_registered_for_info():
    from nolabels.backends import OP_REGISTRY, explain

    assert "prompt_attention" in OP_REGISTRY
    assert set(explain(OP_REGISTRY["prompt_attention"])) == {"torch", "triton"}


# ----------------------------------------------------------------------------- compile / opcheck
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
def test_torch_compile_fullgraph(gen, backend):
    inputs, dout = make_inputs(gen, 2, 9, 2, 16, 3, torch.float32)

    def f(q, k, v, pk, pv):
        return prompt_attention(q * 1.5, k, v, pk, pv, backend=backend).sin()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = run_with_grads(compiled, inputs, dout)
    want = run_with_grads(f, inputs, dout)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, msg=name)


@needs_interp
def test_opcheck_custom_ops(gen):
    from nolabels.ops.attention import _bwd_op, _fwd_op

    inputs, dout = make_inputs(gen, 2, 5, 2, 16, 3, torch.float32)
    q, k, v, pk, pv = inputs
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(_fwd_op, (q, k, v, pk, pv, 0.25, "triton"), test_utils=tests)
    torch.library.opcheck(_fwd_op, (q, k, v, None, None, 0.25, "triton"), test_utils=tests)
    out, lse = _fwd_op(q, k, v, pk, pv, 0.25, "triton")
    torch.library.opcheck(_bwd_op, (dout, q, k, v, pk, pv, out, lse, 0.25, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- GPU
GPU_SHAPES = [  # (B, L, H, d, P): ViT lengths, every supported head dim, P up to 64
    (4, 50, 12, 64, 16), (4, 50, 12, 64, 50), (3, 66, 12, 64, 0), (2, 100, 8, 32, 50),
    (2, 197, 12, 64, 1), (2, 257, 16, 64, 64), (3, 77, 4, 128, 33), (5, 131, 6, 16, 7),
]
# Every shape in bfloat16; float16 and float32 at two of them (each (dtype, d) pair is a
# separate Triton compile, and gpu_check.sh gives all GPU tests a few minutes).
GPU_CASES = [(s, torch.bfloat16) for s in GPU_SHAPES] + [
    (s, dt) for dt in (torch.float16, torch.float32) for s in (GPU_SHAPES[1], GPU_SHAPES[6])
]


def _gpu_triton_or_skip():
    if triton_status() is not None:
        pytest.skip(triton_status())
    if INTERP:
        pytest.skip("set NOLABELS_TEST_GPU=1 to compile Triton for the GPU")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,dtype", GPU_CASES, ids=["x".join(map(str, s)) + f"-{str(dt)[6:]}" for s, dt in GPU_CASES]
)
def test_gpu_triton_flash_tolerance_rule(gen, shape, dtype):
    _gpu_triton_or_skip()
    b, n, h, d, p = shape
    inputs, dout = make_inputs(gen, b, n, h, d, p, dtype, device="cuda")
    got = run_with_grads(lambda *a: prompt_attention(*a, backend="triton"), inputs, dout)
    ref, low = reference_results(inputs, dout, upcast_low=dtype != torch.float32)
    assert_close_to_reference(got, ref, low, dtype, f"gpu {shape}")


@pytest.mark.gpu
def test_gpu_float32_deterministic_at_training_shape(gen):
    _gpu_triton_or_skip()
    inputs, dout = make_inputs(gen, 512, 50, 12, 64, 50, torch.float32, device="cuda")
    a = run_with_grads(lambda *t: prompt_attention(*t, backend="triton"), inputs, dout)
    b = run_with_grads(lambda *t: prompt_attention(*t, backend="triton"), inputs, dout)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


@pytest.mark.gpu
def test_gpu_auto_compile_and_strided(gen):
    _gpu_triton_or_skip()
    b, n, h, d, p = 8, 66, 12, 64, 16
    qkv = torch.randn(b, n, 3, h, d, generator=gen).to("cuda", torch.bfloat16)
    pkv = torch.randn(p, 2, h, d, generator=gen).to("cuda", torch.bfloat16)
    inputs = [qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], pkv[:, 0], pkv[:, 1]]
    dout = torch.randn(b, n, h, d, generator=gen).to("cuda", torch.bfloat16)
    eager = run_with_grads(lambda *a: prompt_attention(*a), inputs, dout)  # auto -> triton
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: prompt_attention(*a), fullgraph=True)
    got = run_with_grads(compiled, inputs, dout)
    for name, g, w in zip(NAMES, got, eager):
        torch.testing.assert_close(g, w, msg=name)
    ref, low = reference_results(inputs, dout, upcast_low=True)
    assert_close_to_reference(eager, ref, low, torch.bfloat16, "gpu strided")
