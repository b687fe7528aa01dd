// Host launchers of the CODER ops on CUDA (LibTorch stable ABI).
//
// GEMMs go through torch (aten::mm / matmul -> cuBLAS, float32; they follow
// torch.backends.cuda.matmul.allow_tf32, which is off by default); the kernels
// around them are in kernels/coder.cu, whose plain interface is declared below
// (keep in sync with that file). Everything is enqueued on torch's current
// stream; temporaries come from torch's caching allocator. mm_out: common.h;
// schemas: registration.cpp (in _C, loaded before this library).
//
//   topk_similarity     query blocks x key tiles: normalise (kernel), GEMM,
//                       warp-select (k <= 256) or block-select merge into the
//                       (N, k) outputs; poison NaN.
//   coder_class_scores_bank   row blocks: normalise, GEMM against the folded
//                       bank, per-class segment max (kernel).
//   coder_affinity      G = T̂ᵀT̂, U = X̂G, V = ŶG, inverse CODER norms (kernel),
//                       out = U Ŷᵀ scaled and clamped (kernel).
#include "coder.cuh"
#include "common.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace nolabels {

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

int dtype_code(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
      return coder_cuda::kFloat32;
    case ScalarType::Half:
      return coder_cuda::kFloat16;
    case ScalarType::BFloat16:
      return coder_cuda::kBFloat16;
    default:
      STD_TORCH_CHECK(false, "coder (cuda): dtype must be float32, float16 or bfloat16");
  }
  return 0;
}

void check(int err, const char* what) {
  STD_TORCH_CHECK(err == 0, "coder (cuda): ", what, " failed: ", coder_cuda::error_string(err));
}

void* current_stream(int32_t dev_index) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(dev_index, &stream) == AOTI_TORCH_SUCCESS,
                  "coder (cuda): could not get the current CUDA stream");
  return stream;
}

Tensor empty_on(const Tensor& like, std::vector<int64_t> shape, ScalarType t) {
  return torch::stable::empty(shape, t, std::nullopt, like.device());
}

// Rows [r0, r0 + rows) of src (any float dtype/strides) -> float32 (rows, D) in dst.
void normalize_into(const Tensor& src, int64_t r0, int64_t rows, Tensor& dst, bool normalize,
                    int* row_bad, int* any_bad, void* stream) {
  const int64_t D = src.size(1);
  const size_t esize = src.scalar_type() == ScalarType::Float ? 4 : 2;
  const char* base = static_cast<const char*>(src.const_data_ptr()) + r0 * src.stride(0) * esize;
  check(coder_cuda::normalize_rows(base, dtype_code(src.scalar_type()), rows, D, src.stride(0),
                                   src.stride(1), dst.mutable_data_ptr<float>(), normalize, row_bad,
                                   any_bad, stream),
        "normalize_rows");
}

void check_2d_cuda(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.dim() == 2, "coder (cuda): ", name, " must be 2-D");
  STD_TORCH_CHECK(t.is_cuda(), "coder (cuda): ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(is_supported_float(t.scalar_type()), "coder (cuda): ", name,
                  " must be float32, float16 or bfloat16");
}

