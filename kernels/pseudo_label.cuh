// Launch interface of the fused CUDA pseudo_label kernel (kernels/pseudo_label.cu).
//
// Plain C++ on purpose: the host launcher csrc/cuda/pseudo_label_cuda.cpp is
// compiled by the host compiler against the stable ABI only, so this header
// must not pull in CUDA or torch headers. The stream travels as void*
// (a cudaStream_t), errors as int (a cudaError_t; 0 = success).
#pragma once

#include <cstdint>

namespace nolabels {
namespace cuda {

enum class PLDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kPseudoLabelMaxTopk = 16;  // the running top-k lives in registers

struct PseudoLabelArgs {
  // image (N x D) and cls (C x D): same dtype, any strides (in elements).
  const void* image = nullptr;
  int64_t N = 0, D = 0, img_s0 = 0, img_s1 = 0;
  const void* cls = nullptr;
  int64_t C = 0, cls_s0 = 0, cls_s1 = 0;
  PLDtype dtype = PLDtype::kFloat32;
  float scale = 1.0f;
  int topk = 1;  // 1 <= topk <= min(C, kPseudoLabelMaxTopk)
  bool normalize = true;
  // Workspace: 2 C float32 (device memory, 16-byte aligned): per-class scales
  // (colscale) followed by per-class power-of-two pre-scales (colpre).
  float* colscale = nullptr;
  // Outputs (contiguous): probs (N, topk) f32, classes (N, topk) i64,
  // entropy (N,) f32, lse (N,) f32.
  float* probs = nullptr;
  int64_t* classes = nullptr;
  float* entropy = nullptr;
  float* lse = nullptr;
};

// Enqueues the whole op on `stream` (a cudaStream_t) on the current device.
// Returns a cudaError_t (0 = success). Requires N >= 1, C >= 1, D >= 1.
int launch_pseudo_label(const PseudoLabelArgs& args, void* stream);

// cudaGetErrorString for the value returned above.
const char* cuda_error_string(int err);

}  // namespace cuda
}  // namespace nolabels
