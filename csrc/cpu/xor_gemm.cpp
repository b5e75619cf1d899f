// CPU implementation of the xorgemm ops (schemas in ops.cpp).
//
// Per block of output features, all cores decode that block's delta tiles with the shared decoders and XOR
// them onto the base rows in a small scratch buffer (at::parallel_for over tile rows); then ATen's GEMM,
// also on all cores, multiplies it: y[:, block] = x @ block^T forward, grad_x += grad_y[:, block] @ block
// backward. Only one block of the fine-tuned weight exists at a time, never the whole. Rows of x are
// grouped by fine-tune; base rows use the base weight directly.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "format/delta_section.h"
#include "op_args.h"

namespace xorgemm {
namespace {

using format::OutBlock;
using format::TileGrid;

// Output features per patched block: large enough for an efficient GEMM, small enough to stay in cache.
constexpr int64_t kBlockFeatures = 512;

struct Problem {
  TileGrid grid;
  int64_t rows;  // rows of x (all leading dimensions flattened)
  std::vector<const uint8_t*> sections;
  std::vector<const uint64_t*> offsets;
  // Row indices of each group: group 0 holds the base rows (row_delta -1), group d+1 those of delta d.
  std::vector<std::vector<int64_t>> group_rows;
};

Problem make_problem(int64_t rows, const at::Tensor& base, const std::vector<at::Tensor>& sections,
                     const std::vector<at::Tensor>& tile_offsets, const std::optional<at::Tensor>& row_delta,
                     int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(base.dim() == 2 && base.is_contiguous() && base.device().is_cpu(),
              "xorgemm: base must be a contiguous 2-D CPU tensor, got ", base.sizes());
  TORCH_CHECK(sections.size() == tile_offsets.size(), "xorgemm: ", sections.size(), " sections but ",
              tile_offsets.size(), " offset tensors");
  TORCH_CHECK(tile_rows > 0 && tile_cols > 0 && tile_rows <= UINT32_MAX && tile_cols <= UINT32_MAX,
              "xorgemm: bad tile shape");
  Problem p{TileGrid{(uint64_t)base.size(0), (uint64_t)base.size(1), (uint32_t)tile_rows, (uint32_t)tile_cols,
                     (uint32_t)base.element_size()},
            rows, {}, {}, {}};
  try {
    p.grid.check();
  } catch (const format::FormatError& e) {
    TORCH_CHECK(false, "xorgemm: ", e.what());
  }
  const int64_t n_delta = (int64_t)sections.size();
  for (int64_t d = 0; d < n_delta; ++d) {
    const at::Tensor& s = sections[d];
    const at::Tensor& o = tile_offsets[d];
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kByte && s.dim() == 1 && s.is_contiguous(),
                "xorgemm: section ", d, " must be a contiguous 1-D uint8 CPU tensor");
    TORCH_CHECK(o.device().is_cpu() && o.scalar_type() == at::kLong && o.is_contiguous() &&
                    (uint64_t)o.numel() == p.grid.num_tiles(),
                "xorgemm: tile_offsets ", d, " must hold one int64 per tile (", p.grid.num_tiles(), ")");
    p.sections.push_back(s.data_ptr<uint8_t>());
    p.offsets.push_back(reinterpret_cast<const uint64_t*>(o.data_ptr<int64_t>()));
    try {
      format::check_section_bounds(p.sections.back(), (uint64_t)s.numel(), p.offsets.back(), p.grid);
    } catch (const format::FormatError& e) {
      TORCH_CHECK(false, "xorgemm: section ", d, ": ", e.what());
    }
  }
  p.group_rows.resize(n_delta + 1);
  if (!row_delta.has_value()) {
    TORCH_CHECK(n_delta <= 1, "xorgemm: ", n_delta, " deltas need a row_delta tensor saying which row uses which");
    auto& all = p.group_rows[n_delta];
    all.resize(rows);
    for (int64_t i = 0; i < rows; ++i) all[i] = i;
    return p;
  }
  const at::Tensor ids = row_delta->contiguous();
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.numel() == rows,
              "xorgemm: row_delta must be an int64 CPU tensor with one entry per row of x (", rows, "), got ",
              ids.sizes());
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(id[i] >= -1 && id[i] < n_delta, "xorgemm: row ", i, " asks for delta ", id[i], " of ", n_delta,
                " (-1 is the base)");
    p.group_rows[id[i] + 1].push_back(i);
  }
  return p;
}

at::Tensor rows_of(const at::Tensor& t, const std::vector<int64_t>& rows, int64_t all) {
  if ((int64_t)rows.size() == all) return t;
  return t.index_select(0, at::tensor(rows, at::kLong));
}

void put_rows(at::Tensor& out, const std::vector<int64_t>& rows, const at::Tensor& part) {
  if ((int64_t)rows.size() == out.size(0)) {
    out.copy_(part);
  } else {
    out.index_copy_(0, at::tensor(rows, at::kLong), part);
  }
}

