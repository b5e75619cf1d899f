// Native unit tests of the tile codecs and delta sections (no torch, no framework: run by ctest and CI).
// Ends with the line "N passed, N failed".
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "codec/tile_encoder.h"
#include "check.h"
#include "float_words.h"
#include "format/delta_section.h"

using namespace xorgemm;
using format::FormatError;
using format::TileGrid;

static bool throws(const std::function<void()>& f) {
  try {
    f();
  } catch (const FormatError&) {
    return true;
  }
  return false;
}

// base and a fine-tune where `density` of the words change in their low `low` bytes and `high_frac` of
// those also in their top byte.
static void make_pair(const TileGrid& g, double density, uint32_t low, double high_frac, uint32_t seed,
                      std::vector<uint8_t>& base, std::vector<uint8_t>& ft) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  base.resize(g.tensor_bytes());
  for (auto& b : base) b = (uint8_t)rng();
  ft = base;
  for (uint64_t i = 0; i < g.rows * g.cols; ++i) {
    if (u(rng) >= density) continue;
    uint8_t* w = ft.data() + i * g.elem_bytes;
    for (uint32_t b = 0; b < low && b < g.elem_bytes; ++b) w[b] ^= (uint8_t)(rng() | 1);
    if (u(rng) < high_frac) w[g.elem_bytes - 1] ^= 0x80;
  }
}

static bool round_trips(const TileGrid& g, const std::vector<uint8_t>& base, const std::vector<uint8_t>& ft,
                        std::vector<uint8_t>* section_out = nullptr) {
  std::vector<uint8_t> s = format::encode_section(base.data(), ft.data(), g);
  auto offsets = format::validate_section(s.data(), s.size(), g);
  std::vector<uint8_t> out(base.size(), 0xAA);
  format::apply_section_block(s.data(), offsets.data(), g, 0, g.grid_rows(), 0, g.grid_cols(), base.data(),
                              {out.data(), 0, 0, g.cols});
  if (section_out) *section_out = s;
  return out == ft;
}

// A fine-tune pair encoded, checked to round-trip, and validated: the setup most tests share.
struct Encoded {
  std::vector<uint8_t> base, ft, section;
  std::vector<uint64_t> offsets;
};
static Encoded encoded(const TileGrid& g, double density, uint32_t low, double high_frac, uint32_t seed) {
  Encoded x;
  make_pair(g, density, low, high_frac, seed, x.base, x.ft);
  check(round_trips(g, x.base, x.ft, &x.section), "fixture round trip");
  x.offsets = format::validate_section(x.section.data(), x.section.size(), g);
  return x;
}

static codec::TileEntry entry(const std::vector<uint8_t>& s, uint64_t t) {
  codec::TileEntry e;
  memcpy(&e, s.data() + t * 8, 8);
  return e;
}

static void test_round_trips() {
  const uint32_t sizes[] = {1, 2, 4, 8};
  const double densities[] = {0.0, 0.001, 0.03, 0.5, 1.0};
  uint32_t seed = 1;
  for (uint32_t eb : sizes)
    for (double d : densities)
      for (auto dims : {std::pair<uint64_t, uint64_t>{64, 64}, {130, 70}, {1, 300}, {3, 1}, {200, 129}}) {
        TileGrid g{dims.first, dims.second, 64, 64, eb};
        if (dims.first == 1) g.tile_rows = 1, g.tile_cols = 4096;
        std::vector<uint8_t> base, ft;
        make_pair(g, d, eb > 1 ? eb - 1 : 1, 0.05, seed++, base, ft);
        check(round_trips(g, base, ft), "round trip eb=" + std::to_string(eb) + " density=" + std::to_string(d) +
                                            " " + std::to_string(dims.first) + "x" + std::to_string(dims.second));
      }
}

