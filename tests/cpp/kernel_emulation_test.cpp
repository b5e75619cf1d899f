// The CUDA kernels' exact source, run on the CPU under cuda_emulation.h:
// - the fused decode-XOR-GEMM (csrc/cuda/fused_gemm_kernel.cuh) against a float64 reference: forward and
//   backward, bf16 and fp16, every row-tile size, ragged N and K, split-K, one staged fine-tune and per-row
//   mixes of fine-tunes and base rows over the multi-tenant benchmark's row distributions, biases. Deltas
//   flip sign and exponent bits too, so a wrongly decoded or skipped tile changes the result by far more
//   than the tolerance;
// - the apply kernel (csrc/cuda/apply_section_kernel.cuh), whole tensors and blocks of grid rows (the
//   patched-block path), every word size and tile shape: bit-exact fine-tuned bytes.
// Ends with "N passed, N failed".
#include "cuda_emulation.h"
#include "float_words.h"
// clang-format off: the emulation must come first
#include "cuda/apply_section_kernel.cuh"
#include "cuda/fused_gemm_kernel.cuh"
// clang-format on

#include <stdio.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>

#include "codec/tile_encoder.h"
#include "check.h"
#include "format/delta_section.h"

using namespace xorgemm;
namespace fused = xorgemm::cuda::fused;

// 16-byte aligned byte buffer (sections are cp.async'ed in 16-byte units).
struct Aligned {
  std::vector<uint4> store;
  size_t size = 0;
  explicit Aligned(const std::vector<uint8_t>& bytes) : store((bytes.size() + 15) / 16), size(bytes.size()) {
    memcpy(store.data(), bytes.data(), bytes.size());
  }
  const uint8_t* data() const { return reinterpret_cast<const uint8_t*>(store.data()); }
};

struct Case {
  int64_t n, k, m;
  bool bf16, trans;
  int n_finetunes;     // fine-tunes
  bool grouped;    // per-row ids (with base rows); else every row uses the single fine-tune
  int bias_rows;   // 0: none, 1: [N], else [n_finetunes + 1, N] (forward only)
  int sms;         // what plan_launch is told, to get split-K
  int kind0;  // fine-tune d is of kind (kind0 + d) % 3; kind0 3: every word, both bytes; 4: all sparse (3%);
              // 5: all sparse at 20% (payloads of ~3.3 KB: a batch of them does not fit the staging area)
  std::string what;
  std::string dist = "";  // grouped: how rows spread over fine-tunes (see row_ids); "" = runs of three + base
  bool big_payload = false;  // encode tile 0 as byteplane with every word an exception: too big to stage
  int corrupt = 0;  // fine-tune 0's section: 1 tile 1's entry malformed, 2 tile 1's offset far outside it
  bool inf = false;  // fine-tune 0's weight holds an Inf: its rows may be non-finite, no other row may
  bool bad_ids = false;  // grouped: two rows' ids out of range, served the base and reported
  bool conditioned = false;  // sections may use the conditioned codec (kind0 6: training-like deltas, for it)
};

// A valid section whose tile 0 is byteplane (1 low byte) with exceptions for every word whose high byte
// changed: up to 4 bytes a word, more than a stage holds (the encoder would pick raw). Other tiles as
// encode_section writes them.
static std::vector<uint8_t> section_with_big_tile(const uint16_t* base, const uint16_t* ft,
                                                  const format::TileGrid& g) {
  std::vector<uint8_t> table(g.table_bytes(), 0), payload;
  std::vector<uint64_t> scratch;
  for (uint64_t t = 0; t < g.num_tiles(); ++t) {
    const uint32_t h = g.tile_height(t), w = g.tile_width(t);
    std::vector<uint16_t> words;
    for (uint32_t r = 0; r < h; ++r)
      for (uint32_t c = 0; c < w; ++c) {
        const uint64_t i = (g.tile_row0(t) + r) * g.cols + g.tile_col0(t) + c;
        words.push_back(base[i] ^ ft[i]);
      }
    codec::TileEntry e = codec::choose_tile_codec(words.data(), h * w, 2);
    if (t == 0) {
      e = {0, codec::kBytePlane, 1, 0};
      for (uint16_t x : words) e.n_exc += x >> 8 != 0;
    }
    memcpy(table.data() + t * 8, &e, 8);
    codec::encode_tile(words.data(), h * w, 2, e, payload, scratch);
  }
  table.insert(table.end(), payload.begin(), payload.end());
  return table;
}

// The multi-tenant benchmark's distributions of M rows over D fine-tunes: distinct (row i on i % D),
// uniform, Zipf(1.5), skewed (90% on one) and identical (all on the last).
static std::vector<int64_t> row_ids(const std::string& dist, int64_t m, int d, std::mt19937& rng) {
  std::vector<int64_t> ids(m);
  std::vector<double> zipf(d);
  for (int i = 0; i < d; ++i) zipf[i] = 1.0 / std::pow(i + 1.0, 1.5);
  std::discrete_distribution<int> z(zipf.begin(), zipf.end());
  std::uniform_int_distribution<int> uni(0, d - 1);
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t i = 0; i < m; ++i) {
    if (dist == "distinct") ids[i] = i % d;
    if (dist == "uniform") ids[i] = uni(rng);
    if (dist == "zipf") ids[i] = z(rng);
    if (dist == "skewed") ids[i] = u(rng) < 0.9 ? 0 : uni(rng);
    if (dist == "identical") ids[i] = d - 1;
  }
  return ids;
}

