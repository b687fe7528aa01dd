"""Host-side emulation of kernels/pseudo_label.cu, for checking its index math without a GPU.

Run: python tests/emulators/pseudo_label_cuda.py, or through tests/test_pseudo_label.py   (numpy + torch; ~20 s)

What it does. The tensor-core kernel is replayed thread by thread with the *same* integer
formulas as the .cu file (swizzle, loader geometry, ldmatrix lane addresses, accumulator ->
epilogue buffer offsets, row-owner reads, the flattened (n-tile, k-tile) pipeline with its
stage indices) on a byte-addressed model of shared memory. The hardware instructions are
modelled from their PTX ISA definitions, written independently of the kernel:

  * cp.async 16 B with src-size: copies src-size bytes, zero-fills the rest; it lands at
    issue time here, which is the worst case for write-after-read hazards between stages.
  * ldmatrix.m8n8.x4: lane l gives the row address of matrix l // 8, row l % 8; register i of
    lane l receives matrix i's elements (row l // 4, cols 2 (l % 4), 2 (l % 4) + 1).
  * mma.m16n8k16.row.col: A element a_i of lane l sits at row g (+8 for i in {2,3,6,7}),
    col 2 t + (i & 1) (+8 for i >= 4); B b_i at k = 2 t + (i & 1) (+8 for i >= 2), n = g;
    C c_i at row g (+8 for i >= 2), col 2 t + (i & 1); g = l // 4, t = l % 4.

The fp32 SIMT kernel's micro-tile and epilogue mapping is replayed the same way. The row-state
update (online max / sum / entropy term in the log2 domain, sorted top-K with strict '>') is
replayed in float32. Results are compared with a float64 reference: top-k indices exactly
(including exact ties from a duplicated class and a zero row), probabilities, entropy, lse.

What it cannot check: timing, races the model does not express (cp.async completion is
modelled as immediate), compiler/ptxas behaviour, and the real ex2/lg2 approximations.
Keep it in sync with the .cu file when the tiling changes.
"""
from __future__ import annotations

import math

import numpy as np

# ---- constants copied from pseudo_label.cu
TC_BM, TC_BN, TC_BK, TC_STAGES, TC_THREADS = 128, 128, 32, 3, 128
TC_ROW_BYTES = TC_BK * 2
TC_A_BYTES = TC_BM * TC_ROW_BYTES
TC_B_BYTES = TC_BN * TC_ROW_BYTES
TC_STAGE_BYTES = TC_A_BYTES + TC_B_BYTES
EPI_COLS, EPI_LD = 32, 36
F_BM, F_BN, F_BK = 128, 64, 16
F_LDA, F_LDB = F_BM + 4, F_BN + 4
LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
NORM_EPS = 1e-12


def swz(row: int, chunk: int) -> int:
    return row * TC_ROW_BYTES + ((chunk ^ ((row >> 1) & 3)) << 4)


# ---------------------------------------------------------------- row state (float32 replay)
class RowState:
    def __init__(self, K):
        self.K = K
        self.m = np.float32(-np.finfo(np.float32).max)
        self.s = np.float32(0)
        self.t = np.float32(0)
        self.v = [np.float32(-np.inf)] * K
        self.ix = [0] * K

    def insert(self, x, c):
        K = self.K
        if not (x > self.v[K - 1]):
            return
        v, ix = self.v, self.ix
        for j in range(K - 1, 0, -1):
            up = x > v[j - 1]
            here = x > v[j]
            nv = v[j - 1] if up else x
            ni = ix[j - 1] if up else c
            if here:
                v[j], ix[j] = nv, ni
        if x > v[0]:
            v[0], ix[0] = x, c

    def rescale(self, cm):
        if cm > self.m:
            d = np.float32(self.m - cm)
            a = np.float32(np.exp2(d))
            self.t = np.float32(a * np.float32(d * self.s + self.t))
            self.s = np.float32(self.s * a)
            self.m = cm

    def acc1(self, y):
        z = np.float32(y - self.m)
        e = np.float32(np.exp2(z))
        self.s = np.float32(self.s + e)
        self.t = np.float32(e * z + self.t)

    def push4(self, ys, c):
        cm = max(ys)
        self.rescale(cm)
        for y in ys:
            self.acc1(y)
        if cm > self.v[self.K - 1]:
            for j, y in enumerate(ys):
                self.insert(y, c + j)

    def push1(self, y, c):
        self.rescale(y)
        self.acc1(y)
        self.insert(y, c)

    def push_row(self, erow, n, cs, c0, rowmul):
        # erow: float32 array (the EPI_LD floats of this thread's row), cs: colscale[c0:]
        c = 0
        while c + 4 <= n:
            ys = [np.float32(np.float32(erow[c + j] * rowmul) * cs[c + j]) for j in range(4)]
            self.push4(ys, c0 + c)
            c += 4
        while c < n:
            self.push1(np.float32(np.float32(erow[c] * rowmul) * cs[c]), c0 + c)
            c += 1

    def finish(self, topk, bad):
        l2s = np.float32(np.log2(self.s))
        lse2 = np.float32(self.m + l2s)
        lse = np.float32(lse2 * LN2)
        ent = np.float32(np.float32(l2s - self.t / self.s) * LN2)
        probs = [np.float32(np.exp2(self.v[j] - lse2)) for j in range(topk)]
        if bad:
            lse = ent = np.float32(np.nan)
            probs = [lse] * topk
        return probs, self.ix[:topk], ent, lse


