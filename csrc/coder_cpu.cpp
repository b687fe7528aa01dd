// CODER ops, CPU kernels (LibTorch stable ABI): exact top-k similarity,
// CODER zero-shot class scores, CODER affinity. Schemas are defined here too
// (a fragment of the nolabels_C library); the CUDA kernels live in _C_cuda.
//
// topk_similarity (FAISS IndexFlatIP's design: blocked GEMM + per-row heap)
//   * Queries are taken in super-blocks of at most 8192 rows, normalised once
//     into float32 (and bfloat16) buffers; keys stream through in tiles of
//     1024 rows, each normalised once per super-block (one pass over the keys
//     when N <= 8192). Within a tile, workers take 256-row sub-blocks
//     dynamically: a single-threaded GEMM (torch's mm into the worker's own
//     reused buffer: oneDNN / MKL) writes a (256 x 1024) similarity tile that
//     is still in L2 when the same worker scans it, row by row, against the
//     row's running top-k, a min-heap kept in the output tensors. Blocks of
//     256 and then 16 similarities whose maximum cannot enter are skipped
//     after one vectorised pass. Working memory: O(tile) buffers + the (N, k)
//     outputs, never (N, M).
//   * Filter mode (default where the CPU has AVX512-BF16 / AMX-BF16: bf16 GEMMs
//     run at ~2x float32's rate): the GEMM runs on bfloat16 copies, and every
//     key whose approximate score a is within the rigorous bound e of the
//     running k-th best exact score is re-scored exactly in float32 (a dot of
//     the float32 normalised rows). With unit roundoff u = 2^-8 (bf16 inputs and
//     output) and g = D 2^-24 (float32 accumulation, either side):
//         |a - s| <= (2u + u^2 + u (1+u)^2 (1+g) + g (1+u)^2 + g) |q| |k| =: c |q| |k|,
//     so a key is skipped only if its float32 score cannot enter the top-k:
//     the result is the float32 search's (up to the summation order of the
//     float32 dot products). Keys are streamed in index order and
//     only a strictly larger score displaces the k-th, so among equal scores
//     the lower index wins. NOLABELS_TOPK_FILTER=off|on overrides the choice.
//   * Non-finite inputs: a non-finite query row gets NaN values; any
//     non-finite key makes every value NaN. The Python caller raises.
//
// coder_class_scores: CODER's mean/max is folded into one float32 bank. With
//   w_c = scale / (n0_c + [n1_c > 0]) > 0, score_c = x.(w_c sum_{kind 0} t_j)
//   + max_{kind 1} x.(w_c t_j) (max commutes with a positive factor), so the
//   bank holds the scaled kind-0 sums (C rows; "a mean of dot products is the
//   dot product with the mean") and the scaled kind-1 texts, grouped by class
//   with a counting sort. Per block of image rows: one GEMM against the bank,
//   then per row the per-class max over the kind-1 columns, added to the sum
//   column (layouts: see scores_from_bank). Texts may come in any order.
//   Workers take row sub-blocks dynamically (GEMM + reduce each, one parallel
//   region per call).
//
// coder_affinity: G = T^T T over the row-normalised text bank (accumulated
//   tile by tile), U = X G, |CODER(x)|^2 = rowdot(U, X), out = U Y^T scaled by
//   the inverse norms. Normalising x and y first changes nothing mathematically
//   but matches the reference's zero-row convention.
#include "common.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace nolabels {
namespace coder {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr float kNormEps = 1e-12f;  // torch.nn.functional.normalize's eps

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CODER_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CODER_MULTIVERSION
#endif

torch::stable::Device cpu_device() {
  return torch::stable::Device(torch::headeronly::DeviceType::CPU);
}

Tensor empty_f32(std::vector<int64_t> shape) {
  return torch::stable::empty(shape, ScalarType::Float, std::nullopt, cpu_device());
}

// out = a @ b (aten::mm.out through the stable dispatcher: no allocation of
// the product, the tile buffer is reused across calls).
void mm_out(Tensor& out, const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a),
                                    torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION));
  (void)torch::stable::detail::to<Tensor>(stack[0]);
}

// ---------------------------------------------------------------- row loading
// bfloat16 bits of a finite float, round to nearest even (same as torch).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

