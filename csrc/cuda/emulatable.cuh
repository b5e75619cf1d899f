// What lets a kernel header compile both for the GPU (nvcc) and for the CPU under the CUDA emulation of
// tests/cpp/cuda_emulation.h (XORGEMM_EMULATE), so the tests run the exact kernel source.
#pragma once

#include <string.h>

#if defined(XORGEMM_EMULATE)
#define XG_DYNAMIC_SMEM(name) unsigned char* name = emulate::dynamic_smem()
#define XG_GRID_CONSTANT
#else
#define XG_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define XG_GRID_CONSTANT __grid_constant__
#endif

namespace xorgemm {
namespace cuda {

// Typed loads from byte or 16-bit buffers: plain loads on the GPU; memcpy in the CPU emulation, where
// reading an array through another type is undefined behaviour.
#if defined(XORGEMM_EMULATE)
template <typename T>
inline T load_as(const void* p) {
  T v;
  memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store_as(void* p, const T& v) {
  memcpy(p, &v, sizeof v);
}
#else
template <typename T>
__device__ __forceinline__ T load_as(const void* p) {
  return *reinterpret_cast<const T*>(p);
}
template <typename T>
__device__ __forceinline__ void store_as(void* p, const T& v) {
  *reinterpret_cast<T*>(p) = v;
}
#endif

}  // namespace cuda
}  // namespace xorgemm
