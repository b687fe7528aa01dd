// Fused cosine-similarity pseudo-labeling, CPU kernel (LibTorch stable ABI).
//
// For every image row x_i and class row w_c the op needs the softmax over
// s_ic = scale * <x_i/|x_i|, w_c/|w_c|>: its top-k, entropy and log-sum-exp.
// The reference materialises the N x C logits; this kernel never does.
//
// Design:
//   * The class matrix is normalised once and the logit scale is folded into
//     it, W' = scale * W / max(|W|, eps) (C x D float32).
//   * The row normalisation is moved behind the GEMM: s_i = f_i * (x_i W'^T)
//     with f_i = 1 / max(|x_i|, eps), applied to the tile in the epilogue. So
//     float32 rows with unit column stride feed the GEMM in place (no copy,
//     no pass over them before it). Their norms (sums of squares in double,
//     vectorised) are taken right after the block's first GEMM, which has
//     just brought the rows into cache. A block holding a row whose raw
//     products could leave float32's normal range (|x| outside
//     [2^-60, 2^60] or |x| max|W'| outside [2^-90, 2^100], zero rows
//     excepted) or a non-finite row is then copied and its first GEMM redone;
//     other dtypes and strides are always copied (converted) first. In the
//     copy each such row is multiplied by an exact power of two 2^-e that
//     brings its norm to [1, 2), and f_i = 2^e / max(|x_i|, eps): scaling by
//     a power of two commutes with rounding, so a row and the same row times
//     2^62 or 2^126 get the same pseudo-labels. Non-finite rows are zeroed in
//     the copy and their results forced to NaN (the caller raises).
//   * Workers of torch's thread pool take row blocks dynamically (an atomic
//     counter, so a core slowed by another process takes fewer). Per block
//     the classes are walked in balanced column tiles of at most 4096: a
//     single-threaded GEMM (torch's mm.out into the worker's reused tile
//     buffer; MKL / oneDNN through the dispatcher, which does not fan out
//     again inside the parallel region) writes the tile and the same worker
//     reduces it at once, row by row, merging the tiles online (running max,
//     rescaled sums, running top-k). Blocks are 2048 rows (512 for C <= 512):
//     small GEMMs (the former ~262-row blocks at C = 1,000) run well below
//     the speed of a large one.
//   * Epilogue per tile row, AVX-512 where the CPU has it (checked at run
//     time; NOLABELS_NO_AVX512=1 forces the portable path): scale and
//     running max in one pass, sum exp and sum exp * (s - max) in a second
//     (a branch-free exp polynomial, masked tails), top-k in a third: only
//     entries >= the k-th largest of the 16 lane maxima (k <= 16) or beating
//     the running k-th value can enter; a 16-lane compare finds them. The
//     portable path does the same with target_clones-vectorised loops
//     (AVX2+FMA or baseline x86-64); topk > 32 keeps whole rows in one tile
//     and partial-sorts.
//
// Peak extra memory (besides the inputs and the O(N * topk) outputs), with
// W = torch's thread count: W' (C*D floats) + per worker one tile of
// R x min(C, 4096) floats, R*(topk + 5) words of row state and, only for
// blocks that are copied, an R x D float buffer (R = 512 or 2048; topk > 32:
// R <= 2^22 / C). At N = 200,000, D = 512, 2 workers, float32 in place:
//   C = 100:    0.2 MB + 2 x 0.2 MB                = 0.6 MB (0.7 % of the 80 MB logits),
//   C = 1,000:  2.0 MB + 2 x 7.8 MB                = 18 MB  (2.2 % of 800 MB),
//   C = 21,841: 44.7 MB + 2 x 2048 x 3641 x 4 B    = 104 MB (0.6 % of 17.5 GB);
// a copy buffer adds 2 x 1 MB (C <= 512) or 2 x 4 MB.
#include "common.h"
#include "rows.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace nolabels {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