// The weights of a case (base first, then each fine-tune) and the fine-tunes' sections.
struct Problem {
  std::vector<std::vector<uint16_t>> weights;
  std::vector<Aligned> sections;
  std::vector<std::vector<int64_t>> offsets;
  format::TileGrid grid;
};

template <typename T>
static Problem make_problem(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 0.05f);
  std::uniform_real_distribution<double> u(0, 1);
  const auto to_bits = [&](float f) { return T(f).bits; };
  const int64_t n = c.n, k = c.k;
  std::vector<uint16_t> base(n * k);
  for (auto& w : base) w = to_bits(normal(rng));
  // Fine-tune d: kind (kind0 + d) % 3 = dense low-mantissa noise everywhere / 3% of elements with any bits flipped
  // (sign and exponent included) / only the first tile row changed, densely (zero tiles elsewhere).
  Problem p{{base}, {}, {}, format::TileGrid{(uint64_t)n, (uint64_t)k, 64, 64, 2}};
  std::vector<std::vector<uint16_t>>& weights = p.weights;
  const format::TileGrid& grid = p.grid;
  for (int d = 0; d < c.n_finetunes; ++d) {
    std::vector<uint16_t> ft = base;
    for (int64_t i = 0; i < n * k; ++i) {
      const int kind = c.kind0 == 3 ? 3 : c.kind0 == 4 ? 1 : c.kind0 == 5 ? 4 : c.kind0 == 6 ? 6 : (c.kind0 + d) % 3;
      if (kind == 0) ft[i] ^= (uint16_t)(rng() & 0x7f);
      if (kind == 1 && u(rng) < 0.03) ft[i] ^= (uint16_t)(rng() | 1) & 0xbfff;  // keep finite: no exponent 255
      if (kind == 2 && i / k < 64) ft[i] ^= (uint16_t)(rng() & 0x3ff);
      if (kind == 3) ft[i] ^= (uint16_t)(rng() & 0x3fff);  // both bytes, exponent's top bit kept: finite
      if (kind == 4 && u(rng) < 0.2) ft[i] ^= (uint16_t)(rng() | 1) & 0xbfff;
      // kind 6: training-like, a few ulps either way (exponent carries included, zero and Inf/NaN not crossed)
      if (kind == 6 && (ft[i] & 0x7fff) > 0x400 && (ft[i] & 0x7fff) < 0x7000)
        ft[i] = (uint16_t)(ft[i] + (int)std::lround(normal(rng) * 100));
    }
    if (c.inf && d == 0) ft[(n / 2) * k + 1] = std::is_same_v<T, emulate::bf16> ? 0x7f80 : 0x7c00;  // +Inf
    const auto section = c.big_payload && d == 0
                             ? section_with_big_tile(base.data(), ft.data(), grid)
                             : format::encode_section(reinterpret_cast<const uint8_t*>(base.data()),
                                                      reinterpret_cast<const uint8_t*>(ft.data()), grid,
                                                      c.conditioned ? (std::is_same_v<T, emulate::bf16> ? 7 : 10) : -1);
    if (c.big_payload && d == 0) {
      codec::TileEntry e0;
      memcpy(&e0, section.data(), 8);
      check(codec::tile_payload_bytes(e0, 64 * 64, 2) > (uint64_t)fused::kPayloadCap,
            c.what + ": tile 0's payload is larger than a stage holds");
    }
    const auto off = format::validate_section(section.data(), section.size(), grid);
    if (c.conditioned) {
      uint64_t n = 0;
      for (uint64_t t = 0; t < grid.num_tiles(); ++t)
        n += codec::load_entry(section.data(), t).codec == codec::kConditioned;
      check(n > 0, c.what + ": fine-tune " + std::to_string(d) + " has conditioned tiles");
    }
    p.sections.emplace_back(section);
    p.offsets.emplace_back(off.begin(), off.end());
    weights.push_back(ft);
  }
  if (c.corrupt == 1) const_cast<uint8_t*>(p.sections[0].data())[8 + 4] = 7;  // tile 1's codec: no such codec
  if (c.corrupt == 2) p.offsets[0][1] = (int64_t)1 << 40;                   // tile 1's payload: far away
  return p;
}

