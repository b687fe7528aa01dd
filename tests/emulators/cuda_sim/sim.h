// CUDA on the CPU, for tests: the *unchanged* source of a .cu file compiles with g++
// against these headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h in this folder)
// and each CUDA thread runs as a std::thread, so kernels are checked without a GPU.
//
// What is modelled (from the CUDA programming guide):
//   * a launch runs its blocks one after another; a block runs blockDim threads
//     concurrently, with threadIdx/blockIdx thread_local and blockDim/gridDim global;
//   * __shared__ is `static` (one block at a time, so a static is the block's shared
//     memory; it is NOT zeroed between blocks, like real shared memory); the dynamic
//     `extern __shared__` array is a per-block buffer of the launch's size, filled
//     with 0xff bytes (NaN as float) so reads of unwritten shared memory show;
//   * kernels/ptx.cuh's inline PTX is replaced by ptx.cuh in this folder;
//   * __syncthreads() is a barrier over the block's live threads (__syncthreads_count
//     and _or too, counting the predicate over them), __syncwarp() and
//     the *_sync shuffles a barrier over the warp's live lanes; a thread that returns
//     leaves both (as exited threads do on the hardware);
//   * __shfl_xor_sync / __shfl_sync / __shfl_down_sync / __shfl_up_sync and the votes
//     __ballot_sync / __any_sync / __all_sync exchange
//     through a per-warp slot array between two warp barriers, so every lane named in
//     the mask must reach the call, as the hardware requires;
//   * atomics are real atomics (GCC __atomic builtins).
// Not modelled: timing, memory-ordering subtleties beyond barriers, the 48 KB shared
// memory limit, warp-synchronous code without __syncwarp (undefined since Volta), and
// inline PTX (kernels using it cannot be compiled here).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace sim {

struct Block;
// Runs once per block-barrier phase, after every live thread arrived and before any
// leaves: publishes the __syncthreads_count accumulator of that phase.
struct PhaseDone {
  Block* b;
  void operator()() noexcept;
};

struct Block {
  std::vector<unsigned char, std::allocator<unsigned char>> dyn_smem;  // extern __shared__
  std::unique_ptr<std::barrier<PhaseDone>> block_bar;
  std::atomic<int> count_acc{0};
  int count_result = 0;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<std::array<unsigned char, 64>> slots;  // one per thread, for warp exchanges
};

inline void PhaseDone::operator()() noexcept { b->count_result = b->count_acc.exchange(0); }

inline Block* g_block = nullptr;
inline thread_local unsigned t_linear = 0;  // linear thread index in the block

}  // namespace sim

inline dim3 blockDim, gridDim;
inline thread_local dim3 threadIdx, blockIdx;
constexpr int warpSize = 32;

inline void __syncthreads() { sim::g_block->block_bar->arrive_and_wait(); }
// Barrier that also returns how many live threads passed a non-zero predicate.
inline int __syncthreads_count(int pred) {
  if (pred) sim::g_block->count_acc.fetch_add(1);
  sim::g_block->block_bar->arrive_and_wait();
  return sim::g_block->count_result;  // stable until every thread reaches the next barrier
}
inline int __syncthreads_or(int pred) { return __syncthreads_count(pred) != 0; }
inline void __syncwarp(unsigned = 0xffffffffu) { sim::g_block->warp_bar[sim::t_linear / 32]->arrive_and_wait(); }