static void test_codec_choice() {
  TileGrid g{64, 64, 64, 64, 4};
  std::vector<uint8_t> base, ft, s;
  make_pair(g, 0.0, 0, 0, 7, base, ft);
  round_trips(g, base, ft, &s);
  check(entry(s, 0).codec == codec::kZero && s.size() == 16, "untouched tile is zero and costs no payload");
  make_pair(g, 0.01, 3, 0, 8, base, ft);
  round_trips(g, base, ft, &s);
  check(entry(s, 0).codec == codec::kSparse, "1% changed is sparse");
  make_pair(g, 1.0, 2, 0.02, 9, base, ft);
  round_trips(g, base, ft, &s);
  check(entry(s, 0).codec == codec::kBytePlane && entry(s, 0).low_bytes == 2, "dense low-2-byte change is byteplane");
  make_pair(g, 1.0, 4, 0.9, 10, base, ft);
  round_trips(g, base, ft, &s);
  check(entry(s, 0).codec == codec::kRaw, "dense full-width change is raw");
}

static void test_cooperative_decode_matches_serial() {
  // A CUDA block runs phase 1 on all threads, syncs, then phase 2; any thread count must agree.
  TileGrid g{64, 64, 64, 64, 2};
  const Encoded x = encoded(g, 1.0, 1, 0.1, 11);
  const auto& s = x.section;
  const auto& offsets = x.offsets;
  codec::TileEntry e = entry(s, 0);
  std::vector<uint16_t> serial(4096), coop(4096, 0xBEEF);
  const uint8_t* p = s.data() + offsets[0];
  codec::decode_tile_low<uint16_t>(p, e, 4096, serial.data(), 0, 1);
  codec::decode_tile_exceptions<uint16_t>(p, e, 4096, serial.data(), 0, 1);
  for (uint32_t t = 0; t < 128; ++t) codec::decode_tile_low<uint16_t>(p, e, 4096, coop.data(), t, 128);
  for (uint32_t t = 0; t < 128; ++t) codec::decode_tile_exceptions<uint16_t>(p, e, 4096, coop.data(), t, 128);
  check(serial == coop && e.n_exc > 0, "128-way cooperative decode equals serial decode");
}

static void test_validation_rejects_bad_sections() {
  TileGrid g{100, 100, 64, 64, 4};
  std::vector<uint8_t> base, ft, s;
  make_pair(g, 0.03, 3, 0.0, 12, base, ft);
  round_trips(g, base, ft, &s);
  check(!throws([&] { format::validate_section(s.data(), s.size(), g); }), "valid section passes");
  check(throws([&] { format::validate_section(s.data(), s.size() - 16, g); }), "truncated section");
  check(throws([&] { format::validate_section(s.data(), 8, g); }), "section shorter than its table");
  auto grown = s;
  grown.resize(s.size() + 16);
  check(throws([&] { format::validate_section(grown.data(), grown.size(), g); }), "trailing bytes");
  auto bad = s;
  bad[4] = 9;  // codec id 9
  check(throws([&] { format::validate_section(bad.data(), bad.size(), g); }), "unknown codec");
  bad = s;
  uint32_t huge = 5000;
  memcpy(bad.data(), &huge, 4);
  check(throws([&] { format::validate_section(bad.data(), bad.size(), g); }), "more exceptions than elements");
  // Swap the first two exception positions of tile 0 (sparse): no longer strictly increasing.
  bad = s;
  auto offsets = format::validate_section(s.data(), s.size(), g);
  codec::TileEntry e = entry(s, 0);
  check(e.codec == codec::kSparse && e.n_exc >= 2, "tile 0 is sparse with exceptions");
  uint8_t* pos = bad.data() + offsets[0];
  std::swap(pos[0], pos[1]);
  std::swap(pos[e.n_exc], pos[e.n_exc + 1]);
  check(throws([&] { format::validate_section(bad.data(), bad.size(), g); }), "unsorted exception positions");
  bad = s;
  pos = bad.data() + offsets[0];
  pos[e.n_exc - 1] = 0xFF, pos[2 * e.n_exc - 1] = 0xFF;  // last position 65535 > elems
  check(throws([&] { format::validate_section(bad.data(), bad.size(), g); }), "position outside the tile");
  check(throws([] { TileGrid{4, 4, 300, 300, 4}.check(); }), "tile larger than 65536 elements");
  check(throws([] { TileGrid{4, 4, 4, 4, 3}.check(); }), "3-byte elements");
  check(throws([] { TileGrid{0, 4, 4, 4, 4}.check(); }), "empty tensor");
}