// The fused kernel and the split reduction on rows `a` with fine-tune ids `ids` (grouped) or every row on the
// last fine-tune; returns the output. `error` receives the launch's error word. With `slot_table`, the
// fine-tunes are its c.n_finetunes rows (xor_linear_slots) instead of p's sections.
template <typename T>
static std::vector<T> launch_fused(const Case& c, const Problem& p, const std::vector<uint16_t>& a,
                                   const std::vector<int64_t>& ids, const std::vector<uint16_t>& bias,
                                   uint32_t* error, const int64_t* slot_table = nullptr) {
  const int64_t n = c.n, k = c.k, m = (int64_t)ids.size();
  const int64_t red = c.trans ? n : k, out_cols = c.trans ? k : n;
  std::vector<int64_t> perm(m, -1);
  std::vector<int32_t> seg(c.n_finetunes + 2, -1);
  if (c.grouped) {  // the call's first launch: rows grouped by fine-tune, ids checked
    emulate::launch({1, 1, 1}, [&] {
      fused::group_rows_kernel(ids.data(), m, c.n_finetunes + 1, perm.data(), seg.data(), error);
    });
    std::vector<int64_t> sorted = perm;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t i = 0; i < m; ++i)
      if (sorted[i] != i) *error |= 1u << 30;  // not a permutation
  }

  const fused::LaunchPlan plan = fused::plan_launch(m, out_cols, red, c.sms);
  fused::FusedArgs args{};
  args.a = a.data();
  args.lda = red;
  args.base = p.weights[0].data();
  args.n = n;
  args.k = k;
  args.m = m;
  args.n_groups = c.n_finetunes + 1;
  args.slot_table = slot_table;
  for (int d = 0; d < c.n_finetunes && slot_table == nullptr; ++d) {
    args.sections[d] = p.sections[d].data();
    args.offsets[d] = p.offsets[d].data();
    args.section_bytes[d] = p.sections[d].size;
  }
  args.table_bytes = p.grid.table_bytes();
  args.error = error;
  if (c.grouped) {
    args.perm = perm.data();
    args.seg = seg.data();
    args.only_group = -1;
  } else {
    args.only_group = c.n_finetunes;
    args.staged = c.n_finetunes == 1;
  }
  std::vector<float> partial((size_t)plan.grid_splits * m * out_cols, NAN);
  std::vector<uint32_t> counters(plan.chunks * plan.out_blocks, 0);
  std::vector<T> out(m * out_cols);
  for (auto& v : out) v.bits = 0xffff;  // NaN: every element must be written
  args.out = reinterpret_cast<uint16_t*>(out.data());
  args.bias = c.bias_rows ? bias.data() : nullptr;
  args.bias_rows = c.bias_rows;
  args.partial = plan.grid_splits > 1 ? partial.data() : nullptr;
  args.counters = plan.grid_splits > 1 ? counters.data() : nullptr;
  args.out_cols = out_cols;
  args.red_tiles = plan.red_tiles;
  args.tiles_per_split = plan.tiles_per_split;
  args.splits = plan.grid_splits;

  const dim3 grid3{(unsigned)plan.out_blocks, (unsigned)plan.grid_splits, (unsigned)plan.chunks};
  constexpr bool kBf16 = std::is_same_v<T, emulate::bf16>;
  const auto go = [&](auto kernel) {
    emulate::launch(grid3, [&] { kernel(args); }, fused::smem_bytes(plan.mt, args.staged));
  };
  switch (plan.mt * 2 + c.trans) {
    case 2: go(fused::fused_xor_gemm_kernel<kBf16, 1, false>); break;
    case 3: go(fused::fused_xor_gemm_kernel<kBf16, 1, true>); break;
    case 4: go(fused::fused_xor_gemm_kernel<kBf16, 2, false>); break;
    case 5: go(fused::fused_xor_gemm_kernel<kBf16, 2, true>); break;
    case 8: go(fused::fused_xor_gemm_kernel<kBf16, 4, false>); break;
    default: go(fused::fused_xor_gemm_kernel<kBf16, 4, true>); break;
  }
  // Every split-K counter is back to zero, ready for the next launch on the stream.
  if (std::any_of(counters.begin(), counters.end(), [](uint32_t x) { return x != 0; })) *error |= 1u << 31;
  return out;
}

template <typename T>
static void run(const Case& c) {
  std::mt19937 rng(1234 + (uint32_t)(c.n * 7 + c.k * 3 + c.m));
  std::normal_distribution<float> normal(0.f, 0.05f);
  const auto to_bits = [&](float f) { return T(f).bits; };
  const auto to_float = [&](uint16_t b) { T t; t.bits = b; return (float)t; };
  const int64_t n = c.n, k = c.k, m = c.m;
  const Problem p = make_problem<T>(c, rng);

  const int64_t red = c.trans ? n : k, out_cols = c.trans ? k : n;
  std::vector<uint16_t> a(m * red);
  for (auto& v : a) v = to_bits(normal(rng) * 20);
  std::vector<int64_t> ids(m, c.n_finetunes - 1);
  if (c.grouped && !c.dist.empty()) {
    ids = row_ids(c.dist, m, c.n_finetunes, rng);
  } else if (c.grouped) {
    // Ids -1 (base) to n_finetunes - 2 in runs of three, shuffled: the last fine-tune gets no rows.
    for (int64_t i = 0; i < m; ++i) ids[i] = (int64_t)((i / 3) % c.n_finetunes) - 1;
    std::shuffle(ids.begin(), ids.end(), rng);
  }
  std::vector<uint16_t> bias;
  if (c.bias_rows) {
    bias.resize((size_t)c.bias_rows * out_cols);
    for (auto& v : bias) v = to_bits(normal(rng) * 10);
  }
  std::vector<int64_t> sent = ids;
  if (c.bad_ids) {  // out of range both ways: what the kernel must serve is the base
    sent[0] = c.n_finetunes + 5;
    sent[m - 1] = -7;
    ids[0] = ids[m - 1] = -1;
  }
  uint32_t error = 0;
  const std::vector<T> out = launch_fused<T>(c, p, a, sent, bias, &error);

  // float64 reference on the fine-tuned weights, row by row. With a corrupted section or an Inf weight,
  // fine-tune 0's rows are not checked: every other row must still be finite and right.
  const bool skip0 = c.corrupt != 0 || c.inf;
  double err2 = 0, ref2 = 0;
  bool finite = true;
  for (int64_t i = 0; i < m; ++i) {
    if (skip0 && ids[i] == 0) continue;
    const std::vector<uint16_t>& w = p.weights[ids[i] + 1];
    for (int64_t o = 0; o < out_cols; ++o) {
      double want = 0;
      for (int64_t r = 0; r < red; ++r)
        want += (double)to_float(a[i * red + r]) * to_float(c.trans ? w[r * k + o] : w[o * k + r]);
      if (c.bias_rows) want += to_float(bias[(c.bias_rows == 1 ? 0 : ids[i] + 1) * out_cols + o]);
      const double got = (float)out[i * out_cols + o];
      finite = finite && std::isfinite(got);
      err2 += (got - want) * (got - want);
      ref2 += want * want;
    }
  }
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : 0.0;  // no row checked: the error word alone
  const fused::LaunchPlan plan = fused::plan_launch(m, out_cols, red, c.sms);
  char buf[128];
  snprintf(buf, sizeof buf, " (rel err %.2e%s, mt %d, splits %d (%d in CTAs), error word %u)", rel,
           finite ? "" : ", not finite", plan.mt, plan.splits, plan.grid_splits, error);
  const uint32_t want_error = (c.corrupt ? cuda::kErrorTile : 0u) | (c.bad_ids ? cuda::kErrorRowId : 0u);
  check(finite && rel < 8e-3 && error == want_error, c.what + buf);
}

