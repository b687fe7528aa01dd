// coder_affinity, CPU kernel (LibTorch stable ABI): the CODER affinity between
// two embedding sets, the cosine similarity of their CODER representations
// (similarities to every row of the text bank T): G = T^T T over the
// row-normalised text bank (accumulated tile by tile), U = X G,
// |CODER(x)|^2 = rowdot(U, X), out = U Y^T scaled by the inverse norms. Rows
// are loaded and normalised by coder_cpu.h's helpers; schema in registration.cpp.
//
// Design: three parallel regions, each with work taken dynamically by per-worker
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
#include "coder_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace nolabels {
namespace coder {
namespace {

using torch::stable::Tensor;

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
  for_each_dynamic(ntiles, gw, [&](int64_t w, int64_t t) {
    const int64_t m0 = t * TT;
    gram_tile(text, m0, std::min(TT, M - m0), tts[w], gs[w], scr[w], !used[w], h);
    used[w] = 1;
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
    float* yp = yn.mutable_data_ptr<float>();
    for_each_dynamic(nb, nw, [&](int64_t w, int64_t bi) {
      const int64_t r0 = bi * RB, nr = std::min(RB, K - r0);
      for (int64_t r = r0; r < r0 + nr; ++r) load_one_normalized(y, r, yp + r * D);
      Tensor v = torch::stable::narrow(vs[w], 0, 0, nr);
      mm_out(v, torch::stable::narrow(yn, 0, r0, nr), G);
      const float* vp = v.const_data_ptr<float>();
      for (int64_t i = 0; i < nr; ++i) {
        const float q = dot_f32(vp + i * D, yp + (r0 + i) * D, D);
        iy[r0 + i] = 1.0f / std::max(std::sqrt(std::max(q, 0.0f)), kNormEpsF);
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
    float* op = out.mutable_data_ptr<float>();
    for_each_dynamic(nb, nw, [&](int64_t w, int64_t bi) {
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
        const float fx = 1.0f / std::max(std::sqrt(std::max(q, 0.0f)), kNormEpsF);
        float* row = op + (r0 + i) * K;
        for (int64_t j = 0; j < K; ++j)
          row[j] = std::min(1.0f, std::max(-1.0f, row[j] * fx * iy[j]));
      }
    });
  }
  return out;
}

}  // namespace
}  // namespace coder
}  // namespace nolabels

STABLE_TORCH_LIBRARY_IMPL(nolabels_C, CPU, m) {
  m.impl("coder_affinity", TORCH_BOX(&nolabels::coder::coder_affinity_cpu));
}
