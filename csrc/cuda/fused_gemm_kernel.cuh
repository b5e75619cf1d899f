// The fused decode-XOR-GEMM's device code (design: docs/kernels.md; launch: fused_gemm.cu). Kept apart from the host side
// so that tests/cpp/kernel_emulation_test.cpp can compile this exact source for the CPU, under the emulation
// of tests/cpp/cuda_emulation.h (XORGEMM_EMULATE: threads and barriers, deferred cp.async, warp MMA).
#pragma once

#include <stdint.h>

#include <algorithm>

#include "codec/tile_codec.h"
#include "cuda/emulatable.cuh"
#include "cuda/error_bits.h"

#if !defined(XORGEMM_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace xorgemm {
namespace cuda {
namespace fused {

using codec::TileEntry;
using codec::Vec16;

constexpr int kMaxFinetunes = 64;  // fine-tunes (or slots) per launch
constexpr int kTile = 64;                    // delta tile = output block = reduction step
constexpr int kStride = kTile + 8;           // shared-memory row in elements: 144 bytes, conflict-free
constexpr int kThreads = 128;                // four warps
constexpr int kStages = 3;                   // cp.async pipeline depth
// Payload bytes a stage holds: a raw 16-bit tile, the largest payload the encoder writes (it picks the
// smallest codec). A valid but larger payload (up to 4 bytes a word, every word an exception) is decoded
// from global memory instead. Sized to the raw tile, three stages of a 16-row CTA take 58 KiB, so three
// CTAs fit an H100 SM (four times 4 bytes a word would allow two).
constexpr int kPayloadCap = kTile * kTile * 2;
constexpr int kTileSmem = kTile * kStride * 2;
constexpr int kSparseBatch = 8;  // sparse tiles whose exception ranges are found in one pass
// Sparse payloads of a batch share the grouped launch's patch area (the tile copy and its payload). The
// largest valid sparse payload, an exception on every word (4 bytes each), fits alone.
constexpr int kSparseStage = kTileSmem + kPayloadCap;
static_assert(kSparseStage >= kTile * kTile * 4, "a sparse tile's payload must fit the staging area");
static_assert(kMaxFinetunes + 1 <= kThreads, "a grouped launch fetches each fine-tune's entries in one thread");

struct FusedArgs {
  const uint16_t* a;   // activations [m, lda]: x (forward) or grad_y (backward)
  int64_t lda;
  const uint16_t* base;  // [n, k]
  int64_t n, k, m;
  const int64_t* perm;  // sorted row -> row of a; nullptr: identity
  const int32_t* seg;   // [n_groups + 1] segment bounds over sorted rows; nullptr: all rows in only_group
  int n_groups;         // 1 + number of fine-tunes; group 0 is the plain base
  int only_group;
  bool staged;          // one fine-tune for every row: its payload rides the pipeline, patched in place
  // Fine-tune d's delta: its section, tile offsets and section length (no tile is read outside it), in the
  // parameters, or, when slot_table is set, row d of that [n_groups - 1, 3] int64 table in device memory
  // (xor_linear_slots): rows rewritten between launches change what a captured CUDA graph's replay reads.
  const uint8_t* sections[kMaxFinetunes];
  const int64_t* offsets[kMaxFinetunes];
  uint64_t section_bytes[kMaxFinetunes];
  const int64_t* slot_table;
  uint64_t table_bytes;                   // the tile table's share of every section (same grid)
  uint32_t* error;                        // device error word: kErrorTile when a tile lies outside its section
  uint16_t* out;         // [m, out_cols] bf16/fp16, rows in the order of `a`
  const uint16_t* bias;  // [bias_rows, out_cols] or nullptr; row g is group g's (bias_rows 1: every row's)
  int64_t bias_rows;
  float* partial;        // [splits, m, out_cols] fp32, sorted rows: each split's sums (splits > 1 only)
  uint32_t* counters;    // [row chunks x output blocks]: splits done; zero before a launch, and again after it
  int64_t out_cols;
  // The reduction's split: tiles_per_split tiles each (the plan's, never a function of m). `splits` of them
  // run in CTAs of their own (grid y) and meet in the epilogue; with splits == 1 and tiles_per_split <
  // red_tiles, one CTA runs them all, one after another, and adds their sums in the same order.
  int red_tiles, tiles_per_split, splits;
};

__host__ __device__ constexpr int a_smem_bytes(int mt) { return 16 * mt * kStride * 2; }
__host__ __device__ constexpr int stage_bytes(int mt, bool staged) {
  return kTileSmem + a_smem_bytes(mt) + (staged ? kPayloadCap : 0);
}
__host__ __device__ constexpr int smem_bytes(int mt, bool staged) {
  // Grouped launches add the patch copy and a dense tile's payload, brought in before its decode.
  return kStages * stage_bytes(mt, staged) + (staged ? 0 : kTileSmem + kPayloadCap);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  // src-size 0 zero-fills the 16 bytes: out-of-range rows and columns contribute nothing to the sums.
#if defined(XORGEMM_EMULATE)
  emulate::cp_async16(smem, gmem, valid);
#else
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(XORGEMM_EMULATE)
  emulate::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(XORGEMM_EMULATE)
  emulate::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <bool kBf16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(XORGEMM_EMULATE)
  emulate::mma16816(kBf16, c, a, b);
#else
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
#endif
}

// bf16/fp16 bits <-> fp32, rounding to nearest even.
template <bool kBf16>
__device__ __forceinline__ float half_to_float(uint16_t h) {
#if defined(XORGEMM_EMULATE)
  return kBf16 ? emulate::bf16_to_float(h) : emulate::fp16_to_float(h);
#else
  if constexpr (kBf16) {
    return __bfloat162float(__ushort_as_bfloat16(h));
  } else {
    return __half2float(__ushort_as_half(h));
  }
#endif
}
template <bool kBf16>
__device__ __forceinline__ uint16_t float_to_half(float v) {
#if defined(XORGEMM_EMULATE)
  return kBf16 ? emulate::float_to_bf16(v) : emulate::float_to_fp16(v);
#else
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
#endif
}

// What the split-K fixup needs between CTAs: an atomic count, a device-wide fence, and loads that bypass L1
// (another SM wrote the partial sums; L1 is not coherent).
template <typename T>
__device__ __forceinline__ T atomic_add(T* p, T v) {
#if defined(XORGEMM_EMULATE)
  return emulate::atomic_add(p, v);
#else
  return atomicAdd(p, v);
#endif
}
__device__ __forceinline__ void fence() {
#if defined(XORGEMM_EMULATE)
  emulate::threadfence();
#else
  __threadfence();
#endif
}
__device__ __forceinline__ float load_l2(const float* p) {
#if defined(XORGEMM_EMULATE)
  return *p;
#else
  return __ldcg(p);
#endif
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ uint32_t ld32(const uint16_t* p) { return load_as<uint32_t>(p); }

// Sections of a fused launch are 16-byte aligned (fused_supported checks): the entry is one 64-bit load.
__device__ __forceinline__ TileEntry entry_of(const uint8_t* section, int64_t t) {
  return codec::load_entry(static_cast<const uint8_t*>(__builtin_assume_aligned(section, 16)), t);
}

// Zeroes a CTA's accumulator fragments (MT row slices x two 8-column halves x four fp32 values a lane).
template <int MT>
__device__ __forceinline__ void zero_fragments(float (&f)[MT][2][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) f[mt][nt][i] = 0.f;
}

// Fine-tune d's delta as the kernel reads it (FusedArgs::sections, slot_table). An empty slot (address 0) has
// no delta: its rows get the base. A slot row whose section is not 16-byte aligned, whose offsets are
// missing or not 8-byte aligned, or whose length is negative or shorter than its tile table is also read as
// empty, and reported.
struct DeltaRef {
  const uint8_t* section;
  const int64_t* offsets;
  uint64_t bytes;
};
__device__ __forceinline__ DeltaRef delta_ref(const FusedArgs& args, int d) {
  const DeltaRef none{nullptr, nullptr, 0};
  if (d < 0 || d >= args.n_groups - 1) return none;
  if (args.slot_table == nullptr) return {args.sections[d], args.offsets[d], args.section_bytes[d]};
  const int64_t* row = args.slot_table + 3 * d;
  const DeltaRef r{reinterpret_cast<const uint8_t*>(row[0]), reinterpret_cast<const int64_t*>(row[1]),
                   (uint64_t)row[2]};
  if (r.section == nullptr) return none;
  if (reinterpret_cast<uintptr_t>(r.section) % 16 || r.offsets == nullptr ||
      reinterpret_cast<uintptr_t>(r.offsets) % 8 || row[2] < 0 || r.bytes < args.table_bytes) {
    atomic_or(args.error, kErrorTile);
    return none;
  }
  return r;
}

// Tile t of fine-tune d as the kernel may read it: its entry when the tile is readable (codec::tile_readable),
// else a zero tile, skipped, with the launch's error word raised. Sections are validated when they are made
// resident; this keeps one that was not (a direct op call) from reading memory outside it, which on a GPU
// would kill the process's CUDA context and every tenant's work with it. ~10 integer ops per tile.
__device__ __forceinline__ TileEntry readable_or_zero(const FusedArgs& args, const DeltaRef& d, TileEntry e,
                                                      int64_t offset, uint32_t elems) {
  if (codec::tile_readable(e, elems, 2, (uint64_t)offset, args.table_bytes, d.bytes)) return e;
  atomic_or(args.error, kErrorTile);  // every thread that reads the entry skips the tile alike
  return TileEntry{0, codec::kZero, 0, 0};
}
__device__ __forceinline__ TileEntry checked_entry(const FusedArgs& args, const DeltaRef& d, int64_t t,
                                                   uint32_t elems) {
  if (d.section == nullptr) return TileEntry{0, codec::kZero, 0, 0};  // an empty slot
  return readable_or_zero(args, d, entry_of(d.section, t), d.offsets[t], elems);
}

// A conditioned tile decoded by the whole CTA into `dst`, a padded shared-memory tile that holds the base
// (the decode's context): codec::conditioned_*'s phases, a barrier after each. A payload that does not fit
// this base leaves the tile as the base, reported; a stream validation would refuse (a section nobody
// validated) is reported by the threads that meet it, their words unspecified. Every thread calls it alike;
// it ends with a barrier.
__device__ __forceinline__ void patch_conditioned(const FusedArgs& args, const uint8_t* payload, TileEntry e,
                                                  uint32_t elems, uint32_t w, uint16_t* dst, uint8_t* width,
                                                  uint32_t* counts) {
  const int tid = threadIdx.x;
  codec::ConditionedLayout l;
  bool ok = codec::conditioned_layout(payload, e, 2, l);  // the same answer in every thread
  if (ok) {
    codec::conditioned_clear_widths(width, tid, kThreads);
    __syncthreads();
    codec::conditioned_fill_widths(l, width, tid, kThreads);
    __syncthreads();
    codec::conditioned_count<uint16_t>(l, dst, elems, w, kStride, e, width, counts, tid, kThreads);
    __syncthreads();
    ok = codec::conditioned_patch<uint16_t>(payload, l, e, elems, w, dst, kStride, width, counts, tid, kThreads);
  }
  if (!ok) atomic_or(args.error, kErrorTile);  // any thread: a bad stream fails only the chunks that meet it
  __syncthreads();
}

// Asks L2 for the line holding p ahead of its use (a no-op under the emulation).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if !defined(XORGEMM_EMULATE)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}

// Rows [lo, hi) of a CTA's BM <= 64 as a bit mask.
__device__ __forceinline__ uint64_t row_mask(int lo, int hi) {
  const uint64_t below_hi = hi >= 64 ? ~0ull : (1ull << hi) - 1;
  return lo >= hi ? 0ull : below_hi & ~((1ull << lo) - 1);
}

// Multiplies the BM activation rows of this CTA by the 64x64 weight tile `w` held in shared memory and adds
// the products of the rows in `rows` (CTA-local, a bit each) into acc. kTrans: the tile's rows are the
// reduction (backward).
// Each 16-row slice is multiplied whole into a zeroed temporary, and only the selected rows are added:
// - isolation: another segment's rows never meet this tile in acc, so one tenant's Inf/NaN weight (0 * Inf
//   = NaN under masking) cannot reach another tenant's rows;
// - batch invariance: a row gains exactly one rounded addition per tile, whoever shares its slice, so its
//   bits do not depend on the rest of its batch.
template <bool kBf16, int MT, bool kTrans>
__device__ __forceinline__ void mma_tile(const uint16_t* a, const uint16_t* w, uint64_t rows,
                                         float (&acc)[MT][2][4]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gid = lane >> 2, tig = lane & 3;
  float t[MT][2][4];
  zero_fragments(t);
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
      if (((rows >> (mt * 16)) & 0xffff) == 0) continue;  // no selected row in the slice (warp-uniform)
      const uint16_t* p0 = a + (mt * 16 + gid) * kStride + kk + tig * 2;
      const uint16_t* p1 = p0 + 8 * kStride;
      const uint32_t af[4] = {ld32(p0), ld32(p1), ld32(p0 + 8), ld32(p1 + 8)};
      mma16816<kBf16>(t[mt][0], af, b[0]);
      mma16816<kBf16>(t[mt][1], af, b[1]);
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int r0 = mt * 16 + gid, r1 = r0 + 8;  // C fragment rows: elements 0, 1 and 2, 3
    const bool in0 = (rows >> r0) & 1, in1 = (rows >> r1) & 1;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      acc[mt][nt][0] += in0 ? t[mt][nt][0] : 0.f;  // a select, not a product: NaN outside stays outside
      acc[mt][nt][1] += in0 ? t[mt][nt][1] : 0.f;
      acc[mt][nt][2] += in1 ? t[mt][nt][2] : 0.f;
      acc[mt][nt][3] += in1 ? t[mt][nt][3] : 0.f;
    }
  }
}

// A sparse tile's exceptions (positions strictly increasing in a validated section) as ranges per tile row:
// row o's are [start[o], start[o + 1]). One coalesced pass over the positions; the caller puts a barrier
// between it and the readers. A section nobody validated may leave entries unset or ranges inverted; the
// reader clamps them, so it only ever reads this tile's exceptions.
__device__ __forceinline__ void exception_rows(const uint8_t* payload, TileEntry e, uint32_t elems, uint32_t w,
                                               int16_t* start) {
  const int n = (int)e.n_exc;
  auto row_of = [&](int x) {
    const uint32_t p = codec::exception_position(payload, e, elems, (uint32_t)x);
    return p < elems ? (int)(p / w) : kTile;
  };
  for (int x = threadIdx.x; x < n; x += kThreads) {
    const int row = imin(row_of(x), kTile), prev = x == 0 ? -1 : imin(row_of(x - 1), kTile);
    for (int r = prev + 1; r <= row; ++r) start[r] = (int16_t)x;  // rows prev+1 .. row start at exception x
  }
  if (threadIdx.x == 0)
    for (int r = (n == 0 ? 0 : imin(row_of(n - 1), kTile) + 1); r <= kTile; ++r) start[r] = (int16_t)n;
}

// Forward, a sparse tile of the rows in `rows`: instead of patching a copy of the base tile and multiplying
// all over again, add x[r][j] * (W'[o][j] - W[o][j]) for each exception (o, j), in fp32, onto the base
// product those rows already have. Each thread owns the four output columns of its C fragments, so it walks
// only their exceptions, in position order: a row's sum runs in the same order in any batch. ~4 exceptions
// a thread at 3% density, against a 9 KiB tile copy, four barriers and a full MMA.
template <bool kBf16, int MT>
__device__ __forceinline__ void sparse_correction(const uint16_t* a, const uint16_t* tile, const uint8_t* payload,
                                                  TileEntry e, uint32_t elems, uint32_t w, const int16_t* start,
                                                  uint64_t rows, float (&acc)[MT][2][4]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gid = lane >> 2, tig = lane & 3;
  const int n = (int)e.n_exc;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int o = warp * 16 + nt * 8 + tig * 2 + c;  // tile row = output column of C elements c and c + 2
      const int lo = imin(imax(start[o], 0), n), hi = imin(imax(start[o + 1], lo), n);
      for (int x = lo; x < hi; ++x) {
        const uint32_t p = codec::exception_position(payload, e, elems, (uint32_t)x);
        if (p >= elems || (int)(p / w) != o) continue;  // only in a section nobody validated
        const int j = (int)(p % w);
        const uint16_t wb = tile[o * kStride + j];
        const uint16_t wf = wb ^ (uint16_t)codec::exception_high_bits(payload, e, elems, 2, (uint32_t)x);
        const float diff = half_to_float<kBf16>(wf) - half_to_float<kBf16>(wb);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int r = mt * 16 + gid + half * 8;
            if ((rows >> r) & 1) acc[mt][nt][half * 2 + c] += half_to_float<kBf16>(a[r * kStride + j]) * diff;
          }
      }
    }
}