// A per-row case's weights and random inputs: activations, ids over the base and every fine-tune, bias rows.
struct GroupedInputs {
  Problem p;
  std::vector<uint16_t> a;
  std::vector<int64_t> ids;
  std::vector<uint16_t> bias;
};
template <typename T>
static GroupedInputs grouped_inputs(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  GroupedInputs in{make_problem<T>(c, rng), {}, {}, {}};
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t red = c.trans ? c.n : c.k, out_cols = c.trans ? c.k : c.n;
  in.a.resize(c.m * red);
  for (auto& v : in.a) v = T(normal(rng)).bits;
  in.ids.resize(c.m);
  for (auto& id : in.ids) id = (int64_t)(rng() % (c.n_finetunes + 1)) - 1;
  in.bias.resize(c.bias_rows * out_cols);
  for (auto& v : in.bias) v = T(normal(rng)).bits;
  return in;
}

// A row's output bits do not depend on the rest of its batch: the same rows served alone, in batches of other
// sizes (other rows per CTA) and beside other fine-tunes' rows give bitwise the same outputs.
template <typename T>
static void batch_invariance(bool trans, int sms) {
  // 130 rows: three row chunks of 64 in the whole batch, one in the small ones; a reduction of 16 tiles, so
  // the split of the reduction would change with the chunk count if it were allowed to.
  const Case c{trans ? 1024 : 136, trans ? 136 : 1024, 130, std::is_same_v<T, emulate::bf16>, trans, 4, true,
               trans ? 0 : 5, sms, 0, "batch invariance"};
  const auto [p, a, ids, bias] = grouped_inputs<T>(c, 99);
  const int64_t red = trans ? c.n : c.k, out_cols = trans ? c.k : c.n;
  uint32_t error = 0;
  const std::vector<T> whole = launch_fused<T>(c, p, a, ids, bias, &error);
  bool same = error == 0;
  for (const auto& [lo, hi] : std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {3, 8}, {5, 30}, {17, 60}, {40, 130}}) {
    const std::vector<uint16_t> part_a(a.begin() + lo * red, a.begin() + hi * red);
    const std::vector<int64_t> part_ids(ids.begin() + lo, ids.begin() + hi);
    const std::vector<T> part = launch_fused<T>(c, p, part_a, part_ids, bias, &error);
    for (int64_t i = lo; i < hi; ++i)
      same = same && !memcmp(&part[(i - lo) * out_cols], &whole[i * out_cols], out_cols * sizeof(T));
  }
  // With 2 SMs the whole batch's CTAs fill the GPU, so each runs its splits itself; the smaller batches
  // split the reduction over CTAs: the same bits either way.
  const fused::LaunchPlan whole_plan = fused::plan_launch(c.m, out_cols, red, sms);
  const bool in_one_cta = whole_plan.grid_splits == 1 && whole_plan.splits > 1;
  check(same && (sms != 2 || in_one_cta),
        std::string("batch invariance, ") + (trans ? "backward" : "forward") +
            (std::is_same_v<T, emulate::bf16> ? ", bf16" : ", fp16") +
            (sms == 2 ? ", the whole batch's splits in one CTA each" : "") +
            ": rows 0-1, 3-8, 5-30, 17-60, 40-130 of 130");
}

// The split-K epilogue adds the splits' sums in split order whichever CTA arrives last: the same bits for any
// order in which the CTAs run.
template <typename T>
static void split_order_invariance(bool trans) {
  const Case c{trans ? 1024 : 136, trans ? 136 : 1024, 40, std::is_same_v<T, emulate::bf16>, trans, 3, true,
               trans ? 0 : 4, 8, 1, "split order"};
  const auto [p, a, ids, bias] = grouped_inputs<T>(c, 7);
  const int64_t red = trans ? c.n : c.k, out_cols = trans ? c.k : c.n;
  const unsigned saved = emulate::cta_order_seed;
  uint32_t error = 0;
  std::vector<std::vector<T>> outs;
  for (unsigned seed : {0u, 3u, 11u}) {
    emulate::cta_order_seed = seed;
    outs.push_back(launch_fused<T>(c, p, a, ids, bias, &error));
  }
  emulate::cta_order_seed = saved;
  const size_t bytes = outs[0].size() * sizeof(T);
  check(fused::plan_launch(c.m, out_cols, red, c.sms).grid_splits > 1 && error == 0 &&
            !memcmp(outs[0].data(), outs[1].data(), bytes) && !memcmp(outs[0].data(), outs[2].data(), bytes),
        std::string("split-K: the same bits whichever CTA arrives last, ") + (trans ? "backward" : "forward"));
}

