// The apply kernel's device code (host side: apply_section.cu): out = the fine-tuned tensor from base and
// delta, one CUDA block (at most kApplyThreads threads) per tile. Kept apart from the host side so
// tests/cpp/kernel_emulation_test.cpp runs this exact source on the CPU.
#pragma once

#include <stdint.h>

#include "codec/tile_codec.h"
#include "cuda/emulatable.cuh"
#include "cuda/error_bits.h"
#include "format/tile_grid.h"

namespace xorgemm {
namespace cuda {

using codec::TileEntry;

constexpr uint32_t kApplyThreads = 256;

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
    if (threadIdx.x == 0) atomic_or(error, kErrorTile);  // other blocks may report too
    e = TileEntry{0, codec::kZero, 0, 0};
  }
  const uint64_t out_row0 = g.tile_row0(t0);
  const uint8_t* payload = section + offsets[t];
  if (e.codec == codec::kConditioned) {
    // The base tile is the decode's context: brought into shared memory and decoded there, in place.
    __shared__ uint8_t width[256];
    __shared__ uint32_t counts[2 * kApplyThreads];
    for (uint32_t i = threadIdx.x; i < elems; i += blockDim.x) tile[i] = base[(r0 + i / w) * cols + c0 + i % w];
    codec::ConditionedLayout l;
    bool ok = codec::conditioned_layout(payload, e, sizeof(Word), l);  // the same answer in every thread
    if (ok) {
      codec::conditioned_clear_widths(width, threadIdx.x, blockDim.x);
      __syncthreads();
      codec::conditioned_fill_widths(l, width, threadIdx.x, blockDim.x);
      __syncthreads();
      codec::conditioned_count<Word>(l, tile, elems, w, w, e, width, counts, threadIdx.x, blockDim.x);
      __syncthreads();
      ok = codec::conditioned_patch<Word>(payload, l, e, elems, w, tile, w, width, counts, threadIdx.x, blockDim.x);
    }
    // Any thread: slots that do not fit this base fail every thread alike before any write (the tile stays
    // the base); a stream validation would refuse fails only the chunks that meet it (theirs unspecified).
    if (!ok) atomic_or(error, kErrorTile);
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < elems; i += blockDim.x)
      out[(r0 + i / w - out_row0) * cols + c0 + i % w] = tile[i];
    return;
  }
  if (e.codec != codec::kZero) {
    codec::decode_tile_low<Word>(payload, e, elems, tile, threadIdx.x, blockDim.x);
    __syncthreads();
    codec::decode_tile_exceptions<Word>(payload, e, elems, tile, threadIdx.x, blockDim.x);
    __syncthreads();
  }
  for (uint32_t i = threadIdx.x; i < elems; i += blockDim.x) {
    const uint64_t row = r0 + i / w, col = c0 + i % w;
    const Word b = base[row * cols + col];
    out[(row - out_row0) * cols + col] = e.codec == codec::kZero ? b : (Word)(b ^ tile[i]);
  }
}

}  // namespace cuda
}  // namespace xorgemm
