// CUDA kernels of the CODER ops (nolabels.ops.coder). The host launcher is
// csrc/cuda/coder_cuda.cpp; the GEMMs are torch's (cuBLAS) through the stable
// ABI, these kernels do everything around them. The interface below is plain
// C++ (void* streams, int error codes), declared in kernels/coder.cuh.
//
// topk_similarity (FAISS GPU IndexFlat's design: tiled GEMM + k-selection)
//   For each (query block, key tile), the host normalises the key tile into a
//   float32 buffer, multiplies (cuBLAS), and a selection kernel merges each row
//   of the similarity tile into the row's running top-k, which lives in the
//   output tensors between tiles (O(N k) state, O(tile) buffers).
//   k <= 256: warp_select_kernel, FAISS WarpSelect's design, all in registers
//   (see the kernel's comment). k > 256: topk_merge_kernel, a block select in
//   shared memory: one 128-thread block per row keeps
//   the row's list sorted in shared memory, [0, CAP), next to a candidate
//   buffer [CAP, 2 CAP). The row is read in rounds of 128 elements; an element
//   is a candidate only if it beats the current k-th (value, then lower
//   index), which after the first tile is rare, so most rounds cost one
//   coalesced load and a compare. Candidates take buffer slots by atomicAdd on
//   a shared counter; the block-uniform count that decides when to flush comes
//   from __syncthreads_count (reading the shared counter instead would race
//   with other warps' atomicAdds of the next round). When the buffer could
//   overflow in the next round (and at the end) the block bitonic-sorts the
//   2 CAP entries (descending value, ascending index) and keeps the first CAP. CAP =
//   max(128, next_pow2(k)) <= 1024: shared memory <= 24 KB. Order among equal
//   values: lower index first, as on the CPU.
//
// coder_class_scores: seg_reduce_kernel turns a (rows, C + M1) tile of
//   x̂ · bank into scores: tile[c] + max over the class's kind-1 segment.
//
// coder_affinity: normalize_rows_kernel, rowdot_inv_kernel (1/|x̂ T̂ᵀ| from
//   U = x̂ G) and scale_clamp_kernel around three cuBLAS GEMMs.
//
// Non-finite inputs: normalize_rows_kernel flags rows with NaN/Inf entries
// (and, for raw inner products, rows whose sum of squares overflows) (per-row
// flag and/or one any-flag); topk_poison_kernel then writes NaN values so that
// the Python caller raises. Finite rows up to 3e38 normalise exactly (see the
// kernel's comment).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "coder.cuh"
#include "norm_eps.h"  // kNormEpsF: the eps of every nolabels kernel (csrc/)

#include <algorithm>
#include <cfloat>
#include <cstdint>

namespace nolabels {
namespace coder_cuda {


namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float load_as_float(const void* p, int dtype, int64_t off) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[off];
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(p)[off]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[off]);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per row: dst[r] = src[r] / max(|src[r]|, eps) (or a plain copy).
// Scale-safe: a finite row whose fp32 sum of squares overflows (entries from
// ~1e19 up to 3e38) is summed again pre-scaled by p = 2^-floor(log2 max|x|)
// (exact), and dst = (x p) / max(|x p|, eps p): the same unit row, no overflow.
// Only NaN/Inf entries make a row bad (with normalize; without, an overflowing
// row is bad too: its raw inner products would overflow as well).
__global__ void normalize_rows_kernel(const void* __restrict__ src, int dtype, int64_t rows,
                                      int64_t D, int64_t s0, int64_t s1, float* __restrict__ dst,
                                      bool normalize, int* row_bad, int* any_bad) {
  const int lane = threadIdx.x & 31;
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (r >= rows) return;
  float ss = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = load_as_float(src, dtype, r * s0 + d * s1);
    ss += v * v;
  }
  ss = warp_sum(ss);
  bool bad = !isfinite(ss);
  float pre = 1.0f;
  if (bad && normalize) {  // warp-uniform, rare: NaN/Inf entries, or fp32 overflow
    float amax = 0.f;
    bool nonfinite = false;
    for (int64_t d = lane; d < D; d += 32) {
      const float v = load_as_float(src, dtype, r * s0 + d * s1);
      nonfinite |= !isfinite(v);
      amax = fmaxf(amax, fabsf(v));
    }
    bad = __any_sync(0xffffffffu, nonfinite);
    amax = warp_max(amax);
    if (!bad) {
      // amax > 2^63 / sqrt(D) >= 1 here; 2^-floor(log2 amax) from the exponent bits
      // (exact, and at least 2^-126: fast math flushes denormals).
      const int eb = (__float_as_int(amax) >> 23) & 0xff;
      pre = __int_as_float(max(254 - eb, 1) << 23);
      ss = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        const float v = load_as_float(src, dtype, r * s0 + d * s1) * pre;
        ss += v * v;
      }
      ss = warp_sum(ss);
    }
  }
  const float f = (normalize && !bad) ? 1.0f / fmaxf(sqrtf(ss), kNormEpsF * pre) : 1.0f;
  float* out = dst + r * D;
  for (int64_t d = lane; d < D; d += 32) out[d] = (load_as_float(src, dtype, r * s0 + d * s1) * pre) * f;
  if (lane == 0) {
    if (row_bad) row_bad[r] = bad ? 1 : 0;
    if (bad && any_bad) atomicExch(any_bad, 1);
  }
}

