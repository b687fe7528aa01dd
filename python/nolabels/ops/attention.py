"""Prompt-token attention for prompt-tuned ViTs (VPT-deep and VPT-shallow).

``prompt_attention(q, k, v, prompt_k, prompt_v)`` is attention whose keys and
values are the P prompt tokens, shared by the whole batch, followed by the L
tokens of each image. The torch backend expands and concatenates the prompts
and calls ``scaled_dot_product_attention``; the triton backend reads the
prompts with batch stride 0 inside a flash-style kernel (no expand, no cat),
saves only the output and the log-sum-exp, and reduces the prompt gradients
over the batch in the backward kernel.
"""
from __future__ import annotations

import torch

from nolabels.backends import (
    ANY_DEVICE,
    TRITON_MIN_CAPABILITY,
    BackendImpl,
    BackendName,
    define_op,
    lazy,
)
from nolabels.ops._validate import (
    SUPPORTED_DTYPES,
    check_dtype,
    check_finite_scalar,
    check_float_tensor,
    check_same_device,
)
from nolabels.reference.attention import default_scale, prompt_attention_reference

TRITON_HEAD_DIMS = (16, 32, 64, 128)


# --------------------------------------------------------------------------- backends
# run: (q, k, v, prompt_k, prompt_v, scale). A backend with ``backward`` runs as the
# custom ops below (run -> (out, lse (B, H, L) f32); backward(dout, q, k, v, prompt_k,
# prompt_v, out, lse, scale) -> (dq, dk, dv, dprompt_k, dprompt_v)); one without is
# differentiated by torch itself (run -> out; torch.compile traces it).
_TRITON = "nolabels.triton.attention"
PROMPT_ATTENTION = define_op("prompt_attention", (
    BackendImpl("triton", lazy(_TRITON, "prompt_attention_fwd_triton"), devices=("cuda",),
                dtypes=SUPPORTED_DTYPES, min_capability=TRITON_MIN_CAPABILITY, needs=("triton",),
                choices={"head_dim": TRITON_HEAD_DIMS},
                backward=lazy(_TRITON, "prompt_attention_bwd_triton")),
    # Plain autograd through SDPA.
    BackendImpl("torch", prompt_attention_reference, devices=(ANY_DEVICE,), dtypes=SUPPORTED_DTYPES),
))
BACKEND_IMPLS: tuple[BackendImpl, ...] = PROMPT_ATTENTION.backends


# --------------------------------------------------------------------------- custom ops
def _fwd_fake(q, k, v, prompt_k, prompt_v, scale, backend):
    b, n, h, d = q.shape
    return q.new_empty((b, n, h, d)), q.new_empty((b, h, n), dtype=torch.float32)


@PROMPT_ATTENTION.custom_op(fake=_fwd_fake, name="prompt_attention_fwd")
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None,
    prompt_v: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, L, H, d), lse (B, H, L) float32) of a fused backend."""
    return PROMPT_ATTENTION.backend(backend).run(q, k, v, prompt_k, prompt_v, scale)


def _bwd_fake(dout, q, k, v, prompt_k, prompt_v, out, lse, scale, backend):
    b, n, h, d = q.shape
    p = 0 if prompt_k is None else prompt_k.shape[0]
    return (
        q.new_empty((b, n, h, d)),
        q.new_empty((b, n, h, d)),
        q.new_empty((b, n, h, d)),
        q.new_empty((p, h, d)),
        q.new_empty((p, h, d)),
    )


@PROMPT_ATTENTION.custom_op(fake=_bwd_fake, name="prompt_attention_bwd")
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None,
    prompt_v: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dprompt_k, dprompt_v); the prompt gradients are (0, H, d) without prompts."""
    return PROMPT_ATTENTION.backend(backend).backward(dout, q, k, v, prompt_k, prompt_v, out, lse, scale)


def _setup_context(ctx, inputs, output):
    q, k, v, prompt_k, prompt_v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse)
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, dout, dlse):
    # lse is an internal output (never returned to users): dlse is ignored.
    q, k, v, prompt_k, prompt_v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv = _bwd_op(dout, q, k, v, prompt_k, prompt_v, out, lse, ctx.scale, ctx.backend)
    if prompt_k is None:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public op
