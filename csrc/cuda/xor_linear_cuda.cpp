// CUDA implementation of the xorgemm ops (schemas in ops.cpp): the path choice, and the GPU patcher of the
// patched-block path (patched_blocks.h). Two paths:
//
//   fused          the decode-XOR-GEMM kernel of fused_gemm.cu: bf16/fp16, 64x64 tiles, rows a multiple of 8
//                  elements; one launch for any mix of fine-tunes. Used for decode-sized batches and for
//                  every per-row mix of fine-tunes.
//   patched blocks for everything else (fp32 weights, other tile shapes, large single-fine-tune batches):
//                  the apply kernel patches a block of output features (~16 MiB, so it stays in L2, at least
//                  2048 of them) into scratch and cuBLAS multiplies it, the next block patched on a side
//                  stream meanwhile. fp32 GEMMs follow torch's TF32 setting (torch.backends.cuda.matmul.allow_tf32).
//
// XORGEMM_CUDA_PATH=fused|blocks forces a path (tests and benchmarks); unset, a shape heuristic picks.
// Sections on the GPU are validated when they are made resident (XorLinear, the loaders); here only their
// sizes are checked (their content would cost a device round trip). The kernels check each tile against its
// section's length and report, through the device error word (device_errors.h), what they had to skip: an
// earlier call's report is raised at the start of each call.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "cuda/apply_section.h"
#include "cuda/device_errors.h"
#include "cuda/fused_gemm.h"
#include "op_args.h"
#include "patched_blocks.h"

namespace xorgemm {
namespace cuda {
namespace {

// Largest batch the fused kernel takes for a single fine-tune before cuBLAS on patched blocks is faster:
// above it the GEMM is compute-bound and the patch cost is amortized (a first guess, to be tuned on a GPU).
constexpr int64_t kFusedMaxRows = 64;
// Patched-block height: about this many bytes of the fine-tuned weight, so a block stays in L2, but never
// fewer than kMinBlockRows rows: narrower blocks give cuBLAS too few output tiles to fill the GPU (at
// K = 14336, 16 MiB would be 576 rows).
constexpr int64_t kScratchBytes = 16ll << 20;
constexpr int64_t kMinBlockRows = 2048;

enum class Path { kAuto, kFused, kBlocks };

Path forced_path() {
  const char* v = std::getenv("XORGEMM_CUDA_PATH");
  if (v == nullptr || *v == 0 || !std::strcmp(v, "auto")) return Path::kAuto;
  if (!std::strcmp(v, "fused")) return Path::kFused;
  if (!std::strcmp(v, "blocks")) return Path::kBlocks;
  TORCH_CHECK(false, "xorgemm: XORGEMM_CUDA_PATH must be fused, blocks or auto, got '", v, "'");
}

bool use_fused(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections, bool grouped,
               int64_t tile_rows, int64_t tile_cols) {
  const std::string why_not =
      fused_unsupported_reason(a2, base, sections, (int64_t)sections.size(), tile_rows, tile_cols);
  switch (forced_path()) {
    case Path::kFused:
      TORCH_CHECK(why_not.empty(), "xorgemm: XORGEMM_CUDA_PATH=fused, but the fused kernel cannot serve this call: ",
                  why_not);
      return true;
    case Path::kBlocks: return false;
    default: return why_not.empty() && (grouped || a2.size(0) <= kFusedMaxRows);
  }
}

// Patches grid rows [gr0, gr1) of fine-tune f into `block` with the apply kernel, each block's patch on a
// side stream while the current stream's GEMM of the block before runs.
struct GpuPatcher {
  const at::Tensor& base;
  at::TensorList sections, offsets;
  const format::TileGrid& g;

  void operator()(size_t f, int64_t gr0, int64_t gr1, at::Tensor& block) const {
    apply_section_rows(sections[f], offsets[f], base, block, g, gr0, gr1);
  }

