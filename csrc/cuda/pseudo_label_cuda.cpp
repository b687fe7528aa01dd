// Host launcher of the fused CUDA pseudo_label kernel (LibTorch stable ABI).
//
// Compiled by the host compiler into _C_cuda.so: argument checks, output
// allocation on the input's device, the current CUDA stream, and the call
// into kernels/pseudo_label.cu through the plain interface of
// kernels/pseudo_label.cuh (no CUDA headers here). The kernel design and its
// memory use are documented at the top of kernels/pseudo_label.cu; beyond
// inputs and outputs it allocates one C-float workspace (class scales).
#include "common.h"
#include "pseudo_label.cuh"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace nolabels {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

cuda::PLDtype to_pl_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
      return cuda::PLDtype::kFloat32;
    case ScalarType::Half:
      return cuda::PLDtype::kFloat16;
    case ScalarType::BFloat16:
      return cuda::PLDtype::kBFloat16;
    default:
      STD_TORCH_CHECK(false, "pseudo_label_cuda: dtype must be float32, float16 or bfloat16");
  }
  return cuda::PLDtype::kFloat32;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pseudo_label_cuda(const Tensor& image,
                                                             const Tensor& cls, double scale,
                                                             int64_t topk, bool normalize) {
  check_pseudo_label_args(image, cls, topk);
  STD_TORCH_CHECK(image.is_cuda() && cls.is_cuda(),
                  "pseudo_label_cuda: CUDA tensors expected");
  const int32_t dev_index = image.get_device_index();
  STD_TORCH_CHECK(cls.get_device_index() == dev_index,
                  "pseudo_label_cuda: image_emb and class_emb are on different devices");
  STD_TORCH_CHECK(image.scalar_type() == cls.scalar_type(),
                  "pseudo_label_cuda: image_emb and class_emb must have the same dtype");
  STD_TORCH_CHECK(topk <= cuda::kPseudoLabelMaxTopk, "pseudo_label_cuda: topk must be <= ",
                  cuda::kPseudoLabelMaxTopk, ", got ", topk);
  const int64_t N = image.size(0), D = image.size(1), C = cls.size(0);
  STD_TORCH_CHECK(D >= 1, "pseudo_label_cuda: D must be >= 1");
  STD_TORCH_CHECK(C <= std::numeric_limits<int32_t>::max() &&
                      D <= std::numeric_limits<int32_t>::max(),
                  "pseudo_label_cuda: C and D must fit in int32");

  torch::stable::accelerator::DeviceGuard guard(dev_index);
  const torch::stable::Device dev = image.device();
  Tensor probs = torch::stable::empty({N, topk}, ScalarType::Float, std::nullopt, dev);
  Tensor classes = torch::stable::empty({N, topk}, ScalarType::Long, std::nullopt, dev);
  Tensor entropy = torch::stable::empty({N}, ScalarType::Float, std::nullopt, dev);
  Tensor lse = torch::stable::empty({N}, ScalarType::Float, std::nullopt, dev);
  if (N == 0) return {probs, classes, entropy, lse};

  // Workspace: per-class scales and pre-scales (2 C floats), freed stream-ordered by
  // the caching allocator.
  Tensor colscale = torch::stable::empty({2 * C}, ScalarType::Float, std::nullopt, dev);

  cuda::PseudoLabelArgs a;
  a.image = image.const_data_ptr();
  a.N = N;
  a.D = D;
  a.img_s0 = image.stride(0);
  a.img_s1 = image.stride(1);
  a.cls = cls.const_data_ptr();
  a.C = C;
  a.cls_s0 = cls.stride(0);
  a.cls_s1 = cls.stride(1);
  a.dtype = to_pl_dtype(image.scalar_type());
  a.scale = static_cast<float>(scale);
  a.topk = static_cast<int>(topk);
  a.normalize = normalize;
  a.colscale = colscale.mutable_data_ptr<float>();
  a.probs = probs.mutable_data_ptr<float>();
  a.classes = classes.mutable_data_ptr<int64_t>();
  a.entropy = entropy.mutable_data_ptr<float>();
  a.lse = lse.mutable_data_ptr<float>();

  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(dev_index, &stream) == AOTI_TORCH_SUCCESS,
                  "pseudo_label_cuda: could not get the current CUDA stream");
  const int err = cuda::launch_pseudo_label(a, stream);
  STD_TORCH_CHECK(err == 0, "pseudo_label_cuda: kernel launch failed: ",
                  cuda::cuda_error_string(err));
  return {probs, classes, entropy, lse};
}

}  // namespace
}  // namespace nolabels

STABLE_TORCH_LIBRARY_IMPL(nolabels_C, CUDA, m) {
  m.impl("pseudo_label", TORCH_BOX(&nolabels::pseudo_label_cuda));
}
