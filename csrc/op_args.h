// Argument rules of the xorgemm ops (schemas in ops.cpp), shared by every device's implementation: the CPU
// and CUDA kernels refuse the same inputs with the same words, and a rule changes in one place.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "format/delta_section.h"

namespace xorgemm {

// The shape of an op's output over the rows of `in`: its leading dimensions, then `last`.
inline std::vector<int64_t> rows_shape(at::IntArrayRef in, int64_t last) {
  std::vector<int64_t> shape(in.begin(), in.end() - 1);
  shape.push_back(last);
  return shape;
}

// The tile grid over a tensor's 2-D view, (shape[0], prod(shape[1:])), as the format defines it.
inline format::TileGrid grid_of(const at::Tensor& t, int64_t tile_rows, int64_t tile_cols) {
  try {
    return format::TileGrid::of_shape(t.sizes().data(), (int)t.dim(), tile_rows, tile_cols, (int64_t)t.element_size());
  } catch (const format::FormatError& e) {
    TORCH_CHECK(false, "xorgemm: ", e.what());
  }
}

// Sections and their tile offsets: one contiguous uint8 section, at least its tile table long, and one int64
// offset per tile each, on the weight's device. Their content: check_sections_on_host.
inline void check_sections(at::TensorList sections, at::TensorList tile_offsets, const at::Device& device,
                           const format::TileGrid& g) {
  TORCH_CHECK(sections.size() == tile_offsets.size(), "xorgemm: ", sections.size(), " sections but ",
              tile_offsets.size(), " offset tensors");
  for (size_t d = 0; d < sections.size(); ++d) {
    const at::Tensor& s = sections[d];
    const at::Tensor& o = tile_offsets[d];
    TORCH_CHECK(s.device() == device && s.scalar_type() == at::kByte && s.dim() == 1 && s.is_contiguous() &&
                    (uint64_t)s.numel() >= g.table_bytes(),
                "xorgemm: section ", d, " must be a contiguous 1-D uint8 tensor on ", device,
                " holding at least its tile table (", g.table_bytes(), " bytes)");
    TORCH_CHECK(o.device() == device && o.scalar_type() == at::kLong && o.is_contiguous() &&
                    (uint64_t)o.numel() == g.num_tiles(),
                "xorgemm: tile_offsets ", d, " must hold one int64 per tile (", g.num_tiles(), ") on ", device);
  }
}

// What makes decoding host-resident sections memory-safe: every entry well formed and every payload inside
// its section (O(tiles); format::check_section_bounds), so a bad section is refused before any decode. The
// CPU kernels call it after check_sections; sections on a GPU were checked when they were made resident.
inline void check_sections_on_host(at::TensorList sections, at::TensorList tile_offsets, const format::TileGrid& g) {
  for (size_t d = 0; d < sections.size(); ++d) {
    try {
      format::check_section_bounds(sections[d].data_ptr<uint8_t>(), (uint64_t)sections[d].numel(),
                                   reinterpret_cast<const uint64_t*>(tile_offsets[d].data_ptr<int64_t>()), g);
    } catch (const format::FormatError& e) {
      TORCH_CHECK(false, "xorgemm: section ", d, ": ", e.what());
    }
  }
}

// The arguments of xor_linear (a = x, `features` = in_features) and xor_linear_grad_input (a = grad_y,
// `features` = out_features) against the weight `base`; returns the weight's tile grid.
inline format::TileGrid check_linear_args(const char* what, const at::Tensor& a, const at::Tensor& base,
                                          at::TensorList sections, at::TensorList tile_offsets,
                                          const std::optional<at::Tensor>& row_finetune, int64_t tile_rows,
                                          int64_t tile_cols, bool transposed) {
  TORCH_CHECK(base.dim() == 2 && base.is_contiguous(), "xorgemm: the weight must be a contiguous 2-D tensor, got ",
              base.sizes());
  const int64_t features = transposed ? base.size(0) : base.size(1);
  TORCH_CHECK(a.dim() >= 1 && a.size(-1) == features, "xorgemm: ", what, " has ", a.dim() ? a.size(-1) : 0,
              " features but the weight has ", features, transposed ? " outputs" : " inputs");
  TORCH_CHECK(a.scalar_type() == base.scalar_type(), "xorgemm: ", what, " is ", a.scalar_type(),
              " but the weight is ", base.scalar_type());
  TORCH_CHECK(a.device() == base.device(), "xorgemm: ", what, " is on ", a.device(), " but the weight is on ",
              base.device());
  const format::TileGrid g = grid_of(base, tile_rows, tile_cols);
  check_sections(sections, tile_offsets, base.device(), g);
  const int64_t rows = a.numel() / features;
  if (row_finetune.has_value()) {
    const at::Tensor& ids = *row_finetune;
    TORCH_CHECK(ids.device() == base.device() && ids.scalar_type() == at::kLong && ids.numel() == rows,
                "xorgemm: row_finetune must be an int64 tensor on ", base.device(), " with one entry per row of ",
                what, " (", rows, "), got ", ids.scalar_type(), " ", ids.sizes(), " on ", ids.device());
  } else {
    TORCH_CHECK(sections.size() <= 1, "xorgemm: ", sections.size(),
                " fine-tunes need a row_finetune tensor saying which row uses which");
  }
  return g;
}

// xor_linear's bias: none, [N], or one row per fine-tune plus the base, [n_finetunes + 1, N]; x's dtype, on
// `device`.
inline void check_bias(const std::optional<at::Tensor>& bias, at::ScalarType dtype, const at::Device& device,
                       int64_t n, size_t n_finetunes) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.scalar_type() == dtype && b.device() == device, "xorgemm: bias must be a ", dtype, " tensor on ",
              device, ", got ", b.scalar_type(), " on ", b.device());
  TORCH_CHECK((b.dim() == 1 && b.size(0) == n) ||
                  (b.dim() == 2 && b.size(0) == (int64_t)n_finetunes + 1 && b.size(1) == n),
              "xorgemm: bias must be [", n, "] or, one row per fine-tune plus the base, [", n_finetunes + 1, ", ", n,
              "]; got ", b.sizes());
}

