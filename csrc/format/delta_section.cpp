#include "format/delta_section.h"

#include <string.h>

#include <algorithm>

#include "codec/tile_encoder.h"

namespace xorgemm {
namespace format {

using codec::TileEntry;

// Gathers tile t's XOR words, row-major inside the tile. Word is the element's unsigned type, so the
// compiler vectorizes the row loop.
template <typename Word>
static void gather_xor_words(const uint8_t* base, const uint8_t* ft, const TileGrid& g, uint64_t t,
                             std::vector<Word>& words, std::vector<Word>& row) {
  const uint32_t h = g.tile_height(t), w = g.tile_width(t);
  const uint64_t r0 = g.tile_row0(t), c0 = g.tile_col0(t);
  words.resize((size_t)h * w);
  row.resize(w);
  for (uint32_t r = 0; r < h; ++r) {
    const uint64_t at = ((r0 + r) * g.cols + c0) * sizeof(Word);
    Word* dst = words.data() + (size_t)r * w;
    memcpy(dst, base + at, (size_t)w * sizeof(Word));  // rows need not be aligned
    memcpy(row.data(), ft + at, (size_t)w * sizeof(Word));
    for (uint32_t c = 0; c < w; ++c) dst[c] ^= row[c];
  }
}

// Tile t's words of `src`, row-major inside the tile.
template <typename Word>
static void gather_tile(const uint8_t* src, const TileGrid& g, uint64_t t, std::vector<Word>& words) {
  const uint32_t h = g.tile_height(t), w = g.tile_width(t);
  const uint64_t r0 = g.tile_row0(t), c0 = g.tile_col0(t);
  words.resize((size_t)h * w);
  for (uint32_t r = 0; r < h; ++r)
    memcpy(words.data() + (size_t)r * w, src + ((r0 + r) * g.cols + c0) * sizeof(Word), (size_t)w * sizeof(Word));
}

template <typename Word>
static void encode_tiles_as(const uint8_t* base, const uint8_t* finetuned, const TileGrid& g, int shift, uint64_t t0,
                            uint64_t t1, std::vector<TileEntry>& entries, std::vector<uint8_t>& out) {
  std::vector<Word> words, row, base_words, ft_words;
  std::vector<uint64_t> scratch;
  const bool conditioned = shift >= 0 && (sizeof(Word) == 2 || sizeof(Word) == 4);
  for (uint64_t t = t0; t < t1; ++t) {
    gather_xor_words<Word>(base, finetuned, g, t, words, row);
    const uint32_t elems = (uint32_t)words.size();
    TileEntry e = codec::choose_tile_codec(words.data(), elems, g.elem_bytes);
    if (conditioned && e.codec != codec::kZero && e.codec != codec::kSparse) {
      gather_tile<Word>(base, g, t, base_words);
      gather_tile<Word>(finetuned, g, t, ft_words);
      const codec::ConditionedPlan plan =
          codec::plan_conditioned<Word>(base_words.data(), ft_words.data(), elems, (uint32_t)shift);
      const uint64_t start = out.size();
      const TileEntry c = codec::encode_conditioned<Word>(base_words.data(), ft_words.data(), elems, plan, out);
      if (c.reserved != 0 && out.size() - start < codec::tile_payload_bytes(e, elems, g.elem_bytes)) {
        entries.push_back(c);
        continue;
      }
      out.resize(start);  // the XOR codecs are smaller here
    }
    entries.push_back(e);
    codec::encode_tile(words.data(), elems, g.elem_bytes, e, out, scratch);
  }
}

static void check_encode_args(const TileGrid& g, int shift) {
  g.check();
  if (shift >= (int)(8 * g.elem_bytes))
    throw FormatError("a context shift of " + std::to_string(shift) + " bits is outside a " +
                      std::to_string(8 * g.elem_bytes) + "-bit word");
}

void encode_tiles(const uint8_t* base, const uint8_t* finetuned, const TileGrid& g, int shift, uint64_t t0,
                  uint64_t t1, std::vector<TileEntry>& entries, std::vector<uint8_t>& payloads) {
  check_encode_args(g, shift);
  if (t0 > t1 || t1 > g.num_tiles()) throw FormatError("tile range outside the grid");
  switch (g.elem_bytes) {
    case 1: return encode_tiles_as<uint8_t>(base, finetuned, g, shift, t0, t1, entries, payloads);
    case 2: return encode_tiles_as<uint16_t>(base, finetuned, g, shift, t0, t1, entries, payloads);
    case 4: return encode_tiles_as<uint32_t>(base, finetuned, g, shift, t0, t1, entries, payloads);
    default: return encode_tiles_as<uint64_t>(base, finetuned, g, shift, t0, t1, entries, payloads);
  }
}

std::vector<uint8_t> encode_section(const uint8_t* base, const uint8_t* finetuned, const TileGrid& g, int shift) {
  check_encode_args(g, shift);
  const uint64_t n = g.num_tiles();
  std::vector<uint8_t> out(g.table_bytes(), 0);  // the payloads follow the (16-aligned) table
  // Room for every tile stored raw, so appending never reallocates.
  out.reserve(out.size() + g.tensor_bytes() + n * codec::kTileAlign);
  std::vector<TileEntry> entries;
  entries.reserve(n);
  encode_tiles(base, finetuned, g, shift, 0, n, entries, out);
  memcpy(out.data(), entries.data(), n * sizeof(TileEntry));
  return out;
}

std::vector<uint64_t> table_offsets(const uint8_t* section, uint64_t len, const TileGrid& g) {
  g.check();
  const uint64_t n = g.num_tiles();
  const uint64_t header = g.table_bytes();
  if (len < header)
    throw FormatError("section of " + std::to_string(len) + " bytes is shorter than its tile table (" +
                      std::to_string(n) + " tiles)");
  std::vector<uint64_t> offsets(n);
  uint64_t at = header;
  for (uint64_t t = 0; t < n; ++t) {
    const TileEntry e = codec::load_entry(section, t);
    const uint32_t elems = g.tile_height(t) * g.tile_width(t);
    if (!codec::tile_entry_valid(e, elems, g.elem_bytes))
      throw FormatError("tile " + std::to_string(t) + " has an invalid entry (codec " + std::to_string(e.codec) +
                        ", low bytes " + std::to_string(e.low_bytes) + ", exceptions " +
                        std::to_string(e.n_exc) + ") for " + std::to_string(elems) + " elements");
    const uint64_t size = codec::tile_payload_bytes(e, elems, g.elem_bytes);
    if (size > len - at)
      throw FormatError("tile " + std::to_string(t) + " runs past the end of the section");
    offsets[t] = at;
    at += size;
  }
  if (at != len)
    throw FormatError("section holds " + std::to_string(len) + " bytes but its tiles account for " +
                      std::to_string(at));
  return offsets;
}

std::vector<uint64_t> validate_section(const uint8_t* section, uint64_t len, const TileGrid& g) {
  std::vector<uint64_t> offsets = table_offsets(section, len, g);
  for (uint64_t t = 0; t < offsets.size(); ++t) {
    const TileEntry e = codec::load_entry(section, t);
    const uint32_t elems = g.tile_height(t) * g.tile_width(t);
    const uint8_t* payload = section + offsets[t];
    if (e.codec == codec::kConditioned) {
      // Its header, stream and escapes need no base: checked whole here (the slots' fit needs the base and
      // is checked by every decode).
      if (!codec::conditioned_stream_valid(payload, e, elems, g.elem_bytes))
        throw FormatError("tile " + std::to_string(t) + " has a malformed conditioned payload (header, unary "
                          "stream or escapes)");
      continue;
    }
    // Positions strictly increasing also bounds them by the tile and rules out duplicates.
    int64_t prev = -1;
    for (uint32_t x = 0; x < e.n_exc; ++x) {
      const uint32_t i = codec::exception_position(payload, e, elems, x);
      if ((int64_t)i <= prev || i >= elems)
        throw FormatError("tile " + std::to_string(t) + " has a bad exception position " + std::to_string(i));
      prev = i;
    }
  }
  return offsets;
}

static void check_tile_edge(uint64_t at, uint64_t tile, uint64_t edge, const char* what, bool is_end) {
  if (at % tile != 0 && !(is_end && at == edge))
    throw FormatError(std::string(what) + " " + std::to_string(at) + " is not on a " + std::to_string(tile) +
                      "-wide tile boundary" + (is_end ? " or the tensor's edge (" + std::to_string(edge) + ")" : ""));
}

std::vector<uint8_t> slice_section(const uint8_t* section, const uint64_t* offsets, const TileGrid& g, uint64_t row0,
                                   uint64_t row1, uint64_t col0, uint64_t col1, TileGrid* sub) {
  g.check();
  if (!(row0 < row1 && row1 <= g.rows && col0 < col1 && col1 <= g.cols))
    throw FormatError("block rows [" + std::to_string(row0) + ", " + std::to_string(row1) + ") x columns [" +
                      std::to_string(col0) + ", " + std::to_string(col1) + ") is not inside the " +
                      std::to_string(g.rows) + " x " + std::to_string(g.cols) + " tensor");
  check_tile_edge(row0, g.tile_rows, g.rows, "row", false);
  check_tile_edge(row1, g.tile_rows, g.rows, "row", true);
  check_tile_edge(col0, g.tile_cols, g.cols, "column", false);
  check_tile_edge(col1, g.tile_cols, g.cols, "column", true);
  *sub = TileGrid::make(row1 - row0, col1 - col0, g.tile_rows, g.tile_cols, g.elem_bytes);
  const uint64_t gr0 = row0 / g.tile_rows, gc0 = col0 / g.tile_cols;
  std::vector<uint8_t> out(sub->table_bytes(), 0);
  for (uint64_t t = 0; t < sub->num_tiles(); ++t) {
    const uint64_t src = (gr0 + t / sub->grid_cols()) * g.grid_cols() + gc0 + t % sub->grid_cols();
    const TileEntry e = codec::load_entry(section, src);
    const uint64_t size = codec::tile_payload_bytes(e, g.tile_height(src) * g.tile_width(src), g.elem_bytes);
    memcpy(out.data() + t * sizeof(TileEntry), section + src * sizeof(TileEntry), sizeof(TileEntry));
    out.insert(out.end(), section + offsets[src], section + offsets[src] + size);
  }
  return out;
}

void check_section_bounds(const uint8_t* section, uint64_t len, const uint64_t* offsets, const TileGrid& g) {
  g.check();
  const uint64_t header = g.table_bytes();
  if (len < header) throw FormatError("section is shorter than its tile table");
  for (uint64_t t = 0; t < g.num_tiles(); ++t) {
    const TileEntry e = codec::load_entry(section, t);
    const uint32_t elems = g.tile_height(t) * g.tile_width(t);
    if (!codec::tile_entry_valid(e, elems, g.elem_bytes))
      throw FormatError("tile " + std::to_string(t) + " has an invalid entry");
    if (!codec::tile_readable(e, elems, g.elem_bytes, offsets[t], header, len))
      throw FormatError("tile " + std::to_string(t) + " has a payload offset outside the section");
  }
}

// out[c] = base[c] ^ x[c] over a row; out may be base (in place) or not overlap it at all. Elements move
// through memcpy (rows need not be aligned), which compiles to plain loads and stores; the compiler
// vectorizes the loop behind a run-time overlap check.
template <typename Word>
static void xor_row(const uint8_t* b, const Word* __restrict__ x, uint8_t* o, uint32_t w) {
  for (uint32_t c = 0; c < w; ++c) {
    Word v;
    memcpy(&v, b + (size_t)c * sizeof(Word), sizeof(Word));
    v ^= x[c];
    memcpy(o + (size_t)c * sizeof(Word), &v, sizeof(Word));
  }
}

template <typename Word>
static void apply_block_as(const uint8_t* section, const uint64_t* offsets, const TileGrid& g, uint64_t gr0,
                           uint64_t gr1, uint64_t gc0, uint64_t gc1, const uint8_t* base, const OutBlock& out) {
  std::vector<Word> scratch((size_t)g.tile_rows * g.tile_cols);
  const uint64_t grid_cols = g.grid_cols();
  // When the block spans whole rows, each grid row's base rows are copied as one contiguous stream (a
  // tile's rows are far apart: copying them tile by tile thrashes the TLB), and its tiles then patch it in
  // place while it is still in cache.
  const bool whole_rows = gc0 == 0 && gc1 == grid_cols && out.col0 == 0 && out.ld == g.cols;
  for (uint64_t gr = gr0; gr < gr1; ++gr) {
    const uint64_t row_begin = gr * g.tile_rows, row_end = std::min<uint64_t>(row_begin + g.tile_rows, g.rows);
    const uint8_t* rows_base = base + row_begin * g.cols * sizeof(Word);
    uint8_t* rows_out = out.data + (row_begin - out.row0) * out.ld * sizeof(Word);
    const bool copied = whole_rows;
    if (whole_rows && rows_out != rows_base) memcpy(rows_out, rows_base, (row_end - row_begin) * g.cols * sizeof(Word));
    for (uint64_t gc = gc0; gc < gc1; ++gc) {
      const uint64_t t = gr * grid_cols + gc;
      const TileEntry e = codec::load_entry(section, t);
      const uint32_t h = g.tile_height(t), w = g.tile_width(t), elems = h * w;
      const uint64_t r0 = g.tile_row0(t), c0 = g.tile_col0(t);
      auto base_row = [&](uint32_t r) { return base + ((r0 + r) * g.cols + c0) * sizeof(Word); };
      auto out_row = [&](uint32_t r) {
        return out.data + ((r0 + r - out.row0) * out.ld + (c0 - out.col0)) * sizeof(Word);
      };
      const uint8_t* payload = section + offsets[t];
      if (e.codec == codec::kZero || e.codec == codec::kSparse) {
        // Few or no changes: copy the base and patch only the listed words, not the whole tile.
        if (!copied && out_row(0) != base_row(0))
          for (uint32_t r = 0; r < h; ++r) memcpy(out_row(r), base_row(r), (size_t)w * sizeof(Word));
        // Tile widths are powers of two but on the ragged edge: avoid a hardware divide per word.
        const bool pow2 = (w & (w - 1)) == 0;
        const uint32_t log2w = pow2 ? (uint32_t)__builtin_ctz(w) : 0;
        for (uint32_t x = 0; x < e.n_exc; ++x) {
          const uint32_t i = codec::exception_position(payload, e, elems, x);
          if (i >= elems) continue;
          const uint32_t r = pow2 ? i >> log2w : i / w, c = pow2 ? i & (w - 1) : i % w;
          uint8_t* o = out_row(r) + (size_t)c * sizeof(Word);
          Word v;
          memcpy(&v, o, sizeof(Word));
          v ^= (Word)codec::exception_high_bits(payload, e, elems, sizeof(Word), x);
          memcpy(o, &v, sizeof(Word));
        }
        continue;
      }
      if (e.codec == codec::kConditioned) {
        // The base tile is the decode's context: gathered, decoded in place into the fine-tuned tile.
        for (uint32_t r = 0; r < h; ++r)
          memcpy(scratch.data() + (size_t)r * w, copied ? out_row(r) : base_row(r), (size_t)w * sizeof(Word));
        if (!codec::decode_conditioned<Word>(payload, e, elems, w, scratch.data(), w))
          throw FormatError("tile " + std::to_string(t) + " does not decode against this base: its slots run past "
                            "its payload, or its header, stream or escapes are malformed");
        for (uint32_t r = 0; r < h; ++r) memcpy(out_row(r), scratch.data() + (size_t)r * w, (size_t)w * sizeof(Word));
        continue;
      }
      codec::decode_tile_low<Word>(payload, e, elems, scratch.data(), 0, 1);
      codec::decode_tile_exceptions<Word>(payload, e, elems, scratch.data(), 0, 1);
      for (uint32_t r = 0; r < h; ++r) {
        uint8_t* o = out_row(r);
        xor_row<Word>(copied ? o : base_row(r), scratch.data() + (size_t)r * w, o, w);
      }
    }
  }
}

void apply_section_block(const uint8_t* section, const uint64_t* offsets, const TileGrid& g, uint64_t gr0,
                         uint64_t gr1, uint64_t gc0, uint64_t gc1, const uint8_t* base, const OutBlock& out) {
  switch (g.elem_bytes) {
    case 1: return apply_block_as<uint8_t>(section, offsets, g, gr0, gr1, gc0, gc1, base, out);
    case 2: return apply_block_as<uint16_t>(section, offsets, g, gr0, gr1, gc0, gc1, base, out);
    case 4: return apply_block_as<uint32_t>(section, offsets, g, gr0, gr1, gc0, gc1, base, out);
    default: return apply_block_as<uint64_t>(section, offsets, g, gr0, gr1, gc0, gc1, base, out);
  }
}

void codec_counts(const uint8_t* section, const TileGrid& g, uint64_t counts[codec::kNumCodecs]) {
  for (int c = 0; c < codec::kNumCodecs; ++c) counts[c] = 0;
  for (uint64_t t = 0; t < g.num_tiles(); ++t) {
    const uint8_t c = codec::load_entry(section, t).codec;
    if (c < codec::kNumCodecs) ++counts[c];
  }
}

}  // namespace format
}  // namespace xorgemm