template <bool kBf16, int MT, bool kTrans>
__global__ void __launch_bounds__(kThreads, 2) fused_xor_gemm_kernel(const XG_GRID_CONSTANT FusedArgs args) {
  constexpr int BM = 16 * MT;
  XG_DYNAMIC_SMEM(smem);
  __shared__ int seg_lo[kMaxFinetunes + 1], seg_hi[kMaxFinetunes + 1];
  __shared__ int64_t a_row[BM];
  __shared__ int row_group[BM];
  __shared__ uint32_t arrived;
  // The grouped path's view of a tile, per group: its checked entry and payload address, for the tile being
  // multiplied and the next one (by tile parity); and the sparse tiles' exception ranges.
  __shared__ TileEntry tile_entry[2][kMaxFinetunes + 1];
  __shared__ const uint8_t* tile_payload[2][kMaxFinetunes + 1];
  __shared__ int16_t exc_start[kSparseBatch][kTile + 1];
  __shared__ uint8_t cond_width[256];       // a conditioned tile's slot width per class of base words
  __shared__ uint32_t cond_counts[2 * kThreads];  // and each thread's share of its slots and stream

  const int tid = threadIdx.x;
  const int64_t out_block = blockIdx.x;
  const int kt0 = blockIdx.y * args.tiles_per_split;
  const int kt1 = args.splits == 1 ? args.red_tiles : imin(args.red_tiles, kt0 + args.tiles_per_split);
  const bool splits_here = args.splits == 1 && args.tiles_per_split < args.red_tiles;  // uniform
  const int64_t row0 = (int64_t)blockIdx.z * BM;  // first sorted row of this CTA
  const int rows_here = (int)min64(BM, args.m - row0);
  const int64_t grid_cols = (args.k + kTile - 1) / kTile;
  const int64_t red_total = kTrans ? args.n : args.k;
  // The delta this thread reads: staged, the one fine-tune's (every thread); grouped, thread g - 1 fetches
  // group g's tile entries (below). Read once: a slot table's row is one load per launch and thread.
  const DeltaRef own = delta_ref(args, args.staged ? args.only_group - 1 : tid);

  const int sbytes = stage_bytes(MT, args.staged);
  auto tile_of = [&](int s) { return reinterpret_cast<uint16_t*>(smem + s * sbytes); };
  auto a_of = [&](int s) { return reinterpret_cast<uint16_t*>(smem + s * sbytes + kTileSmem); };
  auto payload_of = [&](int s) { return smem + s * sbytes + kTileSmem + a_smem_bytes(MT); };
  uint16_t* patch = reinterpret_cast<uint16_t*>(smem + kStages * sbytes);
  unsigned char* patch_payload = smem + kStages * sbytes + kTileSmem;

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
  for (int r = tid; r < BM; r += kThreads) {  // each row's group: which bias row it adds
    int g = args.seg != nullptr ? 0 : args.only_group;
    for (int j = 0; j < args.n_groups && args.seg != nullptr; ++j)
      if (r >= seg_lo[j] && r < seg_hi[j]) g = j;
    row_group[r] = args.bias_rows == 1 ? 0 : g;
  }
  __syncthreads();  // with no reduction tiles (K = 0) the epilogue comes next

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
        const int64_t t = gr * grid_cols + gc;
        const uint32_t h = (uint32_t)min64(kTile, args.n - n0), w = (uint32_t)min64(kTile, args.k - k0);
        const TileEntry e = checked_entry(args, own, t, h * w);
        const uint64_t bytes = codec::tile_payload_bytes(e, h * w, 2);  // 0 for zero tiles: no loads at all
        if (bytes <= (uint64_t)kPayloadCap) {
          const uint8_t* src = own.section + own.offsets[t];
          unsigned char* dst = payload_of(s);
          for (int c = tid; c < (int)(bytes / 16); c += kThreads) cp_async16(dst + c * 16, src + c * 16, true);
        }
      }
    }
    cp_async_commit();  // always, so wait_group counts stay uniform at the end of the range
  };

  // Grouped launches: thread g - 1 fetches fine-tune g's entry and payload offset of the next tile while the
  // CTA multiplies this one, and publishes them (checked) at the end of the tile, with an L2 prefetch of the
  // payload: per tile no round trip waits for a tile table, and exception passes read from L2.
  const int my_group = 1 + tid;
  const bool fetch_meta = !args.staged && own.section != nullptr && seg_lo[imin(my_group, kMaxFinetunes)] <
                                                                       seg_hi[imin(my_group, kMaxFinetunes)];
  TileEntry next_entry{0, codec::kZero, 0, 0};
  int64_t next_offset = 0;
  auto tile_of_step = [&](int kt, int64_t& t, uint32_t& elems) {
    int64_t gr, gc;
    tile_rc(kt, gr, gc);
    t = gr * grid_cols + gc;
    elems = (uint32_t)(min64(kTile, args.n - gr * kTile) * min64(kTile, args.k - gc * kTile));
  };
  auto fetch = [&](int kt) {
    if (!fetch_meta || kt >= kt1) return;
    int64_t t;
    uint32_t elems;
    tile_of_step(kt, t, elems);
    next_entry = entry_of(own.section, t);
    next_offset = own.offsets[t];
  };
  auto publish = [&](int kt, int buf) {
    if (args.staged || my_group >= args.n_groups || kt >= kt1) return;
    TileEntry e{0, codec::kZero, 0, 0};
    const uint8_t* payload = nullptr;
    if (fetch_meta) {
      int64_t t;
      uint32_t elems;
      tile_of_step(kt, t, elems);
      e = readable_or_zero(args, own, next_entry, next_offset, elems);
      if (e.codec != codec::kZero) {
        payload = own.section + next_offset;
        const uint64_t bytes = min64((int64_t)codec::tile_payload_bytes(e, elems, 2), kPayloadCap);
        for (uint64_t b = 0; b < bytes; b += 128) prefetch_l2(payload + b);
      }
    }
    tile_entry[buf][my_group] = e;
    tile_payload[buf][my_group] = payload;
  };

  float acc[MT][2][4], split_sum[MT][2][4];  // this split's sums; the sum of the splits before it here
  zero_fragments(acc);
  zero_fragments(split_sum);
  // One split ends, run in this CTA: its sums join the others' in split order, as the epilogue adds the
  // splits of CTAs of their own (0 + s0 + s1 + ...: the same bits either way).
  const auto end_split = [&] {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          split_sum[mt][nt][i] += acc[mt][nt][i];
          acc[mt][nt][i] = 0.f;
        }
  };
  fetch(kt0);
  publish(kt0, 0);  // before the first tile's barrier

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(kt0 + s, s);

  for (int kt = kt0; kt < kt1; ++kt) {
    if (splits_here && kt > kt0 && kt % args.tiles_per_split == 0) end_split();
    const int s = (kt - kt0) % kStages;
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage s landed for every thread; everyone is done with the stage refilled next
    issue(kt + kStages - 1, (kt - kt0 + kStages - 1) % kStages);
    fetch(kt + 1);  // grouped: the next tile's entries, in flight while this one is multiplied

    int64_t gr, gc;
    tile_rc(kt, gr, gc);
    const int64_t t = gr * grid_cols + gc;
    const uint32_t h = (uint32_t)min64(kTile, args.n - gr * kTile);
    const uint32_t w = (uint32_t)min64(kTile, args.k - gc * kTile);
    uint16_t* tile = tile_of(s);
    const uint16_t* a = a_of(s);
    const uint32_t elems = h * w;
    if (args.staged) {  // one fine-tune for every row: its payload rode the pipeline; patch the tile in place
      const TileEntry e = checked_entry(args, own, t, elems);
      // One call site per address space: a pointer the compiler knows is shared memory decodes with shared
      // loads it can hoist; a select between shared and global would make every read a generic load.
      const auto patch_in_place = [&](const uint8_t* payload) {
        if (e.codec == codec::kConditioned) {
          patch_conditioned(args, payload, e, elems, w, tile, cond_width, cond_counts);
          return;
        }
        codec::xor_tile_low_strided<uint16_t>(payload, e, elems, w, tile, kStride, tid, kThreads);
        __syncthreads();
        codec::xor_tile_exceptions_strided<uint16_t>(payload, e, elems, w, tile, kStride, tid, kThreads);
        __syncthreads();
      };
      if (e.codec != codec::kZero) {
        if (codec::tile_payload_bytes(e, elems, 2) <= (uint64_t)kPayloadCap) {
          patch_in_place(payload_of(s));
        } else {
          patch_in_place(own.section + own.offsets[t]);  // too big to stage
        }
      }
      mma_tile<kBf16, MT, kTrans>(a, tile, row_mask(0, rows_here), acc);
      continue;
    }
    // Rows of several groups. The base tile is multiplied once, for every row whose group can use it: base
    // rows, fine-tunes whose tile is zero and (forward) fine-tunes whose tile is sparse, which then add their
    // exceptions' corrections. A fine-tune with a denser tile (or any non-zero tile, backward) gets its own
    // patched copy of the base tile, multiplied for its rows alone.
    const int parity = (kt - kt0) & 1;
    const TileEntry* te = tile_entry[parity];
    const uint8_t* const* tp = tile_payload[parity];
    const auto own_copy = [&](const TileEntry& e) {
      return e.codec != codec::kZero && (kTrans || e.codec != codec::kSparse);
    };
    const auto sparse = [&](int g) { return !kTrans && te[g].codec == codec::kSparse; };
    uint64_t shared_rows = row_mask(0, rows_here);
    for (int g = 1; g < args.n_groups; ++g)
      if (own_copy(te[g])) shared_rows &= ~row_mask(seg_lo[g], seg_hi[g]);
    mma_tile<kBf16, MT, kTrans>(a, tile, shared_rows, acc);
    // Sparse tiles, up to kSparseBatch at a time: their payloads copied into shared memory (the patch area,
    // free until the dense tiles; 16-byte loads, every segment's in flight together), their exception
    // ranges found in one pass, then the corrections, all reading shared memory. Every thread walks the
    // same groups in the same order, so each recomputes where a payload sits. Which segment goes first
    // changes no row's sum.
    unsigned char* sparse_stage = reinterpret_cast<unsigned char*>(patch);
    bool any_sparse = false;
    for (int g0 = 1;;) {
      int g1 = g0, nb = 0;
      uint32_t used = 0;
      for (; g1 < args.n_groups && nb < kSparseBatch; ++g1) {
        if (!sparse(g1)) continue;
        const uint32_t bytes = (uint32_t)codec::tile_payload_bytes(te[g1], elems, 2);
        if (used + bytes > (uint32_t)kSparseStage) break;  // the next batch takes it (one always fits)
        for (uint32_t i = tid; i < bytes / 16; i += kThreads)
          store_as<Vec16>(sparse_stage + used + 16 * i, load_as<Vec16>(tp[g1] + 16 * i));
        used += bytes;
        ++nb;
      }
      if (nb == 0) break;
      any_sparse = true;
      __syncthreads();  // the payloads are in shared memory
      used = 0;
      for (int g = g0, i = 0; g < g1; ++g) {
        if (!sparse(g)) continue;
        exception_rows(sparse_stage + used, te[g], elems, w, exc_start[i++]);
        used += (uint32_t)codec::tile_payload_bytes(te[g], elems, 2);
      }
      __syncthreads();  // the ranges are complete
      used = 0;
      for (int g = g0, i = 0; g < g1; ++g) {
        if (!sparse(g)) continue;
        sparse_correction<kBf16, MT>(a, tile, sparse_stage + used, te[g], elems, w, exc_start[i++],
                                     row_mask(seg_lo[g], seg_hi[g]), acc);
        used += (uint32_t)codec::tile_payload_bytes(te[g], elems, 2);
      }
      bool more = false;
      for (int g = g1; g < args.n_groups; ++g) more = more || sparse(g);
      if (!more) break;
      __syncthreads();  // the next batch overwrites the payloads and the ranges
      g0 = g1;
    }
    bool any_dense = false;
    for (int g = 1; g < args.n_groups; ++g) any_dense = any_dense || own_copy(te[g]);
    if (any_sparse && any_dense) __syncthreads();  // the patch copies overwrite the sparse payloads
    for (int g = 1; g < args.n_groups; ++g) {
      if (!own_copy(te[g])) continue;
      const TileEntry e = te[g];
      const uint8_t* payload = tp[g];
      // The base tile copied, and the payload brought into shared memory alongside: independent 16-byte
      // loads, one round trip, where decoding from global memory would wait once per pass iteration.
      const uint64_t bytes = codec::tile_payload_bytes(e, elems, 2);
      if (bytes <= (uint64_t)kPayloadCap) {
        for (int i = tid; i < (int)(bytes / 16); i += kThreads)
          store_as<uint4>(patch_payload + 16 * i, load_as<uint4>(payload + 16 * i));
        payload = patch_payload;
      }
      for (int i = tid; i < kTileSmem / 16; i += kThreads)
        store_as<uint4>(patch + 8 * i, load_as<uint4>(tile + 8 * i));
      __syncthreads();
      if (e.codec == codec::kConditioned) {
        patch_conditioned(args, payload, e, elems, w, patch, cond_width, cond_counts);
      } else {
        codec::xor_tile_low_strided<uint16_t>(payload, e, elems, w, patch, kStride, tid, kThreads);
        __syncthreads();
        codec::xor_tile_exceptions_strided<uint16_t>(payload, e, elems, w, patch, kStride, tid, kThreads);
        __syncthreads();
      }
      mma_tile<kBf16, MT, kTrans>(a, patch, row_mask(seg_lo[g], seg_hi[g]), acc);
      __syncthreads();  // the next segment's copy overwrites the patch
    }
    publish(kt + 1, parity ^ 1);  // read after the next tile's barrier; last read during the previous tile
  }
  cp_async_wait<0>();
  if (splits_here) {
    end_split();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = split_sum[mt][nt][i];
  }

  // The epilogue. With split-K, every CTA of an output block writes its fp32 partial sums; the last to
  // arrive adds them all, in split order whoever arrived last (deterministic), then the bias, and writes the
  // output: no second launch and no fp32 round trip when the reduction is not split.
  const int lane = tid % 32, warp = tid / 32, gid = lane >> 2, tig = lane & 3;
  const int64_t total = args.m * args.out_cols;
  if (args.splits > 1) {
    float* part = args.partial + (int64_t)blockIdx.y * total;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = mt * 16 + gid + (i >> 1) * 8;
          const int64_t o = out_block * kTile + warp * 16 + nt * 8 + tig * 2 + (i & 1);
          if (r < rows_here && o < args.out_cols) part[(row0 + r) * args.out_cols + o] = acc[mt][nt][i];
        }
    fence();  // release: the partial sums are visible device-wide before the count says so
    __syncthreads();
    if (tid == 0) {
      uint32_t* counter = args.counters + blockIdx.z * gridDim.x + blockIdx.x;
      arrived = atomic_add(counter, 1u);
      if (arrived == (uint32_t)args.splits - 1) *counter = 0;  // the last: ready for the next launch
    }
    __syncthreads();
    if (arrived != (uint32_t)args.splits - 1) return;  // uniform: every thread read the same count
    fence();  // acquire: the other splits' partial sums
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = mt * 16 + gid + (i >> 1) * 8;
        const int64_t o = out_block * kTile + warp * 16 + nt * 8 + tig * 2 + (i & 1);
        if (r >= rows_here || o >= args.out_cols) continue;
        float v = acc[mt][nt][i];
        if (args.splits > 1) {
          const float* p = args.partial + (row0 + r) * args.out_cols + o;
          v = 0.f;
          for (int sp = 0; sp < args.splits; ++sp)
            v += sp == (int)blockIdx.y ? acc[mt][nt][i] : load_l2(p + sp * total);
        }
        if (args.bias != nullptr) v += half_to_float<kBf16>(args.bias[row_group[r] * args.out_cols + o]);
        args.out[a_row[r] * args.out_cols + o] = float_to_half<kBf16>(v);
      }
}