// Calls fn(r0, h, block) for consecutive blocks of output features [r0, r0 + h) of fine-tune `d`, where
// block is the [h, K] fine-tuned weight block, patched by all cores in a reused scratch buffer. Blocks
// are serial so that fn's GEMM can use every core too.
template <typename Fn>
void for_each_patched_block(const Problem& p, size_t d, const at::Tensor& base, Fn&& fn) {
  const int64_t N = base.size(0), K = base.size(1), tile_rows = p.grid.tile_rows;
  const int64_t grid_rows_per_block = std::max<int64_t>(1, kBlockFeatures / tile_rows);
  const int64_t n_blocks = ((int64_t)p.grid.grid_rows() + grid_rows_per_block - 1) / grid_rows_per_block;
  const uint8_t* base_bytes = reinterpret_cast<const uint8_t*>(base.data_ptr());
  at::Tensor scratch = at::empty({grid_rows_per_block * tile_rows, K}, base.options());
  uint8_t* scratch_bytes = reinterpret_cast<uint8_t*>(scratch.data_ptr());
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t gr0 = b * grid_rows_per_block;
    const int64_t gr1 = std::min<int64_t>(gr0 + grid_rows_per_block, (int64_t)p.grid.grid_rows());
    const int64_t r0 = gr0 * tile_rows, h = std::min<int64_t>(gr1 * tile_rows, N) - r0;
    at::parallel_for(gr0, gr1, 1, [&](int64_t g0, int64_t g1) {  // whole grid rows: contiguous copies
      format::apply_section_block(p.sections[d], p.offsets[d], p.grid, g0, g1, 0, p.grid.grid_cols(), base_bytes,
                                  {scratch_bytes, (uint64_t)r0, 0, (uint64_t)K});
    });
    fn(r0, h, scratch.narrow(0, 0, h));
  }
}

at::Tensor xor_linear_cpu(const at::Tensor& x, const at::Tensor& base, at::TensorList sections,
                          at::TensorList tile_offsets, const std::optional<at::Tensor>& row_delta,
                          const std::optional<at::Tensor>& bias, int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(x.dim() >= 1 && base.dim() == 2 && x.size(-1) == base.size(1), "xorgemm: x has ", x.size(-1),
              " input features but the weight has ", base.dim() == 2 ? base.size(1) : -1);
  TORCH_CHECK(x.scalar_type() == base.scalar_type(), "xorgemm: x is ", x.scalar_type(), " but the weight is ",
              base.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "xorgemm: x is on ", x.device(), ", the CPU op needs CPU tensors");
  const int64_t N = base.size(0), K = base.size(1);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  const Problem p = make_problem(M, base, sections.vec(), tile_offsets.vec(), row_delta, tile_rows, tile_cols);
  check_bias(bias, x.scalar_type(), x.device(), N, sections.size());  // before any work
  at::Tensor out = at::empty({M, N}, x.options());
  for (size_t gi = 0; gi < p.group_rows.size(); ++gi) {
    const auto& rows = p.group_rows[gi];
    if (rows.empty()) continue;
    const at::Tensor xg = rows_of(x2, rows, M);
    if (gi == 0) {  // base rows: the base weight as it is
      put_rows(out, rows, at::mm(xg, base.t()));
      continue;
    }
    // Each block's GEMM writes its columns of y in place (a column slice is a BLAS matrix with ld = N).
    const bool all_rows = (int64_t)rows.size() == M;
    at::Tensor yg = all_rows ? out : at::empty({(int64_t)rows.size(), N}, x.options());
    for_each_patched_block(p, gi - 1, base, [&](int64_t r0, int64_t h, const at::Tensor& block) {
      at::Tensor yb = yg.narrow(1, r0, h);
      at::mm_out(yb, xg, block.t());
    });
    if (!all_rows) put_rows(out, rows, yg);
  }
  if (bias.has_value()) {
    const at::Tensor& bv = *bias;
    if (bv.dim() == 1) {
      out.add_(bv);
    } else {
      const at::Tensor ids = row_delta.has_value()
                                 ? *row_delta + 1
                                 : at::full({M}, (int64_t)sections.size(), at::TensorOptions().dtype(at::kLong));
      out.add_(bv.index_select(0, ids.reshape({-1})));
    }
  }
  return out.reshape(rows_shape(x.sizes(), N));
}

at::Tensor xor_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& base, at::TensorList sections,
                                     at::TensorList tile_offsets, const std::optional<at::Tensor>& row_delta,
                                     int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(base.dim() == 2 && grad_y.size(-1) == base.size(0), "xorgemm: grad_y has ", grad_y.size(-1),
              " features but the weight has ", base.size(0), " outputs");
  TORCH_CHECK(grad_y.scalar_type() == base.scalar_type() && grad_y.device().is_cpu(),
              "xorgemm: grad_y must be a ", base.scalar_type(), " CPU tensor");
  const int64_t N = base.size(0), K = base.size(1);
  const at::Tensor g2 = grad_y.reshape({-1, N}).contiguous();
  const int64_t M = g2.size(0);
  const Problem p = make_problem(M, base, sections.vec(), tile_offsets.vec(), row_delta, tile_rows, tile_cols);
  at::Tensor out = at::empty({M, K}, grad_y.options());
  for (size_t gi = 0; gi < p.group_rows.size(); ++gi) {
    const auto& rows = p.group_rows[gi];
    if (rows.empty()) continue;
    const at::Tensor gg = rows_of(g2, rows, M);
    if (gi == 0) {
      put_rows(out, rows, at::mm(gg, base));
      continue;
    }
    // grad_x = sum over output-feature blocks of grad_y[:, block] @ W'[block, :], accumulated block by block.
    at::Tensor xg = at::zeros({(int64_t)rows.size(), K}, grad_y.options());
    for_each_patched_block(p, gi - 1, base, [&](int64_t r0, int64_t h, const at::Tensor& block) {
      xg.addmm_(gg.narrow(1, r0, h), block);
    });
    put_rows(out, rows, xg);
  }
  return out.reshape(rows_shape(grad_y.sizes(), K));
}

}  // namespace

TORCH_LIBRARY_IMPL(xorgemm, CPU, m) {
  m.impl("xor_linear", &xor_linear_cpu);
  m.impl("xor_linear_grad_input", &xor_linear_grad_input_cpu);
}

}  // namespace xorgemm
