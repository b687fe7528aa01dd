// Plain C++ interface of the CODER CUDA kernels (kernels/coder.cu), used by the
// host launcher csrc/cuda/coder_cuda.cpp: raw pointers, void* streams, int error
// codes, no CUDA headers, so the host side compiles with the host compiler.
#pragma once

#include <cstdint>

namespace nolabels {
namespace coder_cuda {

enum Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
constexpr int kMaxK = 1024;

// Launch plan of one kernel: exactly the <<<grid, block, smem>>> its launcher below uses
// for these shapes (mirrored by python/nolabels/launch_plans.py; tests/test_launch_plans.py
// checks both against each other and against the GPU's launch limits). A launcher whose
// plan does not fit (grid.x > 2^31-1) returns cudaErrorInvalidConfiguration instead.
struct LaunchPlan {
  int64_t grid_x = 1, grid_y = 1, grid_z = 1;
  int block = 1;
  int smem = 0;
};
LaunchPlan plan_normalize_rows(int64_t rows);
LaunchPlan plan_topk_merge(int64_t rows, int64_t k);  // warp select (k <= 256) or block select
LaunchPlan plan_topk_poison(int64_t rows, int64_t k);
LaunchPlan plan_seg_reduce(int64_t rows, int64_t C);  // one block per (row, 128 classes), 1-D
LaunchPlan plan_rowdot_inv(int64_t rows);
LaunchPlan plan_scale_clamp(int64_t N, int64_t K);
bool plan_fits(const LaunchPlan& p);  // within the grid/block limits of every CUDA GPU

int normalize_rows(const void* src, int dtype, int64_t rows, int64_t D, int64_t s0, int64_t s1,
                   float* dst, bool normalize, int* row_bad, int* any_bad, void* stream);
int topk_merge(const float* S, int64_t rows, int64_t cols, int64_t ld, float* vals, int64_t* idx,
               int64_t k, int64_t base, bool first, void* stream);
int topk_poison(float* vals, int64_t rows, int64_t k, const int* row_bad, const int* any_bad,
                void* stream);
int seg_reduce(const float* tile, int64_t rows, int64_t R, int64_t C, const int64_t* seg,
               const int* row_bad, float* out, void* stream);
int rowdot_inv(const float* U, const float* X, int64_t rows, int64_t D, float* inv, void* stream);
int scale_clamp(float* out, int64_t N, int64_t K, const float* ix, const float* iy, void* stream);
const char* error_string(int err);

}  // namespace coder_cuda
}  // namespace nolabels
