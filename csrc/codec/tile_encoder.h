// Host-side tile encoder: picks the smallest codec of the family in tile_codec.h for one tile and writes
// its payload. The decoder side lives in tile_codec.h and is shared with CUDA; this side only runs at pack.
#pragma once

#include <stdint.h>

#include <string.h>

#include <algorithm>
#include <cmath>
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

// The conditioned codec's encoder (layout: tile_codec.h). The transform is the one whose values have the
// fewer significant bits in all (the difference, nearly always, on float weights). Each class of base words
// then gets the Rice parameter k that minimizes its estimated bits: n * (k + 1) for slots and terminators,
// the sum of min(q, escape) for the unary runs, (2 + high_bytes) bytes for each escape. The estimate comes
// from a histogram of the values' bit lengths and their sums per length (floor(v / 2^k) summed as if
// v mod 2^k were uniform), so planning costs O(1) a value. The smallest (high bytes) wins. The plan is
// then encoded, which gives its exact size (encode_conditioned) to compare with the other codecs'.
struct ConditionedPlan {
  TileEntry entry{0, kConditioned, 0, 0};  // n_exc and reserved are set by encode_conditioned
  uint8_t width[256] = {0};
  uint32_t n_classes = 0;  // classes of nonzero width
};

template <typename Word>
inline ConditionedPlan plan_conditioned(const Word* base, const Word* ft, uint32_t elems, uint32_t shift) {
  constexpr uint32_t kBits = 8 * sizeof(Word), kLens = kBits + 1;
  static_assert(kRiceEscape == 1u << 4, "escapes are the values 4 bits longer than their slot");
  struct Stats {
    uint32_t count[256][kLens];  // values of each bit length, per class
    uint64_t sum[256][kLens];    // and their sum
  };
  thread_local Stats tls_stats;  // only the rows of the classes present are cleared and read
  Stats& st = tls_stats;         // one TLS lookup, not one per element
  // floor(v / 2^k) summed over a bit length's values, as if v mod 2^k were uniform.
  static const struct Scales {
    double scale[kBits + 1], half_mod[kBits + 1];  // 2^-k, (2^k - 1) / 2
    Scales() {
      for (uint32_t k = 0; k <= kBits; ++k) {
        scale[k] = std::ldexp(1.0, -(int)k);
        half_mod[k] = (std::ldexp(1.0, (int)k) - 1) / 2;
      }
    }
  } sc;
  // Branch-free: 63 - clz(2v + 1) is 0 for v = 0 and 64 - clz(v) otherwise (values have at most 32 bits).
  const auto bit_length = [](uint64_t v) { return 63 - (uint32_t)__builtin_clzll((v << 1) | 1); };
  uint64_t xor_bits = 0, diff_bits = 0;
  for (uint32_t i = 0; i < elems; i += 4) {  // every fourth element is enough to pick a transform
    xor_bits += bit_length(conditioned_value<Word>(base[i], ft[i], kXorTransform));
    diff_bits += bit_length(conditioned_value<Word>(base[i], ft[i], kDiffTransform));
  }
  const uint32_t transform = xor_bits < diff_bits ? kXorTransform : kDiffTransform;
  uint32_t n_class[256] = {0}, present[256], n_present = 0;
  for (uint32_t i = 0; i < elems; ++i) {
    const uint32_t c = base_class(base[i], shift);
    if (n_class[c]++ == 0) {
      present[n_present++] = c;
      memset(st.count[c], 0, sizeof st.count[c]);
      memset(st.sum[c], 0, sizeof st.sum[c]);
    }
    const uint64_t v = conditioned_value<Word>(base[i], ft[i], transform);
    const uint32_t len = bit_length(v);
    ++st.count[c][len];
    st.sum[c][len] += v;
  }
  ConditionedPlan best;
  double best_cost = 1e300;
  for (uint32_t high = 1; high <= sizeof(Word); ++high) {
    ConditionedPlan plan;
    plan.entry.low_bytes = (uint8_t)(transform | shift << 1 | (high - 1) << 6);
    double cost = 0;  // bits
    for (uint32_t j = 0; j < n_present; ++j) {
      const uint32_t c = present[j], n = n_class[c];
      uint32_t longest = kBits;
      while (longest > 0 && st.count[c][longest] == 0) --longest;
      uint32_t above = 0;  // values longer than k + log2(escape) bits: escapes
      double best_k_cost = 1e300;
      uint32_t best_k = kBits;
      for (int k = (int)kBits; k >= 0; --k) {
        if ((uint32_t)k + 4 + 1 <= kBits) above += st.count[c][k + 5];  // kRiceEscape == 1 << 4
        if (longest > (uint32_t)k + 8 * high) break;  // an escape's quotient would not fit `high` bytes
        double runs = 0;
        for (uint32_t len = (uint32_t)k + 1; len <= (uint32_t)k + 4 && len <= kBits; ++len)
          runs += ((double)st.sum[c][len] - st.count[c][len] * sc.half_mod[k]) * sc.scale[k];
        const double bits = (double)n * (k + 1) + runs + above * (kRiceEscape + 8.0 * (2 + high));
        if (bits < best_k_cost) {
          best_k_cost = bits;
          best_k = (uint32_t)k;
        }
      }
      plan.width[c] = (uint8_t)best_k;
      plan.n_classes += best_k != 0;
      cost += best_k_cost + (best_k != 0 ? 16 : 0);
    }
    if (cost < best_cost) {
      best_cost = cost;
      best = plan;
    }
  }
  return best;
}

