// Fused decode-XOR-GEMM on tensor cores: y = x W'^T (forward) and grad_x = grad_y W' (backward) with
// W' = base XOR delta, for bf16/fp16 weights tiled 64x64. W' is never written to global memory.
//
// Work split. A CTA owns one 64-wide block of outputs (forward: one tile row of the weight, 64 output
// features; backward: one tile column, 64 input features), one range of reduction tiles (split-K, so decode
// shapes with few output blocks still fill every SM) and up to BM = 16 * MT rows of the batch. Its four warps
// each own 16 of the 64 outputs for all BM rows: two m16n8k16 MMAs per 16-row slice and 16-deep k step.
// Partial sums go to an fp32 workspace [split][row][out]; a second kernel adds the splits in a fixed order
// (deterministic: no atomics, no cooperative launch) and the bias, and casts.
//
// Per reduction tile, a kStages-deep cp.async pipeline brings into shared memory the base tile (rows padded
// to 72 elements so 32-bit fragment loads are bank-conflict free), the activations' rows and, when the
// launch serves a single fine-tune, that tile's delta payload. The payload is XORed into the base tile in
// shared memory by the shared decoders of codec/tile_codec.h (the code the CPU tests run); all-zero tiles
// issue no payload loads and no decode. Warps then load 32-bit fragments (two elements) and issue mma.sync
// with fp32 accumulation.
//
// Many fine-tunes in one launch: rows are sorted by fine-tune into segments on the device (the host never
// waits). The CTA reads each base tile once; for each fine-tune with rows in the CTA whose tile is not zero
// it copies the base tile, XORs that fine-tune's payload (read from global memory) into the copy and
// multiplies only that segment's rows, other rows' A fragments masked to zero. Rows asking for the base and
// zero tiles use the base tile as it is.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include "codec/tile_codec.h"
#include "cuda/xor_gemm.h"

