// topk_similarity, CPU kernel (LibTorch stable ABI): for each query row the k
// keys of largest cosine similarity (or inner product), exact. Rows are loaded
// and normalised by coder_cpu.h's load_rows; schema in registration.cpp.
//
// Design (FAISS IndexFlatIP's: blocked GEMM + per-row heap)
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
#include "coder_cpu.h"

#include <algorithm>
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

// ---------------------------------------------------------------- kernels of the scan
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
NOLABELS_MULTIVERSION
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
NOLABELS_MULTIVERSION
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
      for_each_dynamic(nsub, workers, [&](int64_t w, int64_t sbi) {
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

}  // namespace
}  // namespace coder
}  // namespace nolabels

STABLE_TORCH_LIBRARY_IMPL(nolabels_C, CPU, m) {
  m.impl("topk_similarity", TORCH_BOX(&nolabels::coder::topk_similarity_cpu));
}
