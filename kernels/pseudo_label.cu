// Fused cosine-similarity pseudo-labeling, CUDA kernels (sm_80 / sm_90).
//
// Same contract as the CPU kernel (csrc/pseudo_label_cpu.cpp): for image row
// x_i and class row w_c, s_ic = scale * <x_i, w_c> / (max(|x_i|,eps) max(|w_c|,eps))
// (raw inner products when normalize=False); per row: top-k softmax
// probabilities (descending, ties -> lower class index) and their classes,
// entropy over all C classes, log-sum-exp. A non-finite image row gives
// lse = entropy = probs = NaN. The N x C logits are never materialised.
//
// Design
// ------
// 1. Pre-pass `colscale_kernel` (one warp per class): colscale[c] =
//    log2(e) * scale / max(|w_c|, eps)  (or log2(e) * scale), C floats.
//    Everything downstream works in the log2 domain (exp2 on MUFU, no
//    per-element multiply by log2 e); results are converted back at the end.
// 2. Main kernel: one CTA of 128 threads (4 warps) owns BM = 128 image rows
//    and sweeps all C classes in BN-column tiles; the D reduction of every
//    tile runs through a multi-stage shared-memory pipeline, flattened over
//    (n-tile, k-tile) so that the loads of tile j+1 are in flight while the
//    epilogue of tile j runs. The raw dot products <x, w> are accumulated in
//    fp32 and post-scaled (rowmul * colscale): no input is rounded after
//    normalisation, so fp16/bf16 results are as exact as fp32 accumulation.
//    * fp16/bf16: tensor cores, mma.sync.m16n8k16 (fp32 accumulate).
//      BM x BN x BK = 128 x 128 x 32, 3 stages, 2x2 warps of 64x64 each
//      (128 fp32 accumulators per thread; 206-240 registers, no spills).
//      Tiles are stored k-contiguous, 64 B per row, 16-byte chunks
//      XOR-swizzled (chunk ^ ((row>>1)&3)), so the ldmatrix.x4 fragment
//      loads and the row-norm reads are bank-conflict free. Loads
//      (template VEC): cp.async 16 B with zero-fill (src-size) when both
//      matrices have unit column stride and 16-byte-aligned base and row
//      pitch (the common contiguous case, D % 8 == 0); otherwise a strided
//      element gather through registers (any strides, slower).
//    * fp32: SIMT FMA (no TF32: exact fp32), BM x BN x BK = 128 x 64 x 16,
//      each thread an 8x8 micro-tile, k-major double-buffered smem tiles
//      filled from registers (strided gather, any layout).
// 3. Epilogue of each n-tile, in rounds of 32 columns: the accumulators are
//    written to a 128 x 36 fp32 smem buffer; thread t then owns image row t
//    for the whole kernel and folds the 32 values of its row into its
//    running state: max m, s = sum 2^(z-m), t = sum 2^(z-m)(z-m) (entropy),
//    and a sorted register top-K (K = 1, 4 or 16 >= topk). One thread sees
//    its row's classes in increasing order, so ties keep the lower index
//    and no cross-thread merge is needed. Columns >= C are never read.
// 4. |x_i|^2 is accumulated by the row owner from the A tiles it already has
//    in shared memory during the first n-tile (no extra global traffic);
//    a row whose sum of squares is Inf/NaN is re-examined from global memory
//    (NaN/Inf entries -> NaN outputs; mere fp32 overflow -> rescaled norm).
// 5. Range (normalize=True). The raw dot products are formed before
//    normalisation; they cannot overflow while every max-abs entry is below
//    2^32 (all sums < D * 2^64). fp32 (exact for every finite input, up to
//    3e38): colscale_kernel gives each class with an entry >= 2^32 a
//    power-of-two pre-scale colpre[c] (exact), applied when its rows are
//    staged; image rows: the row owner also reduces max |x| in n-tile 0, and
//    a CTA holding such a row restarts once with its rows staged times a power
//    of two (rowpre, shared memory). Both cost nothing when no row is that
//    large (one compare per row and per class; the B multiply by colpre = 1).
//    fp16 cannot get there; bf16 is not pre-scaled: a bf16 row of norm >= 2^96
//    or class of norm >= 2^30 (|x| |w| could overflow) is reported with NaN
//    lse (a class: every row), and nolabels.ops.pseudo_label recomputes those
//    rows from float32 unit rows.
//
// Shared memory per CTA: fp16/bf16 3 * 16 KB (pipeline) + 18 KB (epilogue)
// = 67,584 B (opt-in above 48 KB; 2 CTAs/SM on A100 and H100); fp32 44,544 B.
// Peak device memory beyond inputs and outputs: the colscale/colpre buffer, 2 C floats.
//
// Tuning knobs not explored without a GPU: stages (4 fits H100 at 2 CTAs/SM,
// not A100), BN = 256 with 8 warps, a wgmma (sm_90a) main loop.
// The inline PTX (cp.async, ldmatrix, mma.sync, ex2) is in kernels/ptx.cuh. Tests run
// this file's unchanged source on the CPU (tests/emulators/cuda_sim: one thread per CUDA
// thread, ptx.cuh's instructions modelled from the PTX ISA; tests/test_pseudo_label_cuda_sim.py).
#include "pseudo_label.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "ptx.cuh"
#include "norm_eps.h"  // kNormEpsF: the eps of every nolabels kernel (csrc/)

