// Python bindings of the native format code (xorgemm._C). Byte buffers travel as uint8 CPU tensors; the
// work runs without the GIL and, for decoding, in parallel over tiles.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "format/delta_section.h"

namespace py = pybind11;
using xorgemm::format::TileGrid;

namespace {

const uint8_t* bytes_of(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kUInt8 && t.dim() == 1 && t.is_contiguous(),
              what, " must be a contiguous 1-D uint8 CPU tensor");
  return t.data_ptr<uint8_t>();
}

TileGrid make_grid(int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols, int64_t elem_bytes) {
  if (rows <= 0 || cols <= 0 || tile_rows <= 0 || tile_cols <= 0 || elem_bytes <= 0 || tile_rows > UINT32_MAX ||
      tile_cols > UINT32_MAX)
    throw xorgemm::format::FormatError("shape, tile shape and element size must be positive");
  TileGrid g{(uint64_t)rows, (uint64_t)cols, (uint32_t)tile_rows, (uint32_t)tile_cols, (uint32_t)elem_bytes};
  g.check();
  return g;
}

torch::Tensor encode_section(const torch::Tensor& base, const torch::Tensor& finetuned, int64_t rows, int64_t cols,
                             int64_t tile_rows, int64_t tile_cols, int64_t elem_bytes) {
  const TileGrid g = make_grid(rows, cols, tile_rows, tile_cols, elem_bytes);
  const uint8_t* b = bytes_of(base, "base");
  const uint8_t* f = bytes_of(finetuned, "finetuned");
  TORCH_CHECK((uint64_t)base.numel() == g.tensor_bytes() && (uint64_t)finetuned.numel() == g.tensor_bytes(),
              "base and finetuned must hold rows*cols*elem_bytes bytes");
  std::vector<uint8_t> section;
  {
    py::gil_scoped_release no_gil;
    section = xorgemm::format::encode_section(b, f, g);
  }
  auto out = torch::empty({(int64_t)section.size()}, torch::kUInt8);
  memcpy(out.data_ptr<uint8_t>(), section.data(), section.size());
  return out;
}

// Validates a section and returns its tile payload offsets (int64).
torch::Tensor validate_section(const torch::Tensor& section, int64_t rows, int64_t cols, int64_t tile_rows,
                               int64_t tile_cols, int64_t elem_bytes) {
  const TileGrid g = make_grid(rows, cols, tile_rows, tile_cols, elem_bytes);
  const uint8_t* s = bytes_of(section, "section");
  std::vector<uint64_t> offsets;
  {
    py::gil_scoped_release no_gil;
    offsets = xorgemm::format::validate_section(s, (uint64_t)section.numel(), g);
  }
  auto out = torch::empty({(int64_t)offsets.size()}, torch::kInt64);
  memcpy(out.data_ptr<int64_t>(), offsets.data(), offsets.size() * sizeof(uint64_t));
  return out;
}

// Payload offsets from a section's tile table alone (int64), for a section of section_len bytes elsewhere.
torch::Tensor table_offsets(const torch::Tensor& table, int64_t section_len, int64_t rows, int64_t cols,
                            int64_t tile_rows, int64_t tile_cols, int64_t elem_bytes) {
  const TileGrid g = make_grid(rows, cols, tile_rows, tile_cols, elem_bytes);
  const uint8_t* t = bytes_of(table, "table");
  TORCH_CHECK((uint64_t)table.numel() >= g.num_tiles() * sizeof(xorgemm::codec::TileEntry) && section_len >= 0,
              "table must hold one 8-byte entry per tile");
  const std::vector<uint64_t> offsets = xorgemm::format::table_offsets(t, (uint64_t)section_len, g);
  auto out = torch::empty({(int64_t)offsets.size()}, torch::kInt64);
  memcpy(out.data_ptr<int64_t>(), offsets.data(), offsets.size() * sizeof(uint64_t));
  return out;
}

