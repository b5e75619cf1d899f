// Python bindings of the native format code (xorgemm._C); the ops themselves are torch.ops.xorgemm (ops.cpp).
// Byte buffers travel as uint8 CPU tensors; the work runs without the GIL. The layout facts Python needs
// (codec names, tile table entry size, alignment, the tile grid) come from here, never restated in Python.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "cpu/fused_linear.h"
#include "format/delta_section.h"

namespace py = pybind11;
using xorgemm::format::TileGrid;

namespace {

const uint8_t* bytes_of(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kUInt8 && t.dim() == 1 && t.is_contiguous(),
              what, " must be a contiguous 1-D uint8 CPU tensor");
  return t.data_ptr<uint8_t>();
}

torch::Tensor offsets_tensor(const std::vector<uint64_t>& offsets) {
  auto out = torch::empty({(int64_t)offsets.size()}, torch::kInt64);
  memcpy(out.data_ptr<int64_t>(), offsets.data(), offsets.size() * sizeof(uint64_t));
  return out;
}

// A large tensor's tiles are encoded in ranges on ATen's threads (every tile is encoded on its own: see
// encode_tiles), then joined straight into the result: one core would take seconds on an embedding matrix
// while the others wait. Small tensors stay on the calling thread; pack runs many of them at once.
torch::Tensor encode_section(const torch::Tensor& base, const torch::Tensor& finetuned, const TileGrid& g,
                             int shift) {
  const uint8_t* b = bytes_of(base, "base");
  const uint8_t* f = bytes_of(finetuned, "finetuned");
  TORCH_CHECK((uint64_t)base.numel() == g.tensor_bytes() && (uint64_t)finetuned.numel() == g.tensor_bytes(),
              "base and finetuned must hold the grid's ", g.tensor_bytes(), " bytes");
  constexpr uint64_t kParallelBytes = 16ull << 20, kTilesPerRange = 256;
  const uint64_t n = g.num_tiles();
  const int64_t ranges = g.tensor_bytes() < kParallelBytes
                             ? 1
                             : (int64_t)std::min<uint64_t>((n + kTilesPerRange - 1) / kTilesPerRange,
                                                           4ull * (uint64_t)at::get_num_threads());
  std::vector<std::vector<xorgemm::codec::TileEntry>> entries(ranges);
  std::vector<std::vector<uint8_t>> payloads(ranges);
  {
    py::gil_scoped_release no_gil;
    at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint64_t t0 = n * r / ranges, t1 = n * (r + 1) / ranges;
        entries[r].reserve(t1 - t0);
        // Every tile raw, at most (the first tile is a whole one): untouched, the room costs no memory.
        payloads[r].reserve((t1 - t0) * ((uint64_t)g.tile_height(0) * g.tile_width(0) * g.elem_bytes +
                                         2 * xorgemm::codec::kTileAlign) + (64u << 10));
        xorgemm::format::encode_tiles(b, f, g, shift, t0, t1, entries[r], payloads[r]);
      }
    });
  }
  uint64_t total = g.table_bytes();
  for (const auto& p : payloads) total += p.size();
  auto out = torch::empty({(int64_t)total}, torch::kUInt8);
  uint8_t* dst = out.data_ptr<uint8_t>();
  uint8_t* pay = dst + g.table_bytes();
  memset(dst + n * sizeof(xorgemm::codec::TileEntry), 0, g.table_bytes() - n * sizeof(xorgemm::codec::TileEntry));
  for (int64_t r = 0; r < ranges; ++r) {
    memcpy(dst, entries[r].data(), entries[r].size() * sizeof(xorgemm::codec::TileEntry));
    dst += entries[r].size() * sizeof(xorgemm::codec::TileEntry);
    memcpy(pay, payloads[r].data(), payloads[r].size());
    pay += payloads[r].size();
    std::vector<uint8_t>().swap(payloads[r]);  // freed as it is copied
  }
  return out;
}

