// The patched-block path of the xorgemm ops, for any device: for each fine-tune with rows in the batch, a
// block of output features of its weight is patched into a scratch buffer by the device's `patch` kernel,
// then ATen's GEMM (the CPU's BLAS, cuBLAS on a GPU) multiplies it, block after block. Only one block of a
// fine-tuned weight exists at a time, never the whole. Rows are grouped by fine-tune (op_args.h:
// group_rows); base rows multiply the base weight as it is. Arguments come checked (op_args.h: prepare_linear).
//
// A device supplies
//   patch(f, gr0, gr1, block): write grid rows [gr0, gr1) of fine-tune f's weight (base XOR delta) into
//                              `block`, a [rows of those grid rows, K] tensor of the base's dtype and device;
//   grid_rows_per_block:       the block height in grid rows (what keeps a block in the device's cache);
// and may overlap each block's patch with the previous block's GEMM (kOverlapsBlocks, overlapped_blocks: the
// GPU's, on a second stream).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "op_args.h"

namespace xorgemm {

template <typename P, typename = void>
struct overlaps_blocks : std::false_type {};
template <typename P>
struct overlaps_blocks<P, std::void_t<decltype(P::kOverlapsBlocks)>> : std::bool_constant<P::kOverlapsBlocks> {};

// Calls fn(r0, h, block) for consecutive blocks [r0, r0 + h) of output features of fine-tune f's weight,
// each patched into one reused scratch buffer (or, by a patcher that overlaps blocks, two).
template <typename Patch, typename Fn>
void for_each_patched_block(const at::Tensor& base, const format::TileGrid& g, int64_t grid_rows_per_block,
                            size_t f, Patch& patch, Fn&& fn) {
  const int64_t per_block = std::max<int64_t>(1, grid_rows_per_block);
  if constexpr (overlaps_blocks<std::decay_t<Patch>>::value) {
    patch.overlapped_blocks(base, per_block, f, std::forward<Fn>(fn));
  } else {
    const int64_t n = base.size(0), k = base.size(1), tile_rows = g.tile_rows, grid_rows = (int64_t)g.grid_rows();
    at::Tensor scratch = at::empty({std::min(per_block * tile_rows, n), k}, base.options());
    for (int64_t gr0 = 0; gr0 < grid_rows; gr0 += per_block) {
      const int64_t gr1 = std::min(gr0 + per_block, grid_rows);
      const int64_t r0 = gr0 * tile_rows, h = std::min(gr1 * tile_rows, n) - r0;
      at::Tensor block = scratch.narrow(0, 0, h);
      patch(f, gr0, gr1, block);
      fn(r0, h, block);
    }
  }
}

// The bias of fine-tune f's rows (f = -1: the base rows): [N] for all, or row f + 1 of [n_finetunes + 1, N]
// (without ids every row uses the one fine-tune, f = n_finetunes - 1, row n_finetunes). Undefined: none.
inline at::Tensor bias_of(const std::optional<at::Tensor>& bias, int64_t f) {
  if (!bias.has_value()) return at::Tensor();
  return bias->dim() == 1 ? *bias : bias->select(0, f + 1);
}

// out = x w^T (+ bias, added inside the GEMM before its one rounding, as F.linear does).
inline void linear_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  if (bias.defined())
    at::addmm_out(out, bias, x, w.t());
  else
    at::mm_out(out, x, w.t());
}

// Calls fn(f, rows, a_rows) for each group of rows of p.a2: f = -1 for the base rows, else the fine-tune;
// `rows` their indices in p.a2 and `a_rows` those rows (p.a2 itself when the group holds them all).
template <typename Fn>
void for_each_group(const LinearProblem& p, int64_t n_finetunes, const std::optional<at::Tensor>& row_finetune,
                    Fn&& fn) {
  const int64_t m = p.a2.size(0);
  const auto groups = group_rows(row_finetune, n_finetunes, m, p.a2.device());
  for (int64_t gi = 0; gi <= n_finetunes; ++gi)
    if (groups[gi].defined())
      fn(gi - 1, groups[gi], groups[gi].numel() == m ? p.a2 : p.a2.index_select(0, groups[gi]));
}

// y = x W_f(i)^T + bias per row i, for p.a2 = x [M, K]; returns y [M, N].
template <typename Patch>
at::Tensor patched_blocks_forward(const LinearProblem& p, const at::Tensor& base, int64_t n_finetunes,
                                  const std::optional<at::Tensor>& row_finetune, const std::optional<at::Tensor>& bias,
                                  int64_t grid_rows_per_block, Patch&& patch) {
  const int64_t m = p.a2.size(0), n = base.size(0);
  at::Tensor out = at::empty({m, n}, p.a2.options());
  for_each_group(p, n_finetunes, row_finetune, [&](int64_t f, const at::Tensor& rows, const at::Tensor& xg) {
    const bool all = xg.size(0) == m;
    at::Tensor yg = all ? out : at::empty({xg.size(0), n}, p.a2.options());
    const at::Tensor b = bias_of(bias, f);
    if (f < 0) {  // base rows: the base weight as it is
      linear_out(yg, xg, base, b);
    } else {
      // Each block's GEMM writes its columns of y in place (a column slice is a BLAS matrix with ld = N).
      for_each_patched_block(base, p.grid, grid_rows_per_block, f, patch,
                             [&](int64_t r0, int64_t h, const at::Tensor& block) {
                               at::Tensor yb = yg.narrow(1, r0, h);
                               linear_out(yb, xg, block, b.defined() ? b.narrow(0, r0, h) : b);
                             });
    }
    if (!all) out.index_copy_(0, rows, yg);
  });
  return out;
}

// grad_x = grad_y W_f(i) per row i, for p.a2 = grad_y [M, N]: summed over blocks of output features, block by
// block; returns grad_x [M, K].
template <typename Patch>
at::Tensor patched_blocks_grad_input(const LinearProblem& p, const at::Tensor& base, int64_t n_finetunes,
                                     const std::optional<at::Tensor>& row_finetune, int64_t grid_rows_per_block,
                                     Patch&& patch) {
  const int64_t k = base.size(1);
  at::Tensor out = at::empty({p.a2.size(0), k}, p.a2.options());
  for_each_group(p, n_finetunes, row_finetune, [&](int64_t f, const at::Tensor& rows, const at::Tensor& gg) {
    if (f < 0) {
      out.index_copy_(0, rows, at::mm(gg, base));
      return;
    }
    at::Tensor xg = at::zeros({gg.size(0), k}, p.a2.options());
    for_each_patched_block(base, p.grid, grid_rows_per_block, f, patch,
                           [&](int64_t r0, int64_t h, const at::Tensor& block) {
                             xg.addmm_(gg.narrow(1, r0, h), block);
                           });
    out.index_copy_(0, rows, xg);
  });
  return out;
}

}  // namespace xorgemm
