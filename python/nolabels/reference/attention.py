"""Reference prompt-token attention: expand + cat the prompt K/V, then attention.

Layout everywhere: q, k, v are (B, L, H, d) (open_clip's batch-first tokens
split into heads); prompt_k, prompt_v are (P, H, d), shared by the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def concat_prompt_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None,
    prompt_v: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P + L, H, d) keys and values: the prompts, expanded over the batch, then ``k``/``v``."""
    if prompt_k is None or prompt_k.shape[0] == 0:
        return k, v
    b = k.shape[0]
    pk = prompt_k.to(k.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    pv = prompt_v.to(v.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    return torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)


def prompt_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference for ``nolabels.ops.prompt_attention`` (the contract is documented there).

    ``softmax(q [prompt_k ‖ k]ᵀ · scale) [prompt_v ‖ v]`` per (batch, head).

    Args:
        q, k, v: (B, L, H, d).
        prompt_k, prompt_v: (P, H, d) or None.
        scale: softmax scale, default ``1/sqrt(d)``.
        compute_dtype: ``None`` runs ``scaled_dot_product_attention`` in the
            input dtype (this is the op's ``torch`` backend; differentiable
            through ordinary autograd); ``torch.float64`` casts everything to
            float64 first (the test ground truth, also what ``gradcheck`` uses).

    Returns:
        (B, L, H, d) in the input dtype, or float64; a query row holding a NaN
        gives a NaN output row (on every device). Peak memory: the
        concatenated (B, P + L, H, d) keys and values, plus whatever the SDPA
        kernel picked needs.
    """
    if scale is None:
        scale = default_scale(q.shape[-1])
    if compute_dtype is not None:
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
        if prompt_k is not None:
            prompt_k, prompt_v = prompt_k.to(compute_dtype), prompt_v.to(compute_dtype)
    kk, vv = concat_prompt_kv(k, v, prompt_k, prompt_v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), scale=scale
    ).transpose(1, 2)
    # IEEE propagation for NaN queries. SDPA's math kernel and the flash-style
    # kernels on the GPU (and the triton backend) turn a query row holding a NaN
    # into a NaN output row, but PyTorch's CPU flash kernel finds no finite score
    # in that row, treats it as fully masked and writes zeros. Restore the NaN.
    nan_rows = torch.isnan(q).any(dim=-1, keepdim=True)  # (B, L, H, 1)
    return out.masked_fill(nan_rows, float("nan"))


def prompt_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out with matmul and softmax; returns (out, lse).

    ``upcast=True`` computes in float32 (or float64 for float64 inputs) and
    returns the output in the input dtype; ``upcast=False`` keeps every matmul
    in the input dtype, like FlashAttention's ``attention_ref(upcast=False)``:
    the "torch's own low-precision error" of FlashAttention's tolerance rule.
    ``lse`` (B, H, L) is the natural-log log-sum-exp of the scaled scores
    (float32, or float64 for float64 inputs).
    """
    if scale is None:
        scale = default_scale(q.shape[-1])
    in_dtype = q.dtype
    kk, vv = concat_prompt_kv(k, v, prompt_k, prompt_v)
    if upcast:
        acc = torch.float64 if in_dtype == torch.float64 else torch.float32
        q, kk, vv = q.to(acc), kk.to(acc), vv.to(acc)
    scores = torch.einsum("blhd,bshd->bhls", q, kk) * scale
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    attn = torch.softmax(scores, dim=-1).to(vv.dtype)
    out = torch.einsum("bhls,bshd->blhd", attn, vv)
    return out.to(in_dtype), lse
