"""The CUDA simulator itself (tests/emulators/cuda_sim): the semantics the kernel tests rely
on, each checked on a small kernel written here -- warp shuffles and votes, block barriers
with __syncthreads_count, exited threads leaving barriers, and synccheck (threads waiting
at different barriers fail the launch, naming both call sites)."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "emulators" / "cuda_sim"))
import sim_build  # noqa: E402

_WHY_NOT = sim_build.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"CUDA simulator: {_WHY_NOT}")

_KERNELS = r"""
#include <cuda_runtime.h>
#include <cstdint>

__global__ void shuffles(int* out) {  // 64 threads: per lane xor/down/up/idx/ballot/any/all
  const int lane = threadIdx.x & 31, t = threadIdx.x;
  out[t * 7 + 0] = __shfl_xor_sync(0xffffffffu, t, 5);
  out[t * 7 + 1] = __shfl_down_sync(0xffffffffu, t, 3);
  out[t * 7 + 2] = __shfl_up_sync(0xffffffffu, t, 3);
  out[t * 7 + 3] = __shfl_sync(0xffffffffu, t, 7);
  out[t * 7 + 4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  out[t * 7 + 5] = __any_sync(0xffffffffu, t == 40);
  out[t * 7 + 6] = __all_sync(0xffffffffu, lane < 31);
}

__global__ void block_count(const int* pred, int* out) {  // exited warps leave the barrier
  if (threadIdx.x >= 96) return;  // the last warp exits at once
  __shared__ int s[96];
  s[threadIdx.x] = pred[threadIdx.x];
  const int n = __syncthreads_count(s[threadIdx.x]);
  out[threadIdx.x] = n + s[(threadIdx.x + 1) % 96];  // neighbour's write visible after the barrier
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 40) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void divergent_shuffle(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x & 1) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

extern "C" int run(int which, int* a, int* b) {
  switch (which) {
    case 0: shuffles<<<1, 64>>>(a); break;
    case 1: block_count<<<2, 128>>>(a, b); break;
    case 2: divergent_barrier<<<1, 64>>>(a); break;
    default: divergent_shuffle<<<1, 32>>>(a); break;
  }
  return static_cast<int>(cudaGetLastError());
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cu = tmp_path_factory.mktemp("sim") / "selftest.cu"
    cu.write_text(_KERNELS)
    return sim_build.load(cu, "")


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def test_shuffles_and_votes(lib):
    out = torch.full((64, 7), -1, dtype=torch.int32)
    assert lib.run(0, _ptr(out), None) == 0
    for t in range(64):
        lane, w = t % 32, t - t % 32
        ballot = sum(1 << l for l in range(32) if l % 3 == 0)
        want = [w + (lane ^ 5), w + (lane + 3 if lane + 3 < 32 else lane),
                w + (lane - 3 if lane >= 3 else lane), w + 7,
                ctypes.c_int32(ballot).value, int(t >= 32), 0]
        assert out[t].tolist() == want, t


def test_syncthreads_count_with_exited_threads(lib):
    pred = (torch.arange(96) % 5 == 0).to(torch.int32)
    out = torch.full((96,), -1, dtype=torch.int32)
    assert lib.run(1, _ptr(pred), _ptr(out)) == 0, lib.nolabels_sim_error_message()
    n = int(pred.sum())
    assert out.tolist() == [n + int(pred[(t + 1) % 96]) for t in range(96)]


@pytest.mark.parametrize("which,what", [(2, "__syncthreads"), (3, "warp-collective")])
def test_synccheck_fails_the_launch_and_names_both_sites(lib, which, what):
    out = torch.zeros(64, dtype=torch.int32)
    err = lib.run(which, _ptr(out), None)
    msg = lib.nolabels_sim_error_message().decode()
    assert err != 0, "a divergent barrier went unnoticed"
    assert f"divergent {what}" in msg and msg.count("selftest.cu:") == 2, msg
    assert lib.run(0, _ptr(torch.zeros(64 * 7, dtype=torch.int32)), None) == 0  # error was reset