  // Two scratch buffers and two streams: block b is patched on the side stream into buffer b % 2 once the
  // GEMM of block b - 2 has read that buffer, and the current stream multiplies it once it is patched. The
  // current stream ends up having waited for every patch, so the call's later work is ordered after the
  // side stream's, and a CUDA graph capture joins the fork.
  static constexpr bool kOverlapsBlocks = true;
  template <typename Fn>
  void overlapped_blocks(const at::Tensor& base_w, int64_t per_block, size_t f, Fn&& fn) const {
    const int64_t n = base_w.size(0), k = base_w.size(1), tile_rows = g.tile_rows;
    const int64_t grid_rows = (int64_t)g.grid_rows(), blocks = (grid_rows + per_block - 1) / per_block;
    const int64_t scratch_rows = std::min(per_block * tile_rows, n);
    const at::cuda::CUDAStream main = at::cuda::getCurrentCUDAStream(base_w.get_device());
    const at::cuda::CUDAStream side = at::cuda::getStreamFromPool(false, base_w.get_device());
    at::Tensor scratch[2];
    for (int i = 0; i < std::min<int64_t>(2, blocks); ++i) {
      scratch[i] = at::empty({scratch_rows, k}, base_w.options());
      // Also used on the side stream: not handed out again before the side stream is done with it.
      c10::cuda::CUDACachingAllocator::recordStream(scratch[i].storage().data_ptr(), side);
    }
    at::cuda::CUDAEvent inputs, patched[2], read[2];
    inputs.record(main);  // the base, sections and activations came from work on the current stream
    inputs.block(side);
    const auto rows_of = [&](int64_t b, int64_t& gr0, int64_t& gr1, int64_t& r0, int64_t& h) {
      gr0 = b * per_block;
      gr1 = std::min(gr0 + per_block, grid_rows);
      r0 = gr0 * tile_rows;
      h = std::min(gr1 * tile_rows, n) - r0;
    };
    const auto patch_block = [&](int64_t b) {
      int64_t gr0, gr1, r0, h;
      rows_of(b, gr0, gr1, r0, h);
      at::Tensor block = scratch[b % 2].narrow(0, 0, h);
      if (b >= 2) read[b % 2].block(side);  // the GEMM of block b - 2 is done with this buffer
      {
        const c10::cuda::CUDAStreamGuard on_side(side);
        (*this)(f, gr0, gr1, block);
      }
      patched[b % 2].record(side);
    };
    patch_block(0);
    for (int64_t b = 0; b < blocks; ++b) {
      if (b + 1 < blocks) patch_block(b + 1);
      patched[b % 2].block(main);
      int64_t gr0, gr1, r0, h;
      rows_of(b, gr0, gr1, r0, h);
      fn(r0, h, scratch[b % 2].narrow(0, 0, h));
      read[b % 2].record(main);
    }
  }
};

int64_t grid_rows_per_block(const format::TileGrid& g) {
  const int64_t by_bytes = kScratchBytes / (int64_t)(g.tile_rows * g.cols * g.elem_bytes);
  const int64_t at_least = (kMinBlockRows + (int64_t)g.tile_rows - 1) / (int64_t)g.tile_rows;
  return std::max<int64_t>({1, by_bytes, at_least});
}

at::Tensor xor_linear_cuda(const at::Tensor& x, const at::Tensor& base, at::TensorList sections,
                           at::TensorList tile_offsets, const std::optional<at::Tensor>& row_finetune,
                           const std::optional<at::Tensor>& bias_in, int64_t tile_rows, int64_t tile_cols) {
  raise_device_errors(base.device());
  const LinearProblem p =
      prepare_linear("x", x, base, sections, tile_offsets, row_finetune, bias_in, tile_rows, tile_cols, false);
  // The fused kernel reads the bias by pointer; it is small, so a strided one is simply copied.
  const std::optional<at::Tensor> bias = bias_in.has_value() ? std::optional(bias_in->contiguous()) : std::nullopt;
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t m = p.a2.size(0), n = base.size(0);
  at::Tensor out;
  if (!row_finetune.has_value() && sections.empty()) {  // the plain base: cuBLAS as it is
    out = bias.has_value() ? at::addmm(bias->reshape({-1, n})[0], p.a2, base.t()) : at::mm(p.a2, base.t());
  } else if (m == 0) {
    out = at::empty({0, n}, p.a2.options());
  } else if (use_fused(p.a2, base, sections, row_finetune.has_value(), tile_rows, tile_cols)) {
    out = fused_xor_linear(p.a2, base, sections, tile_offsets, row_finetune, bias, false);
  } else {
    out = patched_blocks_forward(p, base, (int64_t)sections.size(), row_finetune, bias, grid_rows_per_block(p.grid),
                                 GpuPatcher{base, sections, tile_offsets, p.grid});
  }
  return out.reshape(p.out_shape);
}

// The fused kernel reads the slot table on the device, so nothing here depends on what the slots hold: a CUDA
// graph captures the call and replays it with whatever they hold then. Where the fused kernel cannot serve
// the call (fp32, other tiles, unaligned rows), the table is read on the host and the call goes the
// xor_linear way: correct, but a host sync, so not inside a graph capture.
at::Tensor xor_linear_slots_cuda(const at::Tensor& x, const at::Tensor& base, const at::Tensor& slot_table,
                                 const at::Tensor& row_slot, const std::optional<at::Tensor>& bias_in,
                                 int64_t tile_rows, int64_t tile_cols) {
  check_slot_table(slot_table, base.device());
  const LinearProblem p = prepare_linear("x", x, base, {}, {}, row_slot, {}, tile_rows, tile_cols, false);
  check_bias(bias_in, x.scalar_type(), base.device(), base.size(0), (size_t)slot_table.size(0));
  std::string why_not = fused_unsupported_reason(p.a2, base, {}, slot_table.size(0), tile_rows, tile_cols);
  if (why_not.empty() && forced_path() == Path::kBlocks) why_not = "XORGEMM_CUDA_PATH=blocks";
  if (!why_not.empty()) {
    TORCH_CHECK(forced_path() != Path::kFused, "xorgemm: XORGEMM_CUDA_PATH=fused, but the fused kernel cannot serve "
                "this call: ", why_not);
    const c10::cuda::CUDAGuard guard(base.device());
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "xorgemm: xor_linear_slots cannot be captured in a CUDA graph here (", why_not,
                "): only the fused kernel reads the slot table on the GPU; run this model eagerly");
    const SlotLists slots = slot_lists(slot_table.cpu(), p.grid, base.device());
    return xor_linear_cuda(x, base, slots.sections, slots.offsets, row_slot, bias_in, tile_rows, tile_cols);
  }
  raise_device_errors(base.device());
  const std::optional<at::Tensor> bias = bias_in.has_value() ? std::optional(bias_in->contiguous()) : std::nullopt;
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor out = p.a2.size(0) == 0 ? at::empty({0, base.size(0)}, p.a2.options())
                                     : fused_xor_linear(p.a2, base, {}, {}, row_slot, bias, false, slot_table);
  return out.reshape(p.out_shape);
}

at::Tensor xor_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& base, at::TensorList sections,
                                      at::TensorList tile_offsets, const std::optional<at::Tensor>& row_finetune,
                                      int64_t tile_rows, int64_t tile_cols) {
  raise_device_errors(base.device());
  const LinearProblem p =
      prepare_linear("grad_y", grad_y, base, sections, tile_offsets, row_finetune, {}, tile_rows, tile_cols, true);
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t m = p.a2.size(0);
  at::Tensor out;
  if (!row_finetune.has_value() && sections.empty()) {
    out = at::mm(p.a2, base);
  } else if (m == 0) {
    out = at::empty({0, base.size(1)}, p.a2.options());
  } else if (use_fused(p.a2, base, sections, row_finetune.has_value(), tile_rows, tile_cols)) {
    out = fused_xor_linear(p.a2, base, sections, tile_offsets, row_finetune, std::nullopt, true);
  } else {
    out = patched_blocks_grad_input(p, base, (int64_t)sections.size(), row_finetune, grid_rows_per_block(p.grid),
                                    GpuPatcher{base, sections, tile_offsets, p.grid});
  }
  return out.reshape(p.out_shape);
}

void apply_section_cuda(const at::Tensor& section, const at::Tensor& offsets, const at::Tensor& base, at::Tensor& out,
                        int64_t tile_rows, int64_t tile_cols) {
  const format::TileGrid g = check_apply_args(section, offsets, base, out, tile_rows, tile_cols);
  raise_device_errors(base.device());
  const c10::cuda::CUDAGuard guard(base.device());
  apply_section_rows(section, offsets, base, out, g, 0, (int64_t)g.grid_rows());
}

}  // namespace

TORCH_LIBRARY_IMPL(xorgemm, CUDA, m) {
  m.impl("xor_linear", &xor_linear_cuda);
  m.impl("xor_linear_slots", &xor_linear_slots_cuda);
  m.impl("xor_linear_grad_input", &xor_linear_grad_input_cuda);
  m.impl("apply_section", &apply_section_cuda);
}

}  // namespace cuda
}  // namespace xorgemm

// xorgemm._C_cuda: importing it registers the CUDA kernels above; it has no Python functions of its own.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "xorgemm: the CUDA kernels of torch.ops.xorgemm"; }
