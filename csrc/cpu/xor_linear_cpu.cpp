// CPU implementation of the xorgemm ops (schemas in ops.cpp), on two paths:
//   fused          small batches (decode shapes): base words streamed once, delta tiles applied as they pass,
//                  x multiplied in the same pass (cpu/fused_linear.h);
//   patched blocks larger batches, where the GEMM is compute-bound: a block of output features of the
//                  weight is patched into scratch (the shared decoders, all cores over grid rows) and ATen's
//                  GEMM multiplies it, also on all cores (patched_blocks.h). The input gradient always.
// XORGEMM_CPU_PATH=fused|blocks forces a path (tests, benchmarks); unset, the batch's rows pick it against the
// crossover measured per dtype (fused_max_rows). And apply_section.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/fused_linear.h"
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

enum class Path { kAuto, kFused, kBlocks };

Path forced_path() {
  const char* v = std::getenv("XORGEMM_CPU_PATH");
  if (v == nullptr || *v == 0 || !std::strcmp(v, "auto")) return Path::kAuto;
  if (!std::strcmp(v, "fused")) return Path::kFused;
  if (!std::strcmp(v, "blocks")) return Path::kBlocks;
  TORCH_CHECK(false, "xorgemm: XORGEMM_CPU_PATH must be fused, blocks or auto, got '", v, "'");
}

bool use_fused(const LinearProblem& p, const at::Tensor& base) {
  const bool supported = cpu::fused_supports(base.scalar_type());
  switch (forced_path()) {
    case Path::kFused:
      TORCH_CHECK(supported, "xorgemm: XORGEMM_CPU_PATH=fused, but the fused CPU kernel does not take ",
                  base.scalar_type(), " weights (float32, bfloat16 and float16 only)");
      return true;
    case Path::kBlocks: return false;
    default: return supported && p.a2.size(0) <= cpu::fused_max_rows(base.scalar_type());
  }
}

// y = x W_f(i)^T (+ bias) on the fused kernel: fp32 sums, bias added before the one rounding to x's dtype.
// Undefined when the call has only base rows (the patched-block path multiplies them by the base with ATen's
// GEMM) or the kernel could not serve it (a sparse tile it would correct holds a weight that is not finite,
// or repeated positions).
at::Tensor fused_forward(const LinearProblem& p, const at::Tensor& base, at::TensorList sections,
                         at::TensorList tile_offsets, const std::optional<at::Tensor>& row_finetune,
                         const std::optional<at::Tensor>& bias) {
  const std::string isa = cpu::chosen_isa();
  const at::ScalarType x_dtype = cpu::x_dtype_for(isa, base.scalar_type());
  const int64_t m = p.a2.size(0), k = base.size(1), n = base.size(0), n_finetunes = (int64_t)sections.size();
  const std::vector<at::Tensor> groups = group_rows(row_finetune, n_finetunes, m, base.device());
  // Only base rows: ATen's GEMM on the base as it is (the patched-block path's base group), bit for bit what
  // a dense engine computes.
  if (std::none_of(groups.begin() + 1, groups.end(), [](const at::Tensor& t) { return t.defined(); }))
    return at::Tensor();
  // x's rows padded apart: rows a power of two long would all fall in the same L1 sets as the weight rows.
  const int64_t x_stride = k + 64 / (int64_t)at::elementSize(x_dtype) * 3;
  at::Tensor x = at::empty({m, x_stride}, p.a2.options().dtype(x_dtype)).narrow(1, 0, k);
  x.copy_(p.a2);
  at::Tensor y = at::zeros({m, n}, x.options().dtype(at::kFloat));
  cpu::FusedProblem fp{p.grid, base.scalar_type(), base.data_ptr(), x.data_ptr(), x_dtype, (size_t)x_stride,
                       y.data_ptr<float>(), {}};
  for (int64_t gi = 0; gi <= n_finetunes; ++gi) {
    if (!groups[gi].defined()) continue;
    cpu::FusedGroup grp;
    grp.finetune = gi - 1;
    if (gi > 0) {
      grp.section = sections[gi - 1].data_ptr<uint8_t>();
      grp.section_bytes = (uint64_t)sections[gi - 1].numel();
      grp.offsets = reinterpret_cast<const uint64_t*>(tile_offsets[gi - 1].data_ptr<int64_t>());
    }
    const int64_t* rows = groups[gi].data_ptr<int64_t>();
    grp.rows.assign(rows, rows + groups[gi].numel());
    fp.groups.push_back(std::move(grp));
  }
  if (m > 0 && !cpu::fused_linear(fp, isa)) return at::Tensor();
  for (int64_t gi = 0; gi <= n_finetunes; ++gi) {
    const at::Tensor b = bias_of(bias, gi - 1);
    if (!groups[gi].defined() || !b.defined()) continue;
    if (groups[gi].numel() == m)
      y.add_(b.to(at::kFloat));
    else
      y.index_add_(0, groups[gi], b.to(at::kFloat).expand({groups[gi].numel(), n}));
  }
  return y.to(base.scalar_type());
}

at::Tensor xor_linear_cpu(const at::Tensor& x, const at::Tensor& base, at::TensorList sections,
                          at::TensorList tile_offsets, const std::optional<at::Tensor>& row_finetune,
                          const std::optional<at::Tensor>& bias, int64_t tile_rows, int64_t tile_cols) {
  const LinearProblem p =
      prepare_linear("x", x, base, sections, tile_offsets, row_finetune, bias, tile_rows, tile_cols, false);
  check_sections_on_host(sections, tile_offsets, p.grid);
  if (use_fused(p, base)) {
    const at::Tensor y = fused_forward(p, base, sections, tile_offsets, row_finetune, bias);
    if (y.defined()) return y.reshape(p.out_shape);
  }
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
