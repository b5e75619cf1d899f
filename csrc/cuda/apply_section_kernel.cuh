// The apply kernel's device code (host side: apply_section.cu): out = base XOR delta, one CUDA block per
// tile. Kept apart from the host side so tests/cpp/kernel_emulation_test.cpp runs this exact source on the CPU.
#pragma once

#include <stdint.h>

#include "codec/tile_codec.h"
#include "cuda/emulatable.cuh"
#include "cuda/error_bits.h"
#include "format/tile_grid.h"

namespace xorgemm {
namespace cuda {

using codec::TileEntry;

// Tile t0 + blockIdx.x of grid g. `out` starts at the first row of tile t0's grid row: a block of grid rows
// of the tensor (the patched-block path) or the whole of it. A tile that is not readable inside the
// section's `len` bytes (codec::tile_readable) is left as the base and raises kErrorTile in `*error`, instead of
// reading outside the section (see the fused kernel's checked_entry).
template <typename Word>
__global__ void apply_section_kernel(const uint8_t* __restrict__ section, const int64_t* __restrict__ offsets,
                                     uint64_t len, const Word* __restrict__ base, Word* __restrict__ out,
                                     format::TileGrid g, int64_t t0, uint32_t* error) {
  XG_DYNAMIC_SMEM(smem_raw);
  Word* tile = reinterpret_cast<Word*>(smem_raw);
  const uint64_t t = t0 + blockIdx.x;
  const uint64_t r0 = g.tile_row0(t), c0 = g.tile_col0(t), cols = g.cols;
  const uint32_t w = g.tile_width(t), elems = g.tile_height(t) * w;
  TileEntry e = codec::load_entry(section, t);
  if (!codec::tile_readable(e, elems, sizeof(Word), (uint64_t)offsets[t], g.table_bytes(), len)) {
    if (threadIdx.x == 0) *error |= kErrorTile;
    e = TileEntry{0, codec::kZero, 0, 0};
  }
  if (e.codec != codec::kZero) {
    const uint8_t* payload = section + offsets[t];
    codec::decode_tile_low<Word>(payload, e, elems, tile, threadIdx.x, blockDim.x);
    __syncthreads();
    codec::decode_tile_exceptions<Word>(payload, e, elems, tile, threadIdx.x, blockDim.x);
    __syncthreads();
  }
  const uint64_t out_row0 = g.tile_row0(t0);
  for (uint32_t i = threadIdx.x; i < elems; i += blockDim.x) {
    const uint64_t row = r0 + i / w, col = c0 + i % w;
    const Word b = base[row * cols + col];
    out[(row - out_row0) * cols + col] = e.codec == codec::kZero ? b : (Word)(b ^ tile[i]);
  }
}

}  // namespace cuda
}  // namespace xorgemm
