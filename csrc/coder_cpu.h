// Shared helpers of the CODER CPU ops (LibTorch stable ABI). One file per op:
//   topk_similarity_cpu.cpp      exact top-k cosine / inner-product search
//   coder_class_scores_cpu.cpp   CODER zero-shot class scores (folded text bank)
//   coder_affinity_cpu.cpp       CODER affinity between two embedding sets
// over the row loading / normalisation below (defined in coder_rows_cpu.cpp).
// Schemas: registration.cpp; CUDA launchers: cuda/coder_cuda.cpp.
#pragma once

#include "common.h"
#include "rows.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace nolabels {
namespace coder {

inline torch::stable::Tensor empty_f32(std::vector<int64_t> shape) {
  return torch::stable::empty(shape, torch::headeronly::ScalarType::Float, std::nullopt,
                              cpu_device());
}

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

// Sum of squares of x[0..D) in double (no overflow for any float input).
double sumsq(const float* x, int64_t D);

// x[0..D) *= f, rounded once (in double where f is outside float32's normal
// range); bf (optional) receives the bfloat16 copy of the result.
void scale_to_bf16(float* x, double f, uint16_t* bf, int64_t D);

// Row r of src -> L2-normalised float32 dst[0..D) (a zero row stays zero; no NaN check).
void load_one_normalized(const torch::stable::Tensor& src, int64_t r, float* dst);

// Rows [r0, r1) of `src` -> float32 rows of `dst` (leading dim D), optionally
// L2-normalised (a zero row stays zero); `bf` (optional) receives bfloat16
// copies; `norm` (optional) the norm of each stored row; `bad` (optional) flags
// rows with NaN/Inf (their float32 values are left as loaded, their bf16 copy
// is zero). Parallel over rows (torch's thread pool).
void load_rows(const torch::stable::Tensor& src, int64_t r0, int64_t r1, float* dst, uint16_t* bf,
               float* norm, uint8_t* bad, bool normalize);

// Dot product of two float32 vectors of length D (16 float32 lanes).
float dot_f32(const float* a, const float* b, int64_t D);

}  // namespace coder
}  // namespace nolabels