// The per-row launch's preparation, in one CTA (the first of a call's two launches): an id outside
// [-1, n_groups - 1) is served the base and raises kErrorRowId (a device assert would kill the CUDA context,
// a host check would wait for the GPU); rows are counted per group (id + 1), seg gets the groups' bounds and
// perm the rows grouped by group. Rows within a group take any order (atomics): no result depends on it,
// since every row's sum runs the same way wherever it sits.
__global__ void group_rows_kernel(const int64_t* ids, int64_t m, int n_groups, int64_t* perm, int32_t* seg,
                                  uint32_t* error) {
  __shared__ int count[kMaxFinetunes + 1], cursor[kMaxFinetunes + 1];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  auto group_of = [&](int64_t i) {
    const int64_t id = ids[i];
    return id >= -1 && id < n_groups - 1 ? (int)id + 1 : -1;
  };
  for (int g = tid; g < n_groups; g += nthreads) count[g] = 0;
  __syncthreads();
  bool bad = false;
  for (int64_t i = tid; i < m; i += nthreads) {
    const int g = group_of(i);
    bad = bad || g < 0;
    atomic_add(&count[g < 0 ? 0 : g], 1);
  }
  if (bad) atomic_or(error, kErrorRowId);
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int g = 0; g < n_groups; ++g) {
      seg[g] = cursor[g] = run;
      run += count[g];
    }
    seg[n_groups] = run;
  }
  __syncthreads();
  for (int64_t i = tid; i < m; i += nthreads) {
    const int g = group_of(i);
    perm[atomic_add(&cursor[g < 0 ? 0 : g], 1)] = i;
  }
}