// Validates a section and returns its tile payload offsets (int64).
torch::Tensor validate_section(const torch::Tensor& section, const TileGrid& g) {
  const uint8_t* s = bytes_of(section, "section");
  std::vector<uint64_t> offsets;
  {
    py::gil_scoped_release no_gil;
    offsets = xorgemm::format::validate_section(s, (uint64_t)section.numel(), g);
  }
  return offsets_tensor(offsets);
}

// Payload offsets from a section's tile table alone (int64), for a section of section_len bytes elsewhere.
torch::Tensor table_offsets(const torch::Tensor& table, int64_t section_len, const TileGrid& g) {
  const uint8_t* t = bytes_of(table, "table");
  TORCH_CHECK((uint64_t)table.numel() >= g.num_tiles() * sizeof(xorgemm::codec::TileEntry) && section_len >= 0,
              "table must hold one entry per tile");
  return offsets_tensor(xorgemm::format::table_offsets(t, (uint64_t)section_len, g));
}

// The tile table of a section as int64 [n_tiles, 3]: n_exc, codec, low_bytes per tile.
torch::Tensor tile_table(const torch::Tensor& section, const TileGrid& g) {
  const uint8_t* s = bytes_of(section, "section");
  TORCH_CHECK((uint64_t)section.numel() >= g.table_bytes(), "section is shorter than its tile table");
  auto out = torch::empty({(int64_t)g.num_tiles(), 3}, torch::kInt64);
  int64_t* o = out.data_ptr<int64_t>();
  for (uint64_t t = 0; t < g.num_tiles(); ++t) {
    const xorgemm::codec::TileEntry e = xorgemm::codec::load_entry(s, t);
    o[3 * t] = e.n_exc;
    o[3 * t + 1] = e.codec;
    o[3 * t + 2] = e.low_bytes;
  }
  return out;
}

// The shard of a validated section on tile boundaries: (section, its grid).
std::pair<torch::Tensor, TileGrid> slice_section(const torch::Tensor& section, const torch::Tensor& offsets,
                                                 const TileGrid& g, uint64_t row0, uint64_t row1, uint64_t col0,
                                                 uint64_t col1) {
  const uint8_t* s = bytes_of(section, "section");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous() &&
                  (uint64_t)offsets.numel() == g.num_tiles(),
              "offsets must be the section's int64 tile payload offsets");
  const uint64_t* o = reinterpret_cast<const uint64_t*>(offsets.data_ptr<int64_t>());
  xorgemm::format::check_section_bounds(s, (uint64_t)section.numel(), o, g);
  TileGrid sub{};
  std::vector<uint8_t> part = xorgemm::format::slice_section(s, o, g, row0, row1, col0, col1, &sub);
  auto out = torch::empty({(int64_t)part.size()}, torch::kUInt8);
  memcpy(out.data_ptr<uint8_t>(), part.data(), part.size());
  return {out, sub};
}