static void test_block_apply_and_bounds() {
  // A block of grid rows x grid columns written into its own buffer equals that part of the full apply.
  TileGrid g{200, 150, 64, 64, 4};
  const Encoded x = encoded(g, 0.2, 3, 0.05, 13);
  const auto &base = x.base, &ft = x.ft, &s = x.section;
  const auto& offsets = x.offsets;
  // grid rows 1..3 (rows 64..199, the last one ragged), grid column 1 (cols 64..127): a 136 x 64 block
  std::vector<uint8_t> block(136 * 64 * 4, 0);
  format::apply_section_block(s.data(), offsets.data(), g, 1, 4, 1, 2, base.data(), {block.data(), 64, 64, 64});
  bool same = true;
  for (uint64_t r = 64; r < 200; ++r)
    same &= memcmp(block.data() + ((r - 64) * 64) * 4, ft.data() + (r * 150 + 64) * 4, 64 * 4) == 0;
  check(same, "block apply equals the full apply on that block");
  check(!throws([&] { format::check_section_bounds(s.data(), s.size(), offsets.data(), g); }),
        "bounds of a valid section");
  auto bad = offsets;
  bad[3] = s.size() - 8;
  check(throws([&] { format::check_section_bounds(s.data(), s.size(), bad.data(), g); }), "payload past the end");
  bad = offsets;
  bad[0] = 0;
  check(throws([&] { format::check_section_bounds(s.data(), s.size(), bad.data(), g); }), "payload inside the table");
}

static void test_payload_size_formula() {
  codec::TileEntry e{10, codec::kBytePlane, 1, 0};
  check(codec::tile_payload_bytes(e, 4096, 2) == codec::align_up(4096 + 10 * 3, 16), "byteplane size");
  e = {7, codec::kSparse, 0, 0};
  check(codec::tile_payload_bytes(e, 4096, 4) == 48, "sparse size 7*(2+4)=42 padded to 48");
  e = {0, codec::kRaw, 4, 0};
  check(codec::tile_payload_bytes(e, 100, 4) == 400, "raw size");
  check(!codec::tile_entry_valid({0, codec::kRaw, 3, 0}, 100, 4), "raw must keep every byte");
  check(!codec::tile_entry_valid({0, codec::kSparse, 0, 0}, 100, 4), "sparse needs an exception");
  check(!codec::tile_entry_valid({0, codec::kZero, 0, 1}, 100, 4), "reserved must be zero");
}

// The fused kernel's decode: XOR every tile straight into a padded copy of its base tile (stride 72
// words, as in shared memory) with 128 cooperating workers, phase by phase. Ragged edge tiles, every
// codec, 2- and 4-byte words (16-bit ones in pairs when rows are even, one by one when odd): the result
// must be the fine-tuned tile and the padding must stay untouched; and decode_tile_rows' delta words.
template <typename Word>
static bool strided_xor_matches(const TileGrid& g, const Encoded& x) {
  constexpr uint32_t kStride = 72, kWorkers = 128;
  const Word* base = reinterpret_cast<const Word*>(x.base.data());
  const Word* ft = reinterpret_cast<const Word*>(x.ft.data());
  for (uint64_t t = 0; t < g.num_tiles(); ++t) {
    const uint32_t h = g.tile_height(t), w = g.tile_width(t), elems = h * w;
    const uint64_t r0 = g.tile_row0(t), c0 = g.tile_col0(t);
    std::vector<Word> dst(g.tile_rows * kStride, (Word)0x5A5A5A5Au);
    for (uint32_t r = 0; r < h; ++r)
      for (uint32_t c = 0; c < w; ++c) dst[r * kStride + c] = base[(r0 + r) * g.cols + c0 + c];
    const codec::TileEntry e = entry(x.section, t);
    const uint8_t* p = x.section.data() + x.offsets[t];
    for (uint32_t i = 0; i < kWorkers; ++i)
      codec::xor_tile_low_strided<Word>(p, e, elems, w, dst.data(), kStride, i, kWorkers);
    for (uint32_t i = 0; i < kWorkers; ++i)
      codec::xor_tile_exceptions_strided<Word>(p, e, elems, w, dst.data(), kStride, i, kWorkers);
    // The CPU's one-worker form: the delta words alone, rows kStride apart, the padding untouched.
    std::vector<Word> words(g.tile_rows * kStride, (Word)0x5A5A5A5Au);
    codec::decode_tile_rows<Word>(p, e, elems, w, words.data(), kStride);
    for (uint32_t r = 0; r < g.tile_rows; ++r)
      for (uint32_t c = 0; c < kStride; ++c) {
        const bool in = r < h && c < w;
        const Word want = in ? ft[(r0 + r) * g.cols + c0 + c] : (Word)0x5A5A5A5Au;
        if (dst[r * kStride + c] != want) return false;
        if (words[r * kStride + c] != (in ? (Word)(want ^ base[(r0 + r) * g.cols + c0 + c]) : want)) return false;
      }
  }
  return true;
}