CODER_MULTIVERSION
void bf16_row_to_f32(const uint16_t* src, int64_t s1, float* dst, int64_t D) {
  if (s1 == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = bf16_to_float(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = bf16_to_float(src[d * s1]);
  }
}

// Row r of t -> float32 dst[0..D).
void row_to_f32(const Tensor& t, int64_t r, float* dst) {
  const int64_t s1 = t.stride(1), D = t.size(1);
  switch (t.scalar_type()) {
    case ScalarType::Float: {
      const float* row = t.const_data_ptr<float>() + r * t.stride(0);
      if (s1 == 1) {
        std::memcpy(dst, row, D * sizeof(float));
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = row[d * s1];
      }
      break;
    }
    case ScalarType::Half: {
      const auto* row = t.const_data_ptr<torch::headeronly::Half>() + r * t.stride(0);
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(row[d * s1]);
      break;
    }
    case ScalarType::BFloat16: {
      const auto* row = static_cast<const uint16_t*>(t.const_data_ptr()) + r * t.stride(0);
      bf16_row_to_f32(row, s1, dst, D);
      break;
    }
    default:
      STD_TORCH_CHECK(false, "nolabels: unsupported dtype");
  }
}

// Sum of squares in double (no overflow for any float input), 8 lanes.
CODER_MULTIVERSION
double sumsq(const float* x, int64_t D) {
  double acc[8] = {0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int l = 0; l < 8; ++l) acc[l] += static_cast<double>(x[d + l]) * x[d + l];
  double s = 0;
  for (; d < D; ++d) s += static_cast<double>(x[d]) * x[d];
  for (int l = 0; l < 8; ++l) s += acc[l];
  return s;
}

// x *= f, rounded once. f is the double 1 / |x|: for a row of norm above ~8.5e37
// (entries near float32's maximum) it is below FLT_MIN, where a float32 factor would
// keep only a few bits; such rows are scaled in double. Either way the stored row is
// the exactly normalised row rounded to float32, whatever the row's magnitude.
CODER_MULTIVERSION
void scale_to_bf16(float* x, double f, uint16_t* bf, int64_t D) {
  const float ff = static_cast<float>(f);
  if (f >= std::numeric_limits<float>::min() && f <= std::numeric_limits<float>::max()) {
    for (int64_t d = 0; d < D; ++d) x[d] *= ff;
  } else {
    for (int64_t d = 0; d < D; ++d) x[d] = static_cast<float>(x[d] * f);
  }
  if (bf)
    for (int64_t d = 0; d < D; ++d) bf[d] = bf16_bits(x[d]);
}

// Row r of src -> L2-normalised float32 dst (zero row stays zero; no NaN check).
void load_one_normalized(const Tensor& src, int64_t r, float* dst) {
  const int64_t D = src.size(1);
  row_to_f32(src, r, dst);
  const double nrm = std::sqrt(sumsq(dst, D));
  scale_to_bf16(dst, 1.0 / std::max(nrm, static_cast<double>(kNormEps)), nullptr, D);
}

// Rows [r0, r1) of `src` -> float32 rows of `dst` (leading dim D), optionally
// L2-normalised (a zero row stays zero); `bf` (optional) receives bfloat16
// copies; `norm` (optional) the norm of each stored row; `bad` flags rows with
// NaN/Inf (their float32 values are left as loaded, their bf16 copy is zero).
void load_rows(const Tensor& src, int64_t r0, int64_t r1, float* dst, uint16_t* bf,
               float* norm, uint8_t* bad, bool normalize) {
  const int64_t D = src.size(1);
  torch::stable::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t i = r - r0;
      float* row = dst + i * D;
      row_to_f32(src, r, row);
      const double ss = sumsq(row, D);
      const bool finite = std::isfinite(ss);
      if (bad) bad[i] = finite ? 0 : 1;
      double nrm = std::sqrt(ss);
      double f = 1.0;  // in double: see scale_to_bf16
      if (normalize && finite) {
        f = 1.0 / std::max(nrm, static_cast<double>(kNormEps));
        nrm = nrm > 0 ? nrm * f : 0.0;
      }
      if (norm) norm[i] = finite ? static_cast<float>(nrm) : 0.0f;
      if (finite) {
        if (f != 1.0 || bf) scale_to_bf16(row, f, bf ? bf + i * D : nullptr, D);
      } else if (bf) {
        std::memset(bf + i * D, 0, D * sizeof(uint16_t));
      }
    }
  });
}

