// Row loading and normalisation shared by the CODER CPU ops (declared in
// coder_cpu.h): rows of any supported dtype / strides (rows.h's load_row) into
// float32 buffers, L2-normalised exactly whatever the row's magnitude, with
// optional bfloat16 copies (topk_similarity's filter GEMM), norms and
// non-finite flags.
#include "coder_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace nolabels {
namespace coder {

// 8 double lanes.
NOLABELS_MULTIVERSION
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

// f is the double 1 / |x|: for a row of norm above ~8.5e37 (entries near
// float32's maximum) it is below FLT_MIN, where a float32 factor would keep
// only a few bits; such rows are scaled in double. Either way the stored row is
// the exactly normalised row rounded to float32, whatever the row's magnitude.
NOLABELS_MULTIVERSION
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

// The eps compared here is the float32 one (kNormEpsF) widened to double, as
// the CUDA and Triton kernels compare in float32.
void load_one_normalized(const torch::stable::Tensor& src, int64_t r, float* dst) {
  const int64_t D = src.size(1);
  load_row(src, r, dst);
  const double nrm = std::sqrt(sumsq(dst, D));
  scale_to_bf16(dst, 1.0 / std::max(nrm, static_cast<double>(kNormEpsF)), nullptr, D);
}

void load_rows(const torch::stable::Tensor& src, int64_t r0, int64_t r1, float* dst, uint16_t* bf,
               float* norm, uint8_t* bad, bool normalize) {
  const int64_t D = src.size(1);
  torch::stable::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t i = r - r0;
      float* row = dst + i * D;
      load_row(src, r, row);
      const double ss = sumsq(row, D);
      const bool finite = std::isfinite(ss);
      if (bad) bad[i] = finite ? 0 : 1;
      double nrm = std::sqrt(ss);
      double f = 1.0;  // in double: see scale_to_bf16
      if (normalize && finite) {
        f = 1.0 / std::max(nrm, static_cast<double>(kNormEpsF));
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

// 16 float32 lanes.
NOLABELS_MULTIVERSION
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

}  // namespace coder
}  // namespace nolabels
