// GPU kernels over delta sections (see apply_delta.cu).
#pragma once

#include <torch/extension.h>

namespace xorgemm {
namespace cuda {

// out = base XOR section on the GPU, for a section validated on the host (format/delta_section.h).
void apply_section_cuda(const torch::Tensor& section, const torch::Tensor& offsets, const torch::Tensor& base,
                        torch::Tensor& out, int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols,
                        int64_t elem_bytes);

// The same for grid rows [gr0, gr1) only: `out` receives those tensor rows (a block of the fine-tuned weight).
void apply_section_rows_cuda(const torch::Tensor& section, const torch::Tensor& offsets, const torch::Tensor& base,
                             torch::Tensor& out, int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols,
                             int64_t elem_bytes, int64_t gr0, int64_t gr1);

}  // namespace cuda
}  // namespace xorgemm
