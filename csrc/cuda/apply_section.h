// The GPU apply kernel's launcher (apply_section.cu): base XOR delta for grid rows of a section on the GPU.
#pragma once

#include <ATen/ATen.h>

#include "format/tile_grid.h"

namespace xorgemm {
namespace cuda {

// Writes grid rows [gr0, gr1) of the fine-tuned tensor (base XOR section, over grid g) into `out`, which
// holds exactly those rows, on the current stream. Arguments were checked by the caller (op_args.h); the
// section was validated when it was made resident.
void apply_section_rows(const at::Tensor& section, const at::Tensor& offsets, const at::Tensor& base, at::Tensor& out,
                        const format::TileGrid& g, int64_t gr0, int64_t gr1);

}  // namespace cuda
}  // namespace xorgemm
