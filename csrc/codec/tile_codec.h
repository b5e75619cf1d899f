// Tile codecs of the xorgemm delta format: the one definition of how a tile's XOR words are laid out.
//
// Everything here is __host__ __device__ so the exact code a GPU kernel runs is unit-tested on the CPU.
// The spec, with the reasons and the measured sizes, is docs/format.md.
//
// A tile holds `elems` XOR words of `elem_bytes` bytes each (the XOR of base and fine-tuned element
// bytes), row-major inside the (possibly ragged) tile. One codec covers every tile kind: the low
// `low_bytes` bytes of every word are stored as byte planes, and the words that have a nonzero byte
// above those are listed as exceptions carrying their high bytes, also as planes:
//
//   [low planes: low_bytes x elems bytes]   plane j = byte j of every word
//   [exception positions: lo plane, hi plane, n_exc bytes each]   strictly increasing, < elems
//   [exception high bytes: (elem_bytes - low_bytes) planes x n_exc bytes]   plane j = byte low_bytes+j
//   [zero padding to kTileAlign]
//
// The codec id names the corner of that family a tile uses:
//   zero      all words zero; no payload at all (the tile is skipped)
//   sparse    low_bytes = 0: only the exception list (few changed elements)
//   byteplane 0 < low_bytes < elem_bytes: fixed-length low bytes + escapes (dense deltas whose sign and
//             exponent bytes rarely change)
//   raw       low_bytes = elem_bytes, no exceptions (the fallback)
// Every field is fixed-length, so a warp decodes any element in O(1) from shared memory, and byte
// planes keep the stored stream friendly to zstd (the high planes are nearly all zero).
//
// One more codec uses the base as context (a decoder always holds the base tile): `conditioned` Rice-codes
// each element's value (its difference ft - base zig-zagged, or its XOR word) with a parameter chosen per
// class of base words (their exponent): low bits in slots located from the base, quotients in a unary
// stream, large ones as escapes. Its layout is below (conditioned_layout); docs/format.md gives the
// reasons and the measured sizes.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define XG_HD __host__ __device__ __forceinline__
#else
#define XG_HD inline
#endif

