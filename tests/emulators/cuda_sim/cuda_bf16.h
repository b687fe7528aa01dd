// Test shim: see sim.h. bfloat16 is the top half of a float32.
#pragma once
#include "sim.h"

struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t bits = static_cast<uint32_t>(h.x) << 16; float f; std::memcpy(&f, &bits, 4); return f;
}
