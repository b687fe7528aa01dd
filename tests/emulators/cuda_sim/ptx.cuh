// CPU models of kernels/ptx.cuh (same names and signatures), for the simulator in sim.h.
// Written from the PTX ISA's definitions of the instructions, not from the kernels:
//
//   cp.async.cg.shared.global [dst], [src], 16, src_size: copies src_size bytes and
//     zero-fills the rest of the 16. Completion: by default a copy lands only when the
//     issuing thread's cp.async.wait_group lets its group complete (the latest the ISA
//     allows, so a read before the wait sees stale data); with SIM_CP_ASYNC_AT_ISSUE
//     it lands at once (the earliest, so a write-after-read race between pipeline
//     stages hits the reader). The tests build both.
//   ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane 8 i + j supplies the address of
//     row j of matrix i (16 bytes); register i of lane l receives the 32-bit word
//     (l % 4) of row l / 4 of matrix i.
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: g = lane / 4, t = lane % 4;
//     A regs a0..a3 hold (row g, k 2t..2t+1), (row g+8, k 2t..), (row g, k 2t+8..),
//     (row g+8, k 2t+8..), lower k in the low half; B regs b0, b1 hold (k 2t..2t+1,
//     n g), (k 2t+8..2t+9, n g); C/D c0..c3 are (row g, n 2t), (g, 2t+1), (g+8, 2t),
//     (g+8, 2t+1). Products are summed in float (real tensor cores differ in the last
//     bits only).
//   ex2.approx.ftz.f32: 2^x (exp2f here).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_fp16.h"
#include "sim.h"

namespace nolabels {
namespace ptx {

namespace detail {
struct Copy {
  unsigned char* dst;
  unsigned char bytes[16];
};
inline thread_local std::vector<std::vector<Copy>> committed;  // oldest first
inline thread_local std::vector<Copy> open_group;
inline void land(const std::vector<Copy>& g) {
  for (const Copy& c : g) std::memcpy(c.dst, c.bytes, 16);
}
inline unsigned char* at(uint32_t addr) { return sim::dynamic_smem() + addr; }
inline float b16_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return __half2float(__half{h});
}
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  const auto all = sim::warp_allgather(Frag{{a[0], a[1], a[2], a[3]}, {b0, b1}});
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const Frag& f = all[l];
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int r = 0; r < 4; ++r) {
      A[ar[r]][ac[r]] = b16_to_float(static_cast<uint16_t>(f.a[r] & 0xffffu), bf16);
      A[ar[r]][ac[r] + 1] = b16_to_float(static_cast<uint16_t>(f.a[r] >> 16), bf16);
    }
    const int bk[2] = {2 * t, 2 * t + 8};
    for (int r = 0; r < 2; ++r) {
      B[bk[r]][g] = b16_to_float(static_cast<uint16_t>(f.b[r] & 0xffffu), bf16);
      B[bk[r] + 1][g] = b16_to_float(static_cast<uint16_t>(f.b[r] >> 16), bf16);
    }
  }
  const int lane = static_cast<int>(sim::t_linear % 32), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float s = d[i];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[i] = s;
  }
}
}  // namespace detail

inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - sim::dynamic_smem());
}
inline float opaque_zero() { return 0.f; }
inline float fast_exp2(float x) { return exp2f(x); }

inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  detail::Copy c{detail::at(dst), {}};
  std::memcpy(c.bytes, src, static_cast<size_t>(src_bytes));  // rest stays zero
#ifdef SIM_CP_ASYNC_AT_ISSUE
  std::memcpy(c.dst, c.bytes, 16);
#else
  detail::open_group.push_back(c);
#endif
}
inline void cp_async_commit() {
  detail::committed.push_back(std::move(detail::open_group));
  detail::open_group.clear();
}
template <int N>
void cp_async_wait() {
  auto& q = detail::committed;
  while (q.size() > static_cast<size_t>(N)) {
    detail::land(q.front());
    q.erase(q.begin());
  }
}

inline void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  const uint32_t v[4] = {a, b, c, d};
  std::memcpy(detail::at(addr), v, 16);
}
inline uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  std::memcpy(&v, detail::at(addr), 16);
  return v;
}

inline void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  const auto rows = sim::warp_allgather(addr);
  const int lane = static_cast<int>(sim::t_linear % 32);
  uint32_t* out[4] = {&r0, &r1, &r2, &r3};
  for (int i = 0; i < 4; ++i) std::memcpy(out[i], detail::at(rows[8 * i + lane / 4]) + 4 * (lane % 4), 4);
}

inline void mma_16816_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::mma(d, a, b0, b1, true);
}
inline void mma_16816_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::mma(d, a, b0, b1, false);
}

}  // namespace ptx
}  // namespace nolabels
