// Host-side tile encoder: picks the smallest codec of the family in tile_codec.h for one tile and writes
// its payload. The decoder side lives in tile_codec.h and is shared with CUDA; this side only runs at pack.
#pragma once

#include <stdint.h>

#include <algorithm>
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

// The conditioned codec's encoder (layout: tile_codec.h). For each transform, each class of base words gets
// the slot width that minimizes its bytes: n * width bits for its slots, plus (2 + elem_bytes) bytes for
// each value longer than the width (an exception: 2 + high bytes, the same number for the whole tile); the
// smallest (transform, high bytes) wins. `size` receives the
// payload's bytes (padding included), to compare with the other codecs'.
struct ConditionedPlan {
  TileEntry entry{0, kConditioned, 0, 0};
  uint8_t width[256] = {0};
  uint64_t size = UINT64_MAX;
};

template <typename Word>
inline ConditionedPlan plan_conditioned(const Word* base, const Word* ft, uint32_t elems, uint32_t shift) {
  constexpr uint32_t kBits = 8 * sizeof(Word), kLens = kBits + 2;
  ConditionedPlan best;
  std::vector<uint32_t> hist(256 * kLens);  // per class: hist[l] = values of bit length >= l
  for (uint32_t transform : {kXorTransform, kDiffTransform}) {
    std::fill(hist.begin(), hist.end(), 0u);
    uint32_t count[256] = {0};
    for (uint32_t i = 0; i < elems; ++i) {
      const uint32_t c = base_class(base[i], shift);
      const Word v = conditioned_value<Word>(base[i], ft[i], transform);
      ++count[c];
      ++hist[c * kLens + (v ? 64 - (uint32_t)__builtin_clzll((uint64_t)v) : 0)];
    }
    for (uint32_t c = 0; c < 256; ++c)
      for (int len = (int)kBits - 1; len >= 0; --len) hist[c * kLens + len] += hist[c * kLens + len + 1];
    // Exceptions keep `high` bytes of what their slot cannot hold: a width is allowed only if every value
    // of the class fits it plus those bytes.
    for (uint32_t high = 1; high <= sizeof(Word); ++high) {
      ConditionedPlan plan;
      plan.entry.low_bytes = (uint8_t)(transform | shift << 1 | (high - 1) << 6);
      uint64_t slot_bits = 0, n_exc = 0;
      uint32_t n_classes = 0;
      for (uint32_t c = 0; c < 256; ++c) {
        if (!count[c]) continue;
        const uint32_t* h = &hist[c * kLens];
        uint64_t best_cost = UINT64_MAX;
        uint32_t best_w = 0;
        for (uint32_t w = 0; w <= kBits; ++w) {
          if (w + 8 * high < kBits && h[w + 8 * high + 1]) continue;  // a value too long for slot + high bytes
          const uint64_t cost = (uint64_t)count[c] * w + 8ull * (2 + high) * h[w + 1];  // h[w + 1]: exceptions
          if (cost < best_cost) {
            best_cost = cost;
            best_w = w;
          }
        }
        plan.width[c] = (uint8_t)best_w;
        slot_bits += (uint64_t)count[c] * best_w;
        n_exc += h[best_w + 1];
        n_classes += best_w != 0;
      }
      plan.entry.n_exc = (uint32_t)n_exc;
      const uint64_t header = conditioned_header_offset(plan.entry) + 2 + 2ull * n_classes;
      plan.size = align_up(align_up(header, 4) + (slot_bits + 7) / 8 + kConditionedSlack, kTileAlign);
      if (plan.size < best.size) best = plan;
    }
  }
  if (best.size / kTileAlign > 0xffff) best.size = UINT64_MAX;  // too big for the entry: never chosen
  best.entry.reserved = (uint16_t)(best.size / kTileAlign);
  return best;
}

// Appends the payload of `plan` for these words to `out`.
template <typename Word>
inline void encode_conditioned(const Word* base, const Word* ft, uint32_t elems, const ConditionedPlan& plan,
                               std::vector<uint8_t>& out) {
  const TileEntry e = plan.entry;
  const uint32_t shift = conditioned_shift(e), transform = conditioned_transform(e);
  const uint64_t start = out.size();
  out.resize(start + plan.size, 0);
  uint8_t* p = out.data() + start;
  const uint64_t h = conditioned_header_offset(e);
  uint32_t n_classes = 0;
  for (uint32_t c = 0; c < 256; ++c) {
    if (!plan.width[c]) continue;
    p[h + 2 + 2 * n_classes] = (uint8_t)c;
    p[h + 3 + 2 * n_classes] = plan.width[c];
    ++n_classes;
  }
  p[h] = (uint8_t)n_classes;
  p[h + 1] = (uint8_t)(n_classes >> 8);
  uint8_t* slots = p + align_up(h + 2 + 2ull * n_classes, 4);
  uint64_t acc = 0;  // bits not yet written, LSB first
  uint32_t pending = 0, x = 0;
  for (uint32_t i = 0; i < elems; ++i) {
    const uint64_t v = conditioned_value<Word>(base[i], ft[i], transform);
    const uint32_t w = plan.width[base_class(base[i], shift)];
    if (v >> w) {  // longer than its slot: the high part goes to the exception list
      p[x] = (uint8_t)i;
      p[e.n_exc + x] = (uint8_t)(i >> 8);
      for (uint32_t j = 0; j < conditioned_high_bytes(e); ++j)
        p[(2 + j) * (uint64_t)e.n_exc + x] = (uint8_t)((v >> w) >> (8 * j));
      ++x;
    }
    acc |= (v & ((1ull << w) - 1)) << pending;  // pending < 8, w <= 32: fits 64 bits
    pending += w;
    for (; pending >= 8; pending -= 8, acc >>= 8) *slots++ = (uint8_t)acc;
  }
  if (pending) *slots = (uint8_t)acc;
}

}  // namespace codec
}  // namespace xorgemm