// ---------------------------------------------------------------- topk_similarity
std::tuple<Tensor, Tensor> topk_similarity_cuda(const Tensor& queries, const Tensor& keys, int64_t k,
                                                bool normalize) {
  check_2d_cuda(queries, "queries");
  check_2d_cuda(keys, "keys");
  STD_TORCH_CHECK(queries.size(1) == keys.size(1), "topk_similarity: D mismatch");
  STD_TORCH_CHECK(k >= 1 && k <= keys.size(0), "topk_similarity: k out of range");
  STD_TORCH_CHECK(k <= coder_cuda::kMaxK, "topk_similarity (cuda): k must be <= ", coder_cuda::kMaxK);
  const int32_t dev = queries.get_device_index();
  STD_TORCH_CHECK(keys.get_device_index() == dev, "topk_similarity: inputs on different devices");
  torch::stable::accelerator::DeviceGuard guard(dev);
  const int64_t N = queries.size(0), D = queries.size(1), M = keys.size(0);
  Tensor values = empty_on(queries, {N, k}, ScalarType::Float);
  Tensor indices = empty_on(queries, {N, k}, ScalarType::Long);
  if (N == 0) return {values, indices};
  void* stream = current_stream(dev);

  // Query blocks of <= 8192 rows, key tiles of >= max(k, 1024) keys, the tile
  // (QB x TM float32) at most 64M elements (256 MB).
  const int64_t QB = std::min<int64_t>(N, 8192);
  const int64_t TM = std::min<int64_t>(
      M, std::max<int64_t>(std::max<int64_t>(k, 1024), (int64_t(1) << 26) / QB));
  Tensor qf = empty_on(queries, {QB, D}, ScalarType::Float);
  Tensor kf = empty_on(queries, {TM, D}, ScalarType::Float);
  Tensor tile = empty_on(queries, {QB, TM}, ScalarType::Float);
  Tensor row_bad = empty_on(queries, {N}, ScalarType::Int);
  Tensor any_bad = empty_on(queries, {1}, ScalarType::Int);
  torch::stable::zero_(any_bad);
  int* row_bad_p = row_bad.mutable_data_ptr<int>();
  int* any_bad_p = any_bad.mutable_data_ptr<int>();
  float* vals = values.mutable_data_ptr<float>();
  int64_t* idx = indices.mutable_data_ptr<int64_t>();

  for (int64_t q0 = 0; q0 < N; q0 += QB) {
    const int64_t nq = std::min(QB, N - q0);
    normalize_into(queries, q0, nq, qf, normalize, row_bad_p + q0, nullptr, stream);
    const Tensor qv = nq == QB ? qf : torch::stable::narrow(qf, 0, 0, nq);
    for (int64_t m0 = 0; m0 < M; m0 += TM) {
      const int64_t nm = std::min(TM, M - m0);
      normalize_into(keys, m0, nm, kf, normalize, nullptr, any_bad_p, stream);
      const Tensor kv = nm == TM ? kf : torch::stable::narrow(kf, 0, 0, nm);
      Tensor tv = tile;
      if (nq != QB) tv = torch::stable::narrow(tv, 0, 0, nq);
      if (nm != TM) tv = torch::stable::narrow(tv, 1, 0, nm);
      mm_out(tv, qv, torch::stable::transpose(kv, 0, 1));
      check(coder_cuda::topk_merge(tile.const_data_ptr<float>(), nq, nm, tv.stride(0), vals + q0 * k,
                                   idx + q0 * k, k, m0, m0 == 0, stream),
            "topk_merge");
    }
  }
  check(coder_cuda::topk_poison(vals, N, k, row_bad_p, any_bad_p, stream), "topk_poison");
  return {values, indices};
}

// ---------------------------------------------------------------- coder_class_scores_bank
Tensor coder_class_scores_bank_cuda(const Tensor& image, const Tensor& bank, const Tensor& seg) {
  check_2d_cuda(image, "image");
  STD_TORCH_CHECK(bank.dim() == 2 && bank.is_cuda() && bank.scalar_type() == ScalarType::Float &&
                      bank.is_contiguous(),
                  "coder_class_scores_bank (cuda): bank must be contiguous float32 on the GPU");
  STD_TORCH_CHECK(seg.dim() == 1 && seg.is_cuda() && seg.scalar_type() == ScalarType::Long &&
                      seg.is_contiguous(),
                  "coder_class_scores_bank (cuda): seg must be contiguous int64 on the GPU");
  STD_TORCH_CHECK(image.size(1) == bank.size(1), "coder_class_scores_bank: D mismatch");
  const int32_t dev = image.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  const int64_t N = image.size(0), D = image.size(1), R = bank.size(0), C = seg.size(0) - 1;
  STD_TORCH_CHECK(C >= 1 && C <= R, "coder_class_scores_bank: seg does not match bank");
  Tensor out = empty_on(image, {N, C}, ScalarType::Float);
  if (N == 0) return out;
  void* stream = current_stream(dev);
  // Row blocks with a (BN x R) tile of at most 64M floats.
  const int64_t BN = std::min<int64_t>(N, std::max<int64_t>(256, (int64_t(1) << 26) / R));
  Tensor xf = empty_on(image, {BN, D}, ScalarType::Float);
  Tensor tile = empty_on(image, {BN, R}, ScalarType::Float);
  Tensor bad = empty_on(image, {BN}, ScalarType::Int);
  const Tensor bank_t = torch::stable::transpose(bank, 0, 1);
  for (int64_t r0 = 0; r0 < N; r0 += BN) {
    const int64_t nr = std::min(BN, N - r0);
    normalize_into(image, r0, nr, xf, true, bad.mutable_data_ptr<int>(), nullptr, stream);
    Tensor tv = nr == BN ? tile : torch::stable::narrow(tile, 0, 0, nr);
    mm_out(tv, nr == BN ? xf : torch::stable::narrow(xf, 0, 0, nr), bank_t);
    check(coder_cuda::seg_reduce(tile.const_data_ptr<float>(), nr, R, C, seg.const_data_ptr<int64_t>(),
                                 bad.const_data_ptr<int>(), out.mutable_data_ptr<float>() + r0 * C, stream),
          "seg_reduce");
  }
  return out;
}