// ---------------------------------------------------------------- kernels of the scan
CODER_MULTIVERSION
float dot_f32(const float* a, const float* b, int64_t D) {
  float acc[16] = {0};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[d + l] * b[d + l];
  float s = 0.f;
  for (; d < D; ++d) s += a[d] * b[d];
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

// Max of a[0..n) (n a multiple of 16): 16-lane GCC/Clang vectors (each
// target_clones clone lowers them to its own ISA), one horizontal reduce.
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

inline float hmax16(v16f v) {
  float m = v[0];
  for (int l = 1; l < 16; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

inline float block_max_bf16(const uint16_t* a, int64_t n) {
  v16f mx = {};
  mx -= std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; j += 16) {
    v16h h;
    std::memcpy(&h, a + j, sizeof(h));
    const v16u w = __builtin_convertvector(h, v16u) << 16;
    v16f v;
    std::memcpy(&v, &w, sizeof(v));
    mx = v > mx ? v : mx;
  }
  return hmax16(mx);
}

inline float block_max_f32(const float* a, int64_t n) {
  v16f mx = {};
  mx -= std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; j += 16) {
    v16f v;
    std::memcpy(&v, a + j, sizeof(v));
    mx = v > mx ? v : mx;
  }
  return hmax16(mx);
}

// Min-heap of (value, index) whose root is the *worst* element: smaller value,
// or equal value and larger index.
inline bool worse(float va, int64_t ia, float vb, int64_t ib) {
  return va < vb || (va == vb && ia > ib);
}

struct RowHeap {
  float* v;
  int64_t* idx;
  int64_t k;
  int64_t size;

  void push(float val, int64_t id) {  // size < k
    int64_t j = size++;
    while (j > 0) {
      const int64_t p = (j - 1) / 2;
      if (!worse(val, id, v[p], idx[p])) break;
      v[j] = v[p];
      idx[j] = idx[p];
      j = p;
    }
    v[j] = val;
    idx[j] = id;
  }

  void replace_root(float val, int64_t id) {  // size == k
    int64_t j = 0;
    for (;;) {
      const int64_t l = 2 * j + 1;
      if (l >= size) break;
      int64_t c = l;
      if (l + 1 < size && worse(v[l + 1], idx[l + 1], v[l], idx[l])) c = l + 1;
      if (!worse(v[c], idx[c], val, id)) break;
      v[j] = v[c];
      idx[j] = idx[c];
      j = c;
    }
    v[j] = val;
    idx[j] = id;
  }

  // Offer a key with exact score `val`; keys come in increasing index order.
  inline void offer(float val, int64_t id) {
    if (size < k) {
      push(val, id);
    } else if (val > v[0]) {
      replace_root(val, id);
    }
  }

  float threshold() const {  // scores <= this cannot enter
    return size < k ? -std::numeric_limits<float>::infinity() : v[0];
  }

  void sort_desc() {
    std::vector<std::pair<float, int64_t>> tmp(size);
    for (int64_t j = 0; j < size; ++j) tmp[j] = {v[j], idx[j]};
    std::sort(tmp.begin(), tmp.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    for (int64_t j = 0; j < size; ++j) {
      v[j] = tmp[j].first;
      idx[j] = tmp[j].second;
    }
  }
};

// One row of a similarity tile against the row's heap. Blocks of 256 whose
// maximum cannot reach the limit are skipped after one vectorised pass.
constexpr int64_t kScanBlock = 256;

// Filter mode: `a` holds bf16 approximations; candidates are re-scored exactly.
CODER_MULTIVERSION
void scan_row_bf16(RowHeap& h, const uint16_t* a, int64_t nm, const float* qrow,
                   const float* kf, int64_t D, float margin, int64_t base) {
  float lim = h.threshold() - margin;
  auto visit = [&](int64_t j) {
    if (bf16_to_float(a[j]) >= lim) {
      h.offer(dot_f32(qrow, kf + j * D, D), base + j);
      lim = h.threshold() - margin;
    }
  };
  const int64_t full = nm - nm % 16;
  int64_t j = 0;
  for (int64_t n; j < full; j += n) {
    n = std::min(kScanBlock, full - j);
    if (block_max_bf16(a + j, n) < lim) continue;
    for (int64_t c = j; c < j + n; c += 16) {
      if (block_max_bf16(a + c, 16) < lim) continue;
      for (int64_t l = c; l < c + 16; ++l) visit(l);
    }
  }
  for (; j < nm; ++j) visit(j);
}

// Exact mode: `s` holds the float32 similarities.
CODER_MULTIVERSION
void scan_row_f32(RowHeap& h, const float* s, int64_t nm, int64_t base) {
  float thr = h.threshold();
  auto visit = [&](int64_t j) {
    if (h.size < h.k || s[j] > thr) {
      h.offer(s[j], base + j);
      thr = h.threshold();
    }
  };
  const int64_t full = nm - nm % 16;
  int64_t j = 0;
  for (int64_t n; j < full; j += n) {
    n = std::min(kScanBlock, full - j);
    if (h.size == h.k && !(block_max_f32(s + j, n) > thr)) continue;
    for (int64_t c = j; c < j + n; c += 16) {
      if (h.size == h.k && !(block_max_f32(s + c, 16) > thr)) continue;
      for (int64_t l = c; l < c + 16; ++l) visit(l);
    }
  }
  for (; j < nm; ++j) visit(j);
}

bool use_bf16_filter() {
  const char* env = std::getenv("NOLABELS_TOPK_FILTER");
  if (env != nullptr) {
    const std::string s(env);
    if (s == "off" || s == "0" || s == "fp32") return false;
    if (s == "on" || s == "1" || s == "bf16") return true;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

// ---------------------------------------------------------------- topk_similarity
std::tuple<Tensor, Tensor> topk_similarity_cpu(const Tensor& queries, const Tensor& keys,
                                                int64_t k, bool normalize) {
  STD_TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2, "topk_similarity: 2-D inputs expected");
  STD_TORCH_CHECK(queries.size(1) == keys.size(1), "topk_similarity: D mismatch");
  STD_TORCH_CHECK(k >= 1 && k <= keys.size(0), "topk_similarity: k out of range");
  STD_TORCH_CHECK(is_supported_float(queries.scalar_type()) && is_supported_float(keys.scalar_type()),
                  "topk_similarity: dtype must be float32, float16 or bfloat16");
  STD_TORCH_CHECK(queries.is_cpu() && keys.is_cpu(), "topk_similarity: CPU tensors expected");
  const int64_t N = queries.size(0), D = queries.size(1), M = keys.size(0);
  Tensor values = empty_f32({N, k});
  Tensor indices = torch::stable::empty({N, k}, ScalarType::Long, std::nullopt, cpu_device());
  if (N == 0) return {values, indices};

  const bool filter = use_bf16_filter();
  const double u = 1.0 / 256.0, g = static_cast<double>(D + 2) / 16777216.0;
  const float cbound = static_cast<float>(
      1.001 * (2 * u + u * u + u * (1 + u) * (1 + u) * (1 + g) + g * (1 + u) * (1 + u) + g));

  // Query super-blocks of balanced size <= 8192 rows (each key is loaded once
  // per super-block), split into sub-blocks of SB rows; key tiles of TM rows.
  // Each worker owns one (SB x TM) similarity buffer (~0.5-1 MB: it stays in
  // L2 between the single-threaded GEMM that writes it and the scan).
  const int64_t nsb = (N + 8191) / 8192;
  const int64_t QB = (N + nsb - 1) / nsb;
  const int64_t SB = std::min<int64_t>(QB, 256);
  const int64_t TM = std::min<int64_t>(M, 1024);
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>(torch::stable::get_num_threads(), (QB + SB - 1) / SB));

  const ScalarType sdt = filter ? ScalarType::BFloat16 : ScalarType::Float;
  auto empty_of = [&](std::vector<int64_t> shape, ScalarType t) {
    return torch::stable::empty(shape, t, std::nullopt, cpu_device());
  };
  Tensor qf = empty_f32({QB, D});
  Tensor kf = empty_f32({TM, D});
  Tensor qb = filter ? empty_of({QB, D}, sdt) : qf;  // GEMM operands
  Tensor kb = filter ? empty_of({TM, D}, sdt) : kf;
  std::vector<Tensor> tiles;
  for (int64_t w = 0; w < workers; ++w) tiles.push_back(empty_of({SB, TM}, sdt));
  std::vector<float> qnorm(QB), knorm(TM);
  std::vector<uint8_t> qbad(QB), kbad(TM);
  std::vector<int64_t> heap_size(N, 0);
  bool any_bad_key = false;

  float* vals_p = values.mutable_data_ptr<float>();
  int64_t* idx_p = indices.mutable_data_ptr<int64_t>();

  for (int64_t q0 = 0; q0 < N; q0 += QB) {
    const int64_t q1 = std::min(N, q0 + QB), nq = q1 - q0;
    const int64_t nsub = (nq + SB - 1) / SB;
    float* qf_p = qf.mutable_data_ptr<float>();
    uint16_t* qb_p = filter ? static_cast<uint16_t*>(qb.mutable_data_ptr()) : nullptr;
    load_rows(queries, q0, q1, qf_p, qb_p, qnorm.data(), qbad.data(), normalize);

    for (int64_t m0 = 0; m0 < M; m0 += TM) {
      const int64_t m1 = std::min(M, m0 + TM), nm = m1 - m0;
      float* kf_p = kf.mutable_data_ptr<float>();
      uint16_t* kb_p = filter ? static_cast<uint16_t*>(kb.mutable_data_ptr()) : nullptr;
      load_rows(keys, m0, m1, kf_p, kb_p, knorm.data(), kbad.data(), normalize);
      float kmax = 0.f;
      for (int64_t j = 0; j < nm; ++j) {
        kmax = std::max(kmax, knorm[j]);
        any_bad_key |= kbad[j] != 0;
      }
      const Tensor kbt = torch::stable::transpose(
          nm == TM ? kb : torch::stable::narrow(kb, 0, 0, nm), 0, 1);  // (D, nm)

      // Workers take sub-blocks dynamically: GEMM (single-threaded inside the
      // parallel region) into the worker's own buffer, then scan its rows.
      std::atomic<int64_t> next{0};
      torch::stable::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
        for (int64_t w = wb; w < we; ++w) {
          for (int64_t sbi; (sbi = next.fetch_add(1)) < nsub;) {
            const int64_t i0 = sbi * SB, i1 = std::min(nq, i0 + SB), ni = i1 - i0;
            Tensor tv = tiles[w];
            if (ni != SB) tv = torch::stable::narrow(tv, 0, 0, ni);
            if (nm != TM) tv = torch::stable::narrow(tv, 1, 0, nm);
            mm_out(tv, torch::stable::narrow(qb, 0, i0, ni), kbt);
            const int64_t ld = tv.stride(0);
            for (int64_t i = i0; i < i1; ++i) {
              const int64_t r = q0 + i;
              RowHeap h{vals_p + r * k, idx_p + r * k, k, heap_size[r]};
              if (filter) {
                const uint16_t* a = static_cast<const uint16_t*>(tv.const_data_ptr()) + (i - i0) * ld;
                const float margin = cbound * qnorm[i] * kmax + 1e-30f;
                scan_row_bf16(h, a, nm, qf_p + i * D, kf_p, D, margin, m0);
              } else {
                scan_row_f32(h, tv.const_data_ptr<float>() + (i - i0) * ld, nm, m0);
              }
              heap_size[r] = h.size;
            }
          }
        }
      });
    }
    // Rows of this super-block are final: sort, and poison non-finite rows.
    torch::stable::parallel_for(0, nq, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = q0 + i;
        RowHeap h{vals_p + r * k, idx_p + r * k, k, heap_size[r]};
        h.sort_desc();
        if (qbad[i]) {
          for (int64_t j = 0; j < k; ++j) h.v[j] = std::numeric_limits<float>::quiet_NaN();
        }
      }
    });
  }
  if (any_bad_key) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t j = 0; j < N * k; ++j) vals_p[j] = nan;
  }
  return {values, indices};
}

