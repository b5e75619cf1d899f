// The apply kernel's device code (see apply_delta.cu): out = base XOR delta, one CUDA block per tile. Kept
// apart from the host side so tests/cpp/kernel_emulation_test.cpp runs this exact source on the CPU.
#pragma once

#include <stdint.h>

#include "codec/tile_codec.h"
#include "cuda/emulatable.cuh"

namespace xorgemm {
namespace cuda {

using codec::TileEntry;

template <typename Word>
__global__ void apply_section_kernel(const uint8_t* __restrict__ section, const int64_t* __restrict__ offsets,
                                     const Word* __restrict__ base, Word* __restrict__ out, int64_t rows,
                                     int64_t cols, int tile_rows, int tile_cols, int64_t t0) {
  XG_DYNAMIC_SMEM(smem_raw);
  Word* tile = reinterpret_cast<Word*>(smem_raw);
  const int64_t t = t0 + blockIdx.x;
  const int64_t grid_cols = (cols + tile_cols - 1) / tile_cols;
  const int64_t r0 = t / grid_cols * tile_rows, c0 = t % grid_cols * tile_cols;
  const int h = (int)(rows - r0 < tile_rows ? rows - r0 : tile_rows);
  const int w = (int)(cols - c0 < tile_cols ? cols - c0 : tile_cols);
  const uint32_t elems = (uint32_t)h * w;
  TileEntry e;  // memcpy: a section may start at any byte (a span of a decompressed stream)
  memcpy(&e, section + t * sizeof(TileEntry), sizeof e);
  if (e.codec != codec::kZero) {
    const uint8_t* payload = section + offsets[t];
    codec::decode_tile_low<Word>(payload, e, elems, tile, threadIdx.x, blockDim.x);
    __syncthreads();
    codec::decode_tile_exceptions<Word>(payload, e, elems, tile, threadIdx.x, blockDim.x);
    __syncthreads();
  }
  // `out` starts at the first row of tile t0's grid row: a block of the tensor or the whole of it.
  const int64_t out_row0 = t0 / grid_cols * tile_rows;
  for (uint32_t i = threadIdx.x; i < elems; i += blockDim.x) {
    const int64_t row = r0 + i / w, col = c0 + i % w;
    const Word b = base[row * cols + col];
    out[(row - out_row0) * cols + col] = e.codec == codec::kZero ? b : (Word)(b ^ tile[i]);
  }
}

}  // namespace cuda
}  // namespace xorgemm