// "a ranks before b": larger value, or equal value and smaller index.
__device__ __forceinline__ bool before(float va, int64_t ia, float vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// Bitonic sort of L = 2 CAP (value, index) pairs in shared memory, best first.
template <int L>
__device__ void block_sort(float* sv, int64_t* si) {
  for (int size = 2; size <= L; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < L / 2; t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool up = (i & size) == 0;  // this run ends up best-first
        const bool swap = up ? before(sv[j], si[j], sv[i], si[i]) : before(sv[i], si[i], sv[j], si[j]);
        if (swap) {
          const float tv = sv[i];
          sv[i] = sv[j];
          sv[j] = tv;
          const int64_t ti = si[i];
          si[i] = si[j];
          si[j] = ti;
        }
      }
      __syncthreads();
    }
  }
}

template <int CAP>
__global__ void __launch_bounds__(kThreads) topk_merge_kernel(const float* __restrict__ S,
                                                               int64_t cols, int64_t ld,
                                                               float* __restrict__ vals,
                                                               int64_t* __restrict__ idx, int k,
                                                               int64_t base, bool first) {
  __shared__ float sv[2 * CAP];
  __shared__ int64_t si[2 * CAP];
  __shared__ int slot;  // next free buffer slot (atomicAdd); reset by each flush
  const int64_t row = blockIdx.x;
  const float* srow = S + row * ld;
  float* vrow = vals + row * k;
  int64_t* irow = idx + row * k;
  for (int i = threadIdx.x; i < 2 * CAP; i += blockDim.x) {
    const bool keep = !first && i < k;
    sv[i] = keep ? vrow[i] : __int_as_float(0xff800000);  // -inf
    si[i] = keep ? irow[i] : INT64_MAX;
  }
  if (threadIdx.x == 0) slot = 0;
  __syncthreads();
  float thv = sv[k - 1];
  int64_t thi = si[k - 1];
  int buffered = 0;  // candidates in the buffer: block-uniform (a register in every thread)

  auto flush = [&]() {
    for (int i = CAP + buffered + threadIdx.x; i < 2 * CAP; i += blockDim.x) {
      sv[i] = __int_as_float(0xff800000);
      si[i] = INT64_MAX;
    }
    __syncthreads();
    block_sort<2 * CAP>(sv, si);
    if (threadIdx.x == 0) slot = 0;
    __syncthreads();  // the reset is seen before the next round's atomicAdds
    thv = sv[k - 1];
    thi = si[k - 1];
    buffered = 0;
  };

  for (int64_t r0 = 0; r0 < cols; r0 += blockDim.x) {
    if (buffered + static_cast<int>(blockDim.x) > CAP) flush();
    const int64_t j = r0 + threadIdx.x;
    bool cand = false;
    if (j < cols) {
      const float v = srow[j];
      const int64_t id = base + j;
      cand = before(v, id, thv, thi);
      if (cand) {
        const int p = atomicAdd(&slot, 1);
        sv[CAP + p] = v;
        si[CAP + p] = id;
      }
    }
    buffered += __syncthreads_count(cand);  // barrier: the round's writes are visible
  }
  if (buffered > 0) flush();
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    vrow[i] = sv[i];
    irow[i] = si[i];
  }
}

