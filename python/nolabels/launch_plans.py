"""Launch plans (grid, block, shared memory) of every CUDA and Triton kernel, as functions
of the shapes, and the launch limits of the GPUs they run on.

A plan is what the launcher passes at launch: for the CUDA kernels the Python mirror of the
``plan_*`` functions in kernels/coder.cu and of ``launch_main`` / ``launch_typed`` in
kernels/pseudo_label.cu (tests/test_launch_plans.py checks, in the CUDA simulator, that the
C++ launchers launch exactly these); for the Triton kernels the grid functions the launchers
themselves call. Nothing here needs a GPU, torch or Triton at import time, so the sweep of
every plan over extreme shapes (tests/test_launch_plans.py) runs anywhere.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
MAX_THREADS = 1024
DEFAULT_DYN_SMEM = 48 * 1024  # without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
SMEM_OPTIN = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # per block, opt-in maximum


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


@dataclass(frozen=True)
class Plan:
    """One kernel launch: grid (x, y, z) blocks/programs, block (x, y, z) threads, dynamic
    shared memory in bytes (``dyn_smem``; ``optin``: raised with cudaFuncSetAttribute first)
    and the kernel's static shared memory in bytes (``static_smem``)."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dyn_smem: int = 0
    static_smem: int = 0
    optin: bool = False


def violations(plan: Plan, arch: str = "sm_90") -> list[str]:
    """The launch limits ``plan`` breaks on a GPU of ``arch`` ("sm_80" or "sm_90"); empty
    when the launch is accepted."""
    out = []
    gx, gy, gz = plan.grid
    if min(plan.grid) < 1:
        out.append(f"{plan.kernel}: empty grid {plan.grid}")
    if gx > MAX_GRID_X:
        out.append(f"{plan.kernel}: grid.x = {gx} > 2^31-1")
    if gy > MAX_GRID_YZ or gz > MAX_GRID_YZ:
        out.append(f"{plan.kernel}: grid.y/z = {gy}/{gz} > 65535")
    bx, by, bz = plan.block
    if bx * by * bz > MAX_THREADS or bz > 64 or min(plan.block) < 1:
        out.append(f"{plan.kernel}: block {plan.block} over 1024 threads")
    cap = SMEM_OPTIN[arch] if plan.optin else DEFAULT_DYN_SMEM
    if plan.dyn_smem > cap - plan.static_smem:
        out.append(f"{plan.kernel}: shared memory {plan.static_smem} + {plan.dyn_smem} B > {cap} B")
    return out


# ============================================================== CUDA: kernels/coder.cu
CODER_THREADS = 128  # kThreads
CODER_MAX_K = 1024  # kMaxK


def _plan1d(kernel: str, blocks: int, threads: int, static_smem: int = 0) -> Plan:
    return Plan(kernel, (blocks, 1, 1), (threads, 1, 1), 0, static_smem)


