"""Fused prompt-token attention, flash-style (FlashAttention-2 forward and backward).

Per (batch b, head h) the keys are two segments: the P prompt keys shared by
the whole batch, read with batch stride 0 (no expand, no cat), then the L
keys of image b. The forward runs one online softmax over both segments and
saves only ``out`` and the log-sum-exp; the backward recomputes the
probabilities from them (exact: xformers ``merge_training.py``).

Kernels:
    _fwd              1-D grid of B*H*cdiv(L, BLOCK_M) programs (B*H is not on grid
                      axis 1, which stops at 65,535): one query block.
    _bwd_preprocess   delta = rowsum(dO * O), float32 (B, H, L).
    _bwd              1-D grid, two roles, no atomics (float32 results are
                      deterministic):
                      * prompt programs (first, they are the longest): one
                        block of prompt keys x one head x one group of
                        batches; write float32 partial dK/dV per group, summed
                        over the groups afterwards in a fixed order;
                      * sequence programs: block j of one (b, h): dK/dV of
                        keys in block j (loop over the queries) and dQ of
                        queries in block j (loop over prompt keys, then keys).

Tensors may have any strides except a unit last-dimension stride (the host
functions copy otherwise), so q, k, v can be views into a packed qkv
projection. Head dims 16/32/64/128; any L, P >= 0, B, H.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nolabels.triton._common import cast_rne, device_guard, dot, interpreted

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
# At most this many batch groups share the prompt dK/dV reduction (float32
# partials of size groups x P x H x d); fixed by shape only, so deterministic.
MAX_PROMPT_GROUPS = 64


# F32 (a constexpr of every kernel): dot products as float32 "ieee" (float32
# inputs; bfloat16 under the interpreter, whose bfloat16 tl.dot is wrong), i.e.
# dot(a, b, None, False, F32) upcasts both operands (a no-op for float32).


@triton.jit
def _fwd_segment(
    acc, l_i, m_i, q, K, V, stride_kn, stride_vn, N, qk_scale,
    offs_d, BLOCK_N: tl.constexpr, F32: tl.constexpr, RNE: tl.constexpr,
):
    # One key/value segment of N rows (K, V already point at row 0 of this (b, h)).
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N
        kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None], mask=mask_n[None, :], other=0.0)
        qk = dot(q, kT, None, False, F32) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + dot(cast_rne(p, v.dtype, RNE), v, None, False, F32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd(
    Q, K, V, PK, PV, Out, Lse,
    s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh,
    s_pkp, s_pkh, s_pvp, s_pvh, s_ob, s_ol, s_oh,
    H, L, P, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr, RNE: tl.constexpr,
):
    pid = tl.cast(tl.program_id(0), tl.int64)
    n_m = tl.cdiv(L, BLOCK_M)
    bh = pid // n_m
    pid_m = pid - bh * n_m
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :],
        mask=mask_m[:, None], other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # prompt keys: no batch offset (batch stride 0)
    acc, l_i, m_i = _fwd_segment(
        acc, l_i, m_i, q, PK + h * s_pkh, PV + h * s_pvh, s_pkp, s_pvp, P, qk_scale,
        offs_d, BLOCK_N, F32, RNE,
    )
    acc, l_i, m_i = _fwd_segment(
        acc, l_i, m_i, q, K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, s_kl, s_vl, L,
        qk_scale, offs_d, BLOCK_N, F32, RNE,
    )
    out = acc / l_i[:, None]
    tl.store(
        Out + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :],
        cast_rne(out, Out.dtype.element_ty, RNE), mask=mask_m[:, None],
    )
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log
    tl.store(Lse + bh * L + offs_m, lse, mask=mask_m)


@triton.jit
def _bwd_preprocess(
    Out, DO, Delta,
    s_ob, s_ol, s_oh, s_db, s_dl, s_dh,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.cast(tl.program_id(0), tl.int64)
    n_m = tl.cdiv(L, BLOCK_M)
    bh = pid // n_m
    pid_m = pid - bh * n_m
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    o = tl.load(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :],
                mask=mask_m[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dl + offs_d[None, :],
                 mask=mask_m[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + bh * L + offs_m, tl.sum(o * do, 1), mask=mask_m)


@triton.jit
def _bwd_dkdv_segment(
    dk, dv, k, v, Q, DO, Lse, Delta, s_ql, s_dl, L, qk_scale,
    offs_d, BLOCK_M: tl.constexpr, F32: tl.constexpr, RNE: tl.constexpr,
):
    # Contributions of the L queries of one (b, h) to dK, dV of one key block.
    # Q, DO point at query 0 of (b, h); Lse, Delta at row 0 of (b, h).
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < L
        qT = tl.load(Q + offs_m[None, :] * s_ql + offs_d[:, None], mask=mask_m[None, :], other=0.0)
        lse2 = tl.load(Lse + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        qkT = dot(k, qT, None, False, F32)
        pT = tl.exp2(qkT * qk_scale - lse2[None, :])
        pT = tl.where(mask_m[None, :], pT, 0.0)
        do = tl.load(DO + offs_m[:, None] * s_dl + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        dv += dot(cast_rne(pT, do.dtype, RNE), do, None, False, F32)
        di = tl.load(Delta + offs_m, mask=mask_m, other=0.0)
        dpT = dot(v, tl.trans(do), None, False, F32)
        dsT = pT * (dpT - di[None, :])
        dk += dot(cast_rne(dsT, qT.dtype, RNE), tl.trans(qT), None, False, F32)
    return dk, dv


@triton.jit
def _bwd_dq_segment(
    dq, q, do, lse2, di, K, V, s_kn, s_vn, N, qk_scale,
    offs_d, BLOCK_N: tl.constexpr, F32: tl.constexpr, RNE: tl.constexpr,
):
    # Contributions of one key/value segment of N rows to dQ of one query block.
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N
        kT = tl.load(K + offs_n[None, :] * s_kn + offs_d[:, None], mask=mask_n[None, :], other=0.0)
        vT = tl.load(V + offs_n[None, :] * s_vn + offs_d[:, None], mask=mask_n[None, :], other=0.0)
        qk = dot(q, kT, None, False, F32)
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = dot(do, vT, None, False, F32)
        ds = p * (dp - di[:, None])
        dq += dot(cast_rne(ds, kT.dtype, RNE), tl.trans(kT), None, False, F32)
    return dq


@triton.jit
def _bwd(
    Q, K, V, PK, PV, DO, Lse, Delta, DQ, DK, DV, DPK, DPV,
    s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh,
    s_pkp, s_pkh, s_pvp, s_pvh, s_db, s_dl, s_dh,
    s_dqb, s_dql, s_dqh, s_dkb, s_dkl, s_dkh, s_dvb, s_dvl, s_dvh,
    B, H, L, P, batches_per_group, n_prompt_programs, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr,
    F32: tl.constexpr, RNE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_o = tl.arange(0, BLOCK_OUTER)
    if pid < n_prompt_programs:
        # ---- prompt role: block pb of prompt keys, head h, batch group g.
        n_pb = tl.cdiv(P, BLOCK_OUTER)
        pb = pid % n_pb
        rest = pid // n_pb
        h = tl.cast(rest % H, tl.int64)
        g = tl.cast(rest // H, tl.int64)
        offs_n = pb * BLOCK_OUTER + offs_o
        mask_n = offs_n < P
        k = tl.load(PK + h * s_pkh + offs_n[:, None] * s_pkp + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(PV + h * s_pvh + offs_n[:, None] * s_pvp + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        dk = tl.zeros([BLOCK_OUTER, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_OUTER, HEAD_DIM], tl.float32)
        b_start = g * batches_per_group
        b_end = tl.minimum(b_start + batches_per_group, B)
        for b in range(b_start, b_end):
            b64 = tl.cast(b, tl.int64)
            bh = b64 * H + h
            dk, dv = _bwd_dkdv_segment(
                dk, dv, k, v, Q + b64 * s_qb + h * s_qh, DO + b64 * s_db + h * s_dh,
                Lse + bh * L, Delta + bh * L, s_ql, s_dl, L, qk_scale,
                offs_d, BLOCK_INNER, F32, RNE,
            )
        dk *= sm_scale
        # float32 partials, contiguous (groups, P, H, d)
        part = g * P * H * HEAD_DIM + offs_n[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
        tl.store(DPK + part, dk, mask=mask_n[:, None])
        tl.store(DPV + part, dv, mask=mask_n[:, None])
    else:
        # ---- sequence role: block j of (b, h).
        pid = pid - n_prompt_programs
        n_blk = tl.cdiv(L, BLOCK_OUTER)
        j = pid % n_blk
        bh = tl.cast(pid // n_blk, tl.int64)
        b = bh // H
        h = bh % H
        offs = j * BLOCK_OUTER + offs_o
        mask = offs < L
        Qbh = Q + b * s_qb + h * s_qh
        DObh = DO + b * s_db + h * s_dh
        Kbh = K + b * s_kb + h * s_kh
        Vbh = V + b * s_vb + h * s_vh
        # dK, dV of keys in block j
        k = tl.load(Kbh + offs[:, None] * s_kl + offs_d[None, :], mask=mask[:, None], other=0.0)
        v = tl.load(Vbh + offs[:, None] * s_vl + offs_d[None, :], mask=mask[:, None], other=0.0)
        dk = tl.zeros([BLOCK_OUTER, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_OUTER, HEAD_DIM], tl.float32)
        dk, dv = _bwd_dkdv_segment(
            dk, dv, k, v, Qbh, DObh, Lse + bh * L, Delta + bh * L, s_ql, s_dl, L, qk_scale,
            offs_d, BLOCK_INNER, F32, RNE,
        )
        dk *= sm_scale
        tl.store(DK + b * s_dkb + h * s_dkh + offs[:, None] * s_dkl + offs_d[None, :],
                 cast_rne(dk, DK.dtype.element_ty, RNE), mask=mask[:, None])
        tl.store(DV + b * s_dvb + h * s_dvh + offs[:, None] * s_dvl + offs_d[None, :],
                 cast_rne(dv, DV.dtype.element_ty, RNE), mask=mask[:, None])
        # dQ of queries in block j
        q = tl.load(Qbh + offs[:, None] * s_ql + offs_d[None, :], mask=mask[:, None], other=0.0)
        do = tl.load(DObh + offs[:, None] * s_dl + offs_d[None, :], mask=mask[:, None], other=0.0)
        lse2 = tl.load(Lse + bh * L + offs, mask=mask, other=0.0) * 1.4426950408889634
        di = tl.load(Delta + bh * L + offs, mask=mask, other=0.0)
        dq = tl.zeros([BLOCK_OUTER, HEAD_DIM], tl.float32)
        dq = _bwd_dq_segment(
            dq, q, do, lse2, di, PK + h * s_pkh, PV + h * s_pvh, s_pkp, s_pvp, P, qk_scale,
            offs_d, BLOCK_INNER, F32, RNE,
        )
        dq = _bwd_dq_segment(
            dq, q, do, lse2, di, Kbh, Vbh, s_kl, s_vl, L, qk_scale,
            offs_d, BLOCK_INNER, F32, RNE,
        )
        dq *= sm_scale
        tl.store(DQ + b * s_dqb + h * s_dqh + offs[:, None] * s_dql + offs_d[None, :],
                 cast_rne(dq, DQ.dtype.element_ty, RNE), mask=mask[:, None])


# --------------------------------------------------------------------------- host side
def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _f32_dots(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted(_fwd))


def _rne(dtype: torch.dtype) -> bool:
    # The interpreter's float32 -> bfloat16 conversion truncates; the GPU's rounds
    # to nearest even. Rounding by hand there keeps the error the GPU's.
    return dtype == torch.bfloat16 and interpreted(_fwd)


# Block sizes and warps per (dtype class, head dim), never autotuned (an autotuner's
# pick would change the float32 summation order between runs). Chosen so that
# ptxas reports no register spills for sm_90a (triton 3.8 AOT compile); not yet
# timed on a GPU.
_FWD_CFG = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    ("half", 16): (64, 64, 4, 3), ("half", 32): (64, 64, 4, 3),
    ("half", 64): (64, 64, 4, 3), ("half", 128): (64, 32, 4, 2),
    ("f32", 16): (64, 32, 4, 2), ("f32", 32): (64, 32, 4, 2),
    ("f32", 64): (32, 32, 4, 2), ("f32", 128): (16, 32, 4, 1),
}
_BWD_CFG = {  # (BLOCK_OUTER, BLOCK_INNER, num_warps, num_stages)
    ("half", 16): (64, 32, 4, 3), ("half", 32): (64, 32, 4, 3),
    ("half", 64): (64, 32, 8, 3), ("half", 128): (32, 64, 8, 2),
    ("f32", 16): (64, 32, 8, 2), ("f32", 32): (64, 32, 8, 2),
    ("f32", 64): (32, 16, 4, 2), ("f32", 128): (32, 16, 8, 1),
}
PRE_BLOCK = 32


def _kind(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "half"


def fwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Launch parameters of ``_fwd`` (small fixed blocks under the interpreter)."""
    if interpreted(_fwd):
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    m, n, w, st = _FWD_CFG[(_kind(dtype), head_dim)]
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st}


def bwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Launch parameters of ``_bwd``: BLOCK_OUTER rows owned per program, BLOCK_INNER loop step."""
    if interpreted(_bwd):
        return {"BLOCK_OUTER": 32, "BLOCK_INNER": 16, "num_warps": 4, "num_stages": 1}
    o, i, w, st = _BWD_CFG[(_kind(dtype), head_dim)]
    return {"BLOCK_OUTER": o, "BLOCK_INNER": i, "num_warps": w, "num_stages": st}


def prompt_groups(batch: int) -> tuple[int, int]:
    """(groups, batches_per_group) of the prompt dK/dV reduction; depends on B only."""
    if batch == 0:
        return 0, 1
    per = triton.cdiv(batch, min(batch, MAX_PROMPT_GROUPS))
    return triton.cdiv(batch, per), per


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _prompts_or_dummy(q, prompt_k, prompt_v):
    if prompt_k is None or prompt_k.shape[0] == 0:
        # P = 0: the loop over prompt keys never runs; any pointer of the right dtype does.
        return q, q, 0, (0, 0), (0, 0)
    pk, pv = _unit_last(prompt_k), _unit_last(prompt_v)
    return pk, pv, pk.shape[0], (pk.stride(0), pk.stride(1)), (pv.stride(0), pv.stride(1))


def fwd_grid(batch: int, heads: int, length: int, cfg: dict) -> tuple[int]:
    """Grid of ``_fwd``: one program per (b, h, query block), query blocks fastest
    (the order of the former 2-D grid), all on axis 0 (up to 2^31-1 programs)."""
    return (batch * heads * triton.cdiv(length, cfg["BLOCK_M"]),)


def bwd_preprocess_grid(batch: int, heads: int, length: int, block_m: int) -> tuple[int]:
    """Grid of ``_bwd_preprocess``: like ``fwd_grid`` with BLOCK_M = ``block_m``."""
    return (batch * heads * triton.cdiv(length, block_m),)


def bwd_grid(batch: int, heads: int, length: int, n_prompt_keys: int, cfg: dict) -> tuple[int]:
    """Grid of ``_bwd``: the prompt programs (groups x H x prompt-key blocks) then the
    sequence programs (B x H x key blocks), on axis 0."""
    groups = prompt_groups(batch)[0] if n_prompt_keys > 0 else 0
    n_prompt = groups * heads * triton.cdiv(n_prompt_keys, cfg["BLOCK_OUTER"])
    return (n_prompt + batch * heads * triton.cdiv(length, cfg["BLOCK_OUTER"]),)


def prompt_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None,
    prompt_v: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, L, H, d) in q's dtype, lse (B, H, L) float32, natural log)."""
    B, L, H, D = q.shape
    out = q.new_empty((B, L, H, D))
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    pk, pv, P, spk, spv = _prompts_or_dummy(q, prompt_k, prompt_v)
    cfg = fwd_config(D, q.dtype)
    grid = fwd_grid(B, H, L, cfg)
    with device_guard(q):
        _fwd[grid](
            q, k, v, pk, pv, out, lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *spk, *spv, *_strides3(out),
            H, L, P, float(scale) * LOG2E,
            HEAD_DIM=D, F32=_f32_dots(q.dtype), RNE=_rne(q.dtype), **cfg,
        )
    return out, lse