// A slot table (xor_linear_slots) serves each row the delta its slot holds, bitwise as the same fine-tunes
// passed directly; an empty slot's rows get the base; rewriting a row between two launches of the same
// arguments (a CUDA graph's replay) serves the new fine-tune; a misaligned or too short row is read as
// empty and reported.
template <typename T>
static void slot_table_cases(bool trans) {
  const bool bf16 = std::is_same_v<T, emulate::bf16>;
  const Case listed{trans ? 520 : 136, trans ? 136 : 520, 40, bf16, trans, 3, true, trans ? 0 : 1, 4, 0, "slots"};
  Case slots = listed;
  slots.n_finetunes = 5;  // five slots over three fine-tunes
  const auto [p, a, ids, bias] = grouped_inputs<T>(slots, 21);  // ids over -1..4: every slot has rows
  const auto row_of = [&](int f) -> std::vector<int64_t> {      // slot row of fine-tune f (-1: empty)
    if (f < 0) return {0, 0, 0};
    return {(int64_t)(uintptr_t)p.sections[f].data(), (int64_t)(uintptr_t)p.offsets[f].data(),
            (int64_t)p.sections[f].size};
  };
  const auto served = [&](const std::vector<int>& slot_ft, std::vector<int64_t>& table) {
    table.clear();
    std::vector<int64_t> as_listed(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) as_listed[i] = ids[i] < 0 ? -1 : slot_ft[ids[i]];
    for (int f : slot_ft) {
      const auto row = row_of(f);
      table.insert(table.end(), row.begin(), row.end());
    }
    return as_listed;
  };
  std::vector<int64_t> table;
  const std::string what =
      std::string("slot table, ") + (trans ? "backward" : "forward") + (bf16 ? ", bf16" : ", fp16");
  uint32_t error = 0, want_error = 0;
  std::vector<int64_t> as_listed = served({2, -1, 0, 1, 0}, table);
  std::vector<T> want = launch_fused<T>(listed, p, a, as_listed, bias, &want_error);
  std::vector<T> got = launch_fused<T>(slots, p, a, ids, bias, &error, table.data());
  const size_t bytes = want.size() * sizeof(T);
  check(error == 0 && want_error == 0 && !memcmp(got.data(), want.data(), bytes),
        what + ": rows of slots 2, empty, 0, 1, 0 as the fine-tunes passed directly");
  // The same table rewritten in place: slot 0 now holds fine-tune 1, slot 1 fine-tune 2, slot 4 none.
  as_listed = served({1, 2, 0, 1, -1}, table);
  want = launch_fused<T>(listed, p, a, as_listed, bias, &want_error);
  got = launch_fused<T>(slots, p, a, ids, bias, &error, table.data());
  check(error == 0 && !memcmp(got.data(), want.data(), bytes), what + ": rows rewritten between launches");
  // A misaligned section and a section shorter than its tile table: both slots served as empty, reported.
  as_listed = served({1, -1, 0, 1, -1}, table);
  want = launch_fused<T>(listed, p, a, as_listed, bias, &want_error);
  served({1, 2, 0, 1, 0}, table);
  table[1 * 3 + 0] += 1;
  table[4 * 3 + 2] = (int64_t)p.grid.table_bytes() - 8;
  got = launch_fused<T>(slots, p, a, ids, bias, &error, table.data());
  check(error == cuda::kErrorTile && !memcmp(got.data(), want.data(), bytes),
        what + ": a misaligned and a too short slot read as empty, reported");
  // No offsets, and a negative length: read as empty, reported (never a read at address 0 or unbounded).
  served({1, 2, 0, 1, 0}, table);
  table[1 * 3 + 1] = 0;
  table[4 * 3 + 2] = -1;
  error = 0;
  got = launch_fused<T>(slots, p, a, ids, bias, &error, table.data());
  check(error == cuda::kErrorTile && !memcmp(got.data(), want.data(), bytes),
        what + ": a slot without offsets and one of negative length read as empty, reported");
}

// The apply kernel over grid rows [gr0, gr1) (all of them: the whole tensor) must give exactly the
// fine-tuned rows, with `out` holding just those rows.
template <typename Word>
static void run_apply(const format::TileGrid& g, double density, uint64_t gr0, uint64_t gr1) {
  std::mt19937 rng((uint32_t)(g.rows * 31 + g.cols + gr0));
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<uint8_t> base(g.tensor_bytes()), ft;
  for (auto& b : base) b = (uint8_t)rng();
  ft = base;
  for (uint64_t i = 0; i < g.rows * g.cols; ++i)
    if (u(rng) < density) ft[i * sizeof(Word) + rng() % sizeof(Word)] ^= (uint8_t)(rng() | 1);
  const Aligned section(format::encode_section(base.data(), ft.data(), g));
  const auto off = format::validate_section(section.data(), section.size, g);
  const std::vector<int64_t> offsets(off.begin(), off.end());
  const uint64_t row0 = gr0 * g.tile_rows, row1 = std::min<uint64_t>(gr1 * g.tile_rows, g.rows);
  std::vector<Word> out((row1 - row0) * g.cols, (Word)0x5a);
  const dim3 grid{(unsigned)((gr1 - gr0) * g.grid_cols()), 1, 1};
  uint32_t error = 0;
  emulate::launch(
      grid,
      [&] {
        cuda::apply_section_kernel<Word>(section.data(), offsets.data(), section.size,
                                         reinterpret_cast<const Word*>(base.data()), out.data(), g,
                                         (int64_t)(gr0 * g.grid_cols()), &error);
      },
      (size_t)g.tile_rows * g.tile_cols * sizeof(Word));
  const bool same = error == 0 &&
                    !memcmp(out.data(), ft.data() + row0 * g.cols * sizeof(Word), out.size() * sizeof(Word));
  check(same, "apply kernel, " + std::to_string(g.rows) + "x" + std::to_string(g.cols) + " tiles " +
                  std::to_string(g.tile_rows) + "x" + std::to_string(g.tile_cols) + " eb=" +
                  std::to_string(sizeof(Word)) + " density " + std::to_string(density) + ", grid rows " +
                  std::to_string(gr0) + ".." + std::to_string(gr1));
}

