// The fused decode-XOR-GEMM (fused_gemm.cu), called by the CUDA implementation of the ops (xor_linear_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace xorgemm {
namespace cuda {

// Why the fused kernel cannot serve this problem, or "" when it can. It needs bf16/fp16, 64x64 tiles, rows of
// the weight and of the activations a multiple of 8 elements, 16-byte aligned buffers (`sections`: those
// passed as lists) and at most fused::kMaxFinetunes fine-tunes or slots (`n_finetunes`).
std::string fused_unsupported_reason(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections,
                                     int64_t n_finetunes, int64_t tile_rows, int64_t tile_cols);

// Forward (transposed = false): a2 = x [M, K] -> y [M, N] = x W'^T + bias.
// Backward (transposed = true): a2 = grad_y [M, N] -> grad_x [M, K] = grad_y W' (no bias).
// W' per row: row_finetune (int64 on the device, -1 = base) or, without it, the one fine-tune of `sections`.
// With `slot_table` (xor_linear_slots; sections empty), row_finetune names slots of that [S, 3] int64 table
// on the device, which the kernel reads: nothing about the fine-tunes is read on the host.
// Inputs are checked by the caller (op_args.h); sections were validated when they were made resident.
at::Tensor fused_xor_linear(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections,
                            at::TensorList tile_offsets, const std::optional<at::Tensor>& row_finetune,
                            const std::optional<at::Tensor>& bias, bool transposed,
                            const std::optional<at::Tensor>& slot_table = std::nullopt);

}  // namespace cuda
}  // namespace xorgemm