// ---------------------------------------------------------------- coder_class_scores
// Vertical max of P rows of length C (stride C) -> dst (added to dst).
CODER_MULTIVERSION
void add_slot_max(const float* slots, int64_t P, int64_t C, const float* base, float* dst) {
  for (int64_t c = 0; c < C; ++c) dst[c] = slots[c];
  for (int64_t p = 1; p < P; ++p) {
    const float* sp = slots + p * C;
    for (int64_t c = 0; c < C; ++c) dst[c] = sp[c] > dst[c] ? sp[c] : dst[c];
  }
  for (int64_t c = 0; c < C; ++c) dst[c] += base[c];
}

// Scores of image rows against a folded bank (see the file comment).
//   padded (P > 0): bank rows [0, C) kind-0 sums, then P slot blocks of C rows;
//     a class with n1 < P kind-1 texts repeats them across the unused slots
//     (duplicates do not change a max), a class without any has zero rows (max 0);
//     the reduction is a vertical max over slots, vectorised over classes.
//   segmented (P == 0, seg != nullptr): kind-1 rows of class c at C + seg[c]..seg[c+1].
//   neither (P == 0, seg == nullptr): no kind-1 texts at all.
Tensor scores_from_bank(const Tensor& image, const Tensor& bank, int64_t C, int64_t P,
                        const int64_t* seg) {
  const int64_t N = image.size(0), D = image.size(1), R = bank.size(0);
  Tensor out = empty_f32({N, C});
  if (N == 0) return out;
  // Sub-blocks of SB rows with a ~8 MB (SB x R) tile each, taken dynamically
  // by the workers: load + normalise, single-threaded GEMM into the worker's
  // own tile, reduce while the tile is in cache. One parallel region for the
  // whole call, so a worker descheduled on a busy machine does not stall the
  // others at a barrier.
  const int64_t SB = std::min<int64_t>(N, std::max<int64_t>(16, ((int64_t(1) << 21) / R) & ~int64_t(7)));
  const int64_t nsub = (N + SB - 1) / SB;
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>(torch::stable::get_num_threads(), nsub));
  std::vector<Tensor> xbs, tiles;
  std::vector<std::vector<uint8_t>> bads(workers, std::vector<uint8_t>(SB));
  for (int64_t w = 0; w < workers; ++w) {
    xbs.push_back(empty_f32({SB, D}));
    tiles.push_back(empty_f32({SB, R}));
  }
  const Tensor bank_t = torch::stable::transpose(bank, 0, 1);
  float* out_p = out.mutable_data_ptr<float>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::atomic<int64_t> next{0};

  torch::stable::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      for (int64_t sbi; (sbi = next.fetch_add(1)) < nsub;) {
        const int64_t r0 = sbi * SB, nr = std::min(SB, N - r0);
        uint8_t* bad = bads[w].data();
        load_rows(image, r0, r0 + nr, xbs[w].mutable_data_ptr<float>(), nullptr, nullptr, bad, true);
        Tensor tv = nr == SB ? tiles[w] : torch::stable::narrow(tiles[w], 0, 0, nr);
        mm_out(tv, nr == SB ? xbs[w] : torch::stable::narrow(xbs[w], 0, 0, nr), bank_t);
        const float* tp = tiles[w].const_data_ptr<float>();
        for (int64_t i = 0; i < nr; ++i) {
          const float* row = tp + i * R;
          float* o = out_p + (r0 + i) * C;
          if (bad[i]) {
            for (int64_t c = 0; c < C; ++c) o[c] = nan;
          } else if (P > 0) {
            add_slot_max(row + C, P, C, row, o);
          } else if (seg != nullptr) {
            const float* ones = row + C;
            for (int64_t c = 0; c < C; ++c) {
              float mx = 0.f;
              if (seg[c + 1] > seg[c]) {
                mx = ones[seg[c]];
                for (int64_t j = seg[c] + 1; j < seg[c + 1]; ++j) mx = std::max(mx, ones[j]);
              }
              o[c] = row[c] + mx;
            }
          } else {
            std::memcpy(o, row, C * sizeof(float));
          }
        }
      }
    }
  });
  return out;
}