def k_bucket(topk):
    return 1 if topk <= 1 else (4 if topk <= 4 else 16)


def colscale(w, scale, normalize):
    out = np.empty(w.shape[0], np.float32)
    for c in range(w.shape[0]):
        ss = np.float32(np.sum(w[c].astype(np.float32) ** 2, dtype=np.float32))
        nrm = np.float32(math.sqrt(ss))
        f = np.float32(scale) / max(nrm, np.float32(NORM_EPS)) if normalize else np.float32(scale)
        out[c] = LOG2E * np.float32(f)
    return out


def row_multiplier(ss, normalize):
    bad = not np.isfinite(ss)
    nrm = np.float32(math.sqrt(ss)) if not bad else np.float32(0)
    return (np.float32(1) / max(nrm, np.float32(NORM_EPS)) if normalize else np.float32(1)), bad


# ---------------------------------------------------------------- tensor-core kernel replay
def ldmatrix_x4(smem_u16, lane_addr):
    """lane_addr[l]: byte address given by lane l. Returns regs[l][i] = (lo, hi) uint16."""
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        rows = [lane_addr[8 * i + r] for r in range(8)]
        for r in rows:
            assert r % 16 == 0, "ldmatrix row address must be 16-byte aligned"
        mat = np.stack([smem_u16[a // 2: a // 2 + 8] for a in rows])  # 8 x 8
        for l in range(32):
            regs[l][i] = (mat[l // 4, 2 * (l % 4)], mat[l // 4, 2 * (l % 4) + 1])
    return regs


def to_f32(u16, dtype):
    u16 = np.asarray(u16, dtype=np.uint16)
    if dtype == "bf16":
        return (u16.astype(np.uint32) << 16).view(np.float32)
    return u16.view(np.float16).astype(np.float32)


def mma_16816(acc_lanes, a_regs, b_regs, dtype):
    """acc_lanes[l] = list of 4 float32 (c0..c3); a_regs[l] = 4 regs; b_regs[l] = 2 regs."""
    A = np.zeros((16, 16), np.float32)
    B = np.zeros((16, 8), np.float32)
    Cm = np.zeros((16, 8), np.float32)
    for l in range(32):
        g, t = l // 4, l % 4
        a_el = [h for reg in a_regs[l] for h in reg]  # a0..a7
        for i in range(8):
            row = g + (8 if i in (2, 3, 6, 7) else 0)
            col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = to_f32(a_el[i], dtype)
        b_el = [h for reg in b_regs[l] for h in reg]  # b0..b3
        for i in range(4):
            k = 2 * t + (i & 1) + (8 if i >= 2 else 0)
            B[k, g] = to_f32(b_el[i], dtype)
        for i in range(4):
            Cm[g + (8 if i >= 2 else 0), 2 * t + (i & 1)] = acc_lanes[l][i]
    Dm = (A.astype(np.float64) @ B.astype(np.float64)).astype(np.float32) + Cm
    for l in range(32):
        g, t = l // 4, l % 4
        for i in range(4):
            acc_lanes[l][i] = Dm[g + (8 if i >= 2 else 0), 2 * t + (i & 1)]


def load_tile16_vec(smem_u16, sdst, mat_u16, rows, r0_rb, k, D):
    """One thread's 4 chunks (VEC path). mat_u16: (rows, D) uint16 contiguous."""
    nel = min(max(D - k, 0), 8)
    rows_left = rows - r0_rb
    for i in range(4):
        ok = nel > 0 and 32 * i < rows_left
        dst = sdst + i * 32 * TC_ROW_BYTES
        assert dst % 16 == 0
        chunk = np.zeros(8, np.uint16)
        if ok:
            chunk[:nel] = mat_u16[r0_rb + 32 * i, k: k + nel]
        smem_u16[dst // 2: dst // 2 + 8] = chunk


def emulate_tc(x_u16, w_u16, dtype, scale, topk, normalize):
    N, D = x_u16.shape
    C = w_u16.shape[0]
    K = k_bucket(topk)
    cs_all = colscale(to_f32(w_u16, dtype), scale, normalize)
    out = []
    kTiles = (D + TC_BK - 1) // TC_BK
    nTiles = (C + TC_BN - 1) // TC_BN
    total = kTiles * nTiles
    for cta in range((N + TC_BM - 1) // TC_BM):
        m0 = cta * TC_BM
        smem = np.full((TC_STAGES * TC_STAGE_BYTES + 128 * EPI_LD * 4) // 2, 0xDEAD, np.uint16)
        ebuf = np.full(128 * EPI_LD, np.nan, np.float32)
        states = [RowState(K) for _ in range(128)]
        ss = [np.float32(0)] * 128
        rowmul = [np.float32(0)] * 128
        bad = [False] * 128
        acc = [[[[np.float32(0)] * 4 for _ in range(8)] for _ in range(4)] for _ in range(128)]  # [tid][mi][ni][e]

        def issue(it_load):
            nt, kt = it_load // kTiles, it_load % kTiles
            for tid in range(128):
                lrb, lc = tid >> 2, tid & 3
                ldst = swz(lrb, lc)
                sA = (it_load % TC_STAGES) * TC_STAGE_BYTES + ldst
                k = kt * TC_BK + lc * 8
                load_tile16_vec(smem, sA, x_u16, N, m0 + lrb, k, D)
                load_tile16_vec(smem, sA + TC_A_BYTES, w_u16, C, nt * TC_BN + lrb, k, D)

        for s in range(TC_STAGES - 1):
            if s < total:
                issue(s)
        for it in range(total):
            if it + TC_STAGES - 1 < total:
                issue(it + TC_STAGES - 1)  # lands now: worst case for stage reuse
            sA = (it % TC_STAGES) * TC_STAGE_BYTES
            sB = sA + TC_A_BYTES
            for warp in range(4):
                wm, wn = warp >> 1, warp & 1
                for kk in range(TC_BK // 16):
                    af = []
                    for mi in range(4):
                        addrs = []
                        for lane in range(32):
                            r = wm * 64 + mi * 16 + (lane & 15)
                            ch = kk * 2 + (lane >> 4)
                            addrs.append(sA + swz(r, ch))
                        af.append(ldmatrix_x4(smem, addrs))
                    for nj in range(4):
                        addrs = []
                        for lane in range(32):
                            r = wn * 64 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)
                            ch = kk * 2 + ((lane >> 3) & 1)
                            addrs.append(sB + swz(r, ch))
                        bregs = ldmatrix_x4(smem, addrs)
                        for mi in range(4):
                            for half, ni in ((0, 2 * nj), (1, 2 * nj + 1)):
                                lanes_acc = [acc[warp * 32 + l][mi][ni] for l in range(32)]
                                b = [(bregs[l][2 * half], bregs[l][2 * half + 1]) for l in range(32)]
                                mma_16816(lanes_acc, af[mi], b, dtype)
            nt, kt = it // kTiles, it % kTiles
            if nt == 0:
                for tid in range(128):
                    for c in range(4):
                        a = (sA + swz(tid, c)) // 2
                        vals = to_f32(smem[a: a + 8], dtype)
                        for v in vals:
                            ss[tid] = np.float32(v * v + ss[tid])
            if kt == kTiles - 1:
                if nt == 0:
                    for tid in range(128):
                        rowmul[tid], bad[tid] = row_multiplier(ss[tid], normalize)
                n0 = nt * TC_BN
                for r in range(TC_BN // EPI_COLS):
                    cbase = n0 + r * EPI_COLS
                    nvalid = min(EPI_COLS, C - cbase)
                    if nvalid <= 0:
                        break
                    ebuf[:] = np.nan  # anything not written this round must not be read
                    for warp in range(4):
                        wm, wn = warp >> 1, warp & 1
                        if wn != (r >> 1):
                            continue
                        H = r & 1
                        for lane in range(32):
                            g, q = lane >> 2, lane & 3
                            a_ = acc[warp * 32 + lane]
                            for mi in range(4):
                                for nj in range(4):
                                    ni = H * 4 + nj
                                    lr = wm * 64 + mi * 16 + g
                                    lc = nj * 8 + 2 * q
                                    ebuf[lr * EPI_LD + lc: lr * EPI_LD + lc + 2] = a_[mi][ni][0:2]
                                    ebuf[(lr + 8) * EPI_LD + lc: (lr + 8) * EPI_LD + lc + 2] = a_[mi][ni][2:4]
                    for tid in range(128):
                        if m0 + tid < N:
                            erow = ebuf[tid * EPI_LD: tid * EPI_LD + EPI_COLS]
                            assert not np.isnan(erow[:nvalid]).any(), "read an unwritten epilogue slot"
                            states[tid].push_row(erow, nvalid, cs_all[cbase:], cbase, rowmul[tid])
                for tid in range(128):
                    for mi in range(4):
                        for ni in range(8):
                            acc[tid][mi][ni] = [np.float32(0)] * 4
        for tid in range(128):
            if m0 + tid < N:
                out.append(states[tid].finish(topk, bad[tid]))
    return out


# ---------------------------------------------------------------- fp32 kernel replay
def emulate_f32(x, w, scale, topk, normalize):
    N, D = x.shape
    C = w.shape[0]
    K = k_bucket(topk)
    cs_all = colscale(w, scale, normalize)
    kTiles = (D + F_BK - 1) // F_BK
    nTiles = (C + F_BN - 1) // F_BN
    total = kTiles * nTiles
    out = []
    for cta in range((N + F_BM - 1) // F_BM):
        m0 = cta * F_BM
        As = np.zeros((2, F_BK, F_LDA), np.float32)
        Bs = np.zeros((2, F_BK, F_LDB), np.float32)
        ebuf = np.full(128 * EPI_LD, np.nan, np.float32)
        acc = np.zeros((128, 8, 8), np.float32)
        states = [RowState(K) for _ in range(128)]
        ss = np.zeros(128, np.float32)
        rowmul = [np.float32(0)] * 128
        bad = [False] * 128

        def load_store(it_load, buf):
            nt, kt = it_load // kTiles, it_load % kTiles
            for tid in range(128):
                lk, lr = tid & 15, tid >> 4
                k = kt * F_BK + lk
                for i in range(16):
                    gr = m0 + lr + 8 * i
                    As[buf, lk, lr + 8 * i] = x[gr, k] if (k < D and gr < N) else 0
                for i in range(8):
                    gc = nt * F_BN + lr + 8 * i
                    Bs[buf, lk, lr + 8 * i] = w[gc, k] if (k < D and gc < C) else 0

        load_store(0, 0)
        for it in range(total):
            cur = it & 1
            for tid in range(128):
                ty, tx = tid >> 3, tid & 7
                for k in range(F_BK):
                    av = np.concatenate([As[cur, k, ty * 4: ty * 4 + 4], As[cur, k, 64 + ty * 4: 64 + ty * 4 + 4]])
                    bv = np.concatenate([Bs[cur, k, tx * 4: tx * 4 + 4], Bs[cur, k, 32 + tx * 4: 32 + tx * 4 + 4]])
                    acc[tid] += np.outer(av, bv).astype(np.float32)
            nt, kt = it // kTiles, it % kTiles
            if nt == 0:
                for tid in range(128):
                    ss[tid] += np.sum(As[cur, :, tid] ** 2, dtype=np.float32)
            if it + 1 < total:
                load_store(it + 1, cur ^ 1)
            if kt == kTiles - 1:
                if nt == 0:
                    for tid in range(128):
                        rowmul[tid], bad[tid] = row_multiplier(ss[tid], normalize)
                n0 = nt * F_BN
                for r in range(F_BN // EPI_COLS):
                    cbase = n0 + r * EPI_COLS
                    nvalid = min(EPI_COLS, C - cbase)
                    if nvalid <= 0:
                        break
                    ebuf[:] = np.nan
                    for tid in range(128):
                        ty, tx = tid >> 3, tid & 7
                        for i in range(8):
                            lrow = ty * 4 + i if i < 4 else 64 + ty * 4 + (i - 4)
                            ebuf[lrow * EPI_LD + tx * 4: lrow * EPI_LD + tx * 4 + 4] = acc[tid, i, r * 4: r * 4 + 4]
                    for tid in range(128):
                        if m0 + tid < N:
                            erow = ebuf[tid * EPI_LD: tid * EPI_LD + EPI_COLS]
                            assert not np.isnan(erow[:nvalid]).any(), "read an unwritten epilogue slot"
                            states[tid].push_row(erow, nvalid, cs_all[cbase:], cbase, rowmul[tid])
                acc[:] = 0
        for tid in range(128):
            if m0 + tid < N:
                out.append(states[tid].finish(topk, bad[tid]))
    return out


# ---------------------------------------------------------------- checks
def reference(x, w, scale, topk, normalize):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPS)
        w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), NORM_EPS)
    logits = scale * x @ w.T
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    logp = logits - lse[:, None]
    ent = -(np.exp(logp) * logp).sum(1)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :topk]
    probs = np.exp(np.take_along_axis(logits, order, 1) - lse[:, None])
    return probs, order, ent, lse


def compare(name, got, x, w, scale, topk, normalize):
    probs, order, ent, lse = reference(x, w, scale, topk, normalize)
    gp = np.array([g[0] for g in got], np.float64)
    gc = np.array([g[1] for g in got], np.int64)
    ge = np.array([g[2] for g in got], np.float64)
    gl = np.array([g[3] for g in got], np.float64)
    assert np.array_equal(gc, order), f"{name}: top-k classes differ"
    np.testing.assert_allclose(gp, probs, rtol=2e-3, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(ge, ent, rtol=1e-3, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(gl, lse, rtol=1e-5, atol=2e-4, err_msg=name)
    print(f"  {name}: OK ({x.shape[0]}x{w.shape[0]}x{x.shape[1]}, topk={topk}, normalize={normalize})")


def main():
    import torch

    rng = np.random.default_rng(0)
    # sizes: N spans 2 CTAs with a partial one, C several partial n-tiles / rounds,
    # D partial k-tiles and partial 8-element chunks.
    for (N, C, D, topk, normalize, scale) in [(131, 37, 70, 3, True, 100.0),
                                              (130, 161, 33, 16, True, 100.0),
                                              (5, 3, 9, 3, False, 0.5),
                                              (3, 259, 40, 1, True, 100.0)]:
        x = rng.standard_normal((N, D)).astype(np.float32)
        w = rng.standard_normal((C, D)).astype(np.float32)
        if N > 1:
            x[1] = 0  # zero row: uniform probabilities, all classes tie -> 0, 1, 2, ...
        if C > 5:
            w[5] = w[2]  # exact ties in every row: class 2 must come before class 5
        for dtype, tdt in (("bf16", torch.bfloat16), ("f16", torch.float16)):
            xt, wt = torch.from_numpy(x).to(tdt), torch.from_numpy(w).to(tdt)
            xu = xt.view(torch.int16).numpy().view(np.uint16)
            wu = wt.view(torch.int16).numpy().view(np.uint16)
            got = emulate_tc(xu, wu, dtype, scale, topk, normalize)
            compare(f"tc-{dtype}", got, xt.float().numpy(), wt.float().numpy(), scale, topk,
                    normalize)
        got = emulate_f32(x, w, scale, topk, normalize)
        compare("fp32", got, x, w, scale, topk, normalize)
    print("emulation matches the float64 reference")


if __name__ == "__main__":
    main()
