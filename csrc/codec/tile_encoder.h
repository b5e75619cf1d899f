// Host-side tile encoder: picks the smallest codec of the family in tile_codec.h for one tile and writes
// its payload. The decoder side lives in tile_codec.h and is shared with CUDA; this side only runs at pack.
#pragma once

#include <stdint.h>

#include <vector>

#include "codec/tile_codec.h"

namespace xorgemm {
namespace codec {

// Number of significant bytes of a word: 0 for zero, else 1 + index of its highest nonzero byte.
inline uint32_t significant_bytes(uint64_t w) { return w ? (uint32_t)(64 - __builtin_clzll(w) + 7) / 8 : 0; }

// Chooses the codec by payload size. For each candidate low_bytes k, the words with more than k
// significant bytes become exceptions: size(k) = elems*k + n_exc(k)*(2 + elem_bytes - k).
template <typename Word>
inline TileEntry choose_tile_codec(const Word* words, uint32_t elems, uint32_t elem_bytes) {
  uint32_t count[9] = {0};  // count[s] = words with s significant bytes
  for (uint32_t i = 0; i < elems; ++i) ++count[significant_bytes(words[i])];
  TileEntry e{0, kZero, 0, 0};
  if (count[0] == elems) return e;
  uint64_t best = UINT64_MAX;
  uint32_t above = elems - count[0];  // words with more than k significant bytes, starting at k = 0
  for (uint32_t k = 0; k <= elem_bytes; ++k) {
    if (k > 0) above -= count[k];
    uint64_t size = (uint64_t)elems * k + (uint64_t)above * (2 + elem_bytes - k);
    if (size < best) {
      best = size;
      e.low_bytes = (uint8_t)k;
      e.n_exc = above;
    }
  }
  e.codec = e.low_bytes == 0 ? kSparse : (e.low_bytes == elem_bytes ? kRaw : kBytePlane);
  return e;
}

// Appends the payload of `e` for these words to `out` (padding included). `scratch` is reused between
// calls so the exception list is compacted without branches or allocations.
template <typename Word>
inline void encode_tile(const Word* words, uint32_t elems, uint32_t elem_bytes, TileEntry e,
                        std::vector<uint8_t>& out, std::vector<uint64_t>& scratch) {
  if (e.codec == kZero) return;
  const uint64_t start = out.size();
  out.resize(start + tile_payload_bytes(e, elems, elem_bytes), 0);
  uint8_t* low = out.data() + start;
  for (uint32_t j = 0; j < e.low_bytes; ++j)
    for (uint32_t i = 0; i < elems; ++i) low[(uint64_t)j * elems + i] = (uint8_t)((uint64_t)words[i] >> (8 * j));
  if (e.n_exc == 0) return;
  // Branch-free compaction: write every candidate, advance only past words with high bytes.
  scratch.resize(2 * (size_t)elems + 2);
  uint64_t* exc_pos = scratch.data();
  uint64_t* exc_high = scratch.data() + elems + 1;
  const uint32_t shift = 8 * e.low_bytes;  // < 64: exceptions exist only when low_bytes < elem_bytes
  uint32_t x = 0;
  for (uint32_t i = 0; i < elems; ++i) {
    const uint64_t high = (uint64_t)words[i] >> shift;
    exc_pos[x] = i;
    exc_high[x] = high;
    x += high != 0;
  }
  uint8_t* pos = low + (uint64_t)elems * e.low_bytes;
  uint8_t* hi = pos + 2ull * e.n_exc;
  for (uint32_t y = 0; y < e.n_exc; ++y) {
    pos[y] = (uint8_t)exc_pos[y];
    pos[e.n_exc + y] = (uint8_t)(exc_pos[y] >> 8);
  }
  for (uint32_t j = 0; j < elem_bytes - e.low_bytes; ++j)
    for (uint32_t y = 0; y < e.n_exc; ++y) hi[(uint64_t)j * e.n_exc + y] = (uint8_t)(exc_high[y] >> (8 * j));
}

}  // namespace codec
}  // namespace xorgemm