static void test_strided_xor_decode() {
  struct Case {
    double density;
    uint32_t low;
    double high;
    const char* what;
  } cases[] = {{0.0, 0, 0, "untouched (zero tiles)"}, {0.03, 2, 0.5, "sparse"}, {1.0, 1, 0.05, "byteplane"},
               {1.0, 4, 1.0, "raw"}};
  for (const Case& k : cases) {
    for (TileGrid g : {TileGrid{100, 70, 64, 64, 2}, TileGrid{64, 128, 64, 64, 2}, TileGrid{100, 69, 64, 64, 2},
                        TileGrid{130, 70, 64, 64, 4}}) {
      const Encoded x = encoded(g, k.density, k.low, k.high, 21);
      const bool ok = g.elem_bytes == 2 ? strided_xor_matches<uint16_t>(g, x) : strided_xor_matches<uint32_t>(g, x);
      check(ok, std::string("strided XOR decode, ") + k.what + ", " + std::to_string(g.rows) + "x" +
                    std::to_string(g.cols) + " eb=" + std::to_string(g.elem_bytes));
    }
  }
}

// The cooperative decode (128 workers, phase by phase, as a CTA runs it) into a padded tile of `w`-word rows
// holding the base: the fine-tuned words, the padding untouched.
template <typename Word>
static bool cooperative_conditioned(const std::vector<uint8_t>& payload, codec::TileEntry e,
                                    const std::vector<Word>& base, const std::vector<Word>& ft, uint32_t w) {
  constexpr uint32_t kStride = 72, kWorkers = 128;
  const uint32_t elems = (uint32_t)base.size(), h = (elems + w - 1) / w;
  std::vector<Word> tile(h * kStride, (Word)0x5A5A5A5Au);
  for (uint32_t i = 0; i < elems; ++i) tile[(i / w) * kStride + i % w] = base[i];
  codec::ConditionedLayout l;
  if (!codec::conditioned_layout(payload.data(), e, sizeof(Word), l)) return false;
  uint8_t width[256];
  uint32_t counts[2 * kWorkers];
  for (uint32_t t = 0; t < kWorkers; ++t) codec::conditioned_clear_widths(width, t, kWorkers);
  for (uint32_t t = 0; t < kWorkers; ++t) codec::conditioned_fill_widths(l, width, t, kWorkers);
  for (uint32_t t = 0; t < kWorkers; ++t)
    codec::conditioned_count<Word>(l, tile.data(), elems, w, kStride, e, width, counts, t, kWorkers);
  for (uint32_t t = 0; t < kWorkers; ++t)
    if (!codec::conditioned_patch<Word>(payload.data(), l, e, elems, w, tile.data(), kStride, width, counts, t,
                                        kWorkers))
      return false;
  for (uint32_t r = 0; r < h; ++r)
    for (uint32_t c = 0; c < kStride; ++c) {
      const uint32_t i = r * w + c;
      const Word want = c < w && i < elems ? ft[i] : (Word)0x5A5A5A5Au;
      if (tile[r * kStride + c] != want) return false;
    }
  return true;
}