constexpr int64_t kSmallTopk = 32;  // insertion buffer up to here, partial sort above

// From the shared headers: kNormEps (norm_eps.h; the double one here), mm_out and
// cpu_device (common.h), load_row and NOLABELS_MULTIVERSION (rows.h).

// Sum of squares of a contiguous float32 row, in double (vectorised: the
// simd reduction lets the compiler reorder the sum).
NOLABELS_MULTIVERSION
double sumsq_f32(const float* x, int64_t D) {
  double ss = 0.0;
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(x[d]) * x[d];
  return ss;
}

// Per-row factor applied after the GEMM, and whether the raw row may enter
// the GEMM unscaled. `norm` = |x| (double), `wmax` = max_c |W'_c|.
struct RowPlan {
  float f;    // logits = f * (row entering the GEMM) . W'_c
  int e;      // the row enters the GEMM times 2^-e (0: as is)
  bool bad;   // non-finite row: results forced to NaN
};

RowPlan plan_row(double ss, bool normalize, double wmax) {
  if (!std::isfinite(ss)) return {1.0f, 0, true};
  if (!normalize) return {1.0f, 0, false};
  const double a = std::sqrt(ss);
  const double inv = 1.0 / std::max(a, kNormEps);
  const double aw = a * wmax;
  const bool safe = a >= 0x1p-60 && a <= 0x1p60 && aw <= 0x1p100 && (aw >= 0x1p-90 || wmax == 0.0);
  if (safe || a == 0.0) return {static_cast<float>(inv), 0, false};
  int e = 0;
  std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  e -= 1;             // a 2^-e in [1, 2)
  return {static_cast<float>(std::ldexp(inv, e)), e, false};
}

// Rows [r0, r1) of `src` into `dst` (rows x D, float32, contiguous; already
// there if `loaded`), each times its plan's 2^-e; non-finite rows are zeroed
// (their results are NaN).
void copy_block(const Tensor& src, int64_t r0, int64_t r1, float* dst, const RowPlan* plan,
                bool loaded) {
  const int64_t D = src.size(1);
  for (int64_t r = r0; r < r1; ++r) {
    float* row = dst + (r - r0) * D;
    const RowPlan& p = plan[r - r0];
    if (p.bad) {
      std::fill(row, row + D, 0.0f);
      continue;
    }
    if (!loaded) load_row(src, r, row);
    if (p.e != 0) {
      const double m = std::ldexp(1.0, -p.e);  // scaled in double, rounded once
      for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(row[d] * m);
    }
  }
}

// exp(x) for x <= 0, branch-free so loops over it vectorise. Cody-Waite
// range reduction + degree-6 polynomial, about 2 ulp; x below -87 flushes
// to 0 (those terms are below float precision of any sum they enter).
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest with the 1.5 * 2^23 trick: std::nearbyint is a libm
  // call on baseline x86-64 and would stop the loop from vectorising.
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // p * 2^n by adding n to the exponent bits (n in [-126, 0] here).
  const int32_t bits = __builtin_bit_cast(int32_t, p) + (static_cast<int32_t>(n) << 23);
  return __builtin_bit_cast(float, bits);
}

// Running softmax statistics of one row over the column tiles seen so far,
// relative to the running max m: s = sum exp(x - m), t = sum exp(x - m)(x - m).
struct RowState {
  float m, s, t;
};

// Merge a tile row's max cm into the running state (online softmax: when the
// max grows, the old terms shrink by exp(m - cm)).
inline void merge_max(RowState& st, float cm) {
  if (cm > st.m) {
    if (st.s > 0.0f) {
      const float dm = st.m - cm;
      const float a = std::exp(dm);
      st.t = a * (st.t + dm * st.s);
      st.s = a * st.s;
    }
    st.m = cm;
  }
}

