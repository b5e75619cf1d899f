// CUDA implementation of the xorgemm ops (schemas in ops.cpp): checks, then one of two paths.
//
//   fused          the decode-XOR-GEMM kernel of xor_gemm.cu: bf16/fp16, 64x64 tiles, rows a multiple of 8
//                  elements; one launch for any mix of fine-tunes. Used for decode-sized batches and for
//                  every per-row mix of fine-tunes.
//   patched blocks for everything else (fp32 weights, other tile shapes, large single-fine-tune batches):
//                  like the CPU kernel, the apply kernel patches a block of output features (~16 MiB, so it
//                  stays in L2) into scratch and cuBLAS multiplies it, block after block. fp32 GEMMs follow
//                  torch's TF32 setting (torch.backends.cuda.matmul.allow_tf32).
//
// XORGEMM_CUDA_PATH=fused|blocks forces a path (tests and benchmarks); unset, a shape heuristic picks.
// Sections on the GPU are trusted to be the ones validated when they were made resident (XorLinear, the
// loaders); here only their sizes are checked, never their content (that would cost a device round trip).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdlib>
#include <cstring>

#include "cuda/apply_delta.h"
#include "cuda/xor_gemm.h"
#include "op_args.h"

namespace xorgemm {
namespace cuda {
namespace {

// Largest batch the fused kernel takes for a single fine-tune before cuBLAS on patched blocks is faster:
// above it the GEMM is compute-bound and the patch cost is amortized (a first guess, to be tuned on a GPU).
constexpr int64_t kFusedMaxRows = 64;
constexpr int64_t kScratchBytes = 16ll << 20;

enum class Path { kAuto, kFused, kBlocks };

Path forced_path() {
  const char* v = std::getenv("XORGEMM_CUDA_PATH");
  if (v == nullptr || *v == 0 || !std::strcmp(v, "auto")) return Path::kAuto;
  if (!std::strcmp(v, "fused")) return Path::kFused;
  if (!std::strcmp(v, "blocks")) return Path::kBlocks;
  TORCH_CHECK(false, "xorgemm: XORGEMM_CUDA_PATH must be fused, blocks or auto, got '", v, "'");
}

void check_inputs(const char* what, const at::Tensor& a, const at::Tensor& base, at::TensorList sections,
                  at::TensorList tile_offsets, const std::optional<at::Tensor>& row_delta, int64_t rows,
                  int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(base.dim() == 2 && base.is_cuda() && base.is_contiguous(), "xorgemm: base must be a contiguous 2-D ",
              "CUDA tensor, got ", base.sizes(), " on ", base.device());
  TORCH_CHECK(a.is_cuda() && a.device() == base.device(), "xorgemm: ", what, " is on ", a.device(),
              " but the weight is on ", base.device());
  TORCH_CHECK(a.scalar_type() == base.scalar_type(), "xorgemm: ", what, " is ", a.scalar_type(),
              " but the weight is ", base.scalar_type());
  TORCH_CHECK(sections.size() == tile_offsets.size(), "xorgemm: ", sections.size(), " sections but ",
              tile_offsets.size(), " offset tensors");
  TORCH_CHECK(tile_rows > 0 && tile_cols > 0 && tile_rows * tile_cols <= 65536, "xorgemm: bad tile shape ", tile_rows,
              "x", tile_cols);
  const int64_t n_tiles = ((base.size(0) + tile_rows - 1) / tile_rows) * ((base.size(1) + tile_cols - 1) / tile_cols);
  for (size_t d = 0; d < sections.size(); ++d) {
    const at::Tensor& s = sections[d];
    const at::Tensor& o = tile_offsets[d];
    TORCH_CHECK(s.device() == base.device() && s.scalar_type() == at::kByte && s.dim() == 1 && s.is_contiguous() &&
                    s.numel() >= n_tiles * 8,
                "xorgemm: section ", d, " must be a contiguous 1-D uint8 tensor on ", base.device(),
                " holding at least its tile table");
    TORCH_CHECK(o.device() == base.device() && o.scalar_type() == at::kLong && o.is_contiguous() &&
                    o.numel() == n_tiles,
                "xorgemm: tile_offsets ", d, " must hold one int64 per tile (", n_tiles, ") on ", base.device());
  }
  if (row_delta.has_value()) {
    TORCH_CHECK(row_delta->device() == base.device() && row_delta->scalar_type() == at::kLong &&
                    row_delta->numel() == rows,
                "xorgemm: row_delta must be an int64 tensor on ", base.device(), " with one entry per row (", rows,
                "), got ", row_delta->scalar_type(), " ", row_delta->sizes(), " on ", row_delta->device());
  } else {
    TORCH_CHECK(sections.size() <= 1, "xorgemm: ", sections.size(),
                " deltas need a row_delta tensor saying which row uses which");
  }
}

// Rows of each group (0: base rows, d + 1: rows of delta d), read back to the host: the patched-block path
// runs one cuBLAS GEMM per group and must know the group sizes.
std::vector<at::Tensor> group_rows(const std::optional<at::Tensor>& row_delta, int64_t n_delta, int64_t rows,
                                   const at::Device& device) {
  std::vector<at::Tensor> out(n_delta + 1);
  if (!row_delta.has_value()) {
    out[n_delta] = at::arange(rows, at::TensorOptions().dtype(at::kLong).device(device));
    return out;
  }
  const at::Tensor ids = row_delta->reshape({-1}).cpu();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> lists(n_delta + 1);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(id[i] >= -1 && id[i] < n_delta, "xorgemm: row ", i, " asks for delta ", id[i], " of ", n_delta,
                " (-1 is the base)");
    lists[id[i] + 1].push_back(i);
  }
  for (int64_t g = 0; g <= n_delta; ++g)
    if (!lists[g].empty()) out[g] = at::tensor(lists[g], at::kLong).to(device);
  return out;
}

// Calls fn(r0, h, block) for consecutive blocks [r0, r0 + h) of output features of the fine-tuned weight
// of delta d, each patched by the apply kernel into one reused scratch buffer on the current stream.
template <typename Fn>
void for_each_patched_block(const at::Tensor& base, const at::Tensor& section, const at::Tensor& offsets,
                            int64_t tile_rows, int64_t tile_cols, Fn&& fn) {
  const int64_t N = base.size(0), K = base.size(1), eb = base.element_size();
  const int64_t grid_rows = (N + tile_rows - 1) / tile_rows;
  const int64_t per_block = std::max<int64_t>(1, kScratchBytes / (tile_rows * K * eb));
  at::Tensor scratch = at::empty({std::min(per_block, grid_rows) * tile_rows, K}, base.options());
  const at::Tensor base_bytes = base.reshape({-1}).view(at::kByte);
  for (int64_t gr0 = 0; gr0 < grid_rows; gr0 += per_block) {
    const int64_t gr1 = std::min(gr0 + per_block, grid_rows);
    const int64_t r0 = gr0 * tile_rows, h = std::min(gr1 * tile_rows, N) - r0;
    at::Tensor block = scratch.narrow(0, 0, h);
    at::Tensor block_bytes = block.reshape({-1}).view(at::kByte);
    apply_section_rows_cuda(section, offsets, base_bytes, block_bytes, N, K, tile_rows, tile_cols, eb, gr0, gr1);
    fn(r0, h, block);
  }
}

at::Tensor blocks_forward(const at::Tensor& x2, const at::Tensor& base, at::TensorList sections,
                          at::TensorList tile_offsets, const std::optional<at::Tensor>& row_delta,
                          const std::optional<at::Tensor>& bias, int64_t tile_rows, int64_t tile_cols) {
  const int64_t M = x2.size(0), N = base.size(0);
  const int64_t n_delta = (int64_t)sections.size();
  at::Tensor out = at::empty({M, N}, x2.options());
  const auto groups = group_rows(row_delta, n_delta, M, x2.device());
  for (int64_t g = 0; g <= n_delta; ++g) {
    if (!groups[g].defined()) continue;
    const bool all = groups[g].numel() == M;
    const at::Tensor xg = all ? x2 : x2.index_select(0, groups[g]);
    if (g == 0) {
      out.index_copy_(0, groups[g], at::mm(xg, base.t()));
      continue;
    }
    at::Tensor yg = all ? out : at::empty({xg.size(0), N}, x2.options());
    for_each_patched_block(base, sections[g - 1], tile_offsets[g - 1], tile_rows, tile_cols,
                           [&](int64_t r0, int64_t h, const at::Tensor& block) {
                             at::Tensor yb = yg.narrow(1, r0, h);
                             at::mm_out(yb, xg, block.t());
                           });
    if (!all) out.index_copy_(0, groups[g], yg);
  }
  if (bias.has_value()) {
    if (bias->dim() == 1) {
      out.add_(*bias);
    } else {
      const at::Tensor ids = row_delta.has_value() ? row_delta->reshape({-1}) + 1
                                                   : at::full({M}, n_delta, x2.options().dtype(at::kLong));
      out.add_(bias->index_select(0, ids));
    }
  }
  return out;
}

at::Tensor blocks_grad_input(const at::Tensor& g2, const at::Tensor& base, at::TensorList sections,
                             at::TensorList tile_offsets, const std::optional<at::Tensor>& row_delta,
                             int64_t tile_rows, int64_t tile_cols) {
  const int64_t M = g2.size(0), K = base.size(1);
  const int64_t n_delta = (int64_t)sections.size();
  at::Tensor out = at::empty({M, K}, g2.options());
  const auto groups = group_rows(row_delta, n_delta, M, g2.device());
  for (int64_t g = 0; g <= n_delta; ++g) {
    if (!groups[g].defined()) continue;
    const at::Tensor gg = groups[g].numel() == M ? g2 : g2.index_select(0, groups[g]);
    if (g == 0) {
      out.index_copy_(0, groups[g], at::mm(gg, base));
      continue;
    }
    at::Tensor xg = at::zeros({gg.size(0), K}, g2.options());
    for_each_patched_block(base, sections[g - 1], tile_offsets[g - 1], tile_rows, tile_cols,
                           [&](int64_t r0, int64_t h, const at::Tensor& block) {
                             xg.addmm_(gg.narrow(1, r0, h), block);
                           });
    out.index_copy_(0, groups[g], xg);
  }
  return out;
}

bool use_fused(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections, bool grouped,
               int64_t tile_rows, int64_t tile_cols) {
  const bool supported = fused_supported(a2, base, sections, tile_rows, tile_cols);
  switch (forced_path()) {
    case Path::kFused:
      TORCH_CHECK(supported, "xorgemm: XORGEMM_CUDA_PATH=fused, but the fused kernel needs bf16/fp16, 64x64 tiles, ",
                  "rows a multiple of 8 elements, 16-byte aligned tensors and at most ", kMaxDeltasPerLaunch,
                  " fine-tunes");
      return true;
    case Path::kBlocks: return false;
    default: return supported && (grouped || a2.size(0) <= kFusedMaxRows);
  }
}

at::Tensor xor_linear_cuda(const at::Tensor& x, const at::Tensor& base, at::TensorList sections,
                           at::TensorList tile_offsets, const std::optional<at::Tensor>& row_delta,
                           const std::optional<at::Tensor>& bias_in, int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(x.dim() >= 1 && base.dim() == 2 && x.size(-1) == base.size(1), "xorgemm: x has ", x.size(-1),
              " input features but the weight has ", base.dim() == 2 ? base.size(1) : -1);
  const int64_t N = base.size(0), K = base.size(1);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  check_inputs("x", x2, base, sections, tile_offsets, row_delta, M, tile_rows, tile_cols);
  check_bias(bias_in, x.scalar_type(), base.device(), N, sections.size());
  // The fused kernel reads the bias by pointer; it is small, so a strided one is simply copied.
  const std::optional<at::Tensor> bias = bias_in.has_value() ? std::optional(bias_in->contiguous()) : std::nullopt;
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor out;
  if (!row_delta.has_value() && sections.empty()) {  // the plain base: cuBLAS as it is
    out = bias.has_value() ? at::addmm(bias->reshape({-1, N})[0], x2, base.t()) : at::mm(x2, base.t());
  } else if (M == 0) {
    out = at::empty({0, N}, x2.options());
  } else if (use_fused(x2, base, sections, row_delta.has_value(), tile_rows, tile_cols)) {
    out = fused_xor_linear(x2, base, sections, tile_offsets, row_delta, bias, false);
  } else {
    out = blocks_forward(x2, base, sections, tile_offsets, row_delta, bias, tile_rows, tile_cols);
  }
  return out.reshape(rows_shape(x.sizes(), N));
}

at::Tensor xor_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& base, at::TensorList sections,
                                      at::TensorList tile_offsets, const std::optional<at::Tensor>& row_delta,
                                      int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(base.dim() == 2 && grad_y.size(-1) == base.size(0), "xorgemm: grad_y has ", grad_y.size(-1),
              " features but the weight has ", base.size(0), " outputs");
  const int64_t N = base.size(0), K = base.size(1);
  const at::Tensor g2 = grad_y.reshape({-1, N}).contiguous();
  const int64_t M = g2.size(0);
  check_inputs("grad_y", g2, base, sections, tile_offsets, row_delta, M, tile_rows, tile_cols);
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor out;
  if (!row_delta.has_value() && sections.empty()) {
    out = at::mm(g2, base);
  } else if (M == 0) {
    out = at::empty({0, K}, g2.options());
  } else if (use_fused(g2, base, sections, row_delta.has_value(), tile_rows, tile_cols)) {
    out = fused_xor_linear(g2, base, sections, tile_offsets, row_delta, std::nullopt, true);
  } else {
    out = blocks_grad_input(g2, base, sections, tile_offsets, row_delta, tile_rows, tile_cols);
  }
  return out.reshape(rows_shape(grad_y.sizes(), K));
}

}  // namespace

TORCH_LIBRARY_IMPL(xorgemm, CUDA, m) {
  m.impl("xor_linear", &xor_linear_cuda);
  m.impl("xor_linear_grad_input", &xor_linear_grad_input_cuda);
}

}  // namespace cuda
}  // namespace xorgemm