template <typename Word>
static bool conditioned_round_trip(const std::vector<Word>& base, const std::vector<Word>& ft, uint32_t shift,
                                   uint64_t* size = nullptr) {
  const uint32_t elems = (uint32_t)base.size();
  const codec::ConditionedPlan plan = codec::plan_conditioned<Word>(base.data(), ft.data(), elems, shift);
  std::vector<uint8_t> payload;
  const codec::TileEntry e = codec::encode_conditioned<Word>(base.data(), ft.data(), elems, plan, payload);
  if (size) *size = payload.size();
  std::vector<Word> in_place = base;
  // Rows as the tile would have them: 64 wide, or the whole run when shorter (a ragged tile).
  const uint32_t w = elems % 64 == 0 ? 64 : elems % 37 == 0 ? 37 : elems;
  return codec::conditioned_entry_valid(e, elems, sizeof(Word)) &&
         codec::tile_payload_bytes(e, elems, sizeof(Word)) == payload.size() &&
         codec::decode_conditioned<Word>(payload.data(), e, elems, elems, in_place.data(), elems) &&
         in_place == ft && cooperative_conditioned<Word>(payload, e, base, ft, w);
}

// conditioned_stream_valid's rules read code by code: the word-parallel check must agree with it.
static bool stream_valid_walked(const uint8_t* payload, codec::TileEntry e, uint32_t elems) {
  codec::ConditionedLayout l;
  if (!codec::conditioned_layout(payload, e, 2, l) || l.unary_words == 0) return false;
  const uint64_t bits = 32ull * l.unary_words;
  const auto bit = [&](uint64_t i) { return (l.unary[i / 8] >> (i % 8)) & 1; };
  uint64_t p = 0;
  uint32_t x = 0;
  for (uint32_t i = 0; i < elems; ++i) {
    uint32_t run = 0;
    while (p < bits && bit(p)) ++run, ++p;
    if (p == bits || run > codec::kRiceEscape) return false;
    ++p;  // its zero
    if (run == codec::kRiceEscape && (x >= e.n_exc || codec::conditioned_position(payload, e, x++) != i)) return false;
  }
  if (x != e.n_exc || bits - p >= 32) return false;
  for (; p < bits; ++p)
    if (bit(p)) return false;
  return true;
}

