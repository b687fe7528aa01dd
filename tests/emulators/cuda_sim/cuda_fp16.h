// Test shim: see sim.h. IEEE binary16 <-> float.
#pragma once
#include "sim.h"

struct __half { uint16_t x; };
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline float __half2float(__half h) {
  const uint32_t s = (h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1f, m = h.x & 0x3ff;
  uint32_t bits;
  if (e == 0) {
    if (m == 0) { bits = s; } else {  // subnormal
      float f = std::ldexp(static_cast<float>(m), -24);
      std::memcpy(&bits, &f, 4);
      bits |= s;
    }
  } else if (e == 31) {
    bits = s | 0x7f800000u | (m << 13);
  } else {
    bits = s | ((e + 112) << 23) | (m << 13);
  }
  float f; std::memcpy(&f, &bits, 4); return f;
}
