// What lets a kernel header compile both for the GPU (nvcc) and for the CPU under the CUDA emulation of
// tests/cpp/cuda_emulation.h (XORGEMM_EMULATE), so the tests run the exact kernel source. Typed loads and
// stores are codec::load_as / store_as, which already take the memcpy branch in host code.
#pragma once

#include "codec/tile_codec.h"

#if defined(XORGEMM_EMULATE)
#define XG_DYNAMIC_SMEM(name) unsigned char* name = emulate::dynamic_smem()
#define XG_GRID_CONSTANT
#else
#define XG_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define XG_GRID_CONSTANT __grid_constant__
#endif

namespace xorgemm {
namespace cuda {

using codec::load_as;
using codec::store_as;

// ORs bits into a device error word, from any thread of any block.
__device__ __forceinline__ void atomic_or(uint32_t* p, uint32_t v) {
#if defined(XORGEMM_EMULATE)
  __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
#else
  atomicOr(p, v);
#endif
}

}  // namespace cuda
}  // namespace xorgemm