// The base-conditioned codec decodes every kind of word exactly, on full and ragged tiles, with either
// transform; on a training-like delta it is smaller than the byte planes; a payload whose header or slots
// do not fit it is refused, not read past.
static void test_conditioned_codec() {
  for (uint32_t elems : {4096u, 37u * 23u, 1u, 64u * 7u}) {
    for (uint32_t seed : {1u, 2u, 3u}) {
      std::vector<uint16_t> b16, f16;
      std::vector<uint32_t> b32, f32;
      float_tile<uint16_t>(elems, 7, seed, b16, f16);
      check(conditioned_round_trip<uint16_t>(b16, f16, 7), "conditioned bf16, " + std::to_string(elems));
      float_tile<uint16_t>(elems, 10, seed, b16, f16);
      check(conditioned_round_trip<uint16_t>(b16, f16, 10), "conditioned fp16, " + std::to_string(elems));
      float_tile<uint32_t>(elems, 23, seed, b32, f32);
      check(conditioned_round_trip<uint32_t>(b32, f32, 23), "conditioned fp32, " + std::to_string(elems));
    }
  }
  std::vector<uint16_t> b, f;
  float_tile<uint16_t>(4096, 7, 9, b, f);
  uint64_t size = 0;
  check(conditioned_round_trip<uint16_t>(b, f, 7, &size), "conditioned, a training-like bf16 delta");
  std::vector<uint16_t> words(4096);
  for (uint32_t i = 0; i < 4096; ++i) words[i] = b[i] ^ f[i];
  const codec::TileEntry classic = codec::choose_tile_codec(words.data(), 4096, 2);
  check(size < codec::tile_payload_bytes(classic, 4096, 2),
        "conditioned smaller than " + std::string(codec::kCodecNames[classic.codec]) + " on a training-like delta");
  // Identical words (a zero delta): both transforms give zeros; every class at width 0, no exceptions.
  check(conditioned_round_trip<uint16_t>(b, b, 7), "conditioned, a zero delta");
  // One class, one value each but a few: those few are exceptions over width 0 or a narrow width.
  std::vector<uint16_t> same(64, 0x3f80), few = same;
  few[3] ^= 0x7;
  few[40] ^= 0x7fff;
  check(conditioned_round_trip<uint16_t>(same, few, 7), "conditioned, a few exceptions in one class");

  // Malformed: a payload too short for its slots, a header past the payload, classes out of order.
  const codec::ConditionedPlan plan = codec::plan_conditioned<uint16_t>(b.data(), f.data(), 4096, 7);
  std::vector<uint8_t> payload;
  const codec::TileEntry entry = codec::encode_conditioned<uint16_t>(b.data(), f.data(), 4096, plan, payload);
  std::vector<uint16_t> out = b;
  codec::TileEntry cut = entry;
  cut.reserved -= 4;
  check(!codec::decode_conditioned<uint16_t>(payload.data(), cut, 4096, 64, out.data(), 64),
        "conditioned: slots running past a shortened payload are refused");
  codec::TileEntry tiny = entry;
  tiny.reserved = 1;
  tiny.n_exc = 100;
  check(!codec::decode_conditioned<uint16_t>(payload.data(), tiny, 4096, 64, out.data(), 64),
        "conditioned: a header past the payload is refused");
  std::vector<uint8_t> swapped = payload;
  const uint64_t h = codec::conditioned_header_offset(entry);
  if (swapped[h] >= 2) std::swap(swapped[h + 4], swapped[h + 6]);
  check(swapped[h] >= 2 && !codec::decode_conditioned<uint16_t>(swapped.data(), entry, 4096, 64, out.data(), 64),
        "conditioned: classes out of order are refused");
  // The unary stream, which host validation checks whole: a run longer than an escape, an escape code
  // without its listed escape, a stray bit after the last code, a word too many: each refused. The decoder
  // (which trusts validated sections for the rest) refuses the first two too, reading nothing outside.
  codec::ConditionedLayout l;
  check(codec::conditioned_layout(payload.data(), entry, 2, l) && entry.n_exc > 0,
        "conditioned: the training-like delta has escapes");
  const uint64_t unary = (uint64_t)(l.unary - payload.data());
  const auto stream_refused = [&](const std::vector<uint8_t>& p, codec::TileEntry e, bool by_decoder) {
    out = b;
    return !codec::conditioned_stream_valid(p.data(), e, 4096, 2) &&
           (!by_decoder || !codec::decode_conditioned<uint16_t>(p.data(), e, 4096, 64, out.data(), 64));
  };
  std::vector<uint8_t> bad = payload;
  for (int j = 0; j < 3; ++j) bad[unary + 100 + j] = 0xff;  // 24 ones: longer than any code
  check(stream_refused(bad, entry, true), "conditioned: a unary run longer than an escape is refused");
  bad = payload;
  const uint32_t first = codec::conditioned_position(payload.data(), entry, 0);
  bad[0] = (uint8_t)(first + 1);  // the first escape listed one element late
  bad[entry.n_exc] = (uint8_t)((first + 1) >> 8);
  check(stream_refused(bad, entry, true), "conditioned: an escape code without its escape is refused");
  bad = payload;
  bad[unary + 4ull * l.unary_words - 1] |= 0x80;  // the last word's top bit: past the last code
  check(stream_refused(bad, entry, false), "conditioned: a bit set after the last code is refused");
  bad = payload;
  bad[codec::conditioned_header_offset(entry) + 2] += 1;  // one stream word more
  check(stream_refused(bad, entry, false), "conditioned: a stream longer than its codes is refused");
  check(codec::conditioned_stream_valid(payload.data(), entry, 4096, 2), "conditioned: the encoder's stream");
  // Streams with a few bits flipped (runs merged, split, lengthened; escapes moved; codes added or lost):
  // the word-parallel check agrees with the code-by-code reading on every one.
  std::mt19937 flips(11);
  int agree = 0, valid = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    bad = payload;
    for (uint32_t f = 0, n = 1 + flips() % 3; f < n; ++f) {
      const uint32_t at = (uint32_t)(flips() % (32 * l.unary_words));
      bad[unary + at / 8] ^= (uint8_t)(1u << (at % 8));
    }
    const bool fast = codec::conditioned_stream_valid(bad.data(), entry, 4096, 2);
    agree += fast == stream_valid_walked(bad.data(), entry, 4096);
    valid += fast;
  }
  check(agree == 3000 && stream_valid_walked(payload.data(), entry, 4096),
        "conditioned: the word-parallel stream check agrees with a code-by-code reading (" +
            std::to_string(agree) + " of 3000, " + std::to_string(valid) + " valid)");
  // Random payloads of every size: decoded or refused, never read past (the sanitizer builds watch).
  std::mt19937 rng(5);
  int refused = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const uint16_t units = (uint16_t)(1 + rng() % 40);
    std::vector<uint8_t> junk(units * codec::kTileAlign);
    for (auto& byte : junk) byte = (uint8_t)(rng() % 4 ? rng() % 3 : rng());  // small counts, some classes
    const codec::TileEntry e{(uint32_t)(rng() % 64), codec::kConditioned, (uint8_t)(7 << 1 | (rng() & 0x41)), units};
    out = b;
    refused += !codec::decode_conditioned<uint16_t>(junk.data(), e, 4096, 64, out.data(), 64);
  }
  check(refused > 0, "conditioned: random payloads decoded or refused, never read past (" +
                         std::to_string(refused) + " of 2000 refused)");
  check(!codec::conditioned_entry_valid({0, codec::kConditioned, 7 << 1, 0}, 64, 2) &&
            !codec::conditioned_entry_valid({0, codec::kConditioned, 16 << 1, 1}, 64, 2) &&
            !codec::conditioned_entry_valid({0, codec::kConditioned, 7 << 1, 1}, 64, 1),
        "conditioned entries: a size, a shift inside the word, 16- or 32-bit words");
  check(codec::tile_entry_valid(entry, 4096, 2), "sections take conditioned tiles");
}

