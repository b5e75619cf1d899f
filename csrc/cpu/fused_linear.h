// The CPU's fused decode-XOR-GEMM for small batches (decode shapes): y = x W^T with each fine-tune's weight
// W = base XOR delta applied as the base streams, never written out whole. Per grid row of the weight (64
// output features; tasks on all cores), in bands of 1024 columns along K:
//   zero tiles         the base rows go straight into the dot products;
//   sparse tiles       with few changes: the base rows are dotted, then (patched - base) x x is added per
//                      changed element; with more, as byteplane tiles;
//   byteplane, raw     the delta words are decoded into the fine-tune's band matrix (the shared decoders)
//                      and XORed onto the base words in registers, chunk by chunk, as they meet x;
//   conditioned        decoded whole into the band matrix over a copy of the base tile (their context).
// Rows of every fine-tune in the batch are served in the same pass: a band of base words is read from
// memory once, for the base rows, the fine-tunes whose tile is zero or corrected, and each decoded
// fine-tune. Products accumulate in fp32 (fp16/bf16 weights are widened; with AVX512-BF16, bf16 pairs go
// through vdpbf16ps), rounded once at the end, as F.linear does. docs/kernels.md has the design and numbers.
//
// Instruction sets (fused_linear.cpp compiles fused_linear_kernel.h once for each): avx512bf16, avx512,
// avx2 and a portable one (GCC vector extensions of 4 floats: SSE2, NEON, ...). The best the CPU and ATen's
// capability (ATEN_CPU_CAPABILITY) allow is used; XORGEMM_CPU_ISA forces one (tests, benchmarks).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "format/tile_grid.h"

namespace xorgemm {
namespace cpu {

// Rows of x that multiply one weight: the base (section null) or a fine-tune's.
struct FusedGroup {
  int64_t finetune = -1;              // which (-1: the base), for errors
  const uint8_t* section = nullptr;   // a host section checked by check_sections_on_host
  uint64_t section_bytes = 0;
  const uint64_t* offsets = nullptr;  // its tiles' payload offsets
  std::vector<int64_t> rows;          // their indices in x, increasing
};

struct FusedProblem {
  format::TileGrid grid;  // the weight's
  at::ScalarType dtype;   // the weight's: kFloat, kBFloat16 or kHalf
  const void* base;       // [N, K] contiguous
  const void* x;          // [M, K], rows x_stride elements apart: float, or bf16 on the avx512bf16 path
  at::ScalarType x_dtype;
  size_t x_stride;
  float* y;               // [M, N] fp32, zeroed: the products are added into it
  std::vector<FusedGroup> groups;
};

// The instruction sets this CPU (and ATen's capability) can run, best first; "portable" always.
std::vector<std::string> available_isas();
// The one XORGEMM_CPU_ISA asks for (checked against available_isas), or the best available.
std::string chosen_isa();
// Whether the fused kernel can multiply weights of this dtype (float, bf16, fp16).
bool fused_supports(at::ScalarType dtype);
// Batches of at most this many rows take the fused kernel when no path is forced: the crossover with the
// patched-block path, measured per dtype by bench/gemm.py --device cpu.
int64_t fused_max_rows(at::ScalarType dtype);
// Runs the problem on `isa` (one of available_isas()). The x it expects: x_dtype_for(isa, dtype). False
// when a sparse tile it would correct holds a weight that is not finite (inf or nan, in the base or the
// patch, or their difference), or exception positions that do not increase (a section only bounds-checked),
// which corrections cannot carry: y is then wrong and the caller computes the call another way.
bool fused_linear(const FusedProblem& p, const std::string& isa);
at::ScalarType x_dtype_for(const std::string& isa, at::ScalarType weight_dtype);

}  // namespace cpu
}  // namespace xorgemm