// Writes bits LSB first, branch-free: every put stores the whole 64-bit accumulator and advances by its
// whole bytes, so the buffer needs 8 bytes of room past the last bit.
struct BitWriter {
  uint8_t* out;
  uint64_t acc = 0;  // the bits of the byte being filled and beyond
  uint32_t pending = 0;
  void put(uint64_t v, uint32_t n) {  // n <= 32, v < 2^n
    acc |= v << pending;
    pending += n;
    memcpy(out, &acc, sizeof acc);
    const uint32_t whole = pending / 8;
    out += whole;
    acc >>= 8 * whole;  // pending < 40: whole <= 4
    pending %= 8;
  }
  uint64_t bits(const uint8_t* begin) const { return 8 * (uint64_t)(out - begin) + pending; }
};

// Appends the payload of `plan` for these words to `out` and returns its entry (escapes and size set).
// Returns an entry with reserved == 0, out unchanged, if the payload is too big for an entry to describe.
template <typename Word>
inline TileEntry encode_conditioned(const Word* base, const Word* ft, uint32_t elems, const ConditionedPlan& plan,
                                    std::vector<uint8_t>& out) {
  thread_local std::vector<uint8_t> unary, slots;  // the two streams, assembled behind the header at the end
  thread_local std::vector<uint32_t> escapes;
  thread_local std::vector<uint64_t> quotients;
  unary.assign((uint64_t)elems * (kRiceEscape + 1) / 8 + 16, 0);
  slots.assign((uint64_t)elems * sizeof(Word) + 16, 0);
  escapes.clear();
  quotients.clear();
  TileEntry e = plan.entry;
  const uint32_t shift = conditioned_shift(e), transform = conditioned_transform(e);
  BitWriter runs{unary.data()}, low{slots.data()};
  for (uint32_t i = 0; i < elems; ++i) {
    const uint64_t v = conditioned_value<Word>(base[i], ft[i], transform);
    const uint32_t k = plan.width[base_class(base[i], shift)];
    const uint64_t q = v >> k;
    if (q >= kRiceEscape) {  // an escape: the whole quotient goes to the list
      escapes.push_back(i);
      quotients.push_back(q);
    }
    const uint32_t run = q < kRiceEscape ? (uint32_t)q : kRiceEscape;
    runs.put((1u << run) - 1, run + 1);
    low.put(v & ((1ull << k) - 1), k);  // k <= 32
  }
  const uint64_t unary_bytes = (runs.bits(unary.data()) + 31) / 32 * 4, slot_bytes = (low.bits(slots.data()) + 7) / 8;
  e.n_exc = (uint32_t)escapes.size();
  const uint64_t h = conditioned_header_offset(e), at = align_up(h + 4 + 2ull * plan.n_classes, 4);
  const uint64_t size = align_up(at + unary_bytes + slot_bytes + kConditionedSlack, kTileAlign);
  const uint32_t unary_words = (uint32_t)(unary_bytes / 4);
  if (size / kTileAlign > 0xffff || unary_words > 0xffff) {
    e.reserved = 0;
    return e;
  }
  e.reserved = (uint16_t)(size / kTileAlign);
  const uint64_t start = out.size();
  out.resize(start + size, 0);
  uint8_t* p = out.data() + start;
  for (uint32_t x = 0; x < e.n_exc; ++x) {
    p[x] = (uint8_t)escapes[x];
    p[e.n_exc + x] = (uint8_t)(escapes[x] >> 8);
    for (uint32_t j = 0; j < conditioned_high_bytes(e); ++j)
      p[(2 + j) * (uint64_t)e.n_exc + x] = (uint8_t)(quotients[x] >> (8 * j));
  }
  p[h] = (uint8_t)plan.n_classes;
  p[h + 1] = (uint8_t)(plan.n_classes >> 8);
  p[h + 2] = (uint8_t)unary_words;
  p[h + 3] = (uint8_t)(unary_words >> 8);
  for (uint32_t c = 0, n = 0; c < 256; ++c) {
    if (!plan.width[c]) continue;
    p[h + 4 + 2 * n] = (uint8_t)c;
    p[h + 5 + 2 * n] = plan.width[c];
    ++n;
  }
  memcpy(p + at, unary.data(), unary_bytes);  // zero past the last bit: the buffer was cleared
  memcpy(p + at + unary_bytes, slots.data(), slot_bytes);
  return e;
}

}  // namespace codec
}  // namespace xorgemm