// Full op: builds the bank from the raw text bank, then scores.
Tensor coder_class_scores_cpu(const Tensor& image, const Tensor& text, const Tensor& text_class,
                              const Tensor& text_kind, int64_t C, double scale) {
  STD_TORCH_CHECK(image.dim() == 2 && text.dim() == 2 && image.size(1) == text.size(1),
                  "coder_class_scores: image (N,D) and text (M,D) expected");
  const int64_t M = text.size(0), D = text.size(1);
  STD_TORCH_CHECK(text_class.dim() == 1 && text_class.size(0) == M && text_kind.dim() == 1 &&
                      text_kind.size(0) == M,
                  "coder_class_scores: text_class and text_kind must be (M,)");
  STD_TORCH_CHECK(text_class.scalar_type() == ScalarType::Long && text_kind.scalar_type() == ScalarType::Long,
                  "coder_class_scores: text_class and text_kind must be int64");
  STD_TORCH_CHECK(is_supported_float(image.scalar_type()) && is_supported_float(text.scalar_type()),
                  "coder_class_scores: dtype must be float32, float16 or bfloat16");
  STD_TORCH_CHECK(image.is_cpu() && text.is_cpu() && text_class.is_cpu() && text_kind.is_cpu(),
                  "coder_class_scores: CPU tensors expected");
  STD_TORCH_CHECK(C >= 1 && scale > 0, "coder_class_scores: need C >= 1 and scale > 0");
  const Tensor cls_t = torch::stable::contiguous(text_class);
  const Tensor kind_t = torch::stable::contiguous(text_kind);
  const int64_t* cls = cls_t.const_data_ptr<int64_t>();
  const int64_t* kind = kind_t.const_data_ptr<int64_t>();

  // Counting sort of the texts by (kind, class).
  std::vector<int64_t> n0(C, 0), n1(C, 0);
  for (int64_t j = 0; j < M; ++j) {
    STD_TORCH_CHECK(cls[j] >= 0 && cls[j] < C, "coder_class_scores: text_class out of range");
    STD_TORCH_CHECK(kind[j] == 0 || kind[j] == 1, "coder_class_scores: text_kind must be 0 or 1");
    (kind[j] == 0 ? n0 : n1)[cls[j]]++;
  }
  std::vector<int64_t> s0(C + 1, 0), s1(C + 1, 0);
  int64_t P = 0;
  for (int64_t c = 0; c < C; ++c) {
    STD_TORCH_CHECK(n0[c] + n1[c] > 0, "coder_class_scores: a class has no texts");
    s0[c + 1] = s0[c] + n0[c];
    s1[c + 1] = s1[c] + n1[c];
    P = std::max(P, n1[c]);
  }
  const int64_t M1 = s1[C];
  std::vector<int64_t> list0(s0[C]), list1(M1), f0(s0.begin(), s0.end() - 1), f1(s1.begin(), s1.end() - 1);
  for (int64_t j = 0; j < M; ++j) {
    if (kind[j] == 0) list0[f0[cls[j]]++] = j;
    else list1[f1[cls[j]]++] = j;
  }
  std::vector<float> w(C);
  for (int64_t c = 0; c < C; ++c)
    w[c] = static_cast<float>(scale / static_cast<double>(n0[c] + (n1[c] > 0 ? 1 : 0)));

  // Padded slot layout when the padding costs at most 25% more GEMM columns.
  const bool padded = M1 > 0 && (1 + P) * C * 4 <= 5 * (C + M1);
  const int64_t R = M1 == 0 ? C : (padded ? (1 + P) * C : C + M1);
  Tensor bank = empty_f32({R, D});
  float* bp = bank.mutable_data_ptr<float>();
  torch::stable::parallel_for(0, C, 4, [&](int64_t b, int64_t e) {
    std::vector<float> row(D);
    for (int64_t c = b; c < e; ++c) {
      float* sum = bp + c * D;
      std::fill(sum, sum + D, 0.f);
      for (int64_t q = s0[c]; q < s0[c + 1]; ++q) {
        load_one_normalized(text, list0[q], row.data());
        for (int64_t d = 0; d < D; ++d) sum[d] += row[d];
      }
      for (int64_t d = 0; d < D; ++d) sum[d] *= w[c];
      if (M1 == 0) continue;
      const int64_t slots = padded ? P : n1[c];
      for (int64_t p = 0; p < slots; ++p) {
        float* dst = padded ? bp + (C + p * C + c) * D : bp + (C + s1[c] + p) * D;
        if (n1[c] == 0) {
          std::fill(dst, dst + D, 0.f);
        } else if (p < n1[c]) {
          const int64_t j = list1[s1[c] + p];
          load_one_normalized(text, j, dst);
          for (int64_t d = 0; d < D; ++d) dst[d] *= w[c];
        } else {
          std::memcpy(dst, bp + (C + (p % n1[c]) * C + c) * D, D * sizeof(float));
        }
      }
    }
  });
  return scores_from_bank(image, bank, C, padded ? P : 0, (M1 > 0 && !padded) ? s1.data() : nullptr);
}