namespace xorgemm {
namespace cuda {
namespace {

using codec::TileEntry;

constexpr int kTile = 64;                    // delta tile = output block = reduction step
constexpr int kStride = kTile + 8;           // shared-memory row in elements: 144 bytes, conflict-free
constexpr int kThreads = 128;                // four warps
constexpr int kStages = 3;                   // cp.async pipeline depth
constexpr int kPayloadCap = kTile * kTile * 4;  // largest valid payload of a 16-bit tile: every word an exception
constexpr int kTileSmem = kTile * kStride * 2;

struct FusedArgs {
  const uint16_t* a;   // activations [m, lda]: x (forward) or grad_y (backward)
  int64_t lda;
  const uint16_t* base;  // [n, k]
  int64_t n, k, m;
  const int64_t* perm;  // sorted row -> row of a; nullptr: identity
  const int32_t* seg;   // [n_groups + 1] segment bounds over sorted rows; nullptr: all rows in only_group
  int n_groups;         // 1 + number of deltas; group 0 is the plain base
  int only_group;
  bool staged;          // one fine-tune for every row: its payload rides the pipeline, patched in place
  const uint8_t* sections[kMaxDeltasPerLaunch];
  const int64_t* offsets[kMaxDeltasPerLaunch];
  float* partial;  // [splits, m, out_cols]
  int64_t out_cols;
  int red_tiles, tiles_per_split;
};

__host__ __device__ constexpr int a_smem_bytes(int mt) { return 16 * mt * kStride * 2; }
__host__ __device__ constexpr int stage_bytes(int mt, bool staged) {
  return kTileSmem + a_smem_bytes(mt) + (staged ? kPayloadCap : 0);
}
__host__ __device__ constexpr int smem_bytes(int mt, bool staged) {
  return kStages * stage_bytes(mt, staged) + (staged ? 0 : kTileSmem);  // + the patch copy when grouped
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  // src-size 0 zero-fills the 16 bytes: out-of-range rows and columns contribute nothing to the sums.
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <bool kBf16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ uint32_t ld32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ TileEntry load_entry(const uint8_t* section, int64_t t) {
  const uint2 raw = *reinterpret_cast<const uint2*>(section + t * sizeof(TileEntry));
  TileEntry e;
  e.n_exc = raw.x;
  e.codec = (uint8_t)(raw.y & 0xff);
  e.low_bytes = (uint8_t)((raw.y >> 8) & 0xff);
  e.reserved = (uint16_t)(raw.y >> 16);
  return e;
}

// Multiplies the BM activation rows [lo, hi) (CTA-local) of one segment by the 64x64 weight tile `w` held
// in shared memory, accumulating into acc. kTrans: the tile's rows are the reduction (backward).
template <bool kBf16, int MT, bool kTrans>
__device__ __forceinline__ void mma_tile(const uint16_t* a, const uint16_t* w, int lo, int hi,
                                         float (&acc)[MT][2][4]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int kk = 0; kk < kTile; kk += 16) {
    uint32_t b[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int o = warp * 16 + nt * 8 + gid;  // output column within the block
      if constexpr (!kTrans) {  // B[k][o] = W'[o][k]: two consecutive k of one weight row
        const uint16_t* p = w + o * kStride + kk + tig * 2;
        b[nt][0] = ld32(p);
        b[nt][1] = ld32(p + 8);
      } else {  // B[k][o] = W'[k][o]: two weight rows, one column
        const int r = kk + tig * 2;
        b[nt][0] = (uint32_t)w[r * kStride + o] | ((uint32_t)w[(r + 1) * kStride + o] << 16);
        b[nt][1] = (uint32_t)w[(r + 8) * kStride + o] | ((uint32_t)w[(r + 9) * kStride + o] << 16);
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (mt * 16 >= hi || mt * 16 + 16 <= lo) continue;  // slice outside the segment (warp-uniform)
      const int r0 = mt * 16 + gid, r1 = r0 + 8;
      const bool in0 = r0 >= lo && r0 < hi, in1 = r1 >= lo && r1 < hi;
      const uint16_t* p0 = a + r0 * kStride + kk + tig * 2;
      const uint16_t* p1 = a + r1 * kStride + kk + tig * 2;
      const uint32_t af[4] = {in0 ? ld32(p0) : 0u, in1 ? ld32(p1) : 0u, in0 ? ld32(p0 + 8) : 0u,
                              in1 ? ld32(p1 + 8) : 0u};
      mma16816<kBf16>(acc[mt][0], af, b[0]);
      mma16816<kBf16>(acc[mt][1], af, b[1]);
    }
  }
}

template <bool kBf16, int MT, bool kTrans>
__global__ void __launch_bounds__(kThreads, 2) fused_xor_gemm_kernel(const __grid_constant__ FusedArgs args) {
  constexpr int BM = 16 * MT;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int seg_lo[kMaxDeltasPerLaunch + 1], seg_hi[kMaxDeltasPerLaunch + 1];
  __shared__ int64_t a_row[BM];

  const int tid = threadIdx.x;
  const int64_t out_block = blockIdx.x;
  const int kt0 = blockIdx.y * args.tiles_per_split;
  const int kt1 = min(args.red_tiles, kt0 + args.tiles_per_split);
  const int64_t row0 = (int64_t)blockIdx.z * BM;  // first sorted row of this CTA
  const int rows_here = (int)min64(BM, args.m - row0);
  const int64_t grid_cols = (args.k + kTile - 1) / kTile;
  const int64_t red_total = kTrans ? args.n : args.k;

  const int sbytes = stage_bytes(MT, args.staged);
  auto tile_of = [&](int s) { return reinterpret_cast<uint16_t*>(smem + s * sbytes); };
  auto a_of = [&](int s) { return reinterpret_cast<uint16_t*>(smem + s * sbytes + kTileSmem); };
  auto payload_of = [&](int s) { return smem + s * sbytes + kTileSmem + a_smem_bytes(MT); };
  uint16_t* patch = reinterpret_cast<uint16_t*>(smem + kStages * sbytes);

  // This CTA's share of each segment (CTA-local rows), and where its rows live in `a`.
  for (int g = tid; g < args.n_groups; g += kThreads) {
    int64_t lo = 0, hi = 0;
    if (args.seg != nullptr) {
      lo = args.seg[g] - row0;
      hi = args.seg[g + 1] - row0;
    } else if (g == args.only_group) {
      hi = rows_here;
    }
    seg_lo[g] = (int)max64(lo, 0);
    seg_hi[g] = (int)min64(hi, rows_here);
  }
  for (int r = tid; r < BM; r += kThreads)
    a_row[r] = r < rows_here ? (args.perm != nullptr ? args.perm[row0 + r] : row0 + r) : -1;
  __syncthreads();

  // Tile coordinates of reduction step kt.
  auto tile_rc = [&](int kt, int64_t& gr, int64_t& gc) {
    gr = kTrans ? kt : out_block;
    gc = kTrans ? out_block : kt;
  };

  auto issue = [&](int kt, int s) {
    if (kt < kt1) {
      int64_t gr, gc;
      tile_rc(kt, gr, gc);
      const int64_t n0 = gr * kTile, k0 = gc * kTile;
      uint16_t* tile = tile_of(s);
      for (int c = tid; c < kTile * 8; c += kThreads) {
        const int r = c >> 3, col = (c & 7) * 8;
        const bool ok = n0 + r < args.n && k0 + col < args.k;
        cp_async16(tile + r * kStride + col, ok ? args.base + (n0 + r) * args.k + k0 + col : args.base, ok);
      }
      const int64_t red0 = kTrans ? n0 : k0;
      uint16_t* a = a_of(s);
      for (int c = tid; c < BM * 8; c += kThreads) {
        const int r = c >> 3, col = (c & 7) * 8;
        const bool ok = a_row[r] >= 0 && red0 + col < red_total;
        cp_async16(a + r * kStride + col, ok ? args.a + a_row[r] * args.lda + red0 + col : args.a, ok);
      }
      if (args.staged) {
        const int d = args.only_group - 1;
        const int64_t t = gr * grid_cols + gc;
        const TileEntry e = load_entry(args.sections[d], t);
        if (e.codec != codec::kZero) {  // zero tiles: no payload loads at all
          const uint32_t h = (uint32_t)min64(kTile, args.n - n0), w = (uint32_t)min64(kTile, args.k - k0);
          const int chunks = (int)(codec::tile_payload_bytes(e, h * w, 2) / 16);
          const uint8_t* src = args.sections[d] + args.offsets[d][t];
          unsigned char* dst = payload_of(s);
          for (int c = tid; c < chunks; c += kThreads) cp_async16(dst + c * 16, src + c * 16, true);
        }
      }
    }
    cp_async_commit();  // always, so wait_group counts stay uniform at the end of the range
  };

  float acc[MT][2][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(kt0 + s, s);

  for (int kt = kt0; kt < kt1; ++kt) {
    const int s = (kt - kt0) % kStages;
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage s landed for every thread; everyone is done with the stage refilled next
    issue(kt + kStages - 1, (kt - kt0 + kStages - 1) % kStages);

    int64_t gr, gc;
    tile_rc(kt, gr, gc);
    const int64_t t = gr * grid_cols + gc;
    const uint32_t h = (uint32_t)min64(kTile, args.n - gr * kTile);
    const uint32_t w = (uint32_t)min64(kTile, args.k - gc * kTile);
    uint16_t* tile = tile_of(s);
    const uint16_t* a = a_of(s);
    for (int g = 0; g < args.n_groups; ++g) {
      const int lo = seg_lo[g], hi = seg_hi[g];
      if (lo >= hi) continue;
      const uint16_t* wtile = tile;
      bool patched_copy = false;
      if (g > 0) {
        const int d = g - 1;
        const TileEntry e = load_entry(args.sections[d], t);
        if (e.codec != codec::kZero) {
          uint16_t* dst = tile;
          const uint8_t* payload = payload_of(s);
          if (!args.staged) {  // other segments still need the plain base tile: patch a copy
            const uint4* src4 = reinterpret_cast<const uint4*>(tile);
            uint4* dst4 = reinterpret_cast<uint4*>(patch);
            for (int i = tid; i < kTileSmem / 16; i += kThreads) dst4[i] = src4[i];
            __syncthreads();
            dst = patch;
            payload = args.sections[d] + args.offsets[d][t];
            patched_copy = true;
          }
          codec::xor_tile_low_strided<uint16_t>(payload, e, h * w, w, dst, kStride, tid, kThreads);
          __syncthreads();
          codec::xor_tile_exceptions_strided<uint16_t>(payload, e, h * w, w, dst, kStride, tid, kThreads);
          __syncthreads();
          wtile = dst;
        }
      }
      mma_tile<kBf16, MT, kTrans>(a, wtile, lo, hi, acc);
      if (patched_copy) __syncthreads();  // the next segment's copy overwrites the patch
    }
  }
  cp_async_wait<0>();

  // Partial sums of this split: rows in sorted order, outputs of this block.
  const int lane = tid % 32, warp = tid / 32, gid = lane >> 2, tig = lane & 3;
  float* part = args.partial + (int64_t)blockIdx.y * args.m * args.out_cols;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int64_t o = out_block * kTile + warp * 16 + nt * 8 + tig * 2;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = mt * 16 + gid + half * 8;
        if (r >= rows_here) continue;
        float* dst = part + (row0 + r) * args.out_cols + o;
        if (o < args.out_cols) dst[0] = acc[mt][nt][half * 2];
        if (o + 1 < args.out_cols) dst[1] = acc[mt][nt][half * 2 + 1];
      }
    }
}

// out[perm[s], o] = sum over splits of partial[split, s, o] (fixed order) + bias, cast to the output type.
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ partial, int splits, int64_t m, int64_t out_cols,
                                     const int64_t* __restrict__ perm, const T* __restrict__ bias,
                                     int64_t bias_rows, const int64_t* __restrict__ row_delta, int only_group,
                                     T* __restrict__ out) {
  const int64_t total = m * out_cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t s = i / out_cols, o = i % out_cols;
    float v = 0.f;
    for (int sp = 0; sp < splits; ++sp) v += partial[sp * total + i];
    const int64_t row = perm != nullptr ? perm[s] : s;
    if (bias != nullptr) {
      const int64_t br = bias_rows == 1 ? 0 : (row_delta != nullptr ? row_delta[row] + 1 : only_group);
      v += static_cast<float>(bias[br * out_cols + o]);
    }
    out[row * out_cols + o] = static_cast<T>(v);
  }
}

template <bool kBf16, int MT, bool kTrans>
void launch_fused(const FusedArgs& args, dim3 grid, cudaStream_t stream) {
  auto kernel = fused_xor_gemm_kernel<kBf16, MT, kTrans>;
  const int smem = smem_bytes(MT, args.staged);
  // Opting in to more than 48 KiB of dynamic shared memory is per function; cheap to repeat.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes(MT, true)));
  kernel<<<grid, kThreads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

bool fused_supported(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections, int64_t tile_rows,
                     int64_t tile_cols, bool transposed) {
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  if (base.scalar_type() != at::kBFloat16 && base.scalar_type() != at::kHalf) return false;
  if (tile_rows != kTile || tile_cols != kTile || (int64_t)sections.size() > kMaxDeltasPerLaunch) return false;
  // 16-byte cp.async of whole rows: both the weight's and the activations' rows must be multiples of 8.
  if (base.size(1) % 8 != 0 || a2.size(1) % 8 != 0 || !aligned(base) || !aligned(a2)) return false;
  for (const at::Tensor& s : sections)
    if (!aligned(s)) return false;
  (void)transposed;
  return true;
}

at::Tensor fused_xor_linear(const at::Tensor& a2, const at::Tensor& base, at::TensorList sections,
                            at::TensorList tile_offsets, const std::optional<at::Tensor>& row_delta,
                            const std::optional<at::Tensor>& bias, bool transposed) {
  const int64_t m = a2.size(0), n = base.size(0), k = base.size(1);
  const int64_t out_cols = transposed ? k : n, red = transposed ? n : k;
  const int n_delta = (int)sections.size();
  const bool bf16 = base.scalar_type() == at::kBFloat16;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.get_device());
  at::Tensor out = at::empty({m, out_cols}, a2.options());
  if (m == 0) return out;

  FusedArgs args{};
  args.a = reinterpret_cast<const uint16_t*>(a2.data_ptr());
  args.lda = a2.size(1);
  args.base = reinterpret_cast<const uint16_t*>(base.data_ptr());
  args.n = n;
  args.k = k;
  args.m = m;
  args.n_groups = n_delta + 1;
  for (int d = 0; d < n_delta; ++d) {
    args.sections[d] = sections[d].data_ptr<uint8_t>();
    args.offsets[d] = tile_offsets[d].data_ptr<int64_t>();
  }
  at::Tensor perm, seg, ids;
  if (row_delta.has_value()) {
    // Segments by fine-tune, computed on the device: a stable sort and a histogram, no host round trip.
    ids = row_delta->reshape({-1}).contiguous();
    perm = std::get<1>(at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false)).contiguous();
    at::Tensor counts = at::zeros({n_delta + 1}, ids.options()).index_add_(0, ids + 1, at::ones_like(ids));
    seg = at::cat({at::zeros({1}, ids.options()), counts.cumsum(0)}).to(at::kInt);
    args.perm = perm.data_ptr<int64_t>();
    args.seg = seg.data_ptr<int32_t>();
    args.only_group = -1;
    args.staged = false;
  } else {
    args.only_group = n_delta;  // 1: the one fine-tune (0 would be the base, served by cuBLAS upstream)
    args.staged = n_delta == 1;
  }

