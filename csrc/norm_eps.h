// The L2-normalisation eps of every nolabels kernel: x / max(|x|, eps), so a
// zero row stays zero (torch.nn.functional.normalize's default). One place for
// the C++ CPU ops (through common.h) and the CUDA kernels (kernels/*.cu include
// this file directly: plain C++, no torch or CUDA headers, usable in device
// code as a constexpr scalar). The Python side's copies must agree:
// nolabels.reference.normalize.NORM_EPS and nolabels.triton._common.NORM_EPS
// (tests/test_csrc_layout.py checks them against this file).
#pragma once

namespace nolabels {

constexpr double kNormEps = 1e-12;
// The same eps rounded to float32 (what torch uses on float32 tensors); the
// float32 code paths compare against this one.
constexpr float kNormEpsF = static_cast<float>(kNormEps);
static_assert(kNormEpsF == 1e-12f, "the float32 eps is the float literal's value");

}  // namespace nolabels