// ---------------------------------------------------------------- coder_affinity
// Three parallel regions, each with work taken dynamically by per-worker
// single-threaded GEMMs (robust on a busy machine, where a barrier per small
// step would wait for a descheduled thread):
//   1. G: workers take 1024-text tiles, normalise them, and accumulate their
//      own partial Gram matrix; G is symmetric, so with D split in halves
//      [A | B] only A^T A, A^T B and B^T B are computed (3/4 of the flops).
//      The partials are summed and mirrored afterwards.
//   2. Y side: Yhat (normalised rows) and 1/|Yhat G Yhat^T|^(1/2) per row.
//   3. X side, per 256-row block: Xhat, U = Xhat G, 1/|CODER(x)|, and
//      out = U Yhat^T scaled by both inverse norms, clamped to [-1, 1].
// Normalising x and y first changes nothing mathematically but matches the
// reference's zero-row convention (a zero row has affinity 0).

// Partial Gram of the normalised rows of one text tile, added into g (D x D,
// upper blocks only when split); `scratch` (D x D) and `tt` (>= nm x D) are the
// worker's own buffers.
void gram_tile(const Tensor& text, int64_t m0, int64_t nm, Tensor& tt, Tensor& g, Tensor& scratch,
               bool first, int64_t h) {
  const int64_t D = text.size(1);
  float* tp = tt.mutable_data_ptr<float>();
  for (int64_t r = 0; r < nm; ++r) load_one_normalized(text, m0 + r, tp + r * D);
  const Tensor tv = torch::stable::narrow(tt, 0, 0, nm);
  Tensor dst = first ? g : scratch;
  if (h == D) {
    mm_out(dst, torch::stable::transpose(tv, 0, 1), tv);
  } else {
    Tensor tv_ = tv;
    const Tensor A = torch::stable::narrow(tv_, 1, 0, h);
    const Tensor B = torch::stable::narrow(tv_, 1, h, D - h);
    const Tensor At = torch::stable::transpose(A, 0, 1);
    Tensor top = torch::stable::narrow(dst, 0, 0, h);
    Tensor bottom = torch::stable::narrow(dst, 0, h, D - h);
    Tensor d11 = torch::stable::narrow(top, 1, 0, h);
    Tensor d12 = torch::stable::narrow(top, 1, h, D - h);
    Tensor d22 = torch::stable::narrow(bottom, 1, h, D - h);
    mm_out(d11, At, A);
    mm_out(d12, At, B);
    mm_out(d22, torch::stable::transpose(B, 0, 1), B);
  }
  if (!first) {
    float* gp = g.mutable_data_ptr<float>();
    const float* sp = scratch.const_data_ptr<float>();
    for (int64_t r = 0; r < D; ++r) {
      const int64_t c0 = (h == D || r < h) ? 0 : h;  // the lower-left block is never set
      for (int64_t c = c0; c < D; ++c) gp[r * D + c] += sp[r * D + c];
    }
  }
}