// ---------------------------------------------------------------- warp select (k <= 256)
// FAISS WarpSelect's design, in registers: one warp per row. The warp queue
// is a sorted "warp array" of L = 32 Q (value, index) pairs, element
// e = 32 r + lane in register r of that lane (Q = next_pow2(k) / 32 per lane,
// so L >= k). Each lane also keeps a sorted thread queue of Q candidates. The
// row is read 32 columns at a time (one coalesced 128-byte load); a value is a
// candidate only if it beats the warp queue's k-th element (value, then lower
// index), so after the first tile nearly every round is a load and a compare.
// When any lane's thread queue is full (__any_sync: warp-uniform) the warp
// merges: bitonic-sorts the 32 thread queues as one warp array, takes the
// element-wise better of queue[e] and candidates[L-1-e] (a bitonic sequence
// holding the best L of both) and bitonic-merges it. Exchanges between lanes
// are shuffles; between registers of a lane, plain moves (all register
// indices are compile-time after unrolling: no local memory).
template <int Q>
struct WarpArray {
  float v[Q];
  int64_t i[Q];
};

template <int Q>
__device__ __forceinline__ void warp_fill(WarpArray<Q>& a) {
#pragma unroll
  for (int r = 0; r < Q; ++r) {
    a.v[r] = __int_as_float(0xff800000);  // -inf
    a.i[r] = INT64_MAX;
  }
}

// One bitonic step on a warp array: elements e and e ^ stride are compared;
// blocks of `size` elements with (e & size) == 0 end best-first (size == L:
// the whole array best-first).
template <int Q>
__device__ __forceinline__ void warp_step(WarpArray<Q>& a, int size, int stride, int lane) {
  if (stride >= 32) {
    const int rs = stride >> 5;
#pragma unroll
    for (int r = 0; r < Q; ++r) {
      const int p = r ^ rs;
      if (p > r) {  // each register pair once, r the lower element
        const bool up = (((r << 5) | lane) & size) == 0;
        const bool swap = up ? before(a.v[p], a.i[p], a.v[r], a.i[r])
                             : before(a.v[r], a.i[r], a.v[p], a.i[p]);
        if (swap) {
          const float tv = a.v[r];
          a.v[r] = a.v[p];
          a.v[p] = tv;
          const int64_t ti = a.i[r];
          a.i[r] = a.i[p];
          a.i[p] = ti;
        }
      }
    }
  } else {
    const bool lower = (lane & stride) == 0;
#pragma unroll
    for (int r = 0; r < Q; ++r) {
      const float ov = __shfl_xor_sync(0xffffffffu, a.v[r], stride);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, a.i[r], stride);
      const bool up = (((r << 5) | lane) & size) == 0;
      // lower element of an "up" pair keeps the better one, upper the worse; reversed if down
      const bool mine_better = before(a.v[r], a.i[r], ov, oi);
      const bool keep_better = lower == up;
      if (mine_better != keep_better) {
        a.v[r] = ov;
        a.i[r] = oi;
      }
    }
  }
}

template <int Q>
__device__ __forceinline__ void warp_sort(WarpArray<Q>& a, int lane) {
#pragma unroll
  for (int size = 2; size <= 32 * Q; size <<= 1)
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) warp_step(a, size, stride, lane);
}