namespace sim {
template <class T>
T shfl_from(T v, unsigned src_lane_fn(unsigned, int), int arg) {
  static_assert(sizeof(T) <= 64, "shuffle of a type over 64 bytes");
  const unsigned lane = t_linear % 32, warp = t_linear / 32;
  std::memcpy(g_block->slots[t_linear].data(), &v, sizeof(T));
  g_block->warp_bar[warp]->arrive_and_wait();
  unsigned src = src_lane_fn(lane, arg);
  T out = v;
  if (src < 32 && warp * 32 + src < g_block->slots.size()) std::memcpy(&out, g_block->slots[warp * 32 + src].data(), sizeof(T));
  g_block->warp_bar[warp]->arrive_and_wait();
  return out;
}
inline unsigned lane_xor(unsigned l, int m) { return l ^ static_cast<unsigned>(m); }
inline unsigned lane_idx(unsigned, int s) { return static_cast<unsigned>(s) & 31u; }
inline unsigned lane_down(unsigned l, int d) { return l + d < 32 ? l + d : l; }
inline unsigned lane_up(unsigned l, int d) { return static_cast<int>(l) - d >= 0 ? l - d : l; }
}  // namespace sim

namespace sim {
// Every lane's v, in lane order (a warp-collective: all 32 lanes must call it).
template <class T>
std::array<T, 32> warp_allgather(const T& v) {
  static_assert(sizeof(T) <= 64, "allgather of a type over 64 bytes");
  const unsigned warp = t_linear / 32;
  std::memcpy(g_block->slots[t_linear].data(), &v, sizeof(T));
  g_block->warp_bar[warp]->arrive_and_wait();
  std::array<T, 32> out;
  for (unsigned l = 0; l < 32; ++l) std::memcpy(&out[l], g_block->slots[warp * 32 + l].data(), sizeof(T));
  g_block->warp_bar[warp]->arrive_and_wait();
  return out;
}
// Base of the block's dynamic shared memory (``extern __shared__`` arrays).
inline unsigned char* dynamic_smem() { return g_block->dyn_smem.data(); }
}  // namespace sim

template <class T> T __shfl_xor_sync(unsigned, T v, int m, int = 32) { return sim::shfl_from(v, sim::lane_xor, m); }
template <class T> T __shfl_sync(unsigned, T v, int s, int = 32) { return sim::shfl_from(v, sim::lane_idx, s); }
template <class T> T __shfl_down_sync(unsigned, T v, unsigned d, int = 32) { return sim::shfl_from(v, sim::lane_down, static_cast<int>(d)); }
template <class T> T __shfl_up_sync(unsigned, T v, unsigned d, int = 32) { return sim::shfl_from(v, sim::lane_up, static_cast<int>(d)); }

// Warp votes over the lanes named in the mask (all of them must call).
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const auto all = sim::warp_allgather(static_cast<int>(pred != 0));
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && all[l]) out |= 1u << l;
  return out;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

template <class T> T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <class T> T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
  return old;
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
using std::isfinite;  // fmaxf, fminf, sqrtf, fmaf, exp2f, ...: the C library's, from <cmath>
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <class T> T __ldg(const T* p) { return *p; }
template <class A, class B> auto min(A a, B b) { return a < b ? a : b; }
template <class A, class B> auto max(A a, B b) { return a < b ? b : a; }
#define __noinline__ __attribute__((noinline))
#define __align__(n) alignas(n)

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace sim {
// Run kernel(args...) over grid x block threads; blocks in order, threads concurrently.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, void* /*stream*/, A&&... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned nwarps = (nthreads + 31) / 32;
  std::function<void()> body = [&] { kernel(static_cast<P>(args)...); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        // Fresh shared memory holds garbage on a GPU: all-ones bytes read as NaN floats
        // here, so a read of never-written shared memory shows up in the results.
        b.dyn_smem.assign(smem + 128, 0xff);
        b.block_bar = std::make_unique<std::barrier<PhaseDone>>(nthreads, PhaseDone{&b});
        for (unsigned w = 0; w < nwarps; ++w)
          b.warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32u, nthreads - 32 * w)));
        b.slots.resize(nthreads);
        g_block = &b;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t] {
            t_linear = t;
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            body();
            // an exited thread no longer takes part in barriers
            b.block_bar->arrive_and_drop();
            b.warp_bar[t / 32]->arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
        g_block = nullptr;
      }
}
}  // namespace sim