namespace nolabels {
namespace cuda {
namespace {

using namespace ptx;  // NOLINT: cp_async_16, ldmatrix_x4, mma_16816_*, fast_exp2, ...

// Rows whose max-abs entry is below 2^32 cannot overflow any fp32 sum of squares
// or dot product (D * 2^64 < 2^128); larger float32 rows are pre-scaled by a
// power of two (exact) in the fp32 kernel. See "Range" in the header comment.
constexpr float kScaleLimit = 4294967296.f;
// bf16 (not pre-scaled): rows of norm below 2^96 and classes below 2^30 keep
// |x| |w| < 2^126; beyond, the result is reported as NaN (see 5. above).
constexpr float kBf16RowLimit = 79228162514264337593543950336.f;  // 2^96
constexpr float kBf16ClassLimit = 1073741824.f;                    // 2^30
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------- elements
struct F32 {};   // float32
struct F16 {};   // float16
struct BF16 {};  // bfloat16

__device__ __forceinline__ float bits_to_float(uint16_t b, F16) {
  return __half2float(__ushort_as_half(b));
}
__device__ __forceinline__ float bits_to_float(uint16_t b, BF16) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// Element (r, k) of a strided matrix as float.
__device__ __forceinline__ float load_elem(const void* base, int64_t off, F32) {
  return __ldg(static_cast<const float*>(base) + off);
}
template <typename T>
__device__ __forceinline__ float load_elem(const void* base, int64_t off, T tag) {
  return bits_to_float(__ldg(static_cast<const unsigned short*>(base) + off), tag);
}

// Finite test on the bits: immune to any fast-math assumption.
__device__ __forceinline__ bool finite_f(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// Sum of squares of the two halves packed in a 32-bit word.
__device__ __forceinline__ float sq2(uint32_t w, float acc, BF16) {
  const float lo = __uint_as_float(w << 16), hi = __uint_as_float(w & 0xffff0000u);
  return fmaf(hi, hi, fmaf(lo, lo, acc));
}
__device__ __forceinline__ float sq2(uint32_t w, float acc, F16) {
  const float lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  const float hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  return fmaf(hi, hi, fmaf(lo, lo, acc));
}

// 2^-floor(log2 amax) for amax >= 1, at least 2^-126 (a normal number: fast
// math flushes denormals), built from the exponent bits, so exact.
__device__ __forceinline__ float pow2_down(float amax) {
  const int eb = (__float_as_int(amax) >> 23) & 0xff;
  return __int_as_float(max(254 - eb, 1) << 23);
}

// Norm of one row by one thread, for rows whose fp32 sum of squares was not
// finite: NaN/Inf entries -> *bad; otherwise a rescaled, overflow-free norm.
struct NormResult {
  float norm;
  bool bad;
};
template <typename T>
__device__ __noinline__ NormResult row_norm_slow(const void* base, int64_t row, int64_t s0,
                                                 int64_t s1, int D) {
  float amax = 0.f;
  bool nonfinite = false;
  for (int k = 0; k < D; ++k) {
    const float x = load_elem(base, row * s0 + k * s1, T{});
    if (!finite_f(x)) nonfinite = true;
    else amax = fmaxf(amax, fabsf(x));
  }
  if (nonfinite || amax == 0.f) return {0.f, nonfinite};
  const float inv = 1.f / amax;
  float s = 0.f;
  for (int k = 0; k < D; ++k) {
    const float y = load_elem(base, row * s0 + k * s1, T{}) * inv;
    s = fmaf(y, y, s);
  }
  return {amax * sqrtf(s), false};
}

// ---------------------------------------------------------------- parameters
struct Params {
  const void* A;  // image (N x D)
  int64_t N, a_s0, a_s1;
  const void* B;  // cls (C x D)
  int64_t b_s0, b_s1;
  int C, D;
  const float* colscale;  // C floats: log2(e) * scale / max(|w_c|, eps)
  const float* colpre;    // C floats: power-of-two pre-scale of class rows (fp32 kernel)
  float* probs;
  int64_t* classes;
  float* entropy;
  float* lse;
  int topk;
  int normalize;
  int vec_a, vec_b;  // cp.async fast path allowed for A / B
};

// ---------------------------------------------------------------- row state
// Online softmax statistics and top-K of one row, in the log2 domain:
// values are y = log2(e) * logit; m = running max; s = sum 2^(y-m);
// t = sum 2^(y-m) (y-m). Rescale on a new max m' (d = m - m' < 0):
// s' = 2^d s, t' = 2^d (t + d s).
template <int K>
struct RowState {
  float m, s, t;
  float v[K];
  int ix[K];

  __device__ __forceinline__ void init() {
    m = -FLT_MAX;  // finite: (m - m') * s stays 0 * finite = 0 on the first update
    s = 0.f;
    t = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      v[j] = -INFINITY;
      ix[j] = 0;  // stays a valid class index even for all-NaN rows
    }
  }

  // Sorted insertion (descending). Strict '>' keeps an earlier (lower)
  // class index ahead of a later equal value. Fully unrolled, so v / ix stay
  // in registers. Invariant: v[0] >= v[1] >= ... (never NaN: NaN is never
  // inserted because every comparison with it is false).
  __device__ __forceinline__ void insert(float x, int c) {
    if (!(x > v[K - 1])) return;
#pragma unroll
    for (int j = K - 1; j > 0; --j) {
      // Slot j (old values of j-1 and j; slot j-1 is rewritten only in the
      // next step): takes old v[j-1] if x is above it, else x if x is above
      // old v[j], else keeps v[j]. (x > v[j-1] implies x > v[j].)
      const bool up = x > v[j - 1];
      const bool here = x > v[j];
      const float nv = up ? v[j - 1] : x;
      const int ni = up ? ix[j - 1] : c;
      v[j] = here ? nv : v[j];
      ix[j] = here ? ni : ix[j];
    }
    if (x > v[0]) {
      v[0] = x;
      ix[0] = c;
    }
  }

  __device__ __forceinline__ void rescale(float cm) {
    if (cm > m) {
      const float d = m - cm;
      const float a = fast_exp2(d);
      t = a * fmaf(d, s, t);
      s *= a;
      m = cm;
    }
  }

  __device__ __forceinline__ void acc1(float y) {
    const float z = y - m;
    const float e = fast_exp2(z);
    s += e;
    t = fmaf(e, z, t);
  }

  __device__ __forceinline__ void push4(float y0, float y1, float y2, float y3, int c) {
    const float cm = fmaxf(fmaxf(y0, y1), fmaxf(y2, y3));
    rescale(cm);
    acc1(y0);
    acc1(y1);
    acc1(y2);
    acc1(y3);
    if (cm > v[K - 1]) {
      insert(y0, c);
      insert(y1, c + 1);
      insert(y2, c + 2);
      insert(y3, c + 3);
    }
  }

  __device__ __forceinline__ void push1(float y, int c) {
    rescale(y);
    acc1(y);
    insert(y, c);
  }

  // Fold `n` raw dot products erow[0..n) (classes c0..c0+n) into the state.
  // erow is 16-byte aligned, colscale + c0 too (c0 is a multiple of 32).
  __device__ __forceinline__ void push_row(const float* erow, int n, const float* cs, int c0,
                                           float rowmul) {
    int c = 0;
    for (; c + 4 <= n; c += 4) {
      const float4 a = *reinterpret_cast<const float4*>(erow + c);
      const float4 w = __ldg(reinterpret_cast<const float4*>(cs + c));
      push4(a.x * rowmul * w.x, a.y * rowmul * w.y, a.z * rowmul * w.z, a.w * rowmul * w.w,
            c0 + c);
    }
    for (; c < n; ++c) push1(erow[c] * rowmul * __ldg(cs + c), c0 + c);
  }

  __device__ __forceinline__ void finish(const Params& p, int64_t row, bool bad) const {
    const float l2s = __log2f(s);
    const float lse2 = m + l2s;
    float lse = lse2 * kLn2;
    float ent = (l2s - __fdividef(t, s)) * kLn2;
    if (bad) {
      lse = __int_as_float(0x7fffffff);  // NaN: the caller raises on it
      ent = lse;
    }
    p.lse[row] = lse;
    p.entropy[row] = ent;
    float* pr = p.probs + row * p.topk;
    int64_t* cl = p.classes + row * p.topk;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (j < p.topk) {
        pr[j] = bad ? lse : fast_exp2(v[j] - lse2);
        cl[j] = ix[j];
      }
    }
  }
};

// Row norm -> multiplier, with the slow re-check for non-finite sums. `pre`:
// the power of two the row was multiplied by before ss was summed (1 if none);
// 1 / max(|x|, eps) = pre / max(|x pre|, eps pre), and the pre in the numerator
// is carried by the pre-scaled dot products.
template <typename T>
__device__ __forceinline__ float row_multiplier(const Params& p, int64_t row, float ss,
                                                bool* bad, float pre = 1.f) {
  float norm;
  *bad = false;
  if (finite_f(ss)) {
    norm = sqrtf(ss);
  } else {
    const NormResult r = row_norm_slow<T>(p.A, row, p.a_s0, p.a_s1, p.D);
    norm = r.norm;
    *bad = r.bad;
    // 16-bit rows are not pre-scaled: out of range -> NaN multiplier (NaN lse, the
    // op recomputes the row). fp32 rows reach this branch only if non-finite.
    if (!std::is_same<T, F32>::value && p.normalize && !r.bad && !(norm < kBf16RowLimit))
      return __int_as_float(0x7fffffff);
  }
  return p.normalize ? 1.f / fmaxf(norm, kNormEpsF * pre) : 1.f;
}

// ---------------------------------------------------------------- pre-pass
// colscale[c] = log2(e) * scale / max(|w_c|, eps)  (normalize) or log2(e) * scale,
// colpre[c] = 1. fp32 classes with an entry >= 2^32 are pre-scaled instead: the
// fp32 kernel multiplies class row c by colpre[c] = 2^-floor(log2 max|w_c|) when
// staging it, and colscale[c] = log2(e) * scale / max(|w_c colpre[c]|, eps colpre[c]).
// 16-bit kernels stage raw rows: a class of norm >= 2^30 gets colscale NaN (its
// products with a large row could overflow; see 5. above). One warp per class row,
// any strides.
template <typename T>
__global__ void __launch_bounds__(256) colscale_kernel(const void* B, int C, int D, int64_t s0,
                                                       int64_t s1, float scale, int normalize,
                                                       float* out) {
  const int lane = threadIdx.x & 31;
  const int c = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (c >= C) return;  // whole warp leaves together
  const int64_t base = static_cast<int64_t>(c) * s0;
  float ss = 0.f, amax = 0.f;
  for (int k = lane; k < D; k += 32) {
    const float x = load_elem(B, base + k * s1, T{});
    ss = fmaf(x, x, ss);
    amax = fmaxf(amax, fabsf(x));  // fmaxf drops NaN; an Inf makes ss Inf anyway
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ss += __shfl_xor_sync(0xffffffffu, ss, o);
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  }
  float norm = sqrtf(ss), pre = 1.f;  // |w_c| = norm / pre
  const bool big = std::is_same<T, F32>::value && normalize && finite_f(amax) && amax >= kScaleLimit;
  if (!finite_f(ss) || big) {  // warp-uniform: Inf/NaN entries, fp32 overflow, or a big fp32 row
    bool nonfinite = false;
    for (int k = lane; k < D; k += 32) nonfinite |= !finite_f(load_elem(B, base + k * s1, T{}));
    nonfinite = __any_sync(0xffffffffu, nonfinite);
    if (nonfinite) {
      norm = __int_as_float(0x7fffffff);  // NaN class: caller rejects these anyway
    } else {
      pre = pow2_down(amax);  // amax >= 2^32 here (an overflowing ss needs amax > 2^63 / sqrt(D))
      float s = 0.f;
      for (int k = lane; k < D; k += 32) {
        const float y = load_elem(B, base + k * s1, T{}) * pre;
        s = fmaf(y, y, s);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      norm = sqrtf(s);
    }
  }
  if (lane == 0) {
    if (!normalize) {
      out[c] = kLog2e * scale;
      out[C + c] = 1.f;
    } else if (big) {  // the kernel stages w_c * pre
      out[c] = kLog2e * scale / fmaxf(norm, kNormEpsF * pre);
      out[C + c] = pre;
    } else if (!std::is_same<T, F32>::value && !(norm < kBf16ClassLimit * pre)) {
      out[c] = __int_as_float(0x7fffffff);  // 16-bit class out of range: NaN, every row is redone
      out[C + c] = 1.f;
    } else {  // raw w_c: scale / max(norm / pre, eps), pre folded into the numerator
      out[c] = kLog2e * (scale * pre) / fmaxf(norm, kNormEpsF * pre);
      out[C + c] = 1.f;
    }
  }
}

// ================================================================ tensor cores
constexpr int TC_BM = 128, TC_BN = 128, TC_BK = 32, TC_STAGES = 3, TC_THREADS = 128;
constexpr int TC_ROW_BYTES = TC_BK * 2;           // 64 B per tile row (4 chunks of 16 B)
constexpr int TC_A_BYTES = TC_BM * TC_ROW_BYTES;  // 8 KB
constexpr int TC_B_BYTES = TC_BN * TC_ROW_BYTES;  // 8 KB
constexpr int TC_STAGE_BYTES = TC_A_BYTES + TC_B_BYTES;
constexpr int EPI_COLS = 32;  // columns per epilogue round
constexpr int EPI_LD = 36;    // fp32 row pitch: float4 row reads conflict-free
constexpr int EPI_BYTES = 128 * EPI_LD * 4;
constexpr int TC_SMEM = TC_STAGES * TC_STAGE_BYTES + EPI_BYTES;  // 67,584 B
static_assert(TC_BM == TC_THREADS && TC_BN == 128, "loader and epilogue assume 128");
static_assert(TC_BN % EPI_COLS == 0 && TC_BN / EPI_COLS == 4, "4 epilogue rounds per tile");

// Byte offset of 16-byte chunk `chunk` (0..3) of tile row `row` (swizzled).
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * TC_ROW_BYTES + ((chunk ^ ((row >> 1) & 3)) << 4));
}

// D += A(16x16, row) * B(16x8, col), fp32 accumulate (ptx.cuh), by element type.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1, BF16) {
  mma_16816_bf16(d, a, b0, b1);
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1, F16) {
  mma_16816_f16(d, a, b0, b1);
}