// queue <- best L of (queue, cand); both sorted best-first on entry.
template <int Q>
__device__ __forceinline__ void warp_merge(WarpArray<Q>& queue, const WarpArray<Q>& cand, int lane) {
#pragma unroll
  for (int r = 0; r < Q; ++r) {  // element L-1-e of cand: register Q-1-r of lane 31-lane
    const float cv = __shfl_xor_sync(0xffffffffu, cand.v[Q - 1 - r], 31);
    const int64_t ci = __shfl_xor_sync(0xffffffffu, cand.i[Q - 1 - r], 31);
    if (before(cv, ci, queue.v[r], queue.i[r])) {
      queue.v[r] = cv;
      queue.i[r] = ci;
    }
  }
#pragma unroll
  for (int stride = 16 * Q; stride > 0; stride >>= 1) warp_step(queue, 32 * Q, stride, lane);
}

template <int Q>
__global__ void __launch_bounds__(kThreads) warp_select_kernel(const float* __restrict__ S,
                                                               int64_t rows, int64_t cols,
                                                               int64_t ld, float* __restrict__ vals,
                                                               int64_t* __restrict__ idx, int k,
                                                               int64_t base, bool first) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps
  const float* srow = S + row * ld;
  float* vrow = vals + row * k;
  int64_t* irow = idx + row * k;

  WarpArray<Q> queue, cand;
  warp_fill(queue);
  warp_fill(cand);
  if (!first) {
#pragma unroll
    for (int r = 0; r < Q; ++r) {
      const int e = (r << 5) | lane;
      if (e < k) {
        queue.v[r] = vrow[e];
        queue.i[r] = irow[e];
      }
    }
  }
  const int kr = (k - 1) >> 5, kl = (k - 1) & 31;  // where the k-th element lives
  float thv;
  int64_t thi;
  auto threshold = [&]() {
    float tv = queue.v[0];
    int64_t ti = queue.i[0];
#pragma unroll
    for (int r = 1; r < Q; ++r)
      if (r == kr) {
        tv = queue.v[r];
        ti = queue.i[r];
      }
    thv = __shfl_sync(0xffffffffu, tv, kl);
    thi = __shfl_sync(0xffffffffu, ti, kl);
  };
  threshold();
  int n = 0;  // this lane's thread-queue fill
  auto merge = [&]() {
    warp_sort(cand, lane);
    warp_merge(queue, cand, lane);
    warp_fill(cand);
    n = 0;
    threshold();
  };

  for (int64_t c0 = 0; c0 < cols; c0 += 32) {
    const int64_t j = c0 + lane;
    if (j < cols) {
      const float v = srow[j];
      const int64_t id = base + j;
      if (before(v, id, thv, thi)) {
        // sorted insert into the thread queue (its last slot is free: n < Q here)
#pragma unroll
        for (int r = Q - 1; r > 0; --r) {
          const bool up = before(v, id, cand.v[r - 1], cand.i[r - 1]);
          const bool here = before(v, id, cand.v[r], cand.i[r]);
          if (here) {
            cand.v[r] = up ? cand.v[r - 1] : v;
            cand.i[r] = up ? cand.i[r - 1] : id;
          }
        }
        if (before(v, id, cand.v[0], cand.i[0])) {
          cand.v[0] = v;
          cand.i[0] = id;
        }
        ++n;
      }
    }
    if (__any_sync(0xffffffffu, n == Q)) merge();
  }
  if (__any_sync(0xffffffffu, n > 0)) merge();
#pragma unroll
  for (int r = 0; r < Q; ++r) {
    const int e = (r << 5) | lane;
    if (e < k) {
      vrow[e] = queue.v[r];
      irow[e] = queue.i[r];
    }
  }
}

__global__ void topk_poison_kernel(float* vals, int64_t rows, int64_t k, const int* row_bad,
                                   const int* any_bad) {
  // grid-stride: the grid is capped at 2^31-1 blocks
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if ((any_bad && *any_bad) || (row_bad && row_bad[i / k])) vals[i] = __int_as_float(0x7fc00000);
  }
}

