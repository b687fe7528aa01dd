// Op schemas of the nolabels_C namespace. Backend kernels register their
// implementations with STABLE_TORCH_LIBRARY_IMPL in their own files (the CUDA
// ones live in a second library, _C_cuda, loaded only when torch has CUDA).
//
// These raw ops are internal: the public API is nolabels.ops, which validates
// arguments, picks a backend and wraps each call in a torch.library custom op.
#include "common.h"

STABLE_TORCH_LIBRARY(nolabels_C, m) {
  // Returns (probs (N,k) f32, classes (N,k) i64, entropy (N,) f32, lse (N,) f32).
  // Rows whose input is non-finite get lse = NaN; the caller raises.
  m.def("pseudo_label(Tensor image, Tensor cls, float scale, int topk, bool normalize)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
}