// Stage a 128-row x 32-column (k) tile of a 16-bit (rows x D) matrix into
// swizzled smem; zero outside the matrix. 512 chunks of 8 elements, 4 per
// thread: chunk column c = tid & 3, tile rows rb + 32 i with rb = tid >> 2.
// Those four rows share one swizzle pattern ((rb + 32 i) >> 1 & 3 ==
// rb >> 1 & 3), so their smem offsets are sdst + i * 2048.
//   sdst: stage base + swz(rb, c); grow: &M[r0 + rb][0]; rows_left: rows - (r0 + rb);
//   k: k0 + 8 c (first column of the chunk).
template <bool VEC>
__device__ __forceinline__ void load_tile16(uint32_t sdst, const unsigned short* gbase,
                                            const unsigned short* grow, int64_t s0, int64_t s1,
                                            int64_t rows_left, int D, int k) {
  if (VEC) {
    // s1 == 1 and 16-byte-aligned rows: one 16-byte cp.async per chunk that
    // reads only the in-bounds prefix (src-size) and zero-fills the rest.
    const int nel = min(max(D - k, 0), 8);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool ok = nel > 0 && 32 * i < rows_left;
      const unsigned short* src = ok ? grow + static_cast<int64_t>(32 * i) * s0 + k : gbase;
      cp_async_16(sdst + i * 32 * TC_ROW_BYTES, src, ok ? nel * 2 : 0);
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < 4; ++i) {  // not unrolled: keeps register pressure down
      uint32_t w[4];
      const bool rok = 32 * i < rows_left;
      const unsigned short* rp = grow + static_cast<int64_t>(32 * i) * s0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int ka = k + 2 * j, kb = ka + 1;
        uint32_t lo = 0, hi = 0;
        if (rok && ka < D) lo = __ldg(rp + static_cast<int64_t>(ka) * s1);
        if (rok && kb < D) hi = __ldg(rp + static_cast<int64_t>(kb) * s1);
        w[j] = lo | (hi << 16);
      }
      st_shared_v4(sdst + i * 32 * TC_ROW_BYTES, w[0], w[1], w[2], w[3]);
    }
  }
}