// The apply kernel on conditioned tiles: the base tile brought into shared memory is the decode's context.
template <typename Word>
static void run_apply_conditioned(const format::TileGrid& g, uint32_t shift, uint64_t gr0, uint64_t gr1) {
  std::vector<Word> b, f;
  float_tile<Word>((uint32_t)(g.rows * g.cols), shift, 13, b, f);
  const auto* base = reinterpret_cast<const uint8_t*>(b.data());
  const Aligned section(format::encode_section(base, reinterpret_cast<const uint8_t*>(f.data()), g, (int)shift));
  const auto off = format::validate_section(section.data(), section.size, g);
  const std::vector<int64_t> offsets(off.begin(), off.end());
  uint64_t conditioned = 0;
  for (uint64_t t = 0; t < g.num_tiles(); ++t)
    conditioned += codec::load_entry(section.data(), t).codec == codec::kConditioned;
  const uint64_t row0 = gr0 * g.tile_rows, row1 = std::min<uint64_t>(gr1 * g.tile_rows, g.rows);
  std::vector<Word> out((row1 - row0) * g.cols, (Word)0x5a);
  uint32_t error = 0;
  const auto apply = [&](const std::vector<Word>& against) {
    error = 0;
    emulate::launch(
        {(unsigned)((gr1 - gr0) * g.grid_cols()), 1, 1},
        [&] {
          cuda::apply_section_kernel<Word>(section.data(), offsets.data(), section.size, against.data(), out.data(),
                                           g, (int64_t)(gr0 * g.grid_cols()), &error);
        },
        (size_t)g.tile_rows * g.tile_cols * sizeof(Word));
  };
  apply(b);
  check(conditioned > 0 && error == 0 && !memcmp(out.data(), f.data() + row0 * g.cols, out.size() * sizeof(Word)),
        "apply kernel, conditioned tiles (" + std::to_string(conditioned) + "), " + std::to_string(g.rows) + "x" +
            std::to_string(g.cols) + " eb=" + std::to_string(sizeof(Word)) + ", grid rows " + std::to_string(gr0) +
            ".." + std::to_string(gr1));
  // A stream nobody validated, broken in the middle of a tile (not in thread 0's chunk): reported, whichever
  // thread meets it.
  Aligned broken(std::vector<uint8_t>(section.data(), section.data() + section.size));
  for (uint64_t t = gr0 * g.grid_cols(); t < std::min(gr1 * g.grid_cols(), g.num_tiles()); ++t) {
    const codec::TileEntry e = codec::load_entry(broken.data(), t);
    codec::ConditionedLayout l;
    if (e.codec != codec::kConditioned || !codec::conditioned_layout(broken.data() + off[t], e, sizeof(Word), l))
      continue;
    uint8_t* middle = const_cast<uint8_t*>(l.unary) + 4ull * (l.unary_words * 3 / 4);
    for (int j = 0; j < 4; ++j) middle[j] = 0xff;  // 32 ones: longer than any code
    break;
  }
  error = 0;
  emulate::launch(
      {(unsigned)((gr1 - gr0) * g.grid_cols()), 1, 1},
      [&] {
        cuda::apply_section_kernel<Word>(broken.data(), offsets.data(), broken.size, b.data(), out.data(), g,
                                         (int64_t)(gr0 * g.grid_cols()), &error);
      },
      (size_t)g.tile_rows * g.tile_cols * sizeof(Word));
  check(error != 0, "apply kernel, a conditioned stream broken past thread 0's chunk: reported");
  // Another base (exponents moved): slots that no longer fit are refused and reported, never read past.
  std::vector<Word> other = b;
  for (auto& x : other) x ^= (Word)(1u << (shift + 3));
  apply(other);
  check(memcmp(out.data(), f.data() + row0 * g.cols, out.size() * sizeof(Word)) != 0,
        "apply kernel, conditioned tiles against another base: not the fine-tune (error word " +
            std::to_string(error) + ")");
}