// Whole sections with the conditioned codec: chosen where it is smaller, validated, applied exactly (whole
// and by blocks of grid rows and columns), smaller than the XOR-only section; a malformed header refused.
template <typename Word>
static void conditioned_section(TileGrid g, uint32_t shift) {
  std::vector<Word> b, f;
  float_tile<Word>((uint32_t)(g.rows * g.cols), shift, 77, b, f);
  const uint8_t* base = reinterpret_cast<const uint8_t*>(b.data());
  const uint8_t* ft = reinterpret_cast<const uint8_t*>(f.data());
  const std::vector<uint8_t> s = format::encode_section(base, ft, g, (int)shift);
  const std::vector<uint8_t> plain = format::encode_section(base, ft, g);
  const std::string what = "conditioned section, " + std::to_string(g.rows) + "x" + std::to_string(g.cols) +
                           " eb=" + std::to_string(g.elem_bytes);
  const auto offsets = format::validate_section(s.data(), s.size(), g);
  uint64_t conditioned = 0;
  for (uint64_t t = 0; t < g.num_tiles(); ++t)
    conditioned += codec::load_entry(s.data(), t).codec == codec::kConditioned;
  std::vector<uint8_t> out(g.tensor_bytes(), 0xAA), blocks(g.tensor_bytes(), 0xAA);
  std::vector<uint8_t> in_place(base, base + g.tensor_bytes());
  format::apply_section_block(s.data(), offsets.data(), g, 0, g.grid_rows(), 0, g.grid_cols(), base,
                              {out.data(), 0, 0, g.cols});
  for (uint64_t gr = 0; gr < g.grid_rows(); ++gr)
    for (uint64_t gc = 0; gc < g.grid_cols(); ++gc)
      format::apply_section_block(s.data(), offsets.data(), g, gr, gr + 1, gc, gc + 1, base,
                                  {blocks.data(), 0, 0, g.cols});
  format::apply_section_block(s.data(), offsets.data(), g, 0, g.grid_rows(), 0, g.grid_cols(), in_place.data(),
                              {in_place.data(), 0, 0, g.cols});
  const std::vector<uint8_t> want(ft, ft + g.tensor_bytes());
  check(conditioned > 0 && out == want && blocks == want && in_place == want && s.size() < plain.size(),
        what + ": " + std::to_string(conditioned) + " conditioned tiles, " + std::to_string(s.size()) + " against " +
            std::to_string(plain.size()) + " bytes XOR-only");
  // The wrong base: refused by a tile whose slots no longer fit, or decoded to other words; never read past.
  std::vector<uint8_t> other(base, base + g.tensor_bytes());
  for (size_t i = 1; i < other.size(); i += 2) other[i] ^= 0x40;  // exponents moved: other classes, widths
  bool refused = throws([&] {
    format::apply_section_block(s.data(), offsets.data(), g, 0, g.grid_rows(), 0, g.grid_cols(), other.data(),
                                {out.data(), 0, 0, g.cols});
  });
  check(refused || out != want, what + ": another base does not give the fine-tune");
  // A header whose classes are out of order: refused by validation.
  for (uint64_t t = 0; t < g.num_tiles(); ++t) {
    const codec::TileEntry e = codec::load_entry(s.data(), t);
    if (e.codec != codec::kConditioned) continue;
    std::vector<uint8_t> bad = s;
    const uint64_t h = offsets[t] + codec::conditioned_header_offset(e);
    if (bad[h] < 2) continue;
    std::swap(bad[h + 2], bad[h + 4]);
    check(throws([&] { format::validate_section(bad.data(), bad.size(), g); }),
          what + ": a header with classes out of order is refused");
    break;
  }
}

