// Argument rules shared by the CPU and CUDA implementations of the xorgemm ops (schemas in ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace xorgemm {

// The shape of an op's output over the rows of `in`: its leading dimensions, then `last`.
inline std::vector<int64_t> rows_shape(at::IntArrayRef in, int64_t last) {
  std::vector<int64_t> shape(in.begin(), in.end() - 1);
  shape.push_back(last);
  return shape;
}

// xor_linear's bias: none, [N], or one row per delta plus the base, [n_delta + 1, N]; x's dtype, on `device`.
inline void check_bias(const std::optional<at::Tensor>& bias, at::ScalarType dtype, const at::Device& device,
                       int64_t n, size_t n_delta) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.scalar_type() == dtype && b.device() == device, "xorgemm: bias must be a ", dtype, " tensor on ",
              device, ", got ", b.scalar_type(), " on ", b.device());
  TORCH_CHECK((b.dim() == 1 && b.size(0) == n) || (b.dim() == 2 && b.size(0) == (int64_t)n_delta + 1 && b.size(1) == n),
              "xorgemm: bias must be [", n, "] or, one row per delta plus the base, [", n_delta + 1, ", ", n,
              "]; got ", b.sizes());
}

}  // namespace xorgemm