// Scale one tile row by f in place, then merge its softmax statistics into
// st (online: rescale s and t when the max grows).
NOLABELS_MULTIVERSION
void scale_and_stats(float* x, int64_t n, float f, RowState& st) {
  float cm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : cm)
  for (int64_t c = 0; c < n; ++c) {
    const float v = x[c] * f;
    x[c] = v;
    cm = v > cm ? v : cm;
  }
  merge_max(st, cm);
  const float m = st.m;
  float s = 0.f, t = 0.f;
#pragma omp simd reduction(+ : s, t)
  for (int64_t c = 0; c < n; ++c) {
    const float z = x[c] - m;
    const float e = exp_nonpos(z);
    s += e;
    t += e * z;
  }
  st.s += s;
  st.t += t;
}

// Insert v (column c) into a descending buffer of k values; `filled` grows
// to k first. Ties keep the lower index: columns arrive in increasing order
// and only a strictly larger value moves up past an equal one.
inline void topk_insert(float v, int64_t c, int64_t k, float* vals, int64_t* idx,
                        int32_t& filled) {
  int64_t j = filled < k ? filled++ : k - 1;
  while (j > 0 && v > vals[j - 1]) {
    vals[j] = vals[j - 1];
    idx[j] = idx[j - 1];
    --j;
  }
  vals[j] = v;
  idx[j] = c;
}

inline float topk_threshold(int64_t k, const float* vals, int32_t filled) {
  return filled == k ? vals[k - 1] : -std::numeric_limits<float>::infinity();
}

// Small-k top-k, merged over column tiles (portable path): a chunk of 16
// values whose (vectorised) max does not beat the current k-th value is
// skipped, which is almost every chunk once the buffer is full.
NOLABELS_MULTIVERSION
void topk_small(const float* x, int64_t n, int64_t c0, int64_t k, float* vals, int64_t* idx,
                int32_t& filled) {
  constexpr int64_t kChunk = 16;
  float kth = topk_threshold(k, vals, filled);
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t j1 = std::min(n, j0 + kChunk);
    if (filled == k && j1 - j0 == kChunk) {
      float cm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : cm)
      for (int64_t j = 0; j < kChunk; ++j) cm = x[j0 + j] > cm ? x[j0 + j] : cm;
      if (!(cm > kth)) continue;
    }
    for (int64_t c = j0; c < j1; ++c) {
      const float v = x[c];
      if (filled == k && !(v > kth)) continue;
      topk_insert(v, c0 + c, k, vals, idx, filled);
      kth = topk_threshold(k, vals, filled);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define NOLABELS_AVX512_PATH 1
#define NOLABELS_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))

// exp_nonpos on 16 lanes: same reduction and polynomial, 2^n applied with
// scalef (exact, also where the result is subnormal).
NOLABELS_AVX512 inline __m512 exp_nonpos16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The k-th largest of the 16 lanes of a (k <= 16), counting repeats,
// branch-free: rank_i = #{j : a_j > a_i} from 15 lane rotations; the answer
// is the smallest a_i of rank < k.
NOLABELS_AVX512 inline float kth_of_lanes(__m512 a, int64_t k) {
  const __m512i one = _mm512_set1_epi32(1), fifteen = _mm512_set1_epi32(15);
  __m512i perm = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i rank = _mm512_setzero_si512();
  for (int r = 1; r < 16; ++r) {
    perm = _mm512_and_si512(_mm512_add_epi32(perm, one), fifteen);
    const __m512 b = _mm512_permutexvar_ps(perm, a);
    rank = _mm512_mask_add_epi32(rank, _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ), rank, one);
  }
  const __mmask16 top = _mm512_cmplt_epi32_mask(rank, _mm512_set1_epi32(static_cast<int>(k)));
  return _mm512_mask_reduce_min_ps(top, a);
}

