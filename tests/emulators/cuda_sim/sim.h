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
//   * atomics are real atomics (GCC __atomic builtins);
//   * synccheck: every barrier phase checks that all live threads (lanes) called the same
//     __syncthreads (warp collective) -- same source line and column; otherwise the
//     launch fails: cudaGetLastError() returns an error and nolabels_sim_error_message()
//     names the two call sites.
//   * launch limits, checked before a launch runs (a launch a GPU would reject fails
//     here too, cudaGetLastError() returning cudaErrorInvalidConfiguration or
//     cudaErrorInvalidValue and nolabels_sim_error_message() saying which limit):
//     grid.x <= 2^31-1, grid.y/z <= 65535, every grid dim >= 1; block.x/y <= 1024,
//     block.z <= 64, <= 1024 threads; dynamic shared memory <= 48 KB, or <= the
//     value a cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, v)
//     set for that kernel, and that v <= the simulated device's opt-in maximum
//     (sm_90: 227 KB, sm_80: 163 KB; default sm_90, set by the environment variable
//     NOLABELS_SIM_ARCH=sm_80|sm_90 or nolabels_sim_set_arch(80|90));
//   * a launch log (grid, block, dynamic smem of every launch, accepted or not) that
//     tests read through nolabels_sim_launch_count / nolabels_sim_launch_record.
// Not modelled: timing, memory-ordering subtleties beyond barriers, static shared
// memory (the `static` arrays are not counted against the per-block limit), registers
// per thread, warp-synchronous code without __syncwarp (undefined since Volta), and
// inline PTX (kernels using it cannot be compiled here).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cstdlib>
#include <map>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
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

using Site = std::source_location;
struct Block;
// Run once per barrier phase, after every live thread (lane) arrived and before any
// leaves: check that all of them called the same barrier (synccheck) and publish
// the __syncthreads_count accumulator of the phase.
struct BlockPhase {
  Block* b;
  void operator()() noexcept;
};
struct WarpPhase {
  Block* b;
  unsigned warp;
  void operator()() noexcept;
};

struct Block {
  std::vector<unsigned char, std::allocator<unsigned char>> dyn_smem;  // extern __shared__
  std::unique_ptr<std::barrier<BlockPhase>> block_bar;
  std::vector<std::unique_ptr<std::barrier<WarpPhase>>> warp_bar;
  std::atomic<int> count_acc{0};
  int count_result = 0;
  std::vector<std::array<unsigned char, 64>> slots;  // one per thread, for warp exchanges
  std::vector<Site> block_site, warp_site;           // per thread: the barrier it waits at
  std::vector<char> exited;                          // per thread: returned from the kernel
};

// First error of the running launch (synccheck); returned by cudaGetLastError().
inline std::mutex g_error_mu;
inline std::string g_error_message;
inline int g_error_code = 0;
inline void report(const std::string& msg, int code = 4 /* cudaErrorLaunchFailure */) {
  std::lock_guard<std::mutex> lock(g_error_mu);
  if (g_error_code == 0) {
    g_error_code = code;
    g_error_message = msg;
  }
}

// The simulated device's launch limits (CUDA programming guide, "Technical Specifications
// per Compute Capability"); only the shared-memory opt-in differs between sm_80 and sm_90.
struct DeviceLimits {
  int arch;                  // 80 or 90
  size_t smem_optin;         // cudaDevAttrMaxSharedMemoryPerBlockOptin
};
constexpr unsigned kMaxGridX = 0x7fffffffu, kMaxGridYZ = 65535u;
constexpr unsigned kMaxThreads = 1024u, kMaxBlockXY = 1024u, kMaxBlockZ = 64u;
constexpr size_t kDefaultDynSmem = 48 * 1024;  // without the opt-in attribute
inline DeviceLimits limits_for(int arch) {
  return arch == 80 ? DeviceLimits{80, 163 * 1024} : DeviceLimits{90, 227 * 1024};
}
inline DeviceLimits initial_device() {
  const char* a = std::getenv("NOLABELS_SIM_ARCH");
  return limits_for(a && std::strcmp(a, "sm_80") == 0 ? 80 : 90);
}
inline std::mutex g_attr_mu;
inline DeviceLimits g_device = initial_device();
inline std::map<const void*, size_t> g_max_dyn_smem;  // per kernel, set by cudaFuncSetAttribute

// Every launch's configuration, in order (accepted or rejected).
struct LaunchRecord {
  unsigned grid[3], block[3];
  size_t smem;
  int accepted;
};
inline std::vector<LaunchRecord> g_launch_log;