// 1-D grid of rows x cblocks blocks (rows do not go on grid.y: a row block can hold
// millions of rows); block b covers classes [(b % cblocks) * blockDim.x, ...) of row
// b / cblocks.
__global__ void seg_reduce_kernel(const float* __restrict__ tile, int64_t R, int64_t C,
                                  int64_t cblocks, const int64_t* __restrict__ seg,
                                  const int* row_bad, float* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const int64_t row = b / cblocks;
  const int64_t c = (b - row * cblocks) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float* t = tile + row * R;
  float v;
  if (row_bad && row_bad[row]) {
    v = __int_as_float(0x7fc00000);
  } else {
    const int64_t a = seg[c], b = seg[c + 1];
    float mx = 0.f;
    if (b > a) {
      mx = t[C + a];
      for (int64_t j = a + 1; j < b; ++j) mx = fmaxf(mx, t[C + j]);
    }
    v = t[c] + mx;
  }
  out[row * C + c] = v;
}

// inv[r] = 1 / max(sqrt(max(<U_r, X_r>, 0)), eps); one warp per row.
__global__ void rowdot_inv_kernel(const float* __restrict__ U, const float* __restrict__ X,
                                  int64_t rows, int64_t D, float* __restrict__ inv) {
  const int lane = threadIdx.x & 31;
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (r >= rows) return;
  float s = 0.f;
  for (int64_t d = lane; d < D; d += 32) s += U[r * D + d] * X[r * D + d];
  s = warp_sum(s);
  if (lane == 0) inv[r] = 1.0f / fmaxf(sqrtf(fmaxf(s, 0.f)), kNormEpsF);
}

__global__ void scale_clamp_kernel(float* out, int64_t N, int64_t K, const float* ix,
                                   const float* iy) {
  // grid-stride: the grid is capped at 2^31-1 blocks
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N * K;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = out[i] * ix[i / K] * iy[i % K];
    out[i] = fminf(1.0f, fmaxf(-1.0f, v));
  }
}

inline int64_t blocks_for(int64_t n, int per_block) { return (n + per_block - 1) / per_block; }

LaunchPlan plan_1d(int64_t blocks, int threads) {
  LaunchPlan p;
  p.grid_x = blocks;
  p.block = threads;
  return p;
}

dim3 grid_of(const LaunchPlan& p) {
  return dim3(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y),
              static_cast<unsigned>(p.grid_z));
}

}  // namespace

LaunchPlan plan_normalize_rows(int64_t rows) { return plan_1d(blocks_for(rows, kThreads / 32), kThreads); }
LaunchPlan plan_topk_merge(int64_t rows, int64_t k) {
  if (k <= 256) return plan_1d(blocks_for(rows, kThreads / 32), kThreads);  // a warp per row
  return plan_1d(rows, kThreads);                                            // a block per row
}
constexpr int64_t kMaxGridX = 0x7fffffffLL;
LaunchPlan plan_topk_poison(int64_t rows, int64_t k) {
  return plan_1d(std::min(blocks_for(rows * k, 256), kMaxGridX), 256);  // grid-stride kernel
}
LaunchPlan plan_seg_reduce(int64_t rows, int64_t C) { return plan_1d(rows * blocks_for(C, kThreads), kThreads); }
LaunchPlan plan_rowdot_inv(int64_t rows) { return plan_1d(blocks_for(rows, kThreads / 32), kThreads); }
LaunchPlan plan_scale_clamp(int64_t N, int64_t K) {
  return plan_1d(std::min(blocks_for(N * K, 256), kMaxGridX), 256);  // grid-stride kernel
}
bool plan_fits(const LaunchPlan& p) {
  return p.grid_x >= 1 && p.grid_x <= 0x7fffffffLL && p.grid_y >= 1 && p.grid_y <= 65535 &&
         p.grid_z >= 1 && p.grid_z <= 65535 && p.block >= 1 && p.block <= 1024 && p.smem >= 0 &&
         p.smem <= 48 * 1024;
}

int normalize_rows(const void* src, int dtype, int64_t rows, int64_t D, int64_t s0, int64_t s1,
                   float* dst, bool normalize, int* row_bad, int* any_bad, void* stream) {
  if (rows == 0) return 0;
  const LaunchPlan pl = plan_normalize_rows(rows);
  if (!plan_fits(pl)) return static_cast<int>(cudaErrorInvalidConfiguration);
  normalize_rows_kernel<<<grid_of(pl), pl.block, pl.smem, static_cast<cudaStream_t>(stream)>>>(
      src, dtype, rows, D, s0, s1, dst, normalize, row_bad, any_bad);
  return static_cast<int>(cudaGetLastError());
}

