// CPU implementation of the xorgemm ops (schemas in ops.cpp): the patched-block path (patched_blocks.h)
// with a CPU patcher, and apply_section.
//
// The patcher decodes a block's delta tiles with the shared decoders and XORs them onto the base rows in
// the scratch block, all cores at once (at::parallel_for over grid rows); ATen's GEMM then multiplies the
// block, also on all cores. Blocks are serial so that each GEMM can use every core.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "format/delta_section.h"
#include "op_args.h"
#include "patched_blocks.h"

namespace xorgemm {
namespace {

// Output features per patched block: large enough for an efficient GEMM, small enough to stay in cache.
constexpr int64_t kBlockFeatures = 512;

// Patches grid rows [gr0, gr1) of fine-tune f into `block`, whose first row is tensor row gr0 * tile_rows.
struct CpuPatcher {
  const at::Tensor& base;
  at::TensorList sections, offsets;
  const format::TileGrid& g;

  void operator()(size_t f, int64_t gr0, int64_t gr1, at::Tensor& block) const {
    const uint8_t* section = sections[f].data_ptr<uint8_t>();
    const uint64_t* off = reinterpret_cast<const uint64_t*>(offsets[f].data_ptr<int64_t>());
    const uint8_t* base_bytes = static_cast<const uint8_t*>(base.data_ptr());
    const format::OutBlock out{static_cast<uint8_t*>(block.data_ptr()), (uint64_t)(gr0 * g.tile_rows), 0, g.cols};
    at::parallel_for(gr0, gr1, 1, [&](int64_t g0, int64_t g1) {  // whole grid rows: contiguous copies
      format::apply_section_block(section, off, g, g0, g1, 0, g.grid_cols(), base_bytes, out);
    });
  }
};

int64_t grid_rows_per_block(const format::TileGrid& g) { return std::max<int64_t>(1, kBlockFeatures / g.tile_rows); }

at::Tensor xor_linear_cpu(const at::Tensor& x, const at::Tensor& base, at::TensorList sections,
                          at::TensorList tile_offsets, const std::optional<at::Tensor>& row_finetune,
                          const std::optional<at::Tensor>& bias, int64_t tile_rows, int64_t tile_cols) {
  const LinearProblem p =
      prepare_linear("x", x, base, sections, tile_offsets, row_finetune, bias, tile_rows, tile_cols, false);
  check_sections_on_host(sections, tile_offsets, p.grid);
  return patched_blocks_forward(p, base, (int64_t)sections.size(), row_finetune, bias, grid_rows_per_block(p.grid),
                                CpuPatcher{base, sections, tile_offsets, p.grid})
      .reshape(p.out_shape);
}

at::Tensor xor_linear_slots_cpu(const at::Tensor& x, const at::Tensor& base, const at::Tensor& slot_table,
                                const at::Tensor& row_slot, const std::optional<at::Tensor>& bias, int64_t tile_rows,
                                int64_t tile_cols) {
  check_slot_table(slot_table, base.device());
  const SlotLists slots = slot_lists(slot_table, grid_of(base, tile_rows, tile_cols), base.device());
  return xor_linear_cpu(x, base, slots.sections, slots.offsets, row_slot, bias, tile_rows, tile_cols);
}

at::Tensor xor_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& base, at::TensorList sections,
                                     at::TensorList tile_offsets, const std::optional<at::Tensor>& row_finetune,
                                     int64_t tile_rows, int64_t tile_cols) {
  const LinearProblem p =
      prepare_linear("grad_y", grad_y, base, sections, tile_offsets, row_finetune, {}, tile_rows, tile_cols, true);
  check_sections_on_host(sections, tile_offsets, p.grid);
  return patched_blocks_grad_input(p, base, (int64_t)sections.size(), row_finetune, grid_rows_per_block(p.grid),
                                   CpuPatcher{base, sections, tile_offsets, p.grid})
      .reshape(p.out_shape);
}

void apply_section_cpu(const at::Tensor& section, const at::Tensor& offsets, const at::Tensor& base, at::Tensor& out,
                       int64_t tile_rows, int64_t tile_cols) {
  const format::TileGrid g = check_apply_args(section, offsets, base, out, tile_rows, tile_cols);
  check_sections_on_host({section}, {offsets}, g);
  const uint8_t* s = section.data_ptr<uint8_t>();
  const uint64_t* off = reinterpret_cast<const uint64_t*>(offsets.data_ptr<int64_t>());
  const uint8_t* b = static_cast<const uint8_t*>(base.data_ptr());
  uint8_t* o = static_cast<uint8_t*>(out.data_ptr());
  // Tiles write disjoint regions, so any split over grid rows is race-free (out may be base: in place).
  at::parallel_for(0, (int64_t)g.grid_rows(), 1, [&](int64_t begin, int64_t end) {
    format::apply_section_block(s, off, g, (uint64_t)begin, (uint64_t)end, 0, g.grid_cols(), b, {o, 0, 0, g.cols});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(xorgemm, CPU, m) {
  m.impl("xor_linear", &xor_linear_cpu);
  m.impl("xor_linear_slots", &xor_linear_slots_cpu);
  m.impl("xor_linear_grad_input", &xor_linear_grad_input_cpu);
  m.impl("apply_section", &apply_section_cpu);
}

}  // namespace xorgemm
