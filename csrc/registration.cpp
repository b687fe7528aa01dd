// Op schemas of the nolabels_C namespace: every m.def of the library is here
// (tests/test_csrc_layout.py checks that no other file defines one). Backend
// kernels register their implementations with STABLE_TORCH_LIBRARY_IMPL in
// their own files: the CPU ones in csrc/<op>_cpu.cpp (this library, _C), the
// CUDA ones in csrc/cuda/<op>_cuda.cpp (a second library, _C_cuda, loaded
// after this one by nolabels/_lib.py and only when torch has CUDA).
//
// These raw ops are internal: the public API is nolabels.ops, which validates
// arguments, picks a backend and wraps each call in a torch.library custom op.
#include "common.h"

STABLE_TORCH_LIBRARY(nolabels_C, m) {
  // Returns (probs (N,k) f32, classes (N,k) i64, entropy (N,) f32, lse (N,) f32).
  // Rows whose input is non-finite get lse = NaN; the caller raises.
  // CPU: pseudo_label_cpu.cpp; CUDA: cuda/pseudo_label_cuda.cpp.
  m.def("pseudo_label(Tensor image, Tensor cls, float scale, int topk, bool normalize)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // (values (N,k) f32 descending, indices (N,k) i64). Non-finite inputs give NaN values.
  // CPU: topk_similarity_cpu.cpp; CUDA: cuda/coder_cuda.cpp.
  m.def("topk_similarity(Tensor queries, Tensor keys, int k, bool normalize) -> (Tensor, Tensor)");
  // (N, C) f32 CODER class scores; the CPU kernel builds the folded text bank itself
  // (coder_class_scores_cpu.cpp).
  m.def("coder_class_scores(Tensor image, Tensor text, Tensor text_class, Tensor text_kind,"
        " int num_classes, float scale) -> Tensor");
  // Scores against a bank (C+M1, D) f32 and seg (C+1,) i64 from
  // nolabels.ops.coder.prepare_class_bank: a CUDA kernel only (cuda/coder_cuda.cpp).
  m.def("coder_class_scores_bank(Tensor image, Tensor bank, Tensor seg) -> Tensor");
  // (N, K) f32 in [-1, 1]. CPU: coder_affinity_cpu.cpp; CUDA: cuda/coder_cuda.cpp.
  m.def("coder_affinity(Tensor x, Tensor y, Tensor text) -> Tensor");
}
