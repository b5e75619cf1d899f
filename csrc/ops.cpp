// The xorgemm operator schemas: the one place they are defined. Implementations register per device
// (cpu/xor_gemm.cpp now; CUDA next); the Python side (xorgemm/ops.py) adds fake tensors for torch.compile
// and the autograd.Function.
//
//   xor_linear(x, base, sections, tile_offsets, row_delta, bias, tile_rows, tile_cols) -> y
//     y[i] = x[i] @ W_d(i)^T + bias, where W_d = base XOR delta section d (the fine-tuned weight, never
//     materialized whole) and d(i) = row_delta[i]; -1 means the plain base. x: [..., K], base: [N, K],
//     sections[d]: the uint8 delta section of a [N, K] tensor tiled tile_rows x tile_cols, tile_offsets[d]:
//     its tile payload offsets (int64, from validation). row_delta: int64 [rows of x] or None (all rows use
//     delta 0 if there is exactly one, the base if there is none). bias: None, [N], or [D+1, N] picked per
//     row by row_delta + 1 (row 0 for base rows).
//
//   xor_linear_grad_input(grad_y, base, sections, tile_offsets, row_delta, tile_rows, tile_cols) -> grad_x
//     grad_x[i] = grad_y[i] @ W_d(i), the input gradient through the same tiles (transposed).
#include <torch/library.h>

TORCH_LIBRARY(xorgemm, m) {
  m.def(
      "xor_linear(Tensor x, Tensor base, Tensor[] sections, Tensor[] tile_offsets, Tensor? row_delta, Tensor? bias, "
      "int tile_rows, int tile_cols) -> Tensor");
  m.def(
      "xor_linear_grad_input(Tensor grad_y, Tensor base, Tensor[] sections, Tensor[] tile_offsets, "
      "Tensor? row_delta, int tile_rows, int tile_cols) -> Tensor");
}