namespace xorgemm {
namespace codec {

enum TileCodec : uint8_t { kZero = 0, kSparse = 1, kBytePlane = 2, kRaw = 3, kConditioned = 4 };
// Their names, in id order: what the file index and the reports say (exported to Python as CODEC_NAMES).
// Format version 1 files name the first four.
constexpr int kNumCodecs = 5;
constexpr const char* kCodecNames[kNumCodecs] = {"zero", "sparse", "byteplane", "raw", "conditioned"};

// Payloads start on this boundary in the decoded stream, so a kernel can cp.async them in 16-byte units.
constexpr uint64_t kTileAlign = 16;
// Exception positions are 16-bit: a tile holds at most this many elements.
constexpr uint32_t kMaxTileElems = 65536;

// One row of a tensor's tile table (8 bytes, little-endian on disk). Payload offsets are not stored:
// they are the exclusive prefix sum of tile_payload_bytes over the table.
struct TileEntry {
  uint32_t n_exc;     // number of exception words
  uint8_t codec;      // TileCodec
  uint8_t low_bytes;  // bytes of every word stored in the low planes; conditioned: see conditioned_shift
  uint16_t reserved;  // zero; conditioned: the payload's size in kTileAlign units
};
static_assert(sizeof(TileEntry) == 8, "TileEntry is an 8-byte on-disk record");

XG_HD uint64_t align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

// Typed access to byte buffers: a plain load/store on the GPU (the caller guarantees alignment); memcpy on
// the host, where reading an array through another type is undefined behaviour (compilers emit the same
// load). The CPU emulation of the CUDA kernels compiles as host code, so it takes the memcpy branch too.
template <typename T>
XG_HD T load_as(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const T*>(p);
#else
#if defined(XORGEMM_EMULATE)
  emulate::check_access(p, sizeof(T));  // the alignment and bounds the GPU needs (tests/cpp/cuda_emulation.h)
#endif
  T v;
  memcpy(&v, p, sizeof v);
  return v;
#endif
}
template <typename T>
XG_HD void store_as(void* p, const T& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<T*>(p) = v;
#else
#if defined(XORGEMM_EMULATE)
  emulate::check_access(p, sizeof(T));
#endif
  memcpy(p, &v, sizeof v);
#endif
}

// Entry t of a section's tile table (little-endian, as on disk and on every host and GPU xorgemm runs on).
// One 8-byte memcpy at any alignment: a section may start at any byte (a span of a decompressed stream); a
// caller that knows the table is 8-byte aligned says so with __builtin_assume_aligned, and the copy becomes
// one 64-bit load.
XG_HD TileEntry load_entry(const uint8_t* table, uint64_t t) {
  uint64_t raw;
#if defined(XORGEMM_EMULATE)
  emulate::check_access(table + t * sizeof(TileEntry), sizeof raw);  // one 64-bit load on the GPU
#endif
  memcpy(&raw, table + t * sizeof(TileEntry), sizeof raw);
  TileEntry e;
  e.n_exc = (uint32_t)raw;
  e.codec = (uint8_t)(raw >> 32);
  e.low_bytes = (uint8_t)(raw >> 40);
  e.reserved = (uint16_t)(raw >> 48);
  return e;
}

// Bytes the tile occupies in the stream, padding included.
XG_HD uint64_t tile_payload_bytes(TileEntry e, uint32_t elems, uint32_t elem_bytes) {
  if (e.codec == kZero) return 0;
  if (e.codec == kConditioned) return (uint64_t)e.reserved * kTileAlign;
  uint64_t n = (uint64_t)elems * e.low_bytes + (uint64_t)e.n_exc * (2 + elem_bytes - e.low_bytes);
  return align_up(n, kTileAlign);
}

// A conditioned entry's own rules: 16- or 32-bit words, a class inside the word, a payload size; the
// header's rules come with the payload (conditioned_layout).
XG_HD bool conditioned_entry_valid(TileEntry e, uint32_t elems, uint32_t elem_bytes) {
  return e.codec == kConditioned && elems != 0 && elems <= kMaxTileElems && e.n_exc <= elems &&
         (elem_bytes == 2 || elem_bytes == 4) && ((e.low_bytes >> 1) & 31u) < 8 * elem_bytes &&
         (e.low_bytes >> 6) < elem_bytes && e.reserved != 0;
}
XG_HD uint32_t conditioned_transform(TileEntry e) { return e.low_bytes & 1u; }
XG_HD uint32_t conditioned_shift(TileEntry e) { return (e.low_bytes >> 1) & 31u; }
XG_HD uint32_t conditioned_high_bytes(TileEntry e) { return (e.low_bytes >> 6) + 1u; }
// Whether an entry is well formed for a tile of `elems` words of `elem_bytes` bytes. Decoders assume it.
XG_HD bool tile_entry_valid(TileEntry e, uint32_t elems, uint32_t elem_bytes) {
  if (e.codec == kConditioned) return conditioned_entry_valid(e, elems, elem_bytes);
  if (e.reserved != 0 || elems == 0 || elems > kMaxTileElems || e.n_exc > elems) return false;
  switch (e.codec) {
    case kZero: return e.low_bytes == 0 && e.n_exc == 0;
    case kSparse: return e.low_bytes == 0 && e.n_exc >= 1;
    case kBytePlane: return e.low_bytes >= 1 && e.low_bytes < elem_bytes;
    case kRaw: return e.low_bytes == elem_bytes && e.n_exc == 0;
    default: return false;
  }
}

// Whether a tile whose payload starts at `offset` of a section of `len` bytes (its table taking the first
// `table_bytes`) can be read safely: a well-formed entry, a payload inside the section, 16-byte aligned.
// What the kernels check per tile, so that a section nobody validated cannot make them read elsewhere.
XG_HD bool tile_readable(TileEntry e, uint32_t elems, uint32_t elem_bytes, uint64_t offset, uint64_t table_bytes,
                         uint64_t len) {
  if (!tile_entry_valid(e, elems, elem_bytes)) return false;
  const uint64_t size = tile_payload_bytes(e, elems, elem_bytes);
  return offset >= table_bytes && offset <= len && size <= len - offset && offset % kTileAlign == 0;
}

// Exception x: its position inside the tile and the high bytes it contributes, already shifted in place.
XG_HD uint32_t exception_position(const uint8_t* payload, TileEntry e, uint32_t elems, uint32_t x) {
  const uint8_t* pos = payload + (uint64_t)elems * e.low_bytes;
  return (uint32_t)pos[x] | ((uint32_t)pos[e.n_exc + x] << 8);
}
XG_HD uint64_t exception_high_bits(const uint8_t* payload, TileEntry e, uint32_t elems, uint32_t elem_bytes,
                                   uint32_t x) {
  const uint8_t* hi = payload + (uint64_t)elems * e.low_bytes + 2ull * e.n_exc;
  uint64_t w = 0;
  for (uint32_t j = 0; j < elem_bytes - e.low_bytes; ++j)
    w |= (uint64_t)hi[(uint64_t)j * e.n_exc + x] << (8 * (e.low_bytes + j));
  return w;
}

// Decodes a tile's XOR words into `out` (elems words of type Word, the element's unsigned type),
// cooperatively: worker `tid` of `nthreads` takes a strided share. Phase 1 writes every word's low part;
// phase 2 ORs in the exceptions. A CUDA block runs phase 1, __syncthreads(), phase 2; the CPU calls both
// with (0, 1). Positions >= elems are skipped here (host validation rejects them before any decode).
// Plane by plane, so each pass streams one contiguous plane (vectorized on the CPU, coalesced on the GPU);
// a worker only ever touches its own words, so the passes need no synchronization between them.
template <typename Word>
XG_HD void decode_tile_low(const uint8_t* payload, TileEntry e, uint32_t elems, Word* out, uint32_t tid,
                           uint32_t nthreads) {
  const uint32_t k = e.codec == kZero ? 0 : e.low_bytes;
  for (uint32_t i = tid; i < elems; i += nthreads) out[i] = k ? (Word)payload[i] : (Word)0;
  for (uint32_t j = 1; j < k; ++j) {
    const uint8_t* plane = payload + (uint64_t)j * elems;
    for (uint32_t i = tid; i < elems; i += nthreads) out[i] |= (Word)((Word)plane[i] << (8 * j));
  }
}
template <typename Word>
XG_HD void decode_tile_exceptions(const uint8_t* payload, TileEntry e, uint32_t elems, Word* out, uint32_t tid,
                                  uint32_t nthreads) {
  for (uint32_t x = tid; x < e.n_exc; x += nthreads) {
    uint32_t i = exception_position(payload, e, elems, x);
    if (i < elems) out[i] |= (Word)exception_high_bits(payload, e, elems, sizeof(Word), x);
  }
}

// 16 bytes moved as one (an LDS.128 / LDG.128 on the GPU).
#if defined(__CUDACC__)
using Vec16 = uint4;
#else
struct alignas(16) Vec16 {
  uint32_t x, y, z, w;
};
#endif
XG_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
// Four low bytes and four high bytes as four 16-bit words in two 32-bit ones: word i = lo[i] | hi[i] << 8.
XG_HD void interleave_bytes(uint32_t lo, uint32_t hi, uint32_t& w01, uint32_t& w23) {
  w01 = (lo & 0xffu) | ((hi & 0xffu) << 8) | ((lo & 0xff00u) << 8) | ((hi & 0xff00u) << 16);
  w23 = ((lo >> 16) & 0xffu) | (((hi >> 16) & 0xffu) << 8) | ((lo >> 8) & 0xff0000u) | (hi & 0xff000000u);
}
// 16 words of 16 bits at dst ^= 16 low bytes (and 16 high bytes when there are two planes).
XG_HD void xor16_words(uint16_t* dst, const uint8_t* lo_plane, const uint8_t* hi_plane) {
  const Vec16 lo = load_as<Vec16>(lo_plane);
  const Vec16 hi = hi_plane != nullptr ? load_as<Vec16>(hi_plane) : Vec16{0, 0, 0, 0};
  Vec16 d0 = load_as<Vec16>(dst), d1 = load_as<Vec16>(dst + 8);
  uint32_t a, b;
  interleave_bytes(lo.x, hi.x, a, b);
  d0.x ^= a;
  d0.y ^= b;
  interleave_bytes(lo.y, hi.y, a, b);
  d0.z ^= a;
  d0.w ^= b;
  interleave_bytes(lo.z, hi.z, a, b);
  d1.x ^= a;
  d1.y ^= b;
  interleave_bytes(lo.w, hi.w, a, b);
  d1.z ^= a;
  d1.w ^= b;
  store_as<Vec16>(dst, d0);
  store_as<Vec16>(dst + 8, d1);
}

// The fused GEMM's form of the same decode: XORs the tile's words straight into a destination tile laid
// out with `stride` words per row (a padded shared-memory tile holding the base), so no separate delta
// buffer exists: dst[r * stride + c] ^= word (r * w + c), for a tile `w` words wide. Phase 1 XORs each
// word's low part (word-major: a thread gathers word i from every low plane, reads coalesced across
// threads; 16-bit words go 16 at a time with 16-byte loads when rows are a multiple of 16 words and the
// planes and rows 16-byte aligned, else two at a time, one 32-bit xor each, when rows have an even width,
// which needs the payload and dst 4-byte aligned); phase 2 XORs the exceptions' high bytes. A CUDA block
// needs a __syncthreads() between the two phases (a word's low and high parts may belong to different
// threads) and none inside a phase: words are distinct within a phase (exception positions strictly
// increase in a validated section).
template <typename Word>
XG_HD void xor_tile_low_strided(const uint8_t* payload, TileEntry e, uint32_t elems, uint32_t w, Word* dst,
                                uint32_t stride, uint32_t tid, uint32_t nthreads) {
  const uint32_t k = e.codec == kZero ? 0 : e.low_bytes;
  if (k == 0) return;
  if constexpr (sizeof(Word) == 2) {
    if (w % 16 == 0 && stride % 8 == 0 && aligned16(payload) && aligned16(dst)) {
      // Rows a multiple of 16 words, 16-byte aligned planes and rows (every full tile): 16 words a thread at
      // a time, one 16-byte load per plane and two for the destination, all issued before any store, so the
      // loads do not wait one by one behind the stores (elems is a multiple of 16: whole rows).
      const uint32_t chunks = elems / 16, row_chunks = w / 16;
      for (uint32_t q = tid; q < chunks; q += nthreads)
        xor16_words(reinterpret_cast<uint16_t*>(dst) + (q / row_chunks) * stride + (q % row_chunks) * 16,
                    payload + 16 * q, k == 2 ? payload + elems + 16 * q : nullptr);
      return;
    }
    if (w % 2 == 0 && stride % 2 == 0) {
      // 16-bit words in pairs: both halves of a 32-bit destination word are in the same row, so one
      // 32-bit xor patches two elements (the planes are read two bytes at a time, at even offsets).
      const uint32_t w2 = w / 2, stride2 = stride / 2, pairs = elems / 2;
      if (tid >= pairs) return;
      uint32_t r = tid / w2, c = tid % w2;
      const uint32_t dr = nthreads / w2, dc = nthreads % w2;
      for (uint32_t p = tid; p < pairs; p += nthreads) {
        const uint32_t lo = load_as<uint16_t>(payload + 2 * p);
        uint32_t v = (lo & 0xffu) | ((lo >> 8) << 16);
        if (k == 2) {
          const uint32_t hi = load_as<uint16_t>(payload + elems + 2 * p);
          v |= ((hi & 0xffu) << 8) | ((hi >> 8) << 24);
        }
        Word* pair = dst + 2 * (r * stride2 + c);
        store_as<uint32_t>(pair, load_as<uint32_t>(pair) ^ v);
        r += dr;
        c += dc;
        if (c >= w2) {
          c -= w2;
          ++r;
        }
      }
      return;
    }
  }
  if (tid >= elems) return;
  // Walk (row, col) incrementally: one division per thread, not one per word.
  uint32_t r = tid / w, c = tid % w;
  const uint32_t dr = nthreads / w, dc = nthreads % w;
  for (uint32_t i = tid; i < elems; i += nthreads) {
    Word v = (Word)payload[i];
    for (uint32_t j = 1; j < k; ++j) v |= (Word)((Word)payload[(uint64_t)j * elems + i] << (8 * j));
    dst[r * stride + c] ^= v;
    r += dr;
    c += dc;
    if (c >= w) {
      c -= w;
      ++r;
    }
  }
}
template <typename Word>
XG_HD void xor_tile_exceptions_strided(const uint8_t* payload, TileEntry e, uint32_t elems, uint32_t w, Word* dst,
                                       uint32_t stride, uint32_t tid, uint32_t nthreads) {
  for (uint32_t x = tid; x < e.n_exc; x += nthreads) {
    const uint32_t i = exception_position(payload, e, elems, x);
    if (i < elems) dst[(i / w) * stride + i % w] ^= (Word)exception_high_bits(payload, e, elems, sizeof(Word), x);
  }
}

// One worker's exception pass over a tile whose rows are `stride` words apart: XORs each exception's high
// bytes (P planes of them) into its word, as the other decoders do. Tile widths are powers of two except
// on a ragged edge: a shift then, not a divide per exception.
template <typename Word, uint32_t P>
XG_HD void xor_exceptions_rows(const uint8_t* payload, TileEntry e, uint32_t elems, uint32_t w, Word* out,
                               uint32_t stride) {
  uint32_t log2w = 0;
  while ((1u << log2w) < w) ++log2w;
  const bool pow2 = (1u << log2w) == w;
  const uint8_t* pos = payload + (uint64_t)elems * e.low_bytes;
  const uint8_t* hi = pos + 2ull * e.n_exc;
  for (uint32_t x = 0; x < e.n_exc; ++x) {
    const uint32_t i = (uint32_t)pos[x] | ((uint32_t)pos[e.n_exc + x] << 8);
    if (i >= elems) continue;
    Word v = 0;
    for (uint32_t j = 0; j < P; ++j) v |= (Word)((Word)hi[(uint64_t)j * e.n_exc + x] << (8 * (e.low_bytes + j)));
    out[(uint64_t)(pow2 ? i >> log2w : i / w) * stride + (pow2 ? i & (w - 1) : i % w)] ^= v;
  }
}

// Rows of a tile's low words from its K planes, each word gathered from every plane and stored once.
template <typename Word, uint32_t K>
XG_HD void low_words_rows(const uint8_t* payload, uint32_t elems, uint32_t w, Word* out, uint32_t stride) {
  for (uint32_t r = 0, h = elems / w; r < h; ++r) {
    Word* o = out + (uint64_t)r * stride;
    const uint8_t* low = payload + (uint64_t)r * w;
    for (uint32_t c = 0; c < w; ++c) {
      Word v = 0;
      for (uint32_t j = 0; j < K; ++j) v |= (Word)((Word)low[(uint64_t)j * elems + c] << (8 * j));
      o[c] = v;
    }
  }
}

// The whole decode on one worker (the CPU's fused kernel), into rows `stride` words apart: row r of the tile
// (w words) lands at out[r * stride], a tile inside a wider matrix. One pass over each row (every plane
// read, the word stored once: a vectorized loop), then the exceptions' high bytes.
template <typename Word>
XG_HD void decode_tile_rows(const uint8_t* payload, TileEntry e, uint32_t elems, uint32_t w, Word* out,
                            uint32_t stride) {
  const uint32_t k = e.codec == kZero ? 0 : e.low_bytes;
  // The planes (low, then the exceptions' high ones), a constant for each loop: k <= sizeof(Word) <= 8.
  switch (k) {
#define XG_LOW(K) \
  case K:         \
    if constexpr (K <= sizeof(Word)) low_words_rows<Word, K>(payload, elems, w, out, stride); \
    break;
    XG_LOW(0) XG_LOW(1) XG_LOW(2) XG_LOW(3) XG_LOW(4) XG_LOW(5) XG_LOW(6) XG_LOW(7) XG_LOW(8)
#undef XG_LOW
  }
  if (k >= sizeof(Word) || e.n_exc == 0) return;
  switch (sizeof(Word) - k) {
#define XG_HIGH(P) \
  case P:          \
    if constexpr (P <= sizeof(Word)) xor_exceptions_rows<Word, P>(payload, e, elems, w, out, stride); \
    break;
    XG_HIGH(1) XG_HIGH(2) XG_HIGH(3) XG_HIGH(4) XG_HIGH(5) XG_HIGH(6) XG_HIGH(7) XG_HIGH(8)
#undef XG_HIGH
  }
}

// ----------------------------------------------------------------------------------------------------------
// The conditioned codec: a Rice code whose parameter is chosen per class of base words. Entry: low_bytes =
// transform | shift << 1 | (high_bytes - 1) << 6, n_exc = escapes, reserved = payload bytes / kTileAlign.
// A base word's class is its 8 bits from `shift` up (bf16: 7 and fp32: 23, the exponent; fp16: 10, sign
// and exponent). Each element's value v is its XOR word (transform 0) or its difference d = ft - base
// (mod 2^bits) zig-zagged, (d << 1) ^ -(d >> (bits - 1)) (transform 1): small changes of either sign are
// small numbers. With k = width(class of its base word), v = q << k | low: `low` goes to a k-bit slot, q
// to a unary code (q one bits, then a zero); q >= kRiceEscape is written as kRiceEscape ones and a zero,
// and q itself goes to the escape list. Payload:
//
//   [escape positions: lo plane, hi plane, n_exc bytes each]  strictly increasing, < elems
//   [escape quotients: high_bytes planes x n_exc bytes]       q = v >> width, the whole quotient
//   [at an even offset: n_classes u16, unary_words u16, n_classes x (class u8, width u8)]  classes increasing
//   [unary stream, at a 4-byte offset: unary_words 32-bit words, element by element, LSB first]
//   [slots: the low width(class of base i) bits of element i's value, row-major, LSB first (a class the
//    header does not list has width 0)]
//   [zero padding: at least 8 bytes after the slots, then to kTileAlign]
//
// Why: conditioned on its base exponent, a training delta's difference is close to i.i.d. and two-sided
// geometric, which a Rice code fits within a few percent of its entropy; a fixed width per class needs
// about 0.6 bit/element more (docs/format.md has the measurements). Splitting the code keeps decoding O(1)
// per element and parallel: a slot's bit offset is the prefix sum of the widths, computable from the base
// alone (a running sum on the CPU, per-chunk sums on the GPU); a unary code starts after the previous
// element's terminating zero, found by counting zeros per chunk of stream words (popcounts) and selecting
// inside one word. The stream does not depend on the base, so host validation checks it whole.
constexpr uint32_t kXorTransform = 0, kDiffTransform = 1;
constexpr uint32_t kRiceEscape = 16;       // a unary run of this many ones marks an escape (quotient listed)
constexpr uint32_t kConditionedSlack = 8;  // bytes after the last slot: its 64-bit window stays inside

XG_HD uint32_t base_class(uint64_t base_word, uint32_t shift) { return (uint32_t)(base_word >> shift) & 0xffu; }

// The stored value of fine-tuned word f against base word b, and the fine-tuned word back.
template <typename Word>
XG_HD Word conditioned_value(Word b, Word f, uint32_t transform) {
  if (transform == kXorTransform) return (Word)(b ^ f);
  const Word d = (Word)(f - b);
  return (Word)((Word)(d << 1) ^ (Word)((Word)0 - (Word)(d >> (8 * sizeof(Word) - 1))));
}
template <typename Word>
XG_HD Word conditioned_word(Word b, Word v, uint32_t transform) {
  if (transform == kXorTransform) return (Word)(b ^ v);
  return (Word)(b + (Word)((Word)(v >> 1) ^ (Word)((Word)0 - (Word)(v & 1u))));
}

XG_HD uint64_t conditioned_header_offset(TileEntry e) {
  return align_up((uint64_t)e.n_exc * (2 + conditioned_high_bytes(e)), 2);
}

struct ConditionedLayout {
  uint32_t n_classes;
  const uint8_t* classes;  // n_classes x (class, width)
  const uint8_t* unary;    // the unary stream; 4-byte aligned when the payload is
  uint32_t unary_words;
  const uint8_t* slots;    // right after the stream
  uint64_t slot_bytes;     // from `slots` to the payload's end
};
// The payload's parts; false when its header or stream does not fit it or its classes are out of order or
// too wide.
XG_HD bool conditioned_layout(const uint8_t* payload, TileEntry e, uint32_t elem_bytes, ConditionedLayout& out) {
  const uint64_t size = tile_payload_bytes(e, 0, elem_bytes), h = conditioned_header_offset(e);
  if (h + 4 > size) return false;
  out.n_classes = (uint32_t)payload[h] | ((uint32_t)payload[h + 1] << 8);
  out.unary_words = (uint32_t)payload[h + 2] | ((uint32_t)payload[h + 3] << 8);
  const uint64_t unary = align_up(h + 4 + 2ull * out.n_classes, 4), slots = unary + 4ull * out.unary_words;
  if (out.n_classes > 256 || slots + kConditionedSlack > size) return false;
  out.classes = payload + h + 4;
  out.unary = payload + unary;
  out.slots = payload + slots;
  out.slot_bytes = size - slots;
  for (uint32_t c = 0; c < out.n_classes; ++c) {
    if (out.classes[2 * c + 1] > 8 * elem_bytes || (c > 0 && out.classes[2 * c] <= out.classes[2 * c - 2]))
      return false;
  }
  return true;
}
// The slot width of every class, width[256]: cleared, then (after a barrier, cooperatively) filled from the
// header; a class the header does not list has width 0.
XG_HD void conditioned_clear_widths(uint8_t* width, uint32_t tid, uint32_t nthreads) {
  for (uint32_t c = tid; c < 256; c += nthreads) width[c] = 0;
}
XG_HD void conditioned_fill_widths(const ConditionedLayout& l, uint8_t* width, uint32_t tid, uint32_t nthreads) {
  for (uint32_t c = tid; c < l.n_classes; c += nthreads) width[l.classes[2 * c]] = l.classes[2 * c + 1];
}
// Whether slots of `total_bits` fit the payload, with the slack every read needs.
XG_HD bool conditioned_slots_fit(const ConditionedLayout& l, uint64_t total_bits) {
  return (total_bits + 7) / 8 + kConditionedSlack <= l.slot_bytes;
}
// Reads a 4-byte aligned bit stream LSB first from bit `at`, 32 bits a load. It reads at most one word
// past the last bit consumed and one more when asked to look ahead: the payload's slack covers both.
struct BitReader {
  const uint8_t* next;  // the next word to load
  uint64_t buf;         // `avail` bits from the cursor on; zero above them
  uint32_t avail;
  XG_HD BitReader(const uint8_t* stream, uint64_t at)
      : next(stream + (at / 32) * 4 + 4), buf(load_as<uint32_t>(stream + (at / 32) * 4) >> (at % 32)),
        avail(32 - (uint32_t)(at % 32)) {}
  XG_HD void ensure(uint32_t n) {  // n <= 32
    if (avail < n) {
      buf |= (uint64_t)load_as<uint32_t>(next) << avail;
      next += 4;
      avail += 32;
    }
  }
  XG_HD uint32_t take(uint32_t n) {  // n <= 32
    ensure(n);
    const uint32_t v = (uint32_t)buf & (uint32_t)((1ull << n) - 1);
    buf >>= n;
    avail -= n;
    return v;
  }
};
XG_HD uint32_t conditioned_position(const uint8_t* payload, TileEntry e, uint32_t x) {
  return (uint32_t)payload[x] | ((uint32_t)payload[e.n_exc + x] << 8);
}
// The first escape whose position is >= i (n_exc if none): positions are strictly increasing.
XG_HD uint32_t conditioned_first_exception(const uint8_t* payload, TileEntry e, uint32_t i) {
  uint32_t lo = 0, hi = e.n_exc;
  while (lo < hi) {
    const uint32_t mid = (lo + hi) / 2;
    if (conditioned_position(payload, e, mid) < i) lo = mid + 1; else hi = mid;
  }
  return lo;
}
XG_HD uint64_t conditioned_exception_high(const uint8_t* payload, TileEntry e, uint32_t x) {
  const uint8_t* v = payload + 2ull * e.n_exc;
  uint64_t w = 0;
  for (uint32_t j = 0; j < conditioned_high_bytes(e); ++j) w |= (uint64_t)v[(uint64_t)j * e.n_exc + x] << (8 * j);
  return w;
}

XG_HD uint32_t popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return (uint32_t)__popc(x);
#else
  return (uint32_t)__builtin_popcount(x);
#endif
}
XG_HD uint32_t trailing_zeros64(uint64_t x) {  // x != 0
#if defined(__CUDA_ARCH__)
  return (uint32_t)__ffsll((long long)x) - 1;
#else
  return (uint32_t)__builtin_ctzll(x);
#endif
}
// The bit index of the n-th (from 0) set bit of x; n < popcount(x). Five halving steps, no loop over bits.
XG_HD uint32_t select_bit(uint32_t x, uint32_t n) {
  uint32_t at = 0;
  for (uint32_t half = 16; half != 0; half /= 2) {
    const uint32_t low = popcount32(x & ((1u << half) - 1));
    if (n >= low) {
      n -= low;
      x >>= half;
      at += half;
    }
  }
  return at;
}

// Cooperative decode, for a tile that already holds the base (a padded shared-memory tile: element i at
// dst[(i / w) * stride + i % w]), by `nthreads` workers, phase by phase with a barrier between phases:
//   1. conditioned_clear_widths; 2. conditioned_fill_widths (width[256] in shared memory);
//   3. conditioned_count: worker tid sums the slot widths of its chunk of elements into counts[tid] and
//      the zero bits of its share of the unary stream's words into counts[nthreads + tid];
//   4. conditioned_patch: each worker finds its chunk's slot offset (the sum of the chunks before it), its
//      first unary code (after the right zero) and first escape, and patches its elements; false, from
//      every worker alike and before any write, when the slots do not fit the payload (another base).
//      In a section nobody validated, a code longer than an escape, or an escape code without its listed
//      escape or the reverse, makes the workers that meet it stop and return false, having read nothing
//      outside the payload (their elements are then unspecified); what lies after the last code is not
//      read. conditioned_stream_valid checks the whole stream, before any decode, when a section loads.
// Chunks are contiguous runs of ceil(elems / nthreads) elements, so a worker reads its slots, its codes and
// its escapes in order, and only its own elements are written.
XG_HD uint32_t conditioned_chunk(uint32_t elems, uint32_t nthreads) { return (elems + nthreads - 1) / nthreads; }

template <typename Word>
XG_HD void conditioned_count(const ConditionedLayout& l, const Word* dst, uint32_t elems, uint32_t w,
                             uint32_t stride, TileEntry e, const uint8_t* width, uint32_t* counts, uint32_t tid,
                             uint32_t nthreads) {
  const uint32_t chunk = conditioned_chunk(elems, nthreads), shift = conditioned_shift(e);
  const uint32_t begin = tid * chunk, end = begin + chunk < elems ? begin + chunk : elems;
  uint32_t sum = 0;
  for (uint32_t i = begin, r = begin / w, c = begin % w; i < end; ++i) {
    sum += width[base_class(dst[r * stride + c], shift)];
    if (++c == w) {
      c = 0;
      ++r;
    }
  }
  counts[tid] = sum;
  const uint32_t words = conditioned_chunk(l.unary_words, nthreads);
  uint32_t zeros = 0;
  for (uint32_t q = tid * words; q < l.unary_words && q < (tid + 1) * words; ++q)
    zeros += 32 - popcount32(load_as<uint32_t>(l.unary + 4ull * q));
  counts[nthreads + tid] = zeros;
}

template <typename Word>
XG_HD bool conditioned_patch(const uint8_t* payload, const ConditionedLayout& l, TileEntry e, uint32_t elems,
                             uint32_t w, Word* dst, uint32_t stride, const uint8_t* width, const uint32_t* counts,
                             uint32_t tid, uint32_t nthreads) {
  uint64_t at = 0, total = 0;
  for (uint32_t t = 0; t < nthreads; ++t) {
    if (t == tid) at = total;
    total += counts[t];
  }
  if (!conditioned_slots_fit(l, total)) return false;
  const uint32_t chunk = conditioned_chunk(elems, nthreads), begin = tid * chunk;
  if (begin >= elems) return true;
  // The chunk's first code starts after zero number begin - 1 of the stream: find its word by the
  // per-worker zero counts, then the word, then the bit.
  const uint64_t stream_bits = 32ull * l.unary_words;
  uint64_t p = 0;
  if (begin > 0) {
    uint32_t target = begin - 1, t = 0;
    for (; t < nthreads && target >= counts[nthreads + t]; ++t) target -= counts[nthreads + t];
    if (t == nthreads) return false;  // fewer terminating zeros than elements
    const uint32_t words = conditioned_chunk(l.unary_words, nthreads);
    for (uint32_t q = t * words; q < l.unary_words; ++q) {  // the zeros counted for worker t lie in its words
      const uint32_t zeros = ~load_as<uint32_t>(l.unary + 4ull * q), n = popcount32(zeros);
      if (target < n) {
        p = 32ull * q + select_bit(zeros, target) + 1;
        break;
      }
      target -= n;
    }
  }
  const uint32_t shift = conditioned_shift(e), transform = conditioned_transform(e);
  uint32_t x = conditioned_first_exception(payload, e, begin);
  uint32_t next = x < e.n_exc ? conditioned_position(payload, e, x) : elems;  // the next escape's element
  const uint32_t end = begin + chunk < elems ? begin + chunk : elems;
  BitReader codes(l.unary, p), slots(l.slots, at);
  uint32_t r = begin / w, c = begin % w;  // walked, not divided, element by element
  for (uint32_t i = begin; i < end; ++i) {
    if (p >= stream_bits) return false;  // its code would start past the stream
    codes.ensure(kRiceEscape + 1);
    const uint32_t run = trailing_zeros64(~codes.buf);  // the bits above `avail` read as zeros: run <= avail
    if (run > kRiceEscape || (run == kRiceEscape) != (i == next)) return false;  // too long, or a lone escape
    codes.buf >>= run + 1;
    codes.avail -= run + 1;
    p += run + 1;
    Word* d = dst + r * stride + c;
    if (++c == w) {
      c = 0;
      ++r;
    }
    const Word b = *d;
    const uint32_t k = width[base_class(b, shift)];
    uint64_t q = run;
    if (run == kRiceEscape) {
      q = conditioned_exception_high(payload, e, x);
      ++x;
      next = x < e.n_exc ? conditioned_position(payload, e, x) : elems;
    }
    const uint64_t v = (q << k) | slots.take(k);
    if (v != 0) *d = conditioned_word<Word>(b, (Word)v, transform);
  }
  return true;
}

// What host validation checks of a conditioned payload without the base: its layout, escape positions
// strictly increasing, and a stream holding exactly `elems` codes, none longer than an escape, whose
// escape codes are exactly the listed positions, followed by zero bits to the end of its last word. A
// section that passes decodes against any base whose slots fit. Word-parallel: per 32-bit word, popcounts
// rank the zeros and shift-and masks find runs of ones; only escape codes are looked at one by one.
XG_HD bool conditioned_stream_valid(const uint8_t* payload, TileEntry e, uint32_t elems, uint32_t elem_bytes) {
  ConditionedLayout l;
  if (!conditioned_entry_valid(e, elems, elem_bytes) || !conditioned_layout(payload, e, elem_bytes, l) ||
      l.unary_words == 0)
    return false;
  uint32_t zeros = 0, x = 0, carry = 0;  // zeros before the word; escapes matched; the bit before it
  for (uint32_t j = 0; j < l.unary_words; ++j) {
    const uint32_t word = load_as<uint32_t>(l.unary + 4ull * j);
    const uint64_t next = j + 1 < l.unary_words ? load_as<uint32_t>(l.unary + 4ull * j + 4) : 0;
    const uint32_t n = 32 - popcount32(word);
    if (j + 1 == l.unary_words) {  // the last code's zero is here, and only zeros above it
      if (zeros >= elems || elems - zeros > n) return false;
      const uint32_t last = select_bit(~word, elems - zeros - 1);
      if (last < 31 && (word >> (last + 1)) != 0) return false;
    }
    const uint64_t win = word | next << 32;
    uint64_t run16 = win & (win >> 1);  // bit i: bits i .. i+1 are ones; then i .. i+3, i .. i+7, i .. i+15
    run16 &= run16 >> 2;
    run16 &= run16 >> 4;
    run16 &= run16 >> 8;
    run16 &= 0xffffffffu;  // runs that start in this word
    if (run16 & (win >> 16)) return false;  // 17 ones in a row: longer than any code
    // Escape codes: 16 ones that start a code (after a zero, or at the stream's start).
    for (uint64_t starts = run16 & ~((win << 1) | carry) & 0xffffffffu; starts != 0; starts &= starts - 1) {
      const uint32_t bit = trailing_zeros64(starts);
      const uint32_t element = zeros + (bit ? bit - popcount32(word & ((1u << bit) - 1)) : 0);
      if (x >= e.n_exc || conditioned_position(payload, e, x) != element || element >= elems) return false;
      ++x;
    }
    carry = word >> 31;
    zeros += n;
  }
  return x == e.n_exc;
}

// 64 bits from byte `p` on, at any alignment (the host's one-worker decode; it keeps 8 bytes of slack).
XG_HD uint64_t load_u64_unaligned(const uint8_t* p) {
  uint64_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

// The whole decode on one worker (the CPU's), in place: `tile` holds the base of a tile `w` words wide
// (row-major, `stride` words a row) and receives the fine-tuned words. False for a malformed entry or
// header (the tile untouched), or for slots that do not fit this base, a code longer than an escape, or
// escape codes that are not the listed escapes (then the tile's words are unspecified: a caller discards
// them). What lies after the last code is not read: validation checks it when the section loads. The same
// format as conditioned_patch, read in a way that suits one core, 256 elements at a time: first their runs
// (every zero of a 56-bit window found with tzcnt / clear-lowest-bit: no serial chain of code lengths),
// then the elements, each with one unaligned 64-bit load for its slot (bounds-checked: against another
// base the slots may not fit); the only branches taken rarely are escapes and those checks.
template <typename Word>
XG_HD bool decode_conditioned(const uint8_t* payload, TileEntry e, uint32_t elems, uint32_t w, Word* tile,
                              uint32_t stride) {
  ConditionedLayout l;
  if (!conditioned_entry_valid(e, elems, sizeof(Word)) || !conditioned_layout(payload, e, sizeof(Word), l))
    return false;
  uint8_t width[256];
  conditioned_clear_widths(width, 0, 1);
  conditioned_fill_widths(l, width, 0, 1);
  const uint32_t shift = conditioned_shift(e), transform = conditioned_transform(e);
  const uint64_t stream_bits = 32ull * l.unary_words;
  uint64_t p = 0, at = 0;  // the next code's bit, the next slot's bit
  uint32_t x = 0, next = e.n_exc ? conditioned_position(payload, e, 0) : elems, r = 0, c = 0;
  // The slots may be read up to this bit: past it, a 64-bit load would leave the payload (another base).
  const uint64_t slot_limit = l.slot_bytes >= kConditionedSlack ? 8 * (l.slot_bytes - kConditionedSlack) : 0;
  uint8_t runs[256];
  for (uint32_t i0 = 0; i0 < elems; i0 += 256) {
    const uint32_t n = elems - i0 < 256 ? elems - i0 : 256;
    for (uint32_t got = 0; got < n;) {  // the block's runs
      if (p >= stream_bits) return false;
      uint64_t zeros = ~(load_u64_unaligned(l.unary + p / 8) >> (p % 8)) & ((1ull << 56) - 1);
      if (zeros == 0) return false;  // 56 ones: no code is that long
      uint32_t end = 0;              // bits used by the codes found so far
      for (; zeros != 0 && got < n; zeros &= zeros - 1) {
        const uint32_t z = trailing_zeros64(zeros);
        runs[got++] = (uint8_t)(z - end);
        end = z + 1;
      }
      p += end;
    }
    for (uint32_t j = 0; j < n; ++j) {
      const uint32_t i = i0 + j;
      Word* d = tile + (stride == w ? i : r * stride + c);  // a tile of whole rows (the CPU's scratch): i
      if (stride != w && ++c == w) {
        c = 0;
        ++r;
      }
      const Word b = *d;
      const uint32_t k = width[base_class(b, shift)];
      uint64_t q = runs[j];
      if (q >= kRiceEscape) {  // rare: an escape, or a run too long
        if (q > kRiceEscape || i != next) return false;
        q = conditioned_exception_high(payload, e, x);
        ++x;
        next = x < e.n_exc ? conditioned_position(payload, e, x) : elems;
      }
      if (at > slot_limit) return false;  // another base: stop before reading past the payload
      const uint64_t low = (load_u64_unaligned(l.slots + at / 8) >> (at % 8)) & ((1ull << k) - 1);
      at += k;
      *d = conditioned_word<Word>(b, (Word)((q << k) | low), transform);  // v = 0 writes the base back
    }
  }
  return p <= stream_bits && x == e.n_exc && conditioned_slots_fit(l, at);
}

}  // namespace codec
}  // namespace xorgemm
