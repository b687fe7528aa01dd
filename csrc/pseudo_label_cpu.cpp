// Fused cosine-similarity pseudo-labeling, CPU kernel (LibTorch stable ABI).
//
// For every image row x_i and class row w_c the op needs the softmax over
// s_ic = scale * <x_i/|x_i|, w_c/|w_c|>: its top-k, entropy and log-sum-exp.
// The reference materialises the N x C logits; this kernel never does.
//
// Design (why it is fast and small):
//   * The class matrix is normalised once and the logit scale is folded into
//     it, W' = scale * W / |W| (C x D float32): the only O(C*D) buffer.
//   * Images are split into row blocks of ~256K/C rows; each worker of torch's
//     thread pool owns whole blocks: it loads the block (any dtype, any
//     strides), normalises it into a float32 (rows x D) buffer, multiplies it
//     with W'^T through torch's own matmul (single-threaded inside the
//     parallel region: MKL / oneDNN through the dispatcher), and reduces the
//     (rows x C) tile, still in its L2, row by row: max, sum exp,
//     sum exp * x (entropy), top-k. No barrier separates GEMM and epilogue.
//     Peak extra memory: W' (C x D floats) + per thread one block buffer and
//     one ~1 MB tile, i.e. O(C*D + threads*tile), never O(N*C).
//   * exp is a branch-free polynomial that GCC vectorises; the reduction is
//     compiled twice (AVX2+FMA and baseline) and picked at load time, so the
//     wheel stays portable.
#include "common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace nolabels {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

constexpr float kNormEps = 1e-12f;  // same eps as torch.nn.functional.normalize

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// Load row `r` of a (rows x D) strided matrix into `dst` as float32 and
// return its sum of squares (accumulated in double: D may be large).
template <typename T>
double load_row(const Tensor& t, int64_t r, float* dst) {
  const T* base = t.const_data_ptr<T>();
  const int64_t s0 = t.stride(0), s1 = t.stride(1), D = t.size(1);
  const T* row = base + r * s0;
  double ss = 0.0;
  if (s1 == 1) {
    for (int64_t d = 0; d < D; ++d) {
      float v = to_float(row[d]);
      dst[d] = v;
      ss += static_cast<double>(v) * v;
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      float v = to_float(row[d * s1]);
      dst[d] = v;
      ss += static_cast<double>(v) * v;
    }
  }
  return ss;
}

double load_row_any(const Tensor& t, int64_t r, float* dst) {
  switch (t.scalar_type()) {
    case ScalarType::Float:
      return load_row<float>(t, r, dst);
    case ScalarType::Half:
      return load_row<torch::headeronly::Half>(t, r, dst);
    case ScalarType::BFloat16:
      return load_row<torch::headeronly::BFloat16>(t, r, dst);
    default:
      STD_TORCH_CHECK(false, "nolabels: unsupported dtype");
  }
  return 0.0;
}

// Load rows [r0, r1) into a contiguous float32 buffer with leading dim D,
// multiply each row by mul / max(|row|, eps) (or by mul alone), and mark
// non-finite rows in `bad` (their result is forced to NaN later). Exact for
// every finite float32 row, up to entries of 3e38 (norm and factor in double).
void load_block(const Tensor& src, int64_t r0, int64_t r1, float* dst,
                bool normalize, float mul, uint8_t* bad) {
  const int64_t D = src.size(1);
  torch::stable::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* row = dst + (r - r0) * D;
      double ss = load_row_any(src, r, row);
      bool finite = std::isfinite(ss);
      if (bad) bad[r - r0] = finite ? 0 : 1;
      // The factor in double: the sum of squares (double) never overflows for
      // float32 input, but the norm of a row with entries near 3e38 exceeds
      // float32's range and its inverse is a float32 denormal.
      double f = mul;
      if (normalize) f = mul / std::max(std::sqrt(ss), static_cast<double>(kNormEps));
      if (!finite) f = 1.0;
      const float ff = static_cast<float>(f);
      if (std::fabs(f) >= std::numeric_limits<float>::min() && std::isfinite(ff)) {
        for (int64_t d = 0; d < D; ++d) row[d] *= ff;
      } else {  // rare: scale in double, round once
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(row[d] * f);
      }
    }
  });
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

struct RowStats {
  float max, sum, sum_xm;  // max, sum exp(x - max), sum exp(x - max) * (x - max)
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NOLABELS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NOLABELS_MULTIVERSION
#endif

NOLABELS_MULTIVERSION
RowStats row_stats(const float* x, int64_t C) {
  // The omp simd reductions let GCC reorder the sums (no -ffast-math needed,
  // which would also break the isfinite checks elsewhere in this file).
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) m = x[c] > m ? x[c] : m;
  float s = 0.f, t = 0.f;
#pragma omp simd reduction(+ : s, t)
  for (int64_t c = 0; c < C; ++c) {
    const float z = x[c] - m;
    const float e = exp_nonpos(z);
    s += e;
    t += e * z;
  }
  return {m, s, t};
}