Tensor coder_affinity_cpu(const Tensor& x, const Tensor& y, const Tensor& text) {
  STD_TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && text.dim() == 2, "coder_affinity: 2-D inputs expected");
  STD_TORCH_CHECK(x.size(1) == y.size(1) && x.size(1) == text.size(1), "coder_affinity: D mismatch");
  STD_TORCH_CHECK(is_supported_float(x.scalar_type()) && is_supported_float(y.scalar_type()) &&
                      is_supported_float(text.scalar_type()),
                  "coder_affinity: dtype must be float32, float16 or bfloat16");
  STD_TORCH_CHECK(x.is_cpu() && y.is_cpu() && text.is_cpu(), "coder_affinity: CPU tensors expected");
  const int64_t N = x.size(0), K = y.size(0), D = x.size(1), M = text.size(0);
  Tensor out = empty_f32({N, K});
  if (N == 0 || K == 0) return out;
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t h = D >= 128 ? (D / 2) & ~int64_t(15) : D;

  // 1. G = sum over text tiles of That^T That.
  const int64_t TT = std::min<int64_t>(M, 1024);
  const int64_t ntiles = (M + TT - 1) / TT;
  const int64_t gw = std::min(threads, ntiles);
  std::vector<Tensor> gs, scr, tts;
  std::vector<uint8_t> used(gw, 0);
  for (int64_t w = 0; w < gw; ++w) {
    gs.push_back(empty_f32({D, D}));
    scr.push_back(empty_f32({D, D}));
    tts.push_back(empty_f32({TT, D}));
  }
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, gw, 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      for (int64_t t; (t = next.fetch_add(1)) < ntiles;) {
        const int64_t m0 = t * TT;
        gram_tile(text, m0, std::min(TT, M - m0), tts[w], gs[w], scr[w], !used[w], h);
        used[w] = 1;
      }
    }
  });
  int64_t g0 = 0;  // the first worker that took a tile (there is at least one)
  while (!used[g0]) ++g0;
  Tensor G = gs[g0];
  float* gp = G.mutable_data_ptr<float>();
  for (int64_t w = g0 + 1; w < gw; ++w) {
    if (!used[w]) continue;
    const float* op = gs[w].const_data_ptr<float>();
    for (int64_t r = 0; r < D; ++r) {
      const int64_t c0 = (h == D || r < h) ? 0 : h;
      for (int64_t c = c0; c < D; ++c) gp[r * D + c] += op[r * D + c];
    }
  }
  if (h != D) {
    for (int64_t r = h; r < D; ++r)
      for (int64_t c = 0; c < h; ++c) gp[r * D + c] = gp[c * D + r];
  }

  // 2. Yhat and 1/|CODER(y)|.
  const int64_t RB = 256;
  Tensor yn = empty_f32({K, D});
  std::vector<float> iy(K);
  {
    const int64_t nb = (K + RB - 1) / RB, nw = std::min(threads, nb);
    std::vector<Tensor> vs;
    for (int64_t w = 0; w < nw; ++w) vs.push_back(empty_f32({std::min(RB, K), D}));
    std::atomic<int64_t> nb_next{0};
    float* yp = yn.mutable_data_ptr<float>();
    torch::stable::parallel_for(0, nw, 1, [&](int64_t wb, int64_t we) {
      for (int64_t w = wb; w < we; ++w) {
        for (int64_t bi; (bi = nb_next.fetch_add(1)) < nb;) {
          const int64_t r0 = bi * RB, nr = std::min(RB, K - r0);
          for (int64_t r = r0; r < r0 + nr; ++r) load_one_normalized(y, r, yp + r * D);
          Tensor v = torch::stable::narrow(vs[w], 0, 0, nr);
          mm_out(v, torch::stable::narrow(yn, 0, r0, nr), G);
          const float* vp = v.const_data_ptr<float>();
          for (int64_t i = 0; i < nr; ++i) {
            const float q = dot_f32(vp + i * D, yp + (r0 + i) * D, D);
            iy[r0 + i] = 1.0f / std::max(std::sqrt(std::max(q, 0.0f)), kNormEps);
          }
        }
      }
    });
  }

  // 3. X blocks: Xhat, U = Xhat G, out = U Yhat^T, scaled and clamped.
  {
    const int64_t nb = (N + RB - 1) / RB, nw = std::min(threads, nb);
    const int64_t rb = std::min(RB, N);
    std::vector<Tensor> xs, us;
    for (int64_t w = 0; w < nw; ++w) {
      xs.push_back(empty_f32({rb, D}));
      us.push_back(empty_f32({rb, D}));
    }
    const Tensor ynt = torch::stable::transpose(yn, 0, 1);
    std::atomic<int64_t> nb_next{0};
    float* op = out.mutable_data_ptr<float>();
    torch::stable::parallel_for(0, nw, 1, [&](int64_t wb, int64_t we) {
      for (int64_t w = wb; w < we; ++w) {
        for (int64_t bi; (bi = nb_next.fetch_add(1)) < nb;) {
          const int64_t r0 = bi * RB, nr = std::min(RB, N - r0);
          float* xp = xs[w].mutable_data_ptr<float>();
          for (int64_t r = 0; r < nr; ++r) load_one_normalized(x, r0 + r, xp + r * D);
          Tensor xv = torch::stable::narrow(xs[w], 0, 0, nr);
          Tensor u = torch::stable::narrow(us[w], 0, 0, nr);
          mm_out(u, xv, G);
          Tensor ov = torch::stable::narrow(out, 0, r0, nr);
          mm_out(ov, u, ynt);
          const float* up = u.const_data_ptr<float>();
          for (int64_t i = 0; i < nr; ++i) {
            const float q = dot_f32(up + i * D, xp + i * D, D);
            const float fx = 1.0f / std::max(std::sqrt(std::max(q, 0.0f)), kNormEps);
            float* row = op + (r0 + i) * K;
            for (int64_t j = 0; j < K; ++j)
              row[j] = std::min(1.0f, std::max(-1.0f, row[j] * fx * iy[j]));
          }
        }
      }
    });
  }
  return out;
}

}  // namespace
}  // namespace coder
}  // namespace nolabels