// Epilogue store: columns [32 H, 32 H + 32) of this warp's 64 x 64 tile
// (n-tiles ni = 4 H .. 4 H + 3) into the 128 x EPI_LD buffer, rows at the
// warp's row offset, columns 0..31. C fragment: c0,c1 = (g, 2q..2q+1),
// c2,c3 = (g+8, 2q..2q+1) of each 16 x 8 tile.
template <int H>
__device__ __forceinline__ void tc_store_epi(const float (&acc)[4][8][4], float* ebuf, int wm,
                                             int g, int q) {
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int nj = 0; nj < 4; ++nj) {
      const int ni = H * 4 + nj;
      const int lr = wm * 64 + mi * 16 + g;
      const int lc = nj * 8 + 2 * q;
      *reinterpret_cast<float2*>(ebuf + lr * EPI_LD + lc) =
          make_float2(acc[mi][ni][0], acc[mi][ni][1]);
      *reinterpret_cast<float2*>(ebuf + (lr + 8) * EPI_LD + lc) =
          make_float2(acc[mi][ni][2], acc[mi][ni][3]);
    }
  }
}

template <typename T, int K, bool VEC>
__global__ void __launch_bounds__(TC_THREADS, 2) pseudo_label_tc_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;  // warp tile: rows wm*64.., cols wn*64..
  const int g = lane >> 2, q = lane & 3;    // mma fragment coordinates
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * TC_BM;
  const int kTiles = (p.D + TC_BK - 1) / TC_BK;
  const int nTiles = (p.C + TC_BN - 1) / TC_BN;
  const int total = kTiles * nTiles;  // host checks it fits in int
  const uint32_t sbase = smem_u32(smem);
  float* ebuf = reinterpret_cast<float*>(smem + TC_STAGES * TC_STAGE_BYTES);

  const int64_t row = m0 + tid;  // the image row this thread reduces
  const bool row_ok = row < p.N;
  RowState<K> st;
  st.init();
  float ss = 0.f, rowmul = 0.f;
  bool bad = false;

  float acc[4][8][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = opaque_zero();

  // Loader geometry (see load_tile16).
  const int lrb = tid >> 2, lc = tid & 3;
  const uint32_t ldst = swz(lrb, lc);
  const unsigned short* gA = static_cast<const unsigned short*>(p.A);
  const unsigned short* gB = static_cast<const unsigned short*>(p.B);
  auto issue = [&](int it_load) {
    const int nt = it_load / kTiles, kt = it_load - nt * kTiles;
    const uint32_t sA = sbase + (it_load % TC_STAGES) * TC_STAGE_BYTES + ldst;
    const int k = kt * TC_BK + lc * 8;
    const int64_t ra = m0 + lrb, rbb = static_cast<int64_t>(nt) * TC_BN + lrb;
    load_tile16<VEC>(sA, gA, gA + ra * p.a_s0, p.a_s0, p.a_s1, p.N - ra, p.D, k);
    load_tile16<VEC>(sA + TC_A_BYTES, gB, gB + rbb * p.b_s0, p.b_s0, p.b_s1, p.C - rbb, p.D, k);
  };

#pragma unroll
  for (int s = 0; s < TC_STAGES - 1; ++s) {
    if (s < total) issue(s);
    cp_async_commit();  // always commit: keeps the group count = iteration count
  }

  for (int it = 0; it < total; ++it) {
    cp_async_wait<TC_STAGES - 2>();  // group `it` (this iteration's tile) has landed
    __syncthreads();                 // ... for every thread; stage (it-1)%S is free
    if (it + TC_STAGES - 1 < total) issue(it + TC_STAGES - 1);
    cp_async_commit();

    const uint32_t sA = sbase + (it % TC_STAGES) * TC_STAGE_BYTES;
    const uint32_t sB = sA + TC_A_BYTES;
#pragma unroll
    for (int kk = 0; kk < TC_BK / 16; ++kk) {
      uint32_t af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
        // -> a0..a3 of mma.m16n8k16 (row-major A).
        const int r = wm * 64 + mi * 16 + (lane & 15);
        const int ch = kk * 2 + (lane >> 4);
        ldmatrix_x4(sA + swz(r, ch), af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
      }
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        // -> {b0, b1} of n-tile 2*nj and of n-tile 2*nj+1 (B = W^T, "col" layout).
        uint32_t b0, b1, b2, b3;
        const int r = wn * 64 + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int ch = kk * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(sB + swz(r, ch), b0, b1, b2, b3);
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          mma_16816(acc[mi][2 * nj], af[mi], b0, b1, T{});
          mma_16816(acc[mi][2 * nj + 1], af[mi], b2, b3, T{});
        }
      }
    }

    const int nt = it / kTiles, kt = it - nt * kTiles;
    if (nt == 0) {
      // |x_row|^2 from the staged A tile (zero-filled outside the matrix).
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint4 w = ld_shared_v4(sA + swz(tid, c));
        ss = sq2(w.x, ss, T{});
        ss = sq2(w.y, ss, T{});
        ss = sq2(w.z, ss, T{});
        ss = sq2(w.w, ss, T{});
      }
    }
    if (kt == kTiles - 1) {  // CTA-uniform: tile nt is complete
      if (nt == 0 && row_ok) rowmul = row_multiplier<T>(p, row, ss, &bad);
      const int n0 = nt * TC_BN;
#pragma unroll 1
      for (int r = 0; r < TC_BN / EPI_COLS; ++r) {
        const int cbase = n0 + r * EPI_COLS;
        const int nvalid = min(EPI_COLS, p.C - cbase);
        if (nvalid <= 0) break;  // CTA-uniform
        if (wn == (r >> 1)) {
          // Register indices must be compile-time: one case per half of the warp tile.
          if (r & 1) tc_store_epi<1>(acc, ebuf, wm, g, q);
          else tc_store_epi<0>(acc, ebuf, wm, g, q);
        }
        __syncthreads();
        if (row_ok) st.push_row(ebuf + tid * EPI_LD, nvalid, p.colscale + cbase, cbase, rowmul);
        __syncthreads();
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][ni][e] = opaque_zero();
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending; keep the exit clean
  if (row_ok) st.finish(p, row, bad);
}