// Top-k of one row, descending, ties to the lower index. Small k: a sorted
// insertion buffer, fed 16 elements at a time; a chunk whose (vectorised) max
// does not beat the current k-th value is skipped, which is almost every
// chunk once the buffer is full. Large k: partial sort of an index buffer.
NOLABELS_MULTIVERSION
void row_topk(const float* x, int64_t C, int64_t k, float* vals, int64_t* idx,
              std::vector<int32_t>& scratch) {
  if (k <= 32) {
    constexpr int64_t kChunk = 16;
    for (int64_t j = 0; j < k; ++j) {
      vals[j] = -std::numeric_limits<float>::infinity();
      idx[j] = -1;
    }
    float kth = -std::numeric_limits<float>::infinity();
    int64_t filled = 0;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t c1 = std::min(C, c0 + kChunk);
      if (filled == k && c1 - c0 == kChunk) {
        float cm = x[c0];
#pragma omp simd reduction(max : cm)
        for (int64_t c = 1; c < kChunk; ++c) cm = x[c0 + c] > cm ? x[c0 + c] : cm;
        if (!(cm > kth)) continue;
      }
      for (int64_t c = c0; c < c1; ++c) {
        const float v = x[c];
        if (filled == k && !(v > kth)) continue;
        int64_t j = filled < k ? filled++ : k - 1;
        while (j > 0 && v > vals[j - 1]) {
          vals[j] = vals[j - 1];
          idx[j] = idx[j - 1];
          --j;
        }
        vals[j] = v;
        idx[j] = c;
        kth = vals[k - 1];
      }
    }
    return;
  }
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
  const auto dev = torch::stable::Device(torch::headeronly::DeviceType::CPU);

  Tensor probs = torch::stable::empty({N, topk}, ScalarType::Float, std::nullopt, dev);
  Tensor classes = torch::stable::empty({N, topk}, ScalarType::Long, std::nullopt, dev);
  Tensor entropy = torch::stable::empty({N}, ScalarType::Float, std::nullopt, dev);
  Tensor lse = torch::stable::empty({N}, ScalarType::Float, std::nullopt, dev);
  if (N == 0) return {probs, classes, entropy, lse};

  // W' = scale * normalize(W), float32, contiguous (C x D).
  Tensor w = torch::stable::empty({C, D}, ScalarType::Float, std::nullopt, dev);
  load_block(cls, 0, C, w.mutable_data_ptr<float>(), normalize,
             static_cast<float>(scale), nullptr);
  Tensor wt = torch::stable::transpose(w, 0, 1);  // (D x C) view

  float* probs_p = probs.mutable_data_ptr<float>();
  int64_t* cls_p = classes.mutable_data_ptr<int64_t>();
  float* ent_p = entropy.mutable_data_ptr<float>();
  float* lse_p = lse.mutable_data_ptr<float>();

  // Each worker owns whole row blocks: load + normalise, a single-threaded
  // GEMM (torch's matmul inside a parallel region does not fan out again),
  // then the epilogue while the tile is still in L2. No barrier between the
  // GEMM and the epilogue, and the tile never leaves the core that made it.
  // ~256K-float tiles (1 MB): at least 8 rows.
  const int64_t block = std::max<int64_t>(8, (1 << 18) / C);
  const int64_t nblocks = (N + block - 1) / block;
  torch::stable::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    Tensor a = torch::stable::empty({block, D}, ScalarType::Float, std::nullopt, dev);
    std::vector<uint8_t> bad(block);
    std::vector<int32_t> scratch;
    std::vector<float> vals(topk);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * block, r1 = std::min(N, r0 + block), rows = r1 - r0;
      load_block(image, r0, r1, a.mutable_data_ptr<float>(), normalize, 1.0f, bad.data());
      Tensor a_view = rows == block ? a : torch::stable::narrow(a, 0, 0, rows);
      Tensor logits = torch::stable::matmul(a_view, wt);  // (rows x C) tile
      STD_TORCH_CHECK(logits.is_contiguous(), "pseudo_label_cpu: unexpected tile layout");
      const float* lp = logits.const_data_ptr<float>();
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = r0 + i;
        const float* x = lp + i * C;
        RowStats st = row_stats(x, C);
        const float log_s = std::log(st.sum);
        float l = st.max + log_s;
        float h = log_s - st.sum_xm / st.sum;
        if (bad[i]) {  // non-finite input row: report NaN, the caller raises
          l = std::numeric_limits<float>::quiet_NaN();
          h = l;
        }
        lse_p[r] = l;
        ent_p[r] = h;
        row_topk(x, C, topk, vals.data(), cls_p + r * topk, scratch);
        for (int64_t j = 0; j < topk; ++j) probs_p[r * topk + j] = std::exp(vals[j] - l);
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