// The whole small-k epilogue of one tile row, three passes over it (the
// second and third read it from L1):
//   1. scale by f in place and running max, kept per lane (16 lanes);
//   2. sum exp(s - m) and sum exp(s - m)(s - m);
//   3. top-k. The 16 lane maxima are 16 distinct entries of the row, so
//      their k-th largest, tau, is a lower bound of the row's k-th largest
//      (k <= 16): only entries >= tau can enter, typically little more than
//      k of them. A 16-lane compare finds them; they go, in column order,
//      through the scalar insertion (which keeps the lower index on ties).
//      Entries below tau are beaten by k entries of this very tile, so they
//      are skipped even while the buffer is not full. For k > 16, tau = -inf
//      and the bound is the running k-th value once the buffer is full.
// The last partial vector is masked: no scalar tail.
NOLABELS_AVX512
void row_epilogue_avx512(float* x, int64_t n, float f, int64_t c0, RowState& st, int64_t k,
                         float* vals, int64_t* idx, int32_t& filled) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const __m512 vf = _mm512_set1_ps(f);
  __m512 vmax = _mm512_set1_ps(-kInf);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), vf);
    _mm512_mask_storeu_ps(x + j, m, v);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
  }
  merge_max(st, _mm512_reduce_max_ps(vmax));
  const __m512 vm = _mm512_set1_ps(st.m);
  __m512 s = _mm512_setzero_ps(), t = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 z = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vm);
    const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpos16(z));
    s = _mm512_add_ps(s, e);
    t = _mm512_fmadd_ps(e, z, t);
  }
  st.s += _mm512_reduce_add_ps(s);
  st.t += _mm512_reduce_add_ps(t);

  const float tau = k <= 16 ? kth_of_lanes(vmax, k) : -kInf;
  float kth = topk_threshold(k, vals, filled);
  __m512 vlo = _mm512_set1_ps(std::max(tau, kth));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + j);
    uint32_t hit = k > 16 && filled < k ? m : _mm512_mask_cmp_ps_mask(m, v, vlo, _CMP_GE_OQ);
    while (hit) {
      const int l = __builtin_ctz(hit);
      hit &= hit - 1;
      const float val = x[j + l];
      if (filled == k && !(val > kth)) continue;
      topk_insert(val, c0 + j + l, k, vals, idx, filled);
      kth = topk_threshold(k, vals, filled);
      vlo = _mm512_set1_ps(std::max(tau, kth));
    }
  }
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
         std::getenv("NOLABELS_NO_AVX512") == nullptr;
}
#endif