int topk_merge(const float* S, int64_t rows, int64_t cols, int64_t ld, float* vals, int64_t* idx,
               int64_t k, int64_t base, bool first, void* stream) {
  if (rows == 0 || cols == 0) return 0;
  if (k < 1 || k > kMaxK) return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  const int ki = static_cast<int>(k);
  const LaunchPlan pl = plan_topk_merge(rows, k);
  if (!plan_fits(pl)) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid = grid_of(pl);
  if (k <= 256) {  // warp select in registers, 4 rows per block
    if (k <= 32) {
      warp_select_kernel<1><<<grid, pl.block, pl.smem, s>>>(S, rows, cols, ld, vals, idx, ki, base, first);
    } else if (k <= 64) {
      warp_select_kernel<2><<<grid, pl.block, pl.smem, s>>>(S, rows, cols, ld, vals, idx, ki, base, first);
    } else if (k <= 128) {
      warp_select_kernel<4><<<grid, pl.block, pl.smem, s>>>(S, rows, cols, ld, vals, idx, ki, base, first);
    } else {
      warp_select_kernel<8><<<grid, pl.block, pl.smem, s>>>(S, rows, cols, ld, vals, idx, ki, base, first);
    }
    return static_cast<int>(cudaGetLastError());
  }
  // block select in shared memory, a block per row (k > 256 here)
  if (k <= 512) {
    topk_merge_kernel<512><<<grid, pl.block, pl.smem, s>>>(S, cols, ld, vals, idx, ki, base, first);
  } else {
    topk_merge_kernel<1024><<<grid, pl.block, pl.smem, s>>>(S, cols, ld, vals, idx, ki, base, first);
  }
  return static_cast<int>(cudaGetLastError());
}

int topk_poison(float* vals, int64_t rows, int64_t k, const int* row_bad, const int* any_bad,
                void* stream) {
  if (rows * k == 0) return 0;
  const LaunchPlan pl = plan_topk_poison(rows, k);
  if (!plan_fits(pl)) return static_cast<int>(cudaErrorInvalidConfiguration);
  topk_poison_kernel<<<grid_of(pl), pl.block, pl.smem, static_cast<cudaStream_t>(stream)>>>(
      vals, rows, k, row_bad, any_bad);
  return static_cast<int>(cudaGetLastError());
}

int seg_reduce(const float* tile, int64_t rows, int64_t R, int64_t C, const int64_t* seg,
               const int* row_bad, float* out, void* stream) {
  if (rows == 0) return 0;
  const LaunchPlan pl = plan_seg_reduce(rows, C);
  if (!plan_fits(pl)) return static_cast<int>(cudaErrorInvalidConfiguration);
  seg_reduce_kernel<<<grid_of(pl), pl.block, pl.smem, static_cast<cudaStream_t>(stream)>>>(
      tile, R, C, blocks_for(C, kThreads), seg, row_bad, out);
  return static_cast<int>(cudaGetLastError());
}

int rowdot_inv(const float* U, const float* X, int64_t rows, int64_t D, float* inv, void* stream) {
  if (rows == 0) return 0;
  const LaunchPlan pl = plan_rowdot_inv(rows);
  if (!plan_fits(pl)) return static_cast<int>(cudaErrorInvalidConfiguration);
  rowdot_inv_kernel<<<grid_of(pl), pl.block, pl.smem, static_cast<cudaStream_t>(stream)>>>(
      U, X, rows, D, inv);
  return static_cast<int>(cudaGetLastError());
}

int scale_clamp(float* out, int64_t N, int64_t K, const float* ix, const float* iy, void* stream) {
  if (N * K == 0) return 0;
  const LaunchPlan pl = plan_scale_clamp(N, K);
  if (!plan_fits(pl)) return static_cast<int>(cudaErrorInvalidConfiguration);
  scale_clamp_kernel<<<grid_of(pl), pl.block, pl.smem, static_cast<cudaStream_t>(stream)>>>(out, N, K, ix, iy);
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace coder_cuda
}  // namespace nolabels