STABLE_TORCH_LIBRARY_FRAGMENT(nolabels_C, m) {
  // (values (N,k) f32 descending, indices (N,k) i64). Non-finite inputs give NaN values.
  m.def("topk_similarity(Tensor queries, Tensor keys, int k, bool normalize) -> (Tensor, Tensor)");
  // bank (C+M1, D) f32 and seg (C+1,) i64 from nolabels.ops.coder.prepare_class_bank.
  // The full op (CPU): builds the folded bank itself.
  m.def("coder_class_scores(Tensor image, Tensor text, Tensor text_class, Tensor text_kind,"
        " int num_classes, float scale) -> Tensor");
  // Scores against a bank/seg from nolabels.ops.coder.prepare_class_bank (a CUDA kernel
  // only: on the CPU, coder_class_scores builds its bank itself).
  m.def("coder_class_scores_bank(Tensor image, Tensor bank, Tensor seg) -> Tensor");
  m.def("coder_affinity(Tensor x, Tensor y, Tensor text) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(nolabels_C, CPU, m) {
  m.impl("topk_similarity", TORCH_BOX(&nolabels::coder::topk_similarity_cpu));
  m.impl("coder_class_scores", TORCH_BOX(&nolabels::coder::coder_class_scores_cpu));
  m.impl("coder_affinity", TORCH_BOX(&nolabels::coder::coder_affinity_cpu));
}