// out = base XOR section, for a validated section (out may be base: in place).
void apply_section(const torch::Tensor& section, const torch::Tensor& offsets, const torch::Tensor& base,
                   torch::Tensor& out, int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols,
                   int64_t elem_bytes) {
  const TileGrid g = make_grid(rows, cols, tile_rows, tile_cols, elem_bytes);
  const uint8_t* s = bytes_of(section, "section");
  const uint8_t* b = bytes_of(base, "base");
  uint8_t* o = const_cast<uint8_t*>(bytes_of(out, "out"));
  TORCH_CHECK((uint64_t)base.numel() == g.tensor_bytes() && (uint64_t)out.numel() == g.tensor_bytes(),
              "base and out must hold rows*cols*elem_bytes bytes");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous() &&
                  (uint64_t)offsets.numel() == g.num_tiles(),
              "offsets must come from validate_section for this grid");
  const uint64_t* off = reinterpret_cast<const uint64_t*>(offsets.data_ptr<int64_t>());
  xorgemm::format::check_section_bounds(s, (uint64_t)section.numel(), off, g);
  py::gil_scoped_release no_gil;
  // Tiles write disjoint regions, so any split over grid rows is race-free.
  at::parallel_for(0, (int64_t)g.grid_rows(), 1, [&](int64_t begin, int64_t end) {
    xorgemm::format::apply_section_block(s, off, g, (uint64_t)begin, (uint64_t)end, 0, g.grid_cols(), b,
                                         {o, 0, 0, g.cols});
  });
}

std::vector<int64_t> codec_counts(const torch::Tensor& section, int64_t rows, int64_t cols, int64_t tile_rows,
                                  int64_t tile_cols, int64_t elem_bytes) {
  const TileGrid g = make_grid(rows, cols, tile_rows, tile_cols, elem_bytes);
  const uint8_t* s = bytes_of(section, "section");
  TORCH_CHECK((uint64_t)section.numel() >= xorgemm::format::table_bytes(g), "section is shorter than its table");
  uint64_t counts[xorgemm::codec::kNumCodecs];
  xorgemm::format::codec_counts(s, g, counts);
  return std::vector<int64_t>(counts, counts + xorgemm::codec::kNumCodecs);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xorgemm native code: tile codecs and delta sections";
  py::register_exception<xorgemm::format::FormatError>(m, "FormatError", PyExc_ValueError);
  m.attr("TILE_ALIGN") = xorgemm::codec::kTileAlign;
  m.attr("MAX_TILE_ELEMS") = xorgemm::codec::kMaxTileElems;
  m.def("encode_section", &encode_section, "Encode XOR(base, finetuned) bytes as a delta section",
        py::arg("base"), py::arg("finetuned"), py::arg("rows"), py::arg("cols"), py::arg("tile_rows"),
        py::arg("tile_cols"), py::arg("elem_bytes"));
  m.def("validate_section", &validate_section, "Validate a delta section; returns tile payload offsets",
        py::arg("section"), py::arg("rows"), py::arg("cols"), py::arg("tile_rows"), py::arg("tile_cols"),
        py::arg("elem_bytes"));
  m.def("table_offsets", &table_offsets, "Check a section's tile table alone; returns tile payload offsets",
        py::arg("table"), py::arg("section_len"), py::arg("rows"), py::arg("cols"), py::arg("tile_rows"),
        py::arg("tile_cols"), py::arg("elem_bytes"));
  m.def("apply_section", &apply_section, "out = base XOR a validated section (out may be base)", py::arg("section"),
        py::arg("offsets"), py::arg("base"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("tile_rows"),
        py::arg("tile_cols"), py::arg("elem_bytes"));
  m.def("codec_counts", &codec_counts, "Tiles per codec in a validated section", py::arg("section"), py::arg("rows"),
        py::arg("cols"), py::arg("tile_rows"), py::arg("tile_cols"), py::arg("elem_bytes"));
}
