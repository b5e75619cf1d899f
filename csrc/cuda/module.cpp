// Python bindings of the CUDA kernels (xorgemm._C_cuda).
#include <torch/extension.h>

#include "cuda/apply_delta.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xorgemm CUDA kernels";
  m.def("apply_section", &xorgemm::cuda::apply_section_cuda,
        "out = base XOR a host-validated delta section, on the GPU (current stream)", py::arg("section"),
        py::arg("offsets"), py::arg("base"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("tile_rows"),
        py::arg("tile_cols"), py::arg("elem_bytes"));
}