// ================================================================ fp32 (SIMT)
constexpr int F_BM = 128, F_BN = 64, F_BK = 16, F_THREADS = 128;
constexpr int F_LDA = F_BM + 4;  // k-major tiles; pitch keeps float4 reads aligned
constexpr int F_LDB = F_BN + 4;
constexpr int F_A_FLOATS = F_BK * F_LDA;
constexpr int F_B_FLOATS = F_BK * F_LDB;
constexpr int F_SMEM = (2 * F_A_FLOATS + 2 * F_B_FLOATS) * 4 + EPI_BYTES + F_BM * 4;  // 44,544 B
static_assert(F_BM == F_THREADS && F_BN / EPI_COLS == 2, "fp32 layout assumptions");

template <int K>
__global__ void __launch_bounds__(F_THREADS, 2) pseudo_label_f32_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* As = reinterpret_cast<float*>(smem);  // [2][F_BK][F_LDA]
  float* Bs = As + 2 * F_A_FLOATS;             // [2][F_BK][F_LDB]
  float* ebuf = Bs + 2 * F_B_FLOATS;           // [128][EPI_LD]
  float* rowpre = ebuf + 128 * EPI_LD;         // [128] row pre-scales (scaled pass only)
  const int tid = threadIdx.x;
  const int ty = tid >> 3, tx = tid & 7;       // micro-tile: rows ty*4+{0..3}, 64+ty*4+{0..3};
                                               // cols tx*4+{0..3}, 32+tx*4+{0..3}
  const int lk = tid & 15, lr = tid >> 4;      // loader: k = lk, rows lr + 8 i
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * F_BM;
  const int kTiles = (p.D + F_BK - 1) / F_BK;
  const int nTiles = (p.C + F_BN - 1) / F_BN;
  const int total = kTiles * nTiles;
  const float* Ag = static_cast<const float*>(p.A);
  const float* Bg = static_cast<const float*>(p.B);

  const int64_t row = m0 + tid;
  const bool row_ok = row < p.N;
  RowState<K> st;
  st.init();
  float ss = 0.f, amax = 0.f, rowmul = 0.f;
  bool bad = false;
  // Scaled pass (rare, CTA-uniform): some row of this CTA has an entry >= 2^32.
  // Found from its max-abs entry, reduced with |x|^2 during n-tile 0; the CTA
  // then restarts with every row staged times rowpre[row] (a power of two).
  bool scaled = false;

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

  float ra[16], rb[8];
  auto load_regs = [&](int it_load) {
    const int nt = it_load / kTiles, kt = it_load - nt * kTiles;
    const int k = kt * F_BK + lk;
    const bool kok = k < p.D;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int64_t gr = m0 + lr + 8 * i;
      ra[i] = (kok && gr < p.N) ? __ldg(Ag + gr * p.a_s0 + static_cast<int64_t>(k) * p.a_s1) : 0.f;
    }
    if (scaled) {
#pragma unroll
      for (int i = 0; i < 16; ++i) ra[i] *= rowpre[lr + 8 * i];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t gc = static_cast<int64_t>(nt) * F_BN + lr + 8 * i;
      // colpre: 1, or a power of two for a class with entries >= 2^32 (exact).
      rb[i] = (kok && gc < p.C)
                  ? __ldg(Bg + gc * p.b_s0 + static_cast<int64_t>(k) * p.b_s1) * __ldg(p.colpre + gc)
                  : 0.f;
    }
  };
  auto store_regs = [&](int buf) {
    float* a = As + buf * F_A_FLOATS + lk * F_LDA;
    float* b = Bs + buf * F_B_FLOATS + lk * F_LDB;
#pragma unroll
    for (int i = 0; i < 16; ++i) a[lr + 8 * i] = ra[i];
#pragma unroll
    for (int i = 0; i < 8; ++i) b[lr + 8 * i] = rb[i];
  };

  load_regs(0);
  store_regs(0);
  __syncthreads();

  for (int it = 0; it < total; ++it) {
    const int cur = it & 1;
    if (it + 1 < total) load_regs(it + 1);  // global loads in flight during the FMAs
    const float* a = As + cur * F_A_FLOATS;
    const float* b = Bs + cur * F_B_FLOATS;
#pragma unroll
    for (int k = 0; k < F_BK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(a + k * F_LDA + ty * 4);
      const float4 a1 = *reinterpret_cast<const float4*>(a + k * F_LDA + 64 + ty * 4);
      const float4 b0 = *reinterpret_cast<const float4*>(b + k * F_LDB + tx * 4);
      const float4 b1 = *reinterpret_cast<const float4*>(b + k * F_LDB + 32 + tx * 4);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    const int nt = it / kTiles, kt = it - nt * kTiles;
    if (nt == 0) {
#pragma unroll
      for (int k = 0; k < F_BK; ++k) {
        const float x = a[k * F_LDA + tid];
        ss = fmaf(x, x, ss);
        amax = fmaxf(amax, fabsf(x));  // drops NaN; Inf is caught by ss below
      }
    }
    if (it + 1 < total) store_regs(cur ^ 1);  // buffer cur^1 was last read in iteration it-1
    __syncthreads();

    if (kt == kTiles - 1) {  // CTA-uniform
      if (nt == 0 && !scaled) {
        const bool big = row_ok && p.normalize && finite_f(amax) && amax >= kScaleLimit;
        if (__syncthreads_or(big)) {
          // Restart with the rows pre-scaled. Every thread is past the barrier
          // above, so no stage is being read: overwrite stage 0 with tile 0.
          scaled = true;
          rowpre[tid] = big ? pow2_down(amax) : 1.f;
          ss = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
          __syncthreads();  // rowpre visible to the loaders
          load_regs(0);
          store_regs(0);
          __syncthreads();
          it = -1;
          continue;
        }
      }
      if (nt == 0 && row_ok) rowmul = row_multiplier<F32>(p, row, ss, &bad, scaled ? rowpre[tid] : 1.f);
      const int n0 = nt * F_BN;
#pragma unroll
      for (int r = 0; r < F_BN / EPI_COLS; ++r) {
        const int cbase = n0 + r * EPI_COLS;
        const int nvalid = min(EPI_COLS, p.C - cbase);
        if (nvalid <= 0) break;  // CTA-uniform
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int lrow = (i < 4) ? ty * 4 + i : 64 + ty * 4 + (i - 4);
          *reinterpret_cast<float4*>(ebuf + lrow * EPI_LD + tx * 4) =
              make_float4(acc[i][r * 4 + 0], acc[i][r * 4 + 1], acc[i][r * 4 + 2],
                          acc[i][r * 4 + 3]);
        }
        __syncthreads();
        if (row_ok) st.push_row(ebuf + tid * EPI_LD, nvalid, p.colscale + cbase, cbase, rowmul);
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }
  }
  if (row_ok) st.finish(p, row, bad);
}

