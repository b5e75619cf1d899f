// Fused decode-XOR-GEMM on tensor cores: y = x W'^T (forward) and grad_x = grad_y W' (backward) with
// W' = base XOR delta, for bf16/fp16 weights tiled 64x64; W' is never written to global memory. The design
// (work split, pipeline, many fine-tunes per launch) is in docs/kernels.md; the device code is
// fused_gemm_kernel.cuh; this file plans and launches it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda/device_errors.h"
#include "cuda/fused_gemm.h"
#include "cuda/fused_gemm_kernel.cuh"
#include "format/tile_grid.h"

namespace xorgemm {
namespace cuda {
namespace {

using namespace fused;

template <bool kBf16, int MT, bool kTrans>
void launch_fused(const FusedArgs& args, dim3 grid, cudaStream_t stream) {
  auto kernel = fused_xor_gemm_kernel<kBf16, MT, kTrans>;
  // Opting in to more than 48 KiB of dynamic shared memory is per function and device, once: not on every
  // launch, so that launches can be captured in CUDA graphs.
  static std::mutex mu;
  static std::vector<bool> opted;
  {
    const int dev = c10::cuda::current_device();
    std::lock_guard<std::mutex> lock(mu);
    if ((int)opted.size() <= dev) opted.resize(dev + 1, false);
    if (!opted[dev]) {
      const int most = std::max(smem_bytes(MT, true), smem_bytes(MT, false));
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most));
      opted[dev] = true;
    }
  }
  kernel<<<grid, kThreads, smem_bytes(MT, args.staged), stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The split-K arrival counters of a launch on `stream`: `n` zeroed words. The kernel's last CTA of each output
// block resets its own, so a buffer is zero again when the launch ends and is kept for the next one: no memset
// per call, and nothing allocated once a shape has run. One buffer per stream, since launches on two streams
// may overlap. A launch that needs more gets a buffer twice as large; the one it replaces is kept alive, never
// freed, because a CUDA graph captured earlier still points at it (the retired buffers together stay smaller
// than the live one). Graphs captured on one stream share its buffer: replay them on that stream, one at a time.
uint32_t* split_counters(const at::Device& device, cudaStream_t stream, int64_t n) {
  struct Buffers {
    at::Tensor live;
    std::vector<at::Tensor> retired;
  };
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, Buffers> buffers;
  std::lock_guard<std::mutex> lock(mu);
  Buffers& b = buffers[{device.index(), stream}];
  if (!b.live.defined() || b.live.numel() < n) {
    const int64_t size = std::max<int64_t>({n, 4096, b.live.defined() ? 2 * b.live.numel() : 0});
    if (b.live.defined()) b.retired.push_back(b.live);
    b.live = at::zeros({size}, at::TensorOptions().dtype(at::kInt).device(device));
  }
  return reinterpret_cast<uint32_t*>(b.live.data_ptr<int32_t>());
}

template <bool kBf16, bool kTrans>
void launch_by_rows(int mt, const FusedArgs& args, dim3 grid, cudaStream_t stream) {
  switch (mt) {
    case 1: return launch_fused<kBf16, 1, kTrans>(args, grid, stream);
    case 2: return launch_fused<kBf16, 2, kTrans>(args, grid, stream);
    default: return launch_fused<kBf16, 4, kTrans>(args, grid, stream);
  }
}

}  // namespace

std::string fused_unsupported_reason(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections,
                                     int64_t n_finetunes, int64_t tile_rows, int64_t tile_cols) {
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  if (base.scalar_type() != at::kBFloat16 && base.scalar_type() != at::kHalf) return "the weight is not bf16 or fp16";
  if (tile_rows != kTile || tile_cols != kTile) return "the tiles are not 64x64";
  if (n_finetunes > kMaxFinetunes)
    return "more than " + std::to_string(kMaxFinetunes) + " fine-tunes or slots in one call";
  // 16-byte cp.async of whole rows: both the weight's and the activations' rows must be multiples of 8.
  if (base.size(1) % 8 != 0 || a2.size(1) % 8 != 0) return "rows are not a multiple of 8 elements";
  if (!aligned(base) || !aligned(a2)) return "the weight or the activations are not 16-byte aligned";
  for (const at::Tensor& s : sections)
    if (!aligned(s)) return "a section is not 16-byte aligned";
  return "";
}

at::Tensor fused_xor_linear(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections,
                            at::TensorList tile_offsets, const std::optional<at::Tensor>& row_finetune,
                            const std::optional<at::Tensor>& bias, bool transposed,
                            const std::optional<at::Tensor>& slot_table) {
  const int64_t m = a2.size(0), n = base.size(0), k = base.size(1);
  const int64_t out_cols = transposed ? k : n, red = transposed ? n : k;
  const int n_finetunes = slot_table.has_value() ? (int)slot_table->size(0) : (int)sections.size();
  TORCH_CHECK(n_finetunes <= kMaxFinetunes && (!slot_table.has_value() || row_finetune.has_value()),
              "xorgemm: the fused kernel takes at most ", kMaxFinetunes,
              " fine-tunes or slots (slots with per-row ids)");
  const bool bf16 = base.scalar_type() == at::kBFloat16;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.get_device());
  at::Tensor out = at::empty({m, out_cols}, a2.options());
  if (m == 0 || out_cols == 0) return out;
  at::Tensor error = device_error_word(base.device());

