// GPU apply of a delta section: out = base XOR delta, one CUDA block per tile.
//
// Each block decodes its tile with the shared decoders of codec/tile_codec.h (the code the CPU tests
// exercise) into shared memory, then writes base ^ delta row by row, coalesced. Zero tiles copy the base.
// This materializes (a block of) the fine-tuned weight: it serves the apply_section op, the patched-block
// path of the CUDA ops and the unfused baseline, not the fused GEMM.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/apply_section.h"
#include "cuda/apply_section_kernel.cuh"
#include "cuda/device_errors.h"

namespace xorgemm {
namespace cuda {
namespace {

template <typename Word>
void launch(const at::Tensor& section, const at::Tensor& offsets, const at::Tensor& base, at::Tensor& out,
            const format::TileGrid& g, int64_t gr0, int64_t gr1) {
  const int64_t n_tiles = (gr1 - gr0) * (int64_t)g.grid_cols();
  const size_t smem = (size_t)g.tile_rows * g.tile_cols * sizeof(Word);
  int max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, base.get_device()));
  TORCH_CHECK(smem <= (size_t)max_smem, "xorgemm: a tile of ", g.tile_rows, "x", g.tile_cols, " elements needs ", smem,
              " bytes of shared memory; this GPU allows ", max_smem);
  TORCH_CHECK(n_tiles < (1ll << 31), "xorgemm: too many tiles for one launch");
  auto kernel = apply_section_kernel<Word>;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.get_device());
  at::Tensor error = device_error_word(base.device());
  kernel<<<(unsigned)n_tiles, kApplyThreads, smem, stream>>>(
      section.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), (uint64_t)section.numel(),
      static_cast<const Word*>(base.data_ptr()), static_cast<Word*>(out.data_ptr()), g, gr0 * (int64_t)g.grid_cols(),
      reinterpret_cast<uint32_t*>(error.data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  publish_device_errors(base.device(), stream);
}

}  // namespace

void apply_section_rows(const at::Tensor& section, const at::Tensor& offsets, const at::Tensor& base, at::Tensor& out,
                        const format::TileGrid& g, int64_t gr0, int64_t gr1) {
  TORCH_CHECK(0 <= gr0 && gr0 < gr1 && gr1 <= (int64_t)g.grid_rows(), "xorgemm: grid rows [", gr0, ", ", gr1,
              ") outside 0..", g.grid_rows());
  const int64_t rows = std::min<int64_t>(gr1 * g.tile_rows, g.rows) - gr0 * g.tile_rows;
  TORCH_CHECK(out.numel() * out.element_size() == rows * (int64_t)(g.cols * g.elem_bytes),
              "xorgemm: out must hold the ", rows, " rows of grid rows ", gr0, "..", gr1);
  switch (g.elem_bytes) {
    case 1: return launch<uint8_t>(section, offsets, base, out, g, gr0, gr1);
    case 2: return launch<uint16_t>(section, offsets, base, out, g, gr0, gr1);
    case 4: return launch<uint32_t>(section, offsets, base, out, g, gr0, gr1);
    default: return launch<unsigned long long>(section, offsets, base, out, g, gr0, gr1);
  }
}

}  // namespace cuda
}  // namespace xorgemm
