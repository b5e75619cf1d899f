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

// Appends the payload of `e` for these words to `out` (padding included).
template <typename Word>
inline void encode_tile(const Word* words, uint32_t elems, uint32_t elem_bytes, TileEntry e,
                        std::vector<uint8_t>& out) {
  if (e.codec == kZero) return;
  const uint64_t start = out.size();
  out.resize(start + tile_payload_bytes(e, elems, elem_bytes), 0);
  uint8_t* low = out.data() + start;
  for (uint32_t j = 0; j < e.low_bytes; ++j)
    for (uint32_t i = 0; i < elems; ++i) low[(uint64_t)j * elems + i] = (uint8_t)((uint64_t)words[i] >> (8 * j));
  uint8_t* pos = low + (uint64_t)elems * e.low_bytes;
  uint8_t* hi = pos + 2ull * e.n_exc;
  const uint32_t high_planes = elem_bytes - e.low_bytes;
  uint32_t x = 0;
  for (uint32_t i = 0; i < elems && x < e.n_exc; ++i) {
    if (significant_bytes(words[i]) <= e.low_bytes) continue;
    pos[x] = (uint8_t)i;
    pos[e.n_exc + x] = (uint8_t)(i >> 8);
    for (uint32_t j = 0; j < high_planes; ++j)
      hi[(uint64_t)j * e.n_exc + x] = (uint8_t)((uint64_t)words[i] >> (8 * (e.low_bytes + j)));
    ++x;
  }
}

}  // namespace codec
}  // namespace xorgemm