// Why the configuration would be rejected by a GPU ("" when it is accepted); *code: the
// cudaError_t the CUDA runtime returns for it.
inline std::string launch_violation(const void* kernel, dim3 grid, dim3 block, size_t smem, int* code) {
  auto dims = [](dim3 d) {
    return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
  };
  *code = 9;  // cudaErrorInvalidConfiguration
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "grid " + dims(grid) + " has a zero dimension";
  if (grid.x > kMaxGridX) return "grid.x = " + std::to_string(grid.x) + " > 2^31-1";
  if (grid.y > kMaxGridYZ) return "grid.y = " + std::to_string(grid.y) + " > 65535";
  if (grid.z > kMaxGridYZ) return "grid.z = " + std::to_string(grid.z) + " > 65535";
  if (block.x == 0 || block.y == 0 || block.z == 0) return "block " + dims(block) + " has a zero dimension";
  if (block.x > kMaxBlockXY || block.y > kMaxBlockXY || block.z > kMaxBlockZ)
    return "block " + dims(block) + " exceeds (1024, 1024, 64)";
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads > kMaxThreads) return "block " + dims(block) + " has " + std::to_string(threads) + " > 1024 threads";
  size_t allowed = kDefaultDynSmem;
  {
    std::lock_guard<std::mutex> lock(g_attr_mu);
    auto it = g_max_dyn_smem.find(kernel);
    if (it != g_max_dyn_smem.end()) allowed = it->second;
  }
  if (smem > allowed) {
    *code = 1;  // cudaErrorInvalidValue
    return "dynamic shared memory " + std::to_string(smem) + " B > the kernel's maximum " +
           std::to_string(allowed) + " B" +
           (allowed == kDefaultDynSmem ? " (48 KB without cudaFuncSetAttribute(MaxDynamicSharedMemorySize))" : "");
  }
  return "";
}
inline std::string where(const Site& s) { return std::string(s.file_name()) + ":" + std::to_string(s.line()); }
inline bool same(const Site& a, const Site& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}
inline void check_sites(const Block& b, const std::vector<Site>& sites, unsigned lo, unsigned hi,
                        const char* what) {
  int first = -1;
  for (unsigned t = lo; t < hi; ++t) {
    if (b.exited[t]) continue;
    if (first < 0) {
      first = static_cast<int>(t);
    } else if (!same(sites[t], sites[first])) {
      report(std::string("divergent ") + what + ": thread " + std::to_string(first) + " at " +
             where(sites[first]) + ", thread " + std::to_string(t) + " at " + where(sites[t]));
      return;
    }
  }
}
inline void BlockPhase::operator()() noexcept {
  b->count_result = b->count_acc.exchange(0);
  check_sites(*b, b->block_site, 0, static_cast<unsigned>(b->exited.size()), "__syncthreads");
}
inline void WarpPhase::operator()() noexcept {
  const unsigned lo = 32 * warp, hi = std::min<unsigned>(lo + 32, static_cast<unsigned>(b->exited.size()));
  check_sites(*b, b->warp_site, lo, hi, "warp-collective (shuffle, vote, ldmatrix, mma)");
}

inline Block* g_block = nullptr;
inline thread_local unsigned t_linear = 0;  // linear thread index in the block

inline void block_wait(const Site& at) {
  g_block->block_site[t_linear] = at;
  g_block->block_bar->arrive_and_wait();
}
inline void warp_wait(const Site& at) {
  g_block->warp_site[t_linear] = at;
  g_block->warp_bar[t_linear / 32]->arrive_and_wait();
}

}  // namespace sim

// One translation unit per build (the .cu plus its test API), so a plain definition is fine.
extern "C" __attribute__((used)) const char* nolabels_sim_error_message() { return sim::g_error_message.c_str(); }
// The launch log and the simulated device (see sim.h's header comment).
extern "C" __attribute__((used)) int nolabels_sim_launch_count() { return static_cast<int>(sim::g_launch_log.size()); }
// out: grid x, y, z, block x, y, z, dynamic smem bytes, accepted (0/1).
extern "C" __attribute__((used)) int nolabels_sim_launch_record(int i, long long* out) {
  if (i < 0 || i >= static_cast<int>(sim::g_launch_log.size())) return 1;
  const auto& r = sim::g_launch_log[i];
  const long long v[8] = {r.grid[0], r.grid[1], r.grid[2], r.block[0], r.block[1], r.block[2],
                          static_cast<long long>(r.smem), r.accepted};
  for (int j = 0; j < 8; ++j) out[j] = v[j];
  return 0;
}
extern "C" __attribute__((used)) void nolabels_sim_clear_launch_log() { sim::g_launch_log.clear(); }
// 80 or 90 (anything else: 90); forgets the attributes set so far, like a fresh context.
extern "C" __attribute__((used)) void nolabels_sim_set_arch(int arch) {
  std::lock_guard<std::mutex> lock(sim::g_attr_mu);
  sim::g_device = sim::limits_for(arch);
  sim::g_max_dyn_smem.clear();
}

inline dim3 blockDim, gridDim;
inline thread_local dim3 threadIdx, blockIdx;
constexpr int warpSize = 32;

using SiteHere = std::source_location;  // default arguments below record the call site

