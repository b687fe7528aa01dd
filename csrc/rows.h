// Row loading of the CPU ops: one row of a 2-D float32 / float16 / bfloat16
// tensor (any strides, a stride of 0 included) into a float32 buffer. Every
// CPU op reads its inputs through load_row (pseudo_label_cpu.cpp, and the
// CODER ops through coder_cpu.h's load_rows / load_one_normalized), so a new
// dtype or layout is handled in one place. Also the multiversioning macro of
// the CPU kernels' vectorised loops.
#pragma once

#include "common.h"

#include <cstdint>

// One clone per x86-64 level (AVX-512, AVX2+FMA, baseline), picked at load
// time: the library is built for baseline x86-64 and still vectorises wide.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NOLABELS_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NOLABELS_MULTIVERSION
#endif

namespace nolabels {

// Row r of a (rows x D) strided matrix whose elements are T into dst[0..D) as
// float32 (exact: every float16 / bfloat16 value is a float32 value).
template <typename T>
inline void load_row_t(const torch::stable::Tensor& t, int64_t r, float* dst) {
  const T* row = t.const_data_ptr<T>() + r * t.stride(0);
  const int64_t s1 = t.stride(1), D = t.size(1);
  if (s1 == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(row[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(row[d * s1]);
  }
}

// Row r of t (float32, float16 or bfloat16; 2-D, any strides) -> float32 dst[0..D).
inline void load_row(const torch::stable::Tensor& t, int64_t r, float* dst) {
  using torch::headeronly::ScalarType;
  switch (t.scalar_type()) {
    case ScalarType::Float:
      return load_row_t<float>(t, r, dst);
    case ScalarType::Half:
      return load_row_t<torch::headeronly::Half>(t, r, dst);
    case ScalarType::BFloat16:
      return load_row_t<torch::headeronly::BFloat16>(t, r, dst);
    default:
      STD_TORCH_CHECK(false, "nolabels: unsupported dtype");
  }
}

}  // namespace nolabels