def prompt_attention_bwd_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None,
    prompt_v: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv (B, L, H, d), dprompt_k, dprompt_v (P, H, d); P = 0 when no prompts)."""
    B, L, H, D = q.shape
    P = 0 if prompt_k is None else prompt_k.shape[0]
    dq = q.new_empty((B, L, H, D))
    dk = q.new_empty((B, L, H, D))
    dv = q.new_empty((B, L, H, D))
    if dq.numel() == 0:
        z = q.new_zeros((P, H, D))
        return dq, dk, dv, z, z.clone()
    q, k, v, dout, out = (_unit_last(t) for t in (q, k, v, dout, out))
    pk, pv, P, spk, spv = _prompts_or_dummy(q, prompt_k, prompt_v)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    groups, per_group = prompt_groups(B) if P > 0 else (0, 1)
    part_k = torch.empty((groups, P, H, D), dtype=torch.float32, device=q.device)
    part_v = torch.empty((groups, P, H, D), dtype=torch.float32, device=q.device)
    f32 = _f32_dots(q.dtype)
    pre_block = 16 if interpreted(_bwd_preprocess) else PRE_BLOCK
    cfg = bwd_config(D, q.dtype)
    n_prompt = groups * H * triton.cdiv(P, cfg["BLOCK_OUTER"])
    grid = bwd_grid(B, H, L, P, cfg)
    assert grid[0] == n_prompt + B * H * triton.cdiv(L, cfg["BLOCK_OUTER"])
    with device_guard(q):
        _bwd_preprocess[bwd_preprocess_grid(B, H, L, pre_block)](
            out, dout, delta, *_strides3(out), *_strides3(dout), H, L,
            HEAD_DIM=D, BLOCK_M=pre_block,
        )
        _bwd[grid](
            q, k, v, pk, pv, dout, lse, delta, dq, dk, dv, part_k, part_v,
            *_strides3(q), *_strides3(k), *_strides3(v), *spk, *spv, *_strides3(dout),
            *_strides3(dq), *_strides3(dk), *_strides3(dv),
            B, H, L, P, per_group, n_prompt, float(scale), float(scale) * LOG2E,
            HEAD_DIM=D, F32=f32, RNE=_rne(q.dtype), **cfg,
        )
    if P > 0:
        # Fixed-order float32 reduction over the groups: deterministic.
        dpk = part_k.sum(0).to(q.dtype)
        dpv = part_v.sum(0).to(q.dtype)
    else:
        dpk = q.new_zeros((0, H, D))
        dpv = q.new_zeros((0, H, D))
    return dq, dk, dv, dpk, dpv


__all__ = [
    "HEAD_DIMS",
    "bwd_config",
    "bwd_grid",
    "bwd_preprocess_grid",
    "fwd_grid",
    "fwd_config",
    "prompt_attention_bwd_triton",
    "prompt_attention_fwd_triton",
    "prompt_groups",
]
