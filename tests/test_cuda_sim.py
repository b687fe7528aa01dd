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

__global__ void touch(int* out) {  // launch-limit tests: one write per block
  extern __shared__ int dyn[];
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    dyn[0] = 1;
    out[0] = dyn[0];
  }
}
__global__ void touch_optin(int* out) {  // same, for the opt-in attribute (per kernel)
  extern __shared__ int dyn2[];
  if (threadIdx.x == 0) {
    dyn2[0] = 1;
    out[0] = dyn2[0];
  }
}

// which: 0 grid.y, 1 grid.z, 2 grid.x, 3 threads, 4 block.z, 5 smem without attribute,
// 6 smem with attribute; n: the tested value. Returns the cudaError_t of the launch
// (or of cudaFuncSetAttribute when it fails).
extern "C" int launch_limit(int which, long long n, int* out) {
  switch (which) {
    case 0: touch<<<dim3(1, static_cast<unsigned>(n)), 1>>>(out); break;
    case 1: touch<<<dim3(1, 1, static_cast<unsigned>(n)), 1>>>(out); break;
    case 2: touch<<<dim3(static_cast<unsigned>(n)), 1>>>(out); break;
    case 3: touch<<<1, dim3(32, static_cast<unsigned>(n / 32))>>>(out); break;  // n threads
    case 4: touch<<<1, dim3(1, 1, static_cast<unsigned>(n))>>>(out); break;
    case 5: touch<<<1, 32, static_cast<size_t>(n)>>>(out); break;
    default: {
      const cudaError_t e = cudaFuncSetAttribute(touch_optin, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(n));
      if (e != cudaSuccess) return static_cast<int>(e);
      touch_optin<<<1, 32, static_cast<size_t>(n)>>>(out);
    }
  }
  return static_cast<int>(cudaGetLastError());
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


# --------------------------------------------------------------------------- launch limits
_INVALID_CONFIG, _INVALID_VALUE = 9, 1


def _launch(lib, which: int, n: int) -> tuple[int, str, torch.Tensor]:
    out = torch.zeros(1, dtype=torch.int32)
    err = lib.launch_limit(which, ctypes.c_longlong(n), _ptr(out))
    return err, lib.nolabels_sim_error_message().decode(), out


@pytest.mark.parametrize("which,ok,bad,what", [
    (0, 65535, 65536, "grid.y = 65536 > 65535"),
    (1, 65535, 65536, "grid.z = 65536 > 65535"),
    (2, 1, 2**31, "grid.x = 2147483648 > 2^31-1"),
    (3, 1024, 1056, "1056 > 1024 threads"),
    (4, 64, 65, "exceeds (1024, 1024, 64)"),
    (5, 48 * 1024, 48 * 1024 + 4, "48 KB without cudaFuncSetAttribute"),
], ids=["grid.y", "grid.z", "grid.x", "threads", "block.z", "smem-no-attr"])
def test_launch_over_a_limit_fails_and_nothing_runs(lib, which, ok, bad, what):
    if which in (0, 1):  # 65,535 blocks are slow to run here: a small accepted grid instead
        ok = 3
    err, msg, out = _launch(lib, which, bad)
    assert err in (_INVALID_CONFIG, _INVALID_VALUE) and what in msg, (err, msg)
    assert int(out) == 0, "a rejected launch ran"
    err, msg, out = _launch(lib, which, ok)  # at the limit: accepted and run (error reset)
    assert err == 0 and int(out) == 1, (err, msg)


def test_dynamic_smem_above_48k_needs_the_attribute_and_the_device_opt_in(lib):
    try:
        lib.nolabels_sim_set_arch(90)
        err, msg, out = _launch(lib, 6, 227 * 1024)  # sm_90 opt-in maximum
        assert err == 0 and int(out) == 1, msg
        assert _launch(lib, 6, 227 * 1024 + 4)[0] == _INVALID_VALUE  # attribute refused
        lib.nolabels_sim_set_arch(80)  # sm_80: 163 KB
        assert _launch(lib, 6, 200 * 1024)[0] == _INVALID_VALUE
        err, msg, out = _launch(lib, 6, 163 * 1024)
        assert err == 0 and int(out) == 1, msg
        # the attribute is per kernel: the other kernel still has the 48 KB default
        err, msg, _ = _launch(lib, 5, 64 * 1024)
        assert err == _INVALID_VALUE and "48 KB" in msg, msg
    finally:
        lib.nolabels_sim_set_arch(90)


def test_launch_log_records_every_configuration(lib):
    lib.nolabels_sim_clear_launch_log()
    _launch(lib, 3, 96)  # block (32, 3)
    _launch(lib, 0, 70000)
    rec = (ctypes.c_longlong * 8)()
    got = []
    for i in range(lib.nolabels_sim_launch_count()):
        assert lib.nolabels_sim_launch_record(i, rec) == 0
        got.append(list(rec))
    assert got == [[1, 1, 1, 32, 3, 1, 0, 1], [1, 70000, 1, 1, 1, 1, 0, 0]]
