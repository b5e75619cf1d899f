// GPU apply of a delta section: out = base XOR delta, one CUDA block per tile.
//
// Each block decodes its tile with the shared decoders of codec/tile_codec.h (the code the CPU tests
// exercise) into shared memory, then writes base ^ delta row by row, coalesced. Zero tiles copy the base.
// This materializes the fine-tuned weight: it is the building block of the unfused baseline and of
// `DeltaTensor.apply` on CUDA tensors, not the fused GEMM. Sections are validated on the host first.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "cuda/apply_delta.h"
#include "cuda/apply_delta_kernel.cuh"

namespace xorgemm {
namespace cuda {

template <typename Word>
static void launch(const torch::Tensor& section, const torch::Tensor& offsets, const torch::Tensor& base,
                   torch::Tensor& out, int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols, int64_t gr0,
                   int64_t gr1) {
  const int64_t grid_cols = (cols + tile_cols - 1) / tile_cols;
  const int64_t n_tiles = (gr1 - gr0) * grid_cols;
  const size_t smem = (size_t)tile_rows * tile_cols * sizeof(Word);
  int max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, base.get_device()));
  TORCH_CHECK(smem <= (size_t)max_smem, "tile of ", tile_rows, "x", tile_cols, " elements needs ", smem,
              " bytes of shared memory; this GPU allows ", max_smem);
  TORCH_CHECK(n_tiles < (1ll << 31), "too many tiles for one launch");
  auto kernel = apply_section_kernel<Word>;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.get_device());
  kernel<<<(unsigned)n_tiles, 256, smem, stream>>>(
      section.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(),
      reinterpret_cast<const Word*>(base.data_ptr<uint8_t>()), reinterpret_cast<Word*>(out.data_ptr<uint8_t>()), rows,
      cols, (int)tile_rows, (int)tile_cols, gr0 * grid_cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void apply_section_rows_cuda(const torch::Tensor& section, const torch::Tensor& offsets, const torch::Tensor& base,
                             torch::Tensor& out, int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols,
                             int64_t elem_bytes, int64_t gr0, int64_t gr1) {
  for (const torch::Tensor* t : {&section, &base, static_cast<const torch::Tensor*>(&out)})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == torch::kUInt8 && t->is_contiguous() && t->dim() == 1,
                "section, base and out must be contiguous 1-D uint8 CUDA tensors");
  TORCH_CHECK(offsets.is_cuda() && offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous(),
              "offsets must be a contiguous int64 CUDA tensor");
  TORCH_CHECK(section.device() == base.device() && base.device() == out.device() &&
                  offsets.device() == base.device(),
              "all tensors must be on the same GPU");
  TORCH_CHECK(rows > 0 && cols > 0 && tile_rows > 0 && tile_cols > 0, "shape and tile shape must be positive");
  const int64_t grid_rows = (rows + tile_rows - 1) / tile_rows;
  TORCH_CHECK(0 <= gr0 && gr0 < gr1 && gr1 <= grid_rows, "grid rows [", gr0, ", ", gr1, ") outside 0..", grid_rows);
  const int64_t out_rows = std::min(gr1 * tile_rows, rows) - gr0 * tile_rows;
  TORCH_CHECK(base.numel() == rows * cols * elem_bytes && out.numel() == out_rows * cols * elem_bytes,
              "base must hold rows*cols*elem_bytes bytes and out the bytes of the grid rows it receives");
  TORCH_CHECK(offsets.numel() == ((rows + tile_rows - 1) / tile_rows) * ((cols + tile_cols - 1) / tile_cols),
              "offsets must hold one entry per tile");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(base.data_ptr()) % elem_bytes == 0 &&
                  reinterpret_cast<uintptr_t>(out.data_ptr()) % elem_bytes == 0,
              "base and out must be aligned to the element size");
  const c10::cuda::CUDAGuard guard(base.device());
  switch (elem_bytes) {
    case 1: return launch<uint8_t>(section, offsets, base, out, rows, cols, tile_rows, tile_cols, gr0, gr1);
    case 2: return launch<uint16_t>(section, offsets, base, out, rows, cols, tile_rows, tile_cols, gr0, gr1);
    case 4: return launch<uint32_t>(section, offsets, base, out, rows, cols, tile_rows, tile_cols, gr0, gr1);
    case 8: return launch<unsigned long long>(section, offsets, base, out, rows, cols, tile_rows, tile_cols, gr0, gr1);
    default: TORCH_CHECK(false, "element size ", elem_bytes, " is not 1, 2, 4 or 8 bytes");
  }
}

void apply_section_cuda(const torch::Tensor& section, const torch::Tensor& offsets, const torch::Tensor& base,
                        torch::Tensor& out, int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols,
                        int64_t elem_bytes) {
  TORCH_CHECK(rows > 0 && tile_rows > 0, "shape and tile shape must be positive");
  apply_section_rows_cuda(section, offsets, base, out, rows, cols, tile_rows, tile_cols, elem_bytes, 0,
                          (rows + tile_rows - 1) / tile_rows);
}

}  // namespace cuda
}  // namespace xorgemm
