// The xorgemm operator schemas: the one place they are defined. Each device registers its kernels
// (cpu/xor_linear_cpu.cpp, cuda/xor_linear_cuda.cpp) and the dispatcher picks them by the tensors' device;
// the Python side (xorgemm/ops.py) adds fake kernels for torch.compile and autograd. Argument rules:
// op_args.h.
//
//   xor_linear(x, base, sections, tile_offsets, row_finetune, bias, tile_rows, tile_cols) -> y
//     y[i] = x[i] @ W_f(i)^T + bias, where W_f = base XOR delta section f (the fine-tuned weight, never
//     materialized whole) and f(i) = row_finetune[i]; -1 means the plain base. x: [..., K], base: [N, K],
//     sections[f]: the uint8 delta section of fine-tune f, tiled tile_rows x tile_cols; tile_offsets[f]:
//     its tile payload offsets (int64, from validation). row_finetune: int64 [rows of x] or None (all rows
//     use fine-tune 0 if there is exactly one, the base if there is none). bias: None, [N], or
//     [F + 1, N] picked per row by row_finetune + 1 (row 0 for base rows).
//
//   xor_linear_slots(x, base, slot_table, row_slot, bias, tile_rows, tile_cols) -> y
//     xor_linear with the fine-tunes in a slot table instead of lists: slot_table is [S, 3] int64 on the
//     weight's device, row s the (section address, tile offsets address, section bytes) of the delta in
//     slot s, zeros for an empty slot (its rows get the base); row_slot: int64 [rows of x], -1 the base;
//     bias: None, [N] or [S + 1, N]. Rewriting the table's rows (XorLinear.set_slot) changes the fine-tunes
//     without changing the call: on a GPU the kernel reads the table, so a captured CUDA graph replays with
//     whatever the slots hold then. Inference only (no gradient).
//
//   xor_linear_grad_input(grad_y, base, sections, tile_offsets, row_finetune, tile_rows, tile_cols) -> grad_x
//     grad_x[i] = grad_y[i] @ W_f(i), the input gradient through the same tiles (transposed).
//
//   apply_section(section, offsets, base, out, tile_rows, tile_cols) -> ()
//     out = base XOR section, bit for bit, over the tensors' 2-D view (shape[0], prod(shape[1:])): the
//     fine-tuned tensor from its base (or, given zeros, the XOR itself). Any dtype of 1, 2, 4 or 8 bytes;
//     out may be base (in place).
#include <torch/library.h>

TORCH_LIBRARY(xorgemm, m) {
  m.def(
      "xor_linear(Tensor x, Tensor base, Tensor[] sections, Tensor[] tile_offsets, Tensor? row_finetune, "
      "Tensor? bias, int tile_rows, int tile_cols) -> Tensor");
  m.def(
      "xor_linear_slots(Tensor x, Tensor base, Tensor slot_table, Tensor row_slot, Tensor? bias, int tile_rows, "
      "int tile_cols) -> Tensor");
  m.def(
      "xor_linear_grad_input(Tensor grad_y, Tensor base, Tensor[] sections, Tensor[] tile_offsets, "
      "Tensor? row_finetune, int tile_rows, int tile_cols) -> Tensor");
  m.def("apply_section(Tensor section, Tensor offsets, Tensor base, Tensor(a!) out, int tile_rows, int tile_cols) -> ()");
}