// How a problem is cut into CTAs: rows per CTA (16 * mt), row chunks, and the split of the reduction.
struct LaunchPlan {
  int mt;
  int64_t chunks, out_blocks;
  int red_tiles, tiles_per_split;
  int splits;       // of the reduction: never a function of m
  int grid_splits;  // of those, how many run in CTAs of their own: `splits`, or 1 (a CTA runs them all)
};
// The split of the reduction depends on the shape and the device only, never on m: a row's bits must not
// depend on how many rows share its batch (with mma_tile's per-tile additions and the fixed-order split sum,
// each row's sum runs in the same order in any batch). A CTA at decode shapes is bound by the loads it keeps
// in flight, so its time is about its tile count: a plan costs its waves (three 16-row CTAs per SM is what fits:
// three staged stages take 58 KiB of the 227 KiB) times the tiles per CTA, plus one for the split-K epilogue.
// The cheapest split wins, the fewer splits on a tie; each split keeps >= 4 tiles so the pipeline overlaps
// something. A reduction of no tiles (K = 0) is one empty split: the output is the bias alone.
// Where does a split run? In a CTA of its own while the row chunks alone would not fill the GPU; once they do
// (large m: prefill), each CTA runs its block's splits one after another, the same sums in the same order,
// with no fp32 partial sums in memory (at m = 8192 on 14336x4096 they would be 2.3 GB).
inline LaunchPlan plan_launch(int64_t m, int64_t out_cols, int64_t red, int sms) {
  LaunchPlan p;
  p.mt = m <= 16 ? 1 : (m <= 32 ? 2 : 4);
  p.chunks = (m + 16 * p.mt - 1) / (16 * p.mt);
  p.out_blocks = (out_cols + kTile - 1) / kTile;
  p.red_tiles = (int)((red + kTile - 1) / kTile);
  const int64_t slots = 3 * (int64_t)std::max(1, sms);
  p.splits = 1;
  p.tiles_per_split = std::max(1, p.red_tiles);
  int64_t best = -1;
  for (int s = 1; s <= std::max(1, p.red_tiles / 4); ++s) {
    const int per = std::max(1, (p.red_tiles + s - 1) / s);
    if ((p.red_tiles + per - 1) / per != s && s > 1) continue;  // the same cut as fewer splits
    const int64_t waves = (p.out_blocks * s + slots - 1) / slots;
    const int64_t cost = waves * (per + (s > 1 ? 1 : 0));
    if (best < 0 || cost < best) {
      best = cost;
      p.splits = s;
      p.tiles_per_split = per;
    }
  }
  p.grid_splits = p.chunks * p.out_blocks >= slots ? 1 : p.splits;
  return p;
}

}  // namespace fused
}  // namespace cuda
}  // namespace xorgemm
