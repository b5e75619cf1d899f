// Floating-point test words for the conditioned codec's tests (codec_test, kernel_emulation_test).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

// Floating-point words of every kind a checkpoint holds (for 16-bit words bf16's layout when `shift` is 7,
// fp16's when 10; 32-bit: fp32's): normal values around a typical weight scale, zeros of both signs,
// subnormals, Infs and NaNs. Fine-tunes move them as training does (a few ulps either way, carrying into
// the exponent across powers of two), flip signs, rewrite whole words, or leave them alone.
template <typename Word>
static void float_tile(uint32_t elems, uint32_t shift, uint32_t seed, std::vector<Word>& base, std::vector<Word>& ft) {
  constexpr uint32_t kBits = 8 * sizeof(Word);
  const uint32_t exp_bits = shift == 10 ? 5 : 8, exp_max = (1u << exp_bits) - 1, bias = exp_max / 2;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  std::normal_distribution<double> spread(0, 2.5);
  base.resize(elems);
  ft.resize(elems);
  for (uint32_t i = 0; i < elems; ++i) {
    const double k = u(rng);
    uint64_t exp = (uint64_t)std::max(1.0, std::min((double)exp_max - 1, bias - 6 + spread(rng)));
    if (k < 0.01) exp = 0;                 // zero or subnormal
    else if (k < 0.015) exp = exp_max;     // Inf or NaN
    const uint64_t mant = rng() & ((1ull << shift) - 1) & (k < 0.005 ? 0 : ~0ull);
    const uint64_t sign = (uint64_t)(rng() & 1) << (kBits - 1);
    base[i] = (Word)(sign | exp << shift | mant);
    const double m = u(rng);
    Word f = base[i];
    if (m < 0.8) f = (Word)(f + (Word)((int64_t)std::lround(spread(rng) * 8)));  // ulps, carries included
    else if (m < 0.82) f ^= (Word)(1ull << (kBits - 1));                         // a sign flip
    else if (m < 0.83) f = (Word)rng();                                          // anything
    ft[i] = f;
  }
}