std::vector<int64_t> codec_counts(const torch::Tensor& section, const TileGrid& g) {
  const uint8_t* s = bytes_of(section, "section");
  TORCH_CHECK((uint64_t)section.numel() >= g.table_bytes(), "section is shorter than its tile table");
  uint64_t counts[xorgemm::codec::kNumCodecs];
  xorgemm::format::codec_counts(s, g, counts);
  return std::vector<int64_t>(counts, counts + xorgemm::codec::kNumCodecs);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xorgemm native code: tile codecs and delta sections (the ops are torch.ops.xorgemm)";
  py::register_exception<xorgemm::format::FormatError>(m, "FormatError", PyExc_ValueError);
  m.attr("TILE_ALIGN") = xorgemm::codec::kTileAlign;
  m.attr("MAX_TILE_ELEMS") = xorgemm::codec::kMaxTileElems;
  m.attr("TILE_ENTRY_BYTES") = sizeof(xorgemm::codec::TileEntry);
  py::tuple names(xorgemm::codec::kNumCodecs);
  for (int c = 0; c < xorgemm::codec::kNumCodecs; ++c) names[c] = xorgemm::codec::kCodecNames[c];
  m.attr("CODEC_NAMES") = names;

  py::class_<TileGrid>(m, "TileGrid", "The tile grid over a tensor's 2-D view (format/tile_grid.h)")
      .def(py::init(&TileGrid::make), py::arg("rows"), py::arg("cols"), py::arg("tile_rows"), py::arg("tile_cols"),
           py::arg("elem_bytes"))
      .def_static(
          "of_shape",
          [](const std::vector<int64_t>& shape, int64_t tile_rows, int64_t tile_cols, int64_t elem_bytes) {
            return TileGrid::of_shape(shape.data(), (int)shape.size(), tile_rows, tile_cols, elem_bytes);
          },
          "The grid over a tensor's 2-D view (shape[0], prod(shape[1:])); 1-D is one row, 0-d is 1x1",
          py::arg("shape"), py::arg("tile_rows"), py::arg("tile_cols"), py::arg("elem_bytes"))
      .def_readonly("rows", &TileGrid::rows)
      .def_readonly("cols", &TileGrid::cols)
      .def_readonly("tile_rows", &TileGrid::tile_rows)
      .def_readonly("tile_cols", &TileGrid::tile_cols)
      .def_readonly("elem_bytes", &TileGrid::elem_bytes)
      .def_property_readonly("grid_rows", &TileGrid::grid_rows)
      .def_property_readonly("grid_cols", &TileGrid::grid_cols)
      .def_property_readonly("num_tiles", &TileGrid::num_tiles)
      .def_property_readonly("tensor_bytes", &TileGrid::tensor_bytes)
      .def_property_readonly("table_bytes", &TileGrid::table_bytes, "bytes of the tile table and its padding")
      .def("__eq__",
           [](const TileGrid& a, const TileGrid& b) {
             return a.rows == b.rows && a.cols == b.cols && a.tile_rows == b.tile_rows && a.tile_cols == b.tile_cols &&
                    a.elem_bytes == b.elem_bytes;
           })
      .def("__repr__", [](const TileGrid& g) {
        return "TileGrid(rows=" + std::to_string(g.rows) + ", cols=" + std::to_string(g.cols) +
               ", tile_rows=" + std::to_string(g.tile_rows) + ", tile_cols=" + std::to_string(g.tile_cols) +
               ", elem_bytes=" + std::to_string(g.elem_bytes) + ")";
      });

  m.def("encode_section", &encode_section,
        "Encode finetuned against base (bytes) as a delta section; `shift` >= 0: the base words' class bits for "
        "the conditioned codec (xorgemm.format.layout.context_shift), -1: XOR codecs only",
        py::arg("base"), py::arg("finetuned"), py::arg("grid"), py::arg("shift") = -1);
  m.def("validate_section", &validate_section, "Validate a delta section; returns tile payload offsets",
        py::arg("section"), py::arg("grid"));
  m.def("table_offsets", &table_offsets, "Check a section's tile table alone; returns tile payload offsets",
        py::arg("table"), py::arg("section_len"), py::arg("grid"));
  m.def("tile_table", &tile_table, "A section's tile table as int64 [n_tiles, 3]: n_exc, codec, low_bytes",
        py::arg("section"), py::arg("grid"));
  m.def("slice_section", &slice_section,
        "The block rows [row0, row1) x columns [col0, col1) of a section, on tile boundaries: (section, grid)",
        py::arg("section"), py::arg("offsets"), py::arg("grid"), py::arg("row0"), py::arg("row1"), py::arg("col0"),
        py::arg("col1"));
  m.def("codec_counts", &codec_counts, "Tiles per codec in a validated section", py::arg("section"), py::arg("grid"));
  m.def("cpu_isas", &xorgemm::cpu::available_isas,
        "The instruction sets of the fused CPU kernel this CPU runs, best first (XORGEMM_CPU_ISA picks one)");
  m.def(
      "cpu_fused_max_rows", [](py::object dtype) {
        return xorgemm::cpu::fused_max_rows(torch::python::detail::py_object_to_dtype(dtype));
      },
      "The batch rows up to which the CPU op takes the fused kernel for weights of this dtype (unforced)");
  m.def("cpu_isa", &xorgemm::cpu::chosen_isa,
        "The fused CPU kernel's instruction set now (XORGEMM_CPU_ISA, or the best)");
}
