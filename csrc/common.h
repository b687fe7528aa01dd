// Shared host-side helpers for the nolabels stable-ABI libraries (the CPU ops
// in csrc/*.cpp and the CUDA host launchers in csrc/cuda/*.cpp): argument
// checks, mm_out, the normalisation eps (norm_eps.h). CPU row loading is in
// rows.h. Only torch/csrc/stable and torch/headeronly headers may be included here:
// the libraries are built with -DTORCH_STABLE_ONLY and must load on every
// torch >= 2.10 without a rebuild.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "norm_eps.h"

namespace nolabels {

// out = a @ b into an existing tensor (aten::mm.out through the stable
// dispatcher: no allocation of the product, so a tile buffer is reused across
// calls). CPU: MKL / oneDNN, single-threaded inside a parallel region; CUDA:
// cuBLAS on torch's current stream.
inline void mm_out(torch::stable::Tensor& out, const torch::stable::Tensor& a,
                   const torch::stable::Tensor& b) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a),
                                    torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION));
  (void)torch::stable::detail::to<torch::stable::Tensor>(stack[0]);
}

// fn(w, i) for every item i in [0, n) on `workers` workers of torch's thread
// pool (w: the worker, for its own buffers). Items are taken dynamically from
// one shared counter, so a core slowed by another process takes fewer.
template <class Fn>
inline void for_each_dynamic(int64_t n, int64_t workers, Fn&& fn) {
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      for (int64_t i; (i = next.fetch_add(1)) < n;) fn(w, i);
    }
  });
}

inline torch::stable::Device cpu_device() {
  return torch::stable::Device(torch::headeronly::DeviceType::CPU);
}

inline bool is_supported_float(torch::headeronly::ScalarType t) {
  using torch::headeronly::ScalarType;
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// Structural checks repeated in C++ so that a direct call to the raw op
// cannot read out of bounds. User-facing validation (with argument names and
// ValueError) happens in Python before any backend is called.
inline void check_pseudo_label_args(const torch::stable::Tensor& image,
                                    const torch::stable::Tensor& cls,
                                    int64_t topk) {
  STD_TORCH_CHECK(image.dim() == 2 && cls.dim() == 2,
                  "pseudo_label: image_emb and class_emb must be 2-D");
  STD_TORCH_CHECK(image.size(1) == cls.size(1), "pseudo_label: D mismatch");
  STD_TORCH_CHECK(cls.size(0) >= 1, "pseudo_label: need at least one class");
  STD_TORCH_CHECK(topk >= 1 && topk <= cls.size(0), "pseudo_label: topk out of range");
  STD_TORCH_CHECK(is_supported_float(image.scalar_type()) && is_supported_float(cls.scalar_type()),
                  "pseudo_label: dtype must be float32, float16 or bfloat16");
}

}  // namespace nolabels
