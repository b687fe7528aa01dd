// coder_class_scores, CPU kernel (LibTorch stable ABI): CODER's zero-shot class
// scores, scale times the mean cosine similarity over a class's kind-0 texts
// and the best of its kind-1 texts. Rows are loaded and normalised by
// coder_cpu.h's helpers; schema in registration.cpp (the CUDA backend scores
// against a bank built in Python: coder_class_scores_bank, cuda/coder_cuda.cpp).
//
// Design: CODER's mean/max is folded into one float32 bank. With
//   w_c = scale / (n0_c + [n1_c > 0]) > 0, score_c = x.(w_c sum_{kind 0} t_j)
//   + max_{kind 1} x.(w_c t_j) (max commutes with a positive factor), so the
//   bank holds the scaled kind-0 sums (C rows; "a mean of dot products is the
//   dot product with the mean") and the scaled kind-1 texts, grouped by class
//   with a counting sort. Per block of image rows: one GEMM against the bank,
//   then per row the per-class max over the kind-1 columns, added to the sum
//   column (layouts: see scores_from_bank). Texts may come in any order.
//   Workers take row sub-blocks dynamically (GEMM + reduce each, one parallel
//   region per call).
#include "coder_cpu.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace nolabels {
namespace coder {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Vertical max of P rows of length C (stride C) -> dst (added to dst).
NOLABELS_MULTIVERSION
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

  for_each_dynamic(nsub, workers, [&](int64_t w, int64_t sbi) {
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

}  // namespace
}  // namespace coder
}  // namespace nolabels

STABLE_TORCH_LIBRARY_IMPL(nolabels_C, CPU, m) {
  m.impl("coder_class_scores", TORCH_BOX(&nolabels::coder::coder_class_scores_cpu));
}