// ================================================================ host side
template <typename Kernel>
cudaError_t launch_main(Kernel kernel, int smem_bytes, int64_t N, int rows_per_cta,
                        cudaStream_t stream, const Params& p) {
  cudaError_t err = cudaSuccess;
  if (smem_bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = (N + rows_per_cta - 1) / rows_per_cta;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(rows_per_cta), smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const PseudoLabelArgs& a, cudaStream_t stream, const Params& p) {
  colscale_kernel<T><<<dim3(static_cast<unsigned>((a.C + 7) / 8)), dim3(256), 0, stream>>>(
      a.cls, static_cast<int>(a.C), static_cast<int>(a.D), a.cls_s0, a.cls_s1, a.scale,
      a.normalize ? 1 : 0, a.colscale);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int k = a.topk <= 1 ? 1 : (a.topk <= 4 ? 4 : 16);
  if constexpr (std::is_same<T, F32>::value) {
    switch (k) {
      case 1: return launch_main(pseudo_label_f32_kernel<1>, F_SMEM, a.N, F_BM, stream, p);
      case 4: return launch_main(pseudo_label_f32_kernel<4>, F_SMEM, a.N, F_BM, stream, p);
      default: return launch_main(pseudo_label_f32_kernel<16>, F_SMEM, a.N, F_BM, stream, p);
    }
  } else {
    // cp.async path only when both matrices allow it; the gather path is
    // correct for every layout.
    if (p.vec_a && p.vec_b) {
      switch (k) {
        case 1: return launch_main(pseudo_label_tc_kernel<T, 1, true>, TC_SMEM, a.N, TC_BM, stream, p);
        case 4: return launch_main(pseudo_label_tc_kernel<T, 4, true>, TC_SMEM, a.N, TC_BM, stream, p);
        default: return launch_main(pseudo_label_tc_kernel<T, 16, true>, TC_SMEM, a.N, TC_BM, stream, p);
      }
    }
    switch (k) {
      case 1: return launch_main(pseudo_label_tc_kernel<T, 1, false>, TC_SMEM, a.N, TC_BM, stream, p);
      case 4: return launch_main(pseudo_label_tc_kernel<T, 4, false>, TC_SMEM, a.N, TC_BM, stream, p);
      default: return launch_main(pseudo_label_tc_kernel<T, 16, false>, TC_SMEM, a.N, TC_BM, stream, p);
    }
  }
}

// cp.async fast path for a 16-bit (rows x D) matrix: unit column stride,
// 16-byte-aligned base and row pitch.
bool vec_ok16(const void* ptr, int64_t rows, int64_t s0, int64_t s1) {
  return s1 == 1 && (rows == 1 || s0 % 8 == 0) &&
         (reinterpret_cast<uintptr_t>(ptr) % 16) == 0;
}

}  // namespace