// Tile ranges encoded apart and joined (entries, then payloads) give encode_section's bytes: what the Python
// binding does on several threads for a large tensor.
template <typename Word>
static void ranges_join_to_the_section(TileGrid g, int shift) {
  std::vector<Word> b, f;
  float_tile<Word>((uint32_t)(g.rows * g.cols), shift < 0 ? 7 : (uint32_t)shift, 5, b, f);
  const uint8_t* base = reinterpret_cast<const uint8_t*>(b.data());
  const uint8_t* ft = reinterpret_cast<const uint8_t*>(f.data());
  const std::vector<uint8_t> whole = format::encode_section(base, ft, g, shift);
  const uint64_t n = g.num_tiles();
  for (uint64_t parts : {(uint64_t)1, (uint64_t)2, (uint64_t)3, n}) {
    std::vector<uint8_t> joined(g.table_bytes(), 0), payloads;
    std::vector<codec::TileEntry> entries;
    for (uint64_t p = 0; p < parts; ++p) {
      std::vector<uint8_t> pay;
      format::encode_tiles(base, ft, g, shift, n * p / parts, n * (p + 1) / parts, entries, pay);
      payloads.insert(payloads.end(), pay.begin(), pay.end());
    }
    memcpy(joined.data(), entries.data(), entries.size() * sizeof(codec::TileEntry));
    joined.insert(joined.end(), payloads.begin(), payloads.end());
    check(entries.size() == n && joined == whole, "tile ranges joined, " + std::to_string(parts) + " parts of " +
                                                      std::to_string(n) + " tiles, shift " + std::to_string(shift));
  }
  check(throws([&] {
          std::vector<codec::TileEntry> e;
          std::vector<uint8_t> p;
          format::encode_tiles(base, ft, g, shift, 0, n + 1, e, p);
        }),
        "a tile range past the grid is refused");
}

int main() {
  ranges_join_to_the_section<uint16_t>(TileGrid{130, 200, 64, 64, 2}, 7);
  ranges_join_to_the_section<uint16_t>(TileGrid{130, 200, 64, 64, 2}, -1);
  ranges_join_to_the_section<uint32_t>(TileGrid{100, 70, 32, 32, 4}, 23);
  conditioned_section<uint16_t>(TileGrid{130, 200, 64, 64, 2}, 7);
  conditioned_section<uint16_t>(TileGrid{64, 128, 64, 64, 2}, 10);
  conditioned_section<uint32_t>(TileGrid{100, 70, 64, 64, 4}, 23);
  test_conditioned_codec();
  test_round_trips();
  test_codec_choice();
  test_cooperative_decode_matches_serial();
  test_validation_rejects_bad_sections();
  test_payload_size_formula();
  test_block_apply_and_bounds();
  test_strided_xor_decode();
  return report();
}