// Large-k top-k of a whole row (one column tile): partial sort of indices.
void topk_large(const float* x, int64_t C, int64_t k, float* vals, int64_t* idx,
                std::vector<int32_t>& scratch) {
  scratch.resize(C);
  std::iota(scratch.begin(), scratch.end(), 0);
  std::partial_sort(scratch.begin(), scratch.begin() + k, scratch.end(),
                    [x](int32_t a, int32_t b) {
                      return x[a] > x[b] || (x[a] == x[b] && a < b);
                    });
  for (int64_t j = 0; j < k; ++j) {
    idx[j] = scratch[j];
    vals[j] = x[scratch[j]];
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pseudo_label_cpu(
    const Tensor& image, const Tensor& cls, double scale, int64_t topk,
    bool normalize) {
  check_pseudo_label_args(image, cls, topk);
  STD_TORCH_CHECK(image.is_cpu() && cls.is_cpu(), "pseudo_label_cpu: CPU tensors expected");
  const int64_t N = image.size(0), D = image.size(1), C = cls.size(0);
  const auto dev = cpu_device();

  Tensor probs = torch::stable::empty({N, topk}, ScalarType::Float, std::nullopt, dev);
  Tensor classes = torch::stable::empty({N, topk}, ScalarType::Long, std::nullopt, dev);
  Tensor entropy = torch::stable::empty({N}, ScalarType::Float, std::nullopt, dev);
  Tensor lse = torch::stable::empty({N}, ScalarType::Float, std::nullopt, dev);
  if (N == 0) return {probs, classes, entropy, lse};

  // W' = scale * W / max(|W|, eps), float32, contiguous (C x D); wmax = max |W'_c|.
  Tensor w = torch::stable::empty({C, D}, ScalarType::Float, std::nullopt, dev);
  float* w_p = w.mutable_data_ptr<float>();
  std::vector<double> wnorm(C);
  torch::stable::parallel_for(0, C, 16, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      float* row = w_p + c * D;
      load_row(cls, c, row);
      const double ss = sumsq_f32(row, D);
      double f = scale;
      if (normalize) f = scale / std::max(std::sqrt(ss), kNormEps);
      // The factor in double: the norm of a row with entries near 3e38
      // exceeds float32's range and its inverse is a float32 denormal.
      const float ff = static_cast<float>(f);
      if (std::fabs(f) >= std::numeric_limits<float>::min() && std::isfinite(ff)) {
        for (int64_t d = 0; d < D; ++d) row[d] *= ff;
      } else {  // rare: scale in double, round once
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(row[d] * f);
      }
      wnorm[c] = std::sqrt(sumsq_f32(row, D));
    }
  });
  const double wmax = *std::max_element(wnorm.begin(), wnorm.end());

  float* probs_p = probs.mutable_data_ptr<float>();
  int64_t* cls_p = classes.mutable_data_ptr<int64_t>();
  float* ent_p = entropy.mutable_data_ptr<float>();
  float* lse_p = lse.mutable_data_ptr<float>();

  const bool small_k = topk <= kSmallTopk;
#ifdef NOLABELS_AVX512_PATH
  const bool avx512 = cpu_has_avx512();
#endif
  const int64_t workers = std::max<int64_t>(1, torch::stable::get_num_threads());
  // Rows per block: large enough to amortise the GEMM's packing of W', small
  // enough that every worker gets blocks; column tiles of <= Cb classes.
  // Few classes: 512-row blocks, whose rows (1 MB at D = 512) are still in L2
  // when the norm pass reads them after the GEMM. More classes: 2048 rows,
  // so the GEMM's packing of W' and its per-call costs are amortised.
  int64_t R = C <= 512 ? 512 : 2048;
  const int64_t cb_max = small_k ? 4096 : C;
  if (!small_k) R = std::max<int64_t>(8, std::min<int64_t>(R, (int64_t{1} << 22) / C));
  R = std::max<int64_t>(1, std::min(R, (N + workers - 1) / workers));
  const int64_t ntiles = (C + cb_max - 1) / cb_max;
  const int64_t cb = (C + ntiles - 1) / ntiles;  // balanced column tiles
  const int64_t nblocks = (N + R - 1) / R;
  const bool direct = image.scalar_type() == ScalarType::Float && image.stride(1) == 1;

  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    if (wb >= we) return;
    Tensor tile = torch::stable::empty({R, cb}, ScalarType::Float, std::nullopt, dev);
    Tensor abuf;  // copy buffer, allocated on first use
    std::vector<RowPlan> plan(R);
    std::vector<RowState> st(R);
    std::vector<float> vals(R * topk);
    std::vector<int32_t> filled(R);
    std::vector<int32_t> scratch;
    for (int64_t blk; (blk = next.fetch_add(1)) < nblocks;) {
      const int64_t r0 = blk * R, r1 = std::min(N, r0 + R), rows = r1 - r0;
      // Row norms and plans. Other dtypes / strides: loaded into the copy
      // buffer first. In-place float32 rows: after the first GEMM, which has
      // just read them (from memory, overlapped with its arithmetic), so this
      // pass reads them from cache; a block with a row that cannot enter the
      // GEMM raw is then copied and its first GEMM redone (rare).
      auto ensure_abuf = [&]() {
        if (!abuf.defined()) {
          abuf = torch::stable::empty({R, D}, ScalarType::Float, std::nullopt, dev);
        }
      };
      auto make_plans = [&](const float* base, int64_t ld) {
        bool copy = false;
        for (int64_t i = 0; i < rows; ++i) {
          plan[i] = plan_row(sumsq_f32(base + i * ld, D), normalize, wmax);
          copy |= plan[i].bad || plan[i].e != 0;
        }
        return copy;
      };
      Tensor a;
      auto use_copy = [&](bool loaded) {
        ensure_abuf();
        copy_block(image, r0, r1, abuf.mutable_data_ptr<float>(), plan.data(), loaded);
        a = rows == R ? abuf : torch::stable::narrow(abuf, 0, 0, rows);
      };
      if (!direct) {
        ensure_abuf();
        float* buf = abuf.mutable_data_ptr<float>();
        for (int64_t i = 0; i < rows; ++i) load_row(image, r0 + i, buf + i * D);
        make_plans(buf, D);
        use_copy(true);
      } else {
        Tensor img = image;  // narrow takes a non-const handle
        a = torch::stable::narrow(img, 0, r0, rows);
      }
      for (int64_t i = 0; i < rows; ++i) {
        st[i] = {-std::numeric_limits<float>::infinity(), 0.0f, 0.0f};
        filled[i] = 0;
      }
      for (int64_t c0 = 0; c0 < C; c0 += cb) {
        const int64_t n = std::min(cb, C - c0);
        Tensor tv = rows == R ? tile : torch::stable::narrow(tile, 0, 0, rows);
        if (n != cb) tv = torch::stable::narrow(tv, 1, 0, n);
        const Tensor wt = torch::stable::transpose(torch::stable::narrow(w, 0, c0, n), 0, 1);
        mm_out(tv, a, wt);
        if (direct && c0 == 0 &&
            make_plans(image.const_data_ptr<float>() + r0 * image.stride(0), image.stride(0))) {
          use_copy(false);
          mm_out(tv, a, wt);
        }
        float* tp = tv.mutable_data_ptr<float>();
        const int64_t ld = tv.stride(0);
        for (int64_t i = 0; i < rows; ++i) {
          float* x = tp + i * ld;
#ifdef NOLABELS_AVX512_PATH
          if (small_k && avx512) {
            row_epilogue_avx512(x, n, plan[i].f, c0, st[i], topk, vals.data() + i * topk,
                                cls_p + (r0 + i) * topk, filled[i]);
            continue;
          }
#endif
          scale_and_stats(x, n, plan[i].f, st[i]);
          if (small_k) {
            topk_small(x, n, c0, topk, vals.data() + i * topk, cls_p + (r0 + i) * topk,
                       filled[i]);
          } else {
            topk_large(x, n, topk, vals.data() + i * topk, cls_p + (r0 + i) * topk, scratch);
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = r0 + i;
        const float log_s = std::log(st[i].s);
        float l = st[i].m + log_s;
        float h = log_s - st[i].t / st[i].s;
        if (plan[i].bad) {  // non-finite input row: report NaN, the caller raises
          l = std::numeric_limits<float>::quiet_NaN();
          h = l;
        }
        lse_p[r] = l;
        ent_p[r] = h;
        if (small_k) {  // only NaN logits leave the buffer short: valid indices anyway
          for (int64_t j = filled[i]; j < topk; ++j) {
            vals[i * topk + j] = std::numeric_limits<float>::quiet_NaN();
            cls_p[r * topk + j] = j;
          }
        }
        const float* v = vals.data() + i * topk;
        for (int64_t j = 0; j < topk; ++j) probs_p[r * topk + j] = std::exp(v[j] - l);
      }
    }
  });
  return {probs, classes, entropy, lse};
}

}  // namespace
}  // namespace nolabels

STABLE_TORCH_LIBRARY_IMPL(nolabels_C, CPU, m) {
  m.impl("pseudo_label", TORCH_BOX(&nolabels::pseudo_label_cpu));
}