def _validate(q, k, v, prompt_k, prompt_v, scale) -> None:
    op = "prompt_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(op, name, t, 4, "(B, L, H, d)")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but q is {q.dtype}")
        check_same_device(op, name, t, "q", q)
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: head dim d = 0")
    if (prompt_k is None) != (prompt_v is None):
        raise ValueError(f"{op}: give both prompt_k and prompt_v, or neither")
    if prompt_k is not None:
        for name, t in (("prompt_k", prompt_k), ("prompt_v", prompt_v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t.dim() != 3 or tuple(t.shape[1:]) != tuple(q.shape[2:]):
                raise ValueError(
                    f"{op}: {name} must be (P, H, d) = (P, {q.shape[2]}, {q.shape[3]}), "
                    f"got shape {tuple(t.shape)}"
                )
            check_dtype(op, name, t)
            check_same_device(op, name, t, "q", q)
        if prompt_k.shape != prompt_v.shape:
            raise ValueError(
                f"{op}: prompt_k {tuple(prompt_k.shape)} and prompt_v {tuple(prompt_v.shape)} differ"
            )
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"{op}: scale must be a float or None, got {scale!r}")
        check_finite_scalar(op, "scale", scale)


def prompt_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: BackendName = "auto",
) -> torch.Tensor:
    """Attention over [prompt tokens ‖ image tokens], prompts shared by the batch.

    ``out[b, i, h] = softmax_j(scale · q[b, i, h] · K[b, j, h]) V[b, j, h]`` with
    ``K[b] = [prompt_k ‖ k[b]]`` and ``V[b] = [prompt_v ‖ v[b]]`` (keys along
    dim 1). No mask. VPT-deep: the layer's prompts enter only as keys and
    values (their queries and outputs are never needed). VPT-shallow: pass
    ``prompt_k = prompt_v = None`` (the prompts are ordinary tokens of q, k, v).

    Args:
        q, k, v: (B, L, H, d), same shape, dtype and device; any strides (for
            example views of a packed (B, L, 3, H, d) qkv projection). B, L
            may be 0.
        prompt_k, prompt_v: (P, H, d), P >= 0, or both None. Cast to q's dtype
            if they differ.
        scale: softmax scale, default ``1/sqrt(d)``.
        backend: "auto" | "torch" | "triton" (see ``nolabels info``);
            ``NOLABELS_BACKEND`` overrides "auto". The triton backend takes
            CUDA tensors (CPU ones under ``TRITON_INTERPRET=1``) with d in
            {16, 32, 64, 128}.

    Returns:
        out (B, L, H, d) in q's dtype. Differentiable in q, k, v,
        prompt_k, prompt_v (once: no double backward through the triton
        backend); the prompt gradients are summed over the batch. The triton
        backend's float32 results (forward and gradients) are deterministic.

    Raises:
        ValueError: on wrong shapes or ranks, d = 0, unsupported or
            mismatched dtypes, different devices, a non-finite ``scale``, or a
            backend that cannot take the call (with every reason).

    Non-finite inputs are not scanned for (that would cost a device sync per
    layer); they propagate as in IEEE arithmetic, the same on every backend:

    * a NaN or Inf anywhere in ``q[b, i, h]`` makes ``out[b, i, h, :]`` all NaN
      and no other row (the torch backend restores this on the CPU, where
      PyTorch's flash kernel would return zeros for a NaN query row);
    * a NaN in a key of (b, h) makes every output row of (b, h) NaN (a prompt
      key: every b); an Inf in a key makes NaN the rows whose score with it is
      +Inf, and gets weight 0 in the rows where it is -Inf;
    * a NaN in component j of a value of (b, h) makes component j of every
      output row of (b, h) NaN (an Inf: +-Inf there).

    Memory: the triton backend allocates out plus a (B, H, L) float32
    log-sum-exp saved for backward; its backward adds a (B, H, L) float32
    buffer and, with prompts, two float32 (min(B, 64), P, H, d) partial sums.
    The torch backend materialises the concatenated (B, P + L, H, d) keys and
    values (and what its SDPA kernel saves).
    """
    _validate(q, k, v, prompt_k, prompt_v, scale)
    if prompt_k is not None:
        prompt_k, prompt_v = prompt_k.to(q.dtype), prompt_v.to(q.dtype)  # no-op if equal
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    call = {"device": q.device, "dtype": q.dtype, "head_dim": q.shape[-1]}
    impl = PROMPT_ATTENTION.select(backend, call)
    if impl.backward is None:
        return impl.run(q, k, v, prompt_k, prompt_v, scale)
    out, _lse = _fwd_op(q, k, v, prompt_k, prompt_v, scale, impl.name)
    return out