inline void __syncthreads(SiteHere at = SiteHere::current()) { sim::block_wait(at); }
// Barrier that also returns how many live threads passed a non-zero predicate.
inline int __syncthreads_count(int pred, SiteHere at = SiteHere::current()) {
  if (pred) sim::g_block->count_acc.fetch_add(1);
  sim::block_wait(at);
  return sim::g_block->count_result;  // stable until every thread reaches the next barrier
}
inline int __syncthreads_or(int pred, SiteHere at = SiteHere::current()) { return __syncthreads_count(pred, at) != 0; }
inline void __syncwarp(unsigned = 0xffffffffu, SiteHere at = SiteHere::current()) { sim::warp_wait(at); }

namespace sim {
template <class T>
T shfl_from(T v, unsigned src_lane_fn(unsigned, int), int arg, const Site& at) {
  static_assert(sizeof(T) <= 64, "shuffle of a type over 64 bytes");
  const unsigned lane = t_linear % 32, warp = t_linear / 32;
  std::memcpy(g_block->slots[t_linear].data(), &v, sizeof(T));
  warp_wait(at);
  unsigned src = src_lane_fn(lane, arg);
  T out = v;
  if (src < 32 && warp * 32 + src < g_block->slots.size()) std::memcpy(&out, g_block->slots[warp * 32 + src].data(), sizeof(T));
  warp_wait(at);
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
std::array<T, 32> warp_allgather(const T& v, const Site& at = Site::current()) {
  static_assert(sizeof(T) <= 64, "allgather of a type over 64 bytes");
  const unsigned warp = t_linear / 32;
  std::memcpy(g_block->slots[t_linear].data(), &v, sizeof(T));
  warp_wait(at);
  std::array<T, 32> out;
  for (unsigned l = 0; l < 32; ++l) std::memcpy(&out[l], g_block->slots[warp * 32 + l].data(), sizeof(T));
  warp_wait(at);
  return out;
}
// Base of the block's dynamic shared memory (``extern __shared__`` arrays).
inline unsigned char* dynamic_smem() { return g_block->dyn_smem.data(); }
}  // namespace sim

template <class T> T __shfl_xor_sync(unsigned, T v, int m, int = 32, SiteHere at = SiteHere::current()) {
  return sim::shfl_from(v, sim::lane_xor, m, at);
}
template <class T> T __shfl_sync(unsigned, T v, int s, int = 32, SiteHere at = SiteHere::current()) {
  return sim::shfl_from(v, sim::lane_idx, s, at);
}
template <class T> T __shfl_down_sync(unsigned, T v, unsigned d, int = 32, SiteHere at = SiteHere::current()) {
  return sim::shfl_from(v, sim::lane_down, static_cast<int>(d), at);
}
template <class T> T __shfl_up_sync(unsigned, T v, unsigned d, int = 32, SiteHere at = SiteHere::current()) {
  return sim::shfl_from(v, sim::lane_up, static_cast<int>(d), at);
}

// Warp votes over the lanes named in the mask (all of them must call).
inline unsigned __ballot_sync(unsigned mask, int pred, SiteHere at = SiteHere::current()) {
  const auto all = sim::warp_allgather(static_cast<int>(pred != 0), at);
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && all[l]) out |= 1u << l;
  return out;
}
inline int __any_sync(unsigned mask, int pred, SiteHere at = SiteHere::current()) {
  return __ballot_sync(mask, pred, at) != 0;
}
inline int __all_sync(unsigned mask, int pred, SiteHere at = SiteHere::current()) {
  return __ballot_sync(mask, pred, at) == mask;
}

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
// The <<<grid, block[, smem[, stream]]>>> of a launch.
struct LaunchCfg {
  dim3 grid, block;
  size_t smem;
  LaunchCfg(dim3 g, dim3 b, size_t sm = 0, void* /*stream*/ = nullptr) : grid(g), block(b), smem(sm) {}
};

template <class... P, class... A>
void launch(void (*kernel)(P...), const LaunchCfg& cfg, A&&... args) {
  const dim3 grid = cfg.grid, block = cfg.block;
  const size_t smem = cfg.smem;
  int code = 0;
  const std::string bad = launch_violation(reinterpret_cast<const void*>(kernel), grid, block, smem, &code);
  g_launch_log.push_back({{grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, smem, bad.empty() ? 1 : 0});
  if (!bad.empty()) {  // the GPU refuses the launch: nothing runs
    report("launch rejected: " + bad, code);
    return;
  }
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
        b.block_bar = std::make_unique<std::barrier<BlockPhase>>(nthreads, BlockPhase{&b});
        for (unsigned w = 0; w < nwarps; ++w)
          b.warp_bar.push_back(
              std::make_unique<std::barrier<WarpPhase>>(std::min(32u, nthreads - 32 * w), WarpPhase{&b, w}));
        b.slots.resize(nthreads);
        b.block_site.resize(nthreads, Site::current());
        b.warp_site.resize(nthreads, Site::current());
        b.exited.assign(nthreads, 0);
        g_block = &b;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t] {
            t_linear = t;
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            body();
            // an exited thread no longer takes part in barriers (nor in their site checks)
            b.exited[t] = 1;
            b.block_bar->arrive_and_drop();
            b.warp_bar[t / 32]->arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
        g_block = nullptr;
      }
}
}  // namespace sim