int launch_pseudo_label(const PseudoLabelArgs& a, void* stream_ptr) {
  if (a.N <= 0) return 0;
  if (a.C < 1 || a.D < 1 || a.topk < 1 || a.topk > kPseudoLabelMaxTopk || a.topk > a.C ||
      a.C > 0x7fffffffLL || a.D > 0x7fffffffLL ||
      (reinterpret_cast<uintptr_t>(a.colscale) % 16) != 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  {
    // The flattened (n-tile, k-tile) loop counter is an int.
    const int64_t tiles_tc = ((a.C + TC_BN - 1) / TC_BN) * ((a.D + TC_BK - 1) / TC_BK);
    const int64_t tiles_f = ((a.C + F_BN - 1) / F_BN) * ((a.D + F_BK - 1) / F_BK);
    if (tiles_tc > 0x7fffffffLL || tiles_f > 0x7fffffffLL)
      return static_cast<int>(cudaErrorInvalidValue);
  }
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  Params p;
  p.A = a.image;
  p.N = a.N;
  p.a_s0 = a.img_s0;
  p.a_s1 = a.img_s1;
  p.B = a.cls;
  p.b_s0 = a.cls_s0;
  p.b_s1 = a.cls_s1;
  p.C = static_cast<int>(a.C);
  p.D = static_cast<int>(a.D);
  p.colscale = a.colscale;
  p.colpre = a.colscale + a.C;
  p.probs = a.probs;
  p.classes = a.classes;
  p.entropy = a.entropy;
  p.lse = a.lse;
  p.topk = a.topk;
  p.normalize = a.normalize ? 1 : 0;
  p.vec_a = 0;
  p.vec_b = 0;
  cudaError_t err;
  switch (a.dtype) {
    case PLDtype::kFloat32:
      err = launch_typed<F32>(a, stream, p);
      break;
    case PLDtype::kFloat16:
      p.vec_a = vec_ok16(a.image, a.N, a.img_s0, a.img_s1);
      p.vec_b = vec_ok16(a.cls, a.C, a.cls_s0, a.cls_s1);
      err = launch_typed<F16>(a, stream, p);
      break;
    case PLDtype::kBFloat16:
      p.vec_a = vec_ok16(a.image, a.N, a.img_s0, a.img_s1);
      p.vec_b = vec_ok16(a.cls, a.C, a.cls_s0, a.cls_s1);
      err = launch_typed<BF16>(a, stream, p);
      break;
    default:
      err = cudaErrorInvalidValue;
  }
  return static_cast<int>(err);
}

const char* cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

}  // namespace cuda
}  // namespace nolabels
