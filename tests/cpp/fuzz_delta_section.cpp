// libFuzzer target for the delta-section parser: whatever the bytes, validate_section either throws
// FormatError or accepts a section that then decodes without touching memory outside the tensor
// (ASan/UBSan watch), and encode -> validate -> apply is always lossless, with the base-conditioned codec
// (its class bits where a float of that size has its exponent) or without.
#include <stdint.h>
#include <string.h>

#include <cstdlib>
#include <vector>

#include "format/delta_section.h"

using namespace xorgemm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 6) return 0;
  const uint32_t sizes[] = {1, 2, 4, 8};
  format::TileGrid g{1u + data[0] % 96, 1u + data[1] % 96, 1u + data[2] % 80, 1u + data[3] % 80, sizes[data[4] % 4]};
  const bool roundtrip = data[5] & 1;
  const int shift =
      (data[5] & 2) == 0 ? -1 : g.elem_bytes == 2 ? ((data[5] & 4) ? 10 : 7) : g.elem_bytes == 4 ? 23 : -1;
  data += 6;
  size -= 6;
  if (roundtrip) {  // the input is base bytes followed by fine-tuned bytes
    const uint64_t n = g.tensor_bytes();
    std::vector<uint8_t> base(n, 0), ft(n, 0);
    memcpy(base.data(), data, size < n ? size : n);
    if (size > n) memcpy(ft.data(), data + n, size - n < n ? size - n : n);
    std::vector<uint8_t> s = format::encode_section(base.data(), ft.data(), g, shift);
    auto offsets = format::validate_section(s.data(), s.size(), g);
    format::apply_section_block(s.data(), offsets.data(), g, 0, g.grid_rows(), 0, g.grid_cols(), base.data(),
                                {base.data(), 0, 0, g.cols});
    if (base != ft) abort();
    return 0;
  }
  std::vector<uint8_t> section(data, data + size);  // exact-size copy so ASan sees any overread
  try {
    auto offsets = format::validate_section(section.data(), section.size(), g);
    std::vector<uint8_t> out(g.tensor_bytes(), 0);
    format::apply_section_block(section.data(), offsets.data(), g, 0, g.grid_rows(), 0, g.grid_cols(), out.data(),
                                {out.data(), 0, 0, g.cols});
  } catch (const format::FormatError&) {
  }
  return 0;
}
