// A tensor's delta section: the tile grid over a 2-D view of the tensor, its tile table and the tile
// payloads, as they sit in the decoded stream of a .xor.safetensors file:
//
//   [tile table: n_tiles x TileEntry (8 bytes)][zero padding to kTileAlign][tile payloads, in grid order]
//
// Tiles are row-major over the grid; the last tile row/column may be ragged. Plain C++ (no torch) so the
// native unit tests and the fuzzer use exactly the code the Python extension runs.
#pragma once

#include <stdint.h>

#include <vector>

#include "codec/tile_codec.h"
#include "format/tile_grid.h"

namespace xorgemm {
namespace format {

// Encodes finetuned against base (both rows*cols*elem_bytes bytes) as a whole section, each tile in the
// smallest codec. `shift` >= 0 names the base words' class bits for the conditioned codec (the exponent:
// 7 for bf16, 10 for fp16 (with the sign), 23 for fp32); -1 leaves it out (integers, or a caller that
// wants XOR-only tiles).
std::vector<uint8_t> encode_section(const uint8_t* base, const uint8_t* finetuned, const TileGrid& g, int shift = -1);

// Tiles [t0, t1) of that section: their table entries appended to `entries` and their payloads (each padded
// to kTileAlign) to `payloads`. Every tile is encoded on its own, so ranges encoded apart (on several
// threads) and joined, entries then payloads, give encode_section's bytes exactly.
void encode_tiles(const uint8_t* base, const uint8_t* finetuned, const TileGrid& g, int shift, uint64_t t0,
                  uint64_t t1, std::vector<codec::TileEntry>& entries, std::vector<uint8_t>& payloads);

// Checks a section's tile table alone (every entry well formed, payloads filling exactly `len` bytes) and
// returns each tile's payload offset: what a section decompressed on a GPU gets, its table read back.
// Only the table's n_tiles * 8 bytes are read.
std::vector<uint64_t> table_offsets(const uint8_t* table, uint64_t len, const TileGrid& g);

// Validates a section of `len` bytes completely (table entries, total size, exception positions strictly
// increasing and inside their tile) and returns each tile's payload offset within the section.
std::vector<uint64_t> validate_section(const uint8_t* section, uint64_t len, const TileGrid& g);

// Where patched tiles are written: a row-major block of the tensor whose element (0, 0) is tensor element
// (row0, col0), with `ld` elements per row. The whole tensor is {data, 0, 0, cols}.
struct OutBlock {
  uint8_t* data;
  uint64_t row0, col0, ld;
};

// Writes the fine-tuned tensor for the tiles in grid rows [gr0, gr1) x grid columns [gc0, gc1) of a
// validated section (tile payloads at `offsets`) into `out`, from the base bytes (rows*cols*elem_bytes).
// Given zeros instead it yields the XOR itself only when no tile is conditioned (those decode against the
// base: a tile that does not fit it throws FormatError). `out` may alias `base` (in place).
void apply_section_block(const uint8_t* section, const uint64_t* offsets, const TileGrid& g, uint64_t gr0,
                         uint64_t gr1, uint64_t gc0, uint64_t gc1, const uint8_t* base, const OutBlock& out);

// The checks that make decoding memory-safe, for sections whose offsets were computed elsewhere (O(tiles)):
// every entry well formed and every payload inside the section. validate_section also checks exception
// positions; decoders skip out-of-tile positions, so this is enough for safety, not for correctness.
void check_section_bounds(const uint8_t* section, uint64_t len, const uint64_t* offsets, const TileGrid& g);

// The section of the block rows [row0, row1) x columns [col0, col1) of a validated section's tensor (2-D
// view), made of its tiles as they are, no decoding: a tensor-parallel rank's shard. The block must lie on
// tile boundaries (a start a multiple of the tile, an end a multiple of it or the tensor's edge), so every
// tile keeps its shape; anything else throws FormatError. `sub` receives the block's grid.
std::vector<uint8_t> slice_section(const uint8_t* section, const uint64_t* offsets, const TileGrid& g, uint64_t row0,
                                   uint64_t row1, uint64_t col0, uint64_t col1, TileGrid* sub);

// Per-codec tile counts of a validated section: counts[codec].
void codec_counts(const uint8_t* section, const TileGrid& g, uint64_t counts[codec::kNumCodecs]);

}  // namespace format
}  // namespace xorgemm