  FusedArgs args{};
  args.a = reinterpret_cast<const uint16_t*>(a2.data_ptr());
  args.lda = a2.size(1);
  args.base = reinterpret_cast<const uint16_t*>(base.data_ptr());
  args.n = n;
  args.k = k;
  args.m = m;
  args.n_groups = n_finetunes + 1;
  args.slot_table = slot_table.has_value() ? slot_table->data_ptr<int64_t>() : nullptr;
  for (int d = 0; d < (int)sections.size(); ++d) {
    args.sections[d] = sections[d].data_ptr<uint8_t>();
    args.offsets[d] = tile_offsets[d].data_ptr<int64_t>();
    args.section_bytes[d] = (uint64_t)sections[d].numel();
  }
  args.table_bytes = format::TileGrid::make(n, k, kTile, kTile, 2).table_bytes();
  args.error = reinterpret_cast<uint32_t*>(error.data_ptr<int32_t>());
  at::Tensor perm, seg;
  if (row_finetune.has_value()) {
    // Rows grouped by fine-tune on the device, in one small launch (group_rows_kernel): ids checked there,
    // no host round trip, nothing but this launch and the GEMM's in a CUDA graph.
    TORCH_CHECK(m < (1ll << 31), "xorgemm: ", m, " rows with per-row fine-tunes is too many for one call");
    const at::Tensor ids = row_finetune->reshape({-1}).contiguous();
    perm = at::empty({m}, ids.options());
    seg = at::empty({n_finetunes + 2}, ids.options().dtype(at::kInt));
    group_rows_kernel<<<1, 1024, 0, stream>>>(ids.data_ptr<int64_t>(), m, n_finetunes + 1, perm.data_ptr<int64_t>(),
                                              seg.data_ptr<int32_t>(), args.error);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    args.perm = perm.data_ptr<int64_t>();
    args.seg = seg.data_ptr<int32_t>();
    args.only_group = -1;
    args.staged = false;
  } else {
    args.only_group = n_finetunes;  // 1: the one fine-tune (0 would be the base, served by cuBLAS upstream)
    args.staged = n_finetunes == 1;
  }

  if (bias.has_value()) {
    args.bias = reinterpret_cast<const uint16_t*>(bias->data_ptr());
    args.bias_rows = bias->dim() == 1 ? 1 : bias->size(0);
  }
  args.out = reinterpret_cast<uint16_t*>(out.data_ptr());

  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const LaunchPlan plan = plan_launch(m, out_cols, red, sms);
  args.tiles_per_split = plan.tiles_per_split;
  args.red_tiles = plan.red_tiles;
  args.splits = plan.grid_splits;
  args.out_cols = out_cols;
  TORCH_CHECK(plan.chunks <= 65535 && plan.grid_splits <= 65535, "xorgemm: batch of ", m,
              " rows is too large for one launch");
  at::Tensor partial;
  if (plan.grid_splits > 1) {
    partial = at::empty({plan.grid_splits, m, out_cols}, a2.options().dtype(at::kFloat));
    args.partial = partial.data_ptr<float>();
    args.counters = split_counters(base.device(), stream, plan.chunks * plan.out_blocks);
  }

  const dim3 grid((unsigned)plan.out_blocks, (unsigned)plan.grid_splits, (unsigned)plan.chunks);
  if (bf16) {
    transposed ? launch_by_rows<true, true>(plan.mt, args, grid, stream)
               : launch_by_rows<true, false>(plan.mt, args, grid, stream);
  } else {
    transposed ? launch_by_rows<false, true>(plan.mt, args, grid, stream)
               : launch_by_rows<false, false>(plan.mt, args, grid, stream);
  }
  publish_device_errors(base.device(), stream);
  return out;
}

}  // namespace cuda
}  // namespace xorgemm