  const int mt = m <= 16 ? 1 : (m <= 32 ? 2 : 4);
  const int64_t chunks = (m + 16 * mt - 1) / (16 * mt);
  const int64_t out_blocks = (out_cols + kTile - 1) / kTile;
  const int red_tiles = (int)((red + kTile - 1) / kTile);
  // Split the reduction until about four CTAs per SM are in flight, keeping >= 4 tiles per split so the
  // pipeline has something to overlap.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, (4 * (int64_t)sms + out_blocks * chunks - 1) / (out_blocks * chunks));
  const int64_t splits0 = std::min<int64_t>(want, std::max(1, red_tiles / 4));
  args.tiles_per_split = (int)((red_tiles + splits0 - 1) / splits0);
  const int splits = (red_tiles + args.tiles_per_split - 1) / args.tiles_per_split;
  args.red_tiles = red_tiles;
  args.out_cols = out_cols;
  TORCH_CHECK(chunks <= 65535 && splits <= 65535, "xorgemm: batch of ", m, " rows is too large for one launch");
  at::Tensor partial = at::empty({splits, m, out_cols}, a2.options().dtype(at::kFloat));
  args.partial = partial.data_ptr<float>();

  const dim3 grid((unsigned)out_blocks, (unsigned)splits, (unsigned)chunks);
  if (bf16) {
    transposed ? launch_by_rows<true, true>(mt, args, grid, stream) : launch_by_rows<true, false>(mt, args, grid, stream);
  } else {
    transposed ? launch_by_rows<false, true>(mt, args, grid, stream)
               : launch_by_rows<false, false>(mt, args, grid, stream);
  }

  const int64_t total = m * out_cols;
  const int threads = 256;
  const int blocks = (int)std::min<int64_t>((total + threads - 1) / threads, 8ll * sms);
  const int64_t* perm_ptr = row_delta.has_value() ? perm.data_ptr<int64_t>() : nullptr;
  const int64_t* ids_ptr = row_delta.has_value() ? ids.data_ptr<int64_t>() : nullptr;
  const int64_t bias_rows = bias.has_value() ? (bias->dim() == 1 ? 1 : bias->size(0)) : 0;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(a2.scalar_type(), "xorgemm_reduce_splits", [&] {
    reduce_splits_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        partial.data_ptr<float>(), splits, m, out_cols, perm_ptr,
        bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, bias_rows, ids_ptr, args.only_group,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace xorgemm