// A section nobody validated: the apply kernel leaves the unreadable tile as the base, raises its error word,
// and reads nothing outside the section (under the emulation a wild read would crash this test).
static void apply_refuses_unreadable_tiles() {
  const format::TileGrid g{130, 136, 64, 64, 2};
  std::vector<uint8_t> base(g.tensor_bytes()), ft;
  std::mt19937 rng(5);
  for (auto& b : base) b = (uint8_t)rng();
  ft = base;
  for (auto& b : ft) b ^= (uint8_t)(rng() & 3);
  const Aligned section(format::encode_section(base.data(), ft.data(), g));
  const auto off = format::validate_section(section.data(), section.size, g);
  bool ok = true;
  for (int bad = 0; bad < 3; ++bad) {
    std::vector<int64_t> offsets(off.begin(), off.end());
    uint64_t len = section.size;
    if (bad == 0) offsets[4] = (int64_t)1 << 40;  // tile 4's payload far outside
    if (bad == 1) offsets[4] += 8;                // misaligned: a cp.async would fault
    if (bad == 2) len = offsets[5] - 16;          // the section cut short inside tile 4's payload
    std::vector<uint16_t> out(g.rows * g.cols);
    uint32_t error = 0;
    emulate::launch(
        {(unsigned)g.num_tiles(), 1, 1},
        [&] {
          cuda::apply_section_kernel<uint16_t>(section.data(), offsets.data(), len,
                                               reinterpret_cast<const uint16_t*>(base.data()), out.data(), g, 0,
                                               &error);
        },
        64 * 64 * 2);
    ok = ok && error == cuda::kErrorTile;
    for (uint64_t t = 0; t < g.num_tiles(); ++t) {  // unreadable tiles stay the base, the others are patched
      const bool skipped = t == 4 || (bad == 2 && t > 4);  // cut short: every later payload is outside too
      for (uint64_t r = g.tile_row0(t); r < g.tile_row0(t) + g.tile_height(t); ++r) {
        const uint64_t at = r * g.cols + g.tile_col0(t);
        ok = ok && !memcmp(&out[at], (skipped ? base : ft).data() + 2 * at, 2 * g.tile_width(t));
      }
    }
  }
  check(ok, "apply kernel: an unreadable tile (wild, misaligned or cut-short payload) is skipped and flagged");
}

static const char* kUsage =
    "usage: kernel_emulation_test [--eager] [--cta-order SEED] [--only SUBSTRING]\n"
    "  --eager           cp.async copies land at issue too (default: only at their wait_group)\n"
    "  --cta-order SEED  run each launch's CTAs in a shuffled order\n"
    "  --only SUBSTRING  run only the cases whose name contains it\n";

