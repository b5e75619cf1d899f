#include "format/delta_section.h"

#include <string.h>

#include <algorithm>

#include "codec/tile_encoder.h"

namespace xorgemm {
namespace format {

using codec::TileEntry;

uint32_t TileGrid::tile_height(uint64_t t) const {
  uint64_t r0 = tile_row0(t);
  return (uint32_t)std::min<uint64_t>(tile_rows, rows - r0);
}
uint32_t TileGrid::tile_width(uint64_t t) const {
  uint64_t c0 = tile_col0(t);
  return (uint32_t)std::min<uint64_t>(tile_cols, cols - c0);
}

void TileGrid::check() const {
  if (!(elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8))
    throw FormatError("element size " + std::to_string(elem_bytes) + " is not 1, 2, 4 or 8 bytes");
  if (tile_rows == 0 || tile_cols == 0 || (uint64_t)tile_rows * tile_cols > codec::kMaxTileElems)
    throw FormatError("tile shape " + std::to_string(tile_rows) + "x" + std::to_string(tile_cols) +
                      " is empty or holds more than " + std::to_string(codec::kMaxTileElems) + " elements");
  // Keeps rows*cols*elem_bytes and every offset derived from it far from overflow.
  if (rows == 0 || cols == 0 || rows > (1ull << 40) || cols > (1ull << 40) || rows * cols > (1ull << 44))
    throw FormatError("tensor shape " + std::to_string(rows) + "x" + std::to_string(cols) + " is out of range");
}

uint64_t table_bytes(const TileGrid& g) {
  return codec::align_up(g.num_tiles() * sizeof(TileEntry), codec::kTileAlign);
}

// Gathers tile t's XOR words, row-major inside the tile.
static void gather_xor_words(const uint8_t* base, const uint8_t* ft, const TileGrid& g, uint64_t t,
                             std::vector<uint64_t>& words) {
  const uint32_t h = g.tile_height(t), w = g.tile_width(t), eb = g.elem_bytes;
  const uint64_t r0 = g.tile_row0(t), c0 = g.tile_col0(t);
  words.resize((size_t)h * w);
  for (uint32_t r = 0; r < h; ++r) {
    const uint64_t at = ((r0 + r) * g.cols + c0) * eb;
    const uint8_t* b = base + at;
    const uint8_t* f = ft + at;
    uint64_t* dst = words.data() + (size_t)r * w;
    for (uint32_t c = 0; c < w; ++c)
      dst[c] = codec::load_word(b + (size_t)c * eb, eb) ^ codec::load_word(f + (size_t)c * eb, eb);
  }
}

std::vector<uint8_t> encode_section(const uint8_t* base, const uint8_t* finetuned, const TileGrid& g) {
  g.check();
  const uint64_t n = g.num_tiles();
  std::vector<uint8_t> out(table_bytes(g), 0);
  std::vector<uint64_t> words;
  for (uint64_t t = 0; t < n; ++t) {
    gather_xor_words(base, finetuned, g, t, words);
    const uint32_t elems = (uint32_t)words.size();
    TileEntry e = codec::choose_tile_codec(words.data(), elems, g.elem_bytes);
    memcpy(out.data() + t * sizeof(TileEntry), &e, sizeof e);
    codec::encode_tile(words.data(), elems, g.elem_bytes, e, out);
  }
  return out;
}

static TileEntry read_entry(const uint8_t* section, uint64_t t) {
  TileEntry e;
  memcpy(&e, section + t * sizeof(TileEntry), sizeof e);
  return e;
}

std::vector<uint64_t> validate_section(const uint8_t* section, uint64_t len, const TileGrid& g) {
  g.check();
  const uint64_t n = g.num_tiles();
  const uint64_t header = table_bytes(g);
  if (len < header)
    throw FormatError("section of " + std::to_string(len) + " bytes is shorter than its tile table (" +
                      std::to_string(n) + " tiles)");
  std::vector<uint64_t> offsets(n);
  uint64_t at = header;
  for (uint64_t t = 0; t < n; ++t) {
    const TileEntry e = read_entry(section, t);
    const uint32_t elems = g.tile_height(t) * g.tile_width(t);
    if (!codec::tile_entry_valid(e, elems, g.elem_bytes))
      throw FormatError("tile " + std::to_string(t) + " has an invalid entry (codec " + std::to_string(e.codec) +
                        ", low bytes " + std::to_string(e.low_bytes) + ", exceptions " +
                        std::to_string(e.n_exc) + ") for " + std::to_string(elems) + " elements");
    const uint64_t size = codec::tile_payload_bytes(e, elems, g.elem_bytes);
    if (size > len - at)
      throw FormatError("tile " + std::to_string(t) + " runs past the end of the section");
    offsets[t] = at;
    // Positions strictly increasing also bounds them by the tile and rules out duplicates.
    int64_t prev = -1;
    for (uint32_t x = 0; x < e.n_exc; ++x) {
      const uint32_t i = codec::exception_position(section + at, e, elems, x);
      if ((int64_t)i <= prev || i >= elems)
        throw FormatError("tile " + std::to_string(t) + " has a bad exception position " + std::to_string(i));
      prev = i;
    }
    at += size;
  }
  if (at != len)
    throw FormatError("section holds " + std::to_string(len) + " bytes but its tiles account for " +
                      std::to_string(at));
  return offsets;
}

void apply_section_tiles(const uint8_t* section, const std::vector<uint64_t>& offsets, const TileGrid& g,
                         uint64_t t_begin, uint64_t t_end, uint8_t* inout) {
  const uint32_t eb = g.elem_bytes;
  std::vector<uint8_t> scratch((size_t)g.tile_rows * g.tile_cols * eb);
  for (uint64_t t = t_begin; t < t_end; ++t) {
    const TileEntry e = read_entry(section, t);
    if (e.codec == codec::kZero) continue;
    const uint32_t h = g.tile_height(t), w = g.tile_width(t), elems = h * w;
    const uint8_t* payload = section + offsets[t];
    codec::decode_tile_low(payload, e, elems, eb, scratch.data(), 0, 1);
    codec::decode_tile_exceptions(payload, e, elems, eb, scratch.data(), 0, 1);
    const uint64_t r0 = g.tile_row0(t), c0 = g.tile_col0(t);
    for (uint32_t r = 0; r < h; ++r) {
      uint8_t* dst = inout + ((r0 + r) * g.cols + c0) * eb;
      const uint8_t* src = scratch.data() + (size_t)r * w * eb;
      for (size_t b = 0; b < (size_t)w * eb; ++b) dst[b] ^= src[b];
    }
  }
}

void codec_counts(const uint8_t* section, const TileGrid& g, uint64_t counts[codec::kNumCodecs]) {
  for (int c = 0; c < codec::kNumCodecs; ++c) counts[c] = 0;
  for (uint64_t t = 0; t < g.num_tiles(); ++t) {
    const uint8_t c = read_entry(section, t).codec;
    if (c < codec::kNumCodecs) ++counts[c];
  }
}

}  // namespace format
}  // namespace xorgemm