// ---------------------------------------------------------------- coder_affinity
Tensor coder_affinity_cuda(const Tensor& x, const Tensor& y, const Tensor& text) {
  check_2d_cuda(x, "x");
  check_2d_cuda(y, "y");
  check_2d_cuda(text, "text");
  STD_TORCH_CHECK(x.size(1) == y.size(1) && x.size(1) == text.size(1), "coder_affinity: D mismatch");
  const int32_t dev = x.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  const int64_t N = x.size(0), K = y.size(0), D = x.size(1), M = text.size(0);
  Tensor out = empty_on(x, {N, K}, ScalarType::Float);
  if (N == 0 || K == 0) return out;
  void* stream = current_stream(dev);
  Tensor tf = empty_on(x, {M, D}, ScalarType::Float);
  normalize_into(text, 0, M, tf, true, nullptr, nullptr, stream);
  const Tensor G = torch::stable::matmul(torch::stable::transpose(tf, 0, 1), tf);  // (D, D)
  Tensor xf = empty_on(x, {N, D}, ScalarType::Float);
  Tensor yf = empty_on(x, {K, D}, ScalarType::Float);
  normalize_into(x, 0, N, xf, true, nullptr, nullptr, stream);
  normalize_into(y, 0, K, yf, true, nullptr, nullptr, stream);
  const Tensor U = torch::stable::matmul(xf, G);  // G symmetric
  const Tensor V = torch::stable::matmul(yf, G);
  Tensor ix = empty_on(x, {N}, ScalarType::Float);
  Tensor iy = empty_on(x, {K}, ScalarType::Float);
  check(coder_cuda::rowdot_inv(U.const_data_ptr<float>(), xf.const_data_ptr<float>(), N, D,
                               ix.mutable_data_ptr<float>(), stream),
        "rowdot_inv");
  check(coder_cuda::rowdot_inv(V.const_data_ptr<float>(), yf.const_data_ptr<float>(), K, D,
                               iy.mutable_data_ptr<float>(), stream),
        "rowdot_inv");
  mm_out(out, U, torch::stable::transpose(yf, 0, 1));
  check(coder_cuda::scale_clamp(out.mutable_data_ptr<float>(), N, K, ix.const_data_ptr<float>(),
                                iy.const_data_ptr<float>(), stream),
        "scale_clamp");
  return out;
}

}  // namespace
}  // namespace nolabels

STABLE_TORCH_LIBRARY_IMPL(nolabels_C, CUDA, m) {
  m.impl("topk_similarity", TORCH_BOX(&nolabels::topk_similarity_cuda));
  m.impl("coder_class_scores_bank", TORCH_BOX(&nolabels::coder_class_scores_bank_cuda));
  m.impl("coder_affinity", TORCH_BOX(&nolabels::coder_affinity_cuda));
}