int main(int argc, char** argv) {
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--eager") {
      emulate::eager_landing = true;
    } else if (arg == "--cta-order" && i + 1 < argc) {
      emulate::cta_order_seed = (unsigned)std::stoul(argv[++i]);
    } else if (arg == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else {
      fputs(kUsage, stderr);
      return 2;
    }
  }
  printf("cp.async landing: %s; CTA order: %s\n", emulate::eager_landing ? "eager" : "late",
         emulate::cta_order_seed ? ("shuffled, seed " + std::to_string(emulate::cta_order_seed)).c_str() : "grid");
  const auto wanted = [&](const std::string& what) { return only.empty() || what.find(only) != std::string::npos; };
  if (wanted("apply kernel")) {
    for (double density : {0.0, 0.02, 1.0}) {
      run_apply<uint16_t>({200, 136, 64, 64, 2}, density, 0, 4);
      run_apply<uint16_t>({200, 136, 64, 64, 2}, density, 1, 4);  // the last, ragged grid row included
      run_apply<uint32_t>({100, 70, 32, 48, 4}, density, 1, 3);
      run_apply<uint8_t>({33, 65, 16, 16, 1}, density, 0, 3);
      run_apply<unsigned long long>({20, 9, 8, 8, 8}, density, 2, 3);
    }
  }
  const std::vector<Case> cases = {
      {136, 200, 5, true, false, 1, false, 1, 132, 0, "forward, bf16, staged byteplane delta, ragged N and K, M=5"},
      {136, 200, 5, true, false, 1, false, 0, 132, 1, "forward, bf16, staged sparse delta (exceptions)"},
      {136, 200, 5, false, false, 1, false, 1, 132, 2, "forward, fp16, staged delta with zero tiles"},
      {128, 520, 20, true, false, 1, false, 1, 4, 1, "forward, bf16, split-K, M=20 (two 16-row slices)"},
      {200, 264, 50, true, false, 1, false, 0, 132, 2, "forward, bf16, M=50 (four slices)"},
      {72, 136, 100, false, false, 1, false, 1, 132, 0, "forward, fp16, M=100 (two row chunks)"},
      {136, 200, 37, true, false, 3, true, 4, 132, 0, "forward, bf16, three fine-tunes + base rows, per-row bias"},
      {200, 584, 12, true, false, 4, true, 1, 4, 1, "forward, bf16, four fine-tunes (one without rows), split-K"},
      {136, 200, 9, true, true, 1, false, 0, 132, 1, "backward, bf16, staged sparse delta"},
      {520, 136, 20, false, true, 1, false, 0, 4, 0, "backward, fp16, split-K"},
      {200, 136, 45, true, true, 3, true, 0, 132, 2, "backward, bf16, three fine-tunes + base rows"},
      {64, 64, 4, true, false, 2, true, 1, 132, 1, "forward, bf16, one tile, grouped"},
  };
  Case big{128, 200, 6, true, false, 1, false, 1, 132, 3, "forward, bf16, staged, a tile too big to stage"};
  big.big_payload = true;
  Case big_bwd{128, 200, 6, false, true, 1, false, 0, 132, 3, "backward, fp16, staged, a tile too big to stage"};
  big_bwd.big_payload = true;
  std::vector<Case> all = cases;
  all.push_back(big);
  all.push_back(big_bwd);
  for (const char* dist : {"distinct", "uniform", "zipf", "skewed", "identical"})
    for (int d : {1, 4, 16})
      for (int64_t m : {(int64_t)d, (int64_t)4 * d})
        all.push_back({136, 200, m, true, false, d, true, 1, 132, d % 3,
                       std::string("grouped ") + dist + ", D=" + std::to_string(d) + ", M=" + std::to_string(m)});
  for (Case& c : all)
    if (c.what.rfind("grouped ", 0) == 0) c.dist = c.what.substr(8, c.what.find(',') - 8);
  Case corrupt_entry{136, 200, 30, true, false, 3, true, 4, 132, 0, "grouped, fine-tune 0's tile 1 entry malformed"};
  corrupt_entry.corrupt = 1;
  Case corrupt_offset{200, 136, 30, false, true, 3, true, 0, 132, 1, "backward, fine-tune 0's tile 1 offset wild"};
  corrupt_offset.corrupt = 2;
  Case staged_corrupt{136, 200, 7, true, false, 1, false, 1, 132, 0, "staged, tile 1 entry malformed"};
  staged_corrupt.corrupt = 1;
  Case inf{136, 200, 30, true, false, 3, true, 4, 132, 1, "grouped, fine-tune 0 holds an Inf weight"};
  inf.inf = true;
  Case inf_fp16{200, 136, 30, false, true, 3, true, 0, 4, 2, "backward, fp16, split-K, an Inf weight"};
  inf_fp16.inf = true;
  // Sixteen sparse tiles in one CTA: two batches of exception ranges per tile.
  all.push_back({136, 200, 64, true, false, 16, true, 17, 132, 4, "grouped, 16 sparse fine-tunes in one CTA",
                 "distinct"});
  all.push_back({136, 200, 64, true, false, 16, true, 17, 132, 5, "grouped, 16 fine-tunes, 20% sparse", "distinct"});
  // Conditioned tiles: staged (one fine-tune), grouped (patched copies beside other fine-tunes' tiles),
  // backward, split-K; payloads staged in shared memory and one decoded from global memory (M = 100 rows: no
  // staging in a grouped launch's dense path is kept for payloads within kPayloadCap).
  for (Case c : {Case{136, 200, 5, true, false, 1, false, 1, 132, 6, "conditioned, staged, bf16"},
                 Case{136, 200, 9, false, false, 1, false, 1, 4, 6, "conditioned, staged, fp16, split-K"},
                 Case{200, 136, 9, true, true, 1, false, 0, 132, 6, "conditioned, staged, backward"},
                 Case{136, 200, 37, true, false, 3, true, 4, 132, 6, "conditioned, grouped, three fine-tunes"},
                 Case{200, 584, 12, false, false, 4, true, 1, 4, 6, "conditioned, grouped, fp16, split-K"},
                 Case{200, 136, 45, true, true, 3, true, 0, 132, 6, "conditioned, grouped, backward"}}) {
    c.conditioned = true;
    all.push_back(c);
  }
  Case bad_ids{136, 200, 20, true, false, 3, true, 4, 132, 1, "grouped, two rows' ids out of range"};
  bad_ids.bad_ids = true;
  for (const Case& c : {corrupt_entry, corrupt_offset, staged_corrupt, inf, inf_fp16, bad_ids}) all.push_back(c);
  for (const Case& c : all) {
    if (!wanted(c.what)) continue;
    if (c.bf16) {
      run<emulate::bf16>(c);
    } else {
      run<emulate::fp16>(c);
    }
  }
  if (wanted("batch invariance")) {
    batch_invariance<emulate::bf16>(false, 8);
    batch_invariance<emulate::fp16>(false, 8);
    batch_invariance<emulate::bf16>(true, 8);
    batch_invariance<emulate::bf16>(false, 2);
    batch_invariance<emulate::fp16>(true, 2);
  }
  if (wanted("split order")) {
    split_order_invariance<emulate::bf16>(false);
    split_order_invariance<emulate::fp16>(true);
  }
  if (wanted("slot table")) {
    slot_table_cases<emulate::bf16>(false);
    slot_table_cases<emulate::fp16>(true);
  }
  if (wanted("apply kernel")) {
    apply_refuses_unreadable_tiles();
    run_apply_conditioned<uint16_t>({200, 136, 64, 64, 2}, 7, 0, 4);
    run_apply_conditioned<uint16_t>({200, 136, 64, 64, 2}, 10, 1, 4);
    run_apply_conditioned<uint32_t>({100, 70, 64, 64, 4}, 23, 0, 2);
  }
  const fused::LaunchPlan empty = fused::plan_launch(5, 128, 0, 132);  // K = 0: no division by zero
  check(empty.splits == 1 && empty.tiles_per_split >= 1 && empty.red_tiles == 0, "plan_launch with K = 0");
  const fused::LaunchPlan p16 = fused::plan_launch(16, 4096, 4096, 132), p64 = fused::plan_launch(64, 4096, 4096, 132);
  check(p16.splits == p64.splits && p16.tiles_per_split == p64.tiles_per_split,
        "plan_launch: the split of the reduction does not depend on the batch size");
  // The splits docs/kernels.md states and bench/perf_model.py mirrors (tests/test_perf_model.py: the same).
  check(p16.splits == 6 && fused::plan_launch(1, 14336, 4096, 132).splits == 5 &&
            fused::plan_launch(1, 4096, 14336, 132).splits == 6,
        "plan_launch on 132 SMs: 4096x4096 6 splits, 14336x4096 5, 4096x14336 6");
  const fused::LaunchPlan prefill = fused::plan_launch(8192, 14336, 4096, 132);
  check(prefill.splits == 5 && prefill.grid_splits == 1 && fused::plan_launch(16, 14336, 4096, 132).grid_splits == 5,
        "plan_launch: at M = 8192 each CTA runs its splits itself (no fp32 partial sums); at M = 16 in 5 CTAs");
  return report();
}
