// The fused decode-XOR-GEMM (xor_gemm.cu), called by the CUDA implementation of the ops (xor_linear_cuda.cpp).
#pragma once

#include <torch/extension.h>

namespace xorgemm {
namespace cuda {

// Fine-tunes one fused launch can serve (their section pointers travel in the kernel's parameters).
constexpr int kMaxDeltasPerLaunch = 64;

// Whether the fused kernel serves this problem: bf16/fp16, 64x64 tiles, rows of the weight and of the
// activations a multiple of 8 elements, 16-byte aligned buffers, at most kMaxDeltasPerLaunch fine-tunes.
bool fused_supported(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections, int64_t tile_rows,
                     int64_t tile_cols);

// Forward (transposed = false): a2 = x [M, K] -> y [M, N] = x W'^T + bias.
// Backward (transposed = true): a2 = grad_y [M, N] -> grad_x [M, K] = grad_y W' (no bias).
// W' per row: row_delta (int64 on the device, -1 = base) or, without it, the one fine-tune of `sections`.
// Inputs are checked by the caller; sections were validated when they were made resident.
at::Tensor fused_xor_linear(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections,
                            at::TensorList tile_offsets, const std::optional<at::Tensor>& row_delta,
                            const std::optional<at::Tensor>& bias, bool transposed);

}  // namespace cuda
}  // namespace xorgemm
