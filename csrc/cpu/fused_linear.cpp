// The fused CPU kernel (fused_linear.h), compiled for each instruction set from one body
// (fused_linear_kernel.h) under `#pragma GCC target`, and the choice among them at run time.
#include "cpu/fused_linear.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "codec/tile_codec.h"
#include "format/tile_grid.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define XG_X86 1
// Code between XG_TARGET_BEGIN("isa,...") and XG_TARGET_END is compiled for those instruction sets.
#define XG_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define XG_TARGET_BEGIN(isa) XG_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define XG_TARGET_END XG_PRAGMA(clang attribute pop)
#else
#define XG_TARGET_BEGIN(isa) XG_PRAGMA(GCC push_options) XG_PRAGMA(GCC target(isa))
#define XG_TARGET_END XG_PRAGMA(GCC pop_options)
#endif
#endif

namespace xorgemm {
namespace cpu {

namespace portable {
#define XG_LANES 4
#define XG_BF16_DOT 0
#define XG_F16C 0
#include "cpu/fused_linear_kernel.h"
#undef XG_LANES
#undef XG_BF16_DOT
#undef XG_F16C
}  // namespace portable

#ifdef XG_X86
XG_TARGET_BEGIN("avx2,fma,f16c")
namespace avx2 {
#define XG_LANES 8
#define XG_BF16_DOT 0
#define XG_F16C 1
#include "cpu/fused_linear_kernel.h"
#undef XG_LANES
#undef XG_BF16_DOT
#undef XG_F16C
}  // namespace avx2
XG_TARGET_END

XG_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace avx512 {
#define XG_LANES 16
#define XG_BF16_DOT 0
#define XG_F16C 1
#include "cpu/fused_linear_kernel.h"
#undef XG_LANES
#undef XG_BF16_DOT
#undef XG_F16C
}  // namespace avx512
XG_TARGET_END

XG_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
namespace avx512bf16 {
#define XG_LANES 16
#define XG_BF16_DOT 1
#define XG_F16C 1
#include "cpu/fused_linear_kernel.h"
#undef XG_LANES
#undef XG_BF16_DOT
#undef XG_F16C
}  // namespace avx512bf16
XG_TARGET_END
#endif

namespace {

struct Isa {
  const char* name;
  bool (*run)(const FusedProblem&);
};

// Best first.
const std::vector<Isa>& all_isas() {
  static const std::vector<Isa> isas = {
#ifdef XG_X86
      {"avx512bf16", &avx512bf16::run},
      {"avx512", &avx512::run},
      {"avx2", &avx2::run},
#endif
      {"portable", &portable::run},
  };
  return isas;
}

#ifdef XG_X86
// F16C (CPUID leaf 1, ECX bit 29): every build but the portable one converts fp16 with it.
bool has_f16c() {
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
#endif

bool cpu_has(const std::string& isa) {
#ifdef XG_X86
  // ATen's capability caps ours: ATEN_CPU_CAPABILITY=avx2 (or default) keeps AVX-512 (or all AVX) off here too.
  const std::string aten = at::get_cpu_capability();
  const bool aten512 = aten.find("AVX512") != std::string::npos;
  const bool aten2 = aten512 || aten.find("AVX2") != std::string::npos;
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
  const bool has512 = has2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx512bf16") return aten512 && has512 && __builtin_cpu_supports("avx512bf16");
  if (isa == "avx512") return aten512 && has512;
  if (isa == "avx2") return aten2 && has2;
#endif
  return isa == "portable";
}

}  // namespace

std::vector<std::string> available_isas() {
  static const std::vector<std::string> out = [] {
    std::vector<std::string> names;
    for (const Isa& i : all_isas())
      if (cpu_has(i.name)) names.push_back(i.name);
    return names;
  }();
  return out;
}

std::string chosen_isa() {
  const char* v = std::getenv("XORGEMM_CPU_ISA");
  const std::vector<std::string> ok = available_isas();
  if (v == nullptr || *v == 0 || !std::strcmp(v, "auto")) return ok.front();
  for (const std::string& name : ok)
    if (name == v) return name;
  std::string known;
  for (const Isa& i : all_isas()) known += std::string(known.empty() ? "" : ", ") + i.name;
  std::string here;
  for (const std::string& name : ok) here += (here.empty() ? "" : ", ") + name;
  TORCH_CHECK(false, "xorgemm: XORGEMM_CPU_ISA=", v, " is not one this CPU runs (", here, "); the sets are ", known,
              " or auto");
}

bool fused_supports(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// The crossover measured by bench/gemm.py --device cpu: its "crossover" table in bench/results/gemm_cpu.md
// (4096x4096, every delta kind, M in 1, 4, 16, 64, 256): the fused kernel wins up to 16 rows and loses at 64
// for fp32 and bf16. fp16 is not measured (ATen's fp16 GEMM on the CPU has no fast path to cross): it takes
// bf16's threshold.
int64_t fused_max_rows(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return 16;
    default: return 16;
  }
}

at::ScalarType x_dtype_for(const std::string& isa, at::ScalarType weight_dtype) {
  return isa == "avx512bf16" && weight_dtype == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

bool fused_linear(const FusedProblem& p, const std::string& isa) {
  TORCH_CHECK(fused_supports(p.dtype), "xorgemm: the fused CPU kernel does not take ", p.dtype, " weights");
  TORCH_CHECK(p.x_dtype == x_dtype_for(isa, p.dtype), "xorgemm: the ", isa, " kernel wants x as ",
              x_dtype_for(isa, p.dtype), " for ", p.dtype, " weights, got ", p.x_dtype);
  const std::vector<std::string> ok = available_isas();
  TORCH_CHECK(std::find(ok.begin(), ok.end(), isa) != ok.end(), "xorgemm: this CPU does not run the fused kernel's ",
              isa, " instruction set");
  for (const Isa& i : all_isas())
    if (isa == i.name) return i.run(p);
  return false;
}

}  // namespace cpu
}  // namespace xorgemm