// xor_linear / xor_linear_grad_input, checked and flattened: what every device's implementation starts from.
struct LinearProblem {
  format::TileGrid grid;           // the weight's tile grid
  at::Tensor a2;                   // x (forward) or grad_y (backward) as [M, features], contiguous
  std::vector<int64_t> out_shape;  // the output's shape: a's leading dimensions, then N (forward) or K
};

inline LinearProblem prepare_linear(const char* what, const at::Tensor& a, const at::Tensor& base,
                                    at::TensorList sections, at::TensorList tile_offsets,
                                    const std::optional<at::Tensor>& row_finetune,
                                    const std::optional<at::Tensor>& bias, int64_t tile_rows, int64_t tile_cols,
                                    bool transposed) {
  const format::TileGrid g =
      check_linear_args(what, a, base, sections, tile_offsets, row_finetune, tile_rows, tile_cols, transposed);
  const int64_t features = transposed ? base.size(0) : base.size(1), out = transposed ? base.size(1) : base.size(0);
  check_bias(bias, a.scalar_type(), base.device(), out, sections.size());
  return {g, a.reshape({-1, features}).contiguous(), rows_shape(a.sizes(), out)};
}

// Rows of each group as index tensors on the rows' device: group 0 holds the base rows (id -1), group f + 1
// those of fine-tune f; a group without rows is an undefined tensor. The ids are read on the host (one copy
// from a GPU): the patched-block path runs one GEMM per group and needs the group sizes there.
inline std::vector<at::Tensor> group_rows(const std::optional<at::Tensor>& row_finetune, int64_t n_finetunes,
                                          int64_t rows, const at::Device& device) {
  std::vector<at::Tensor> out(n_finetunes + 1);
  const auto index = at::TensorOptions().dtype(at::kLong);
  if (!row_finetune.has_value()) {
    if (rows > 0) out[n_finetunes] = at::arange(rows, index.device(device));  // no rows: nothing to patch
    return out;
  }
  const at::Tensor ids = row_finetune->reshape({-1}).cpu().contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> lists(n_finetunes + 1);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(id[i] >= -1 && id[i] < n_finetunes, "xorgemm: row ", i, " asks for fine-tune ", id[i], " of ",
                n_finetunes, " (-1 is the base)");
    lists[id[i] + 1].push_back(i);
  }
  for (int64_t g = 0; g <= n_finetunes; ++g)
    if (!lists[g].empty()) out[g] = at::tensor(lists[g], index).to(device);
  return out;
}