def coder_normalize_rows(rows: int) -> Plan:
    """normalize_rows_kernel: a warp per row."""
    return _plan1d("normalize_rows", cdiv(rows, CODER_THREADS // 32), CODER_THREADS)


def coder_topk_merge(rows: int, k: int) -> Plan:
    """warp_select_kernel (k <= 256, a warp per row) or topk_merge_kernel<CAP> (a block per
    row, static shared memory 2 CAP (4 + 8) + 4 bytes)."""
    if k <= 256:
        return _plan1d("warp_select", cdiv(rows, CODER_THREADS // 32), CODER_THREADS)
    cap = 512 if k <= 512 else 1024
    return _plan1d(f"topk_merge<{cap}>", rows, CODER_THREADS, 2 * cap * 12 + 4)


def coder_topk_poison(rows: int, k: int) -> Plan:
    """topk_poison_kernel: a thread per output value (grid-stride, at most 2^31-1 blocks)."""
    return _plan1d("topk_poison", min(cdiv(rows * k, 256), MAX_GRID_X), 256)


def coder_seg_reduce(rows: int, classes: int) -> Plan:
    """seg_reduce_kernel: a block per (row, 128 classes), 1-D."""
    return _plan1d("seg_reduce", rows * cdiv(classes, CODER_THREADS), CODER_THREADS)


def coder_rowdot_inv(rows: int) -> Plan:
    """rowdot_inv_kernel: a warp per row."""
    return _plan1d("rowdot_inv", cdiv(rows, CODER_THREADS // 32), CODER_THREADS)


def coder_scale_clamp(n: int, k: int) -> Plan:
    """scale_clamp_kernel: a thread per output value (grid-stride, at most 2^31-1 blocks)."""
    return _plan1d("scale_clamp", min(cdiv(n * k, 256), MAX_GRID_X), 256)


def cuda_topk_similarity(n: int, m: int, k: int) -> Iterator[Plan]:
    """The launches of csrc/cuda/coder_cuda.cpp's topk_similarity (distinct plans only)."""
    qb = min(n, 8192)
    tm = min(m, max(k, 1024, (1 << 26) // qb))
    for nq in {qb, n % qb or qb}:
        yield coder_normalize_rows(nq)
        yield coder_topk_merge(nq, k)
    for nm in {tm, m % tm or tm}:
        yield coder_normalize_rows(nm)
    yield coder_topk_poison(n, k)


def cuda_class_scores_bank(n: int, r: int, c: int) -> Iterator[Plan]:
    """The launches of coder_class_scores_bank: row blocks of BN = min(N, max(256, 2^26 / R))
    rows, R folded bank rows, C classes."""
    bn = min(n, max(256, (1 << 26) // r))
    for nr in {bn, n % bn or bn}:
        yield coder_normalize_rows(nr)
        yield coder_seg_reduce(nr, c)


def cuda_affinity(n: int, k: int, m: int) -> Iterator[Plan]:
    """The launches of coder_affinity: (N, K) output, M texts."""
    for rows in (m, n, k):
        yield coder_normalize_rows(rows)
    yield coder_rowdot_inv(n)
    yield coder_rowdot_inv(k)
    yield coder_scale_clamp(n, k)


# ============================================================== CUDA: kernels/pseudo_label.cu
PL_BM = 128  # F_BM = TC_BM rows (threads) per CTA
PL_F32_SMEM = 44544  # F_SMEM
PL_TC_SMEM = 67584  # TC_SMEM


def cuda_pseudo_label(n: int, c: int, dtype: str) -> Iterator[Plan]:
    """colscale_kernel then the main kernel (dtype "float32", "float16" or "bfloat16")."""
    yield _plan1d("colscale", cdiv(c, 8), 256)
    smem = PL_F32_SMEM if dtype == "float32" else PL_TC_SMEM
    yield Plan("pseudo_label_f32" if dtype == "float32" else "pseudo_label_tc",
               (cdiv(n, PL_BM), 1, 1), (PL_BM, 1, 1), smem, 0, smem > DEFAULT_DYN_SMEM)


# ============================================================== Triton
def _triton(kernel: str, grid: tuple[int, ...], num_warps: int) -> Plan:
    g = (tuple(grid) + (1, 1))[:3]
    return Plan(kernel, g, (32 * num_warps, 1, 1))


def triton_attention(batch: int, heads: int, length: int, n_prompt: int, head_dim: int,
                     dtype) -> Iterator[Plan]:
    """_fwd, _bwd_preprocess and _bwd of nolabels.triton.attention (GPU configs)."""
    from nolabels.triton import attention as att

    kind = "f32" if str(dtype).endswith("float32") else "half"
    m, nb, w, _ = att._FWD_CFG[(kind, head_dim)]
    yield _triton("attention._fwd", att.fwd_grid(batch, heads, length, {"BLOCK_M": m}), w)
    yield _triton("attention._bwd_preprocess",
                  att.bwd_preprocess_grid(batch, heads, length, att.PRE_BLOCK), 4)
    o, _, w, _ = att._BWD_CFG[(kind, head_dim)]
    yield _triton("attention._bwd", att.bwd_grid(batch, heads, length, n_prompt, {"BLOCK_OUTER": o}), w)


def triton_coder(n: int, m: int, k: int, c: int, d: int, kk: int = 1000,
                 n_sms: int = 132) -> Iterator[Plan]:
    """The kernels of nolabels.triton.coder (GPU metas): top-k (N queries, M keys, k),
    class scores (N, C), the affinity GEMMs and row kernels ((N, K = kk) output, D)."""
    from nolabels.triton import coder as tc

    kp = max(16, 1 << (k - 1).bit_length())
    meta = tc.topk_meta(kp)
    want = max(1, (4 * n_sms) // cdiv(n, meta["BLOCK_N"]))
    splits = max(1, min(want, cdiv(m, 4 * meta["BLOCK_M"])))
    per = cdiv(cdiv(m, splits), meta["BLOCK_M"]) * meta["BLOCK_M"]
    yield _triton("coder._topk_kernel", (cdiv(n, meta["BLOCK_N"]), cdiv(m, per)), meta["num_warps"])
    yield _triton("coder._scores_kernel", tc.scores_grid(n, c, tc.SCORES_META), tc.SCORES_META["num_warps"])
    for r, cn in ((d, d), (n, d), (kk, d), (n, kk)):
        yield _triton("coder._mm_nt_kernel", tc.mm_nt_grid(r, cn, tc.MM_META), tc.MM_META["num_warps"])
    yield _triton("coder._row_inv_norm_kernel", (cdiv(max(n, m), 32),), 4)
    yield _triton("coder._rowdot_kernel", (cdiv(n, 32),), 4)


def triton_pseudo_label(n: int) -> Iterator[Plan]:
    """_fwd of nolabels.triton.pseudo_label for every autotuner config."""
    from nolabels.triton import pseudo_label as tp

    for cfg in tp._CONFIGS_F32 + tp._CONFIGS_LOWP:
        yield _triton("pseudo_label._fwd", (cdiv(n, cfg.kwargs["BLOCK_N"]),), cfg.num_warps)
