// Test shim: see sim.h.
#pragma once
#include "sim.h"

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
// The simulator's launch errors (synccheck); like CUDA, reading the error resets it.
inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(sim::g_error_mu);
  const int e = sim::g_error_code;
  sim::g_error_code = 0;
  return static_cast<cudaError_t>(e);
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : sim::g_error_message.c_str();
}
// Only the dynamic shared-memory opt-in is modelled: it must not exceed the simulated
// device's opt-in maximum (sim::g_device), and sets the kernel's launch limit.
template <class F> cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  std::lock_guard<std::mutex> lock(sim::g_attr_mu);
  if (value < 0 || static_cast<size_t>(value) > sim::g_device.smem_optin) return cudaErrorInvalidValue;
  sim::g_max_dyn_smem[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