// xor_linear_slots' slot table: [S, 3] int64 on `device`, row s = (section address, tile offsets address,
// section bytes) of the delta in slot s, or zeros for an empty slot (its rows get the base). Made by
// XorLinear.set_slot from tensors it keeps alive; the op cannot check an address, only the table's form.
inline void check_slot_table(const at::Tensor& table, const at::Device& device) {
  TORCH_CHECK(table.device() == device && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.size(1) == 3 && table.is_contiguous(),
              "xorgemm: slot_table must be a contiguous [slots, 3] int64 tensor on ", device, ", got ",
              table.scalar_type(), " ", table.sizes(), " on ", table.device());
}

// A slot table read on the host (`rows`: the table on the CPU) as the lists xor_linear takes: a view of
// each slot's section and offsets (not owning them) on `device`, and for an empty slot an all-zero delta.
struct SlotLists {
  std::vector<at::Tensor> sections, offsets;
};
inline SlotLists slot_lists(const at::Tensor& rows, const format::TileGrid& g, const at::Device& device) {
  SlotLists out;
  const auto bytes = at::TensorOptions().dtype(at::kByte).device(device);
  const auto longs = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor none_section, none_offsets;
  for (int64_t s = 0; s < rows.size(0); ++s) {
    const int64_t* row = rows.data_ptr<int64_t>() + 3 * s;
    if (row[0] == 0) {
      if (!none_section.defined()) {
        none_section = at::zeros({(int64_t)g.table_bytes()}, bytes);
        none_offsets = at::full({(int64_t)g.num_tiles()}, (int64_t)g.table_bytes(), longs);  // payloads start there
      }
      out.sections.push_back(none_section);
      out.offsets.push_back(none_offsets);
      continue;
    }
    TORCH_CHECK(row[1] != 0 && row[2] >= (int64_t)g.table_bytes(), "xorgemm: slot ", s, " of the slot table holds ",
                row[2], " section bytes (its tile table alone is ", g.table_bytes(), ") or no tile offsets");
    out.sections.push_back(at::from_blob(reinterpret_cast<void*>(row[0]), {row[2]}, bytes));
    out.offsets.push_back(at::from_blob(reinterpret_cast<void*>(row[1]), {(int64_t)g.num_tiles()}, longs));
  }
  return out;
}

// apply_section's arguments: `base` and `out` alike (dtype, shape, device, contiguous), the section on their
// device; returns the grid over their 2-D view.
inline format::TileGrid check_apply_args(const at::Tensor& section, const at::Tensor& offsets, const at::Tensor& base,
                                         const at::Tensor& out, int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(base.is_contiguous() && out.is_contiguous() && base.scalar_type() == out.scalar_type() &&
                  base.sizes() == out.sizes() && base.device() == out.device(),
              "xorgemm: apply_section needs contiguous base and out of the same dtype, shape and device; got ",
              base.scalar_type(), " ", base.sizes(), " on ", base.device(), " and ", out.scalar_type(), " ",
              out.sizes(), " on ", out.device());
  const format::TileGrid g = grid_of(base, tile_rows, tile_cols);
  check_sections({section}, {offsets}, base.device(), g);
  return g;
}

}  // namespace xorgemm
