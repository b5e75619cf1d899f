// The fused CPU kernel's body (fused_linear.h says what it does), compiled once per instruction set:
// fused_linear.cpp includes it inside a namespace per set, between `#pragma GCC target` lines, having
// defined
//   XG_LANES     floats per vector: 16 (AVX-512), 8 (AVX2), 4 (portable)
//   XG_BF16_DOT  1: bf16 weights meet bf16 x in vdpbf16ps (AVX512-BF16); 0: they are widened to fp32
//   XG_F16C      1: fp16 vectors are widened by F16C; 0: lane by lane
// and included what it uses (ATen/Parallel.h, c10/util/Half.h, the codec and grid headers, immintrin.h on
// x86). No include guard: being included once per instruction set is its purpose.
//
// The dot products run along K: a vector accumulator per (weight row, x row) pair holds partial sums of
// XG_LANES columns, and a run's accumulators are folded into one vector of sums at the run's end (a
// transposing reduction: one add per accumulator). Register blocks of NR weight rows x MR x rows with
// NR * MR = XG_LANES accumulators: each weight chunk loaded (and XOR-patched) once serves MR rows of x.

constexpr uint32_t kLanes = XG_LANES;
using VF = float __attribute__((vector_size(4 * XG_LANES)));
using VU32 = uint32_t __attribute__((vector_size(4 * XG_LANES)));
using VU16 = uint16_t __attribute__((vector_size(2 * XG_LANES)));

template <typename V>
inline V load_vec(const void* p) {
  V v;
  memcpy(&v, p, sizeof v);
  return v;
}

inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// How a chunk of weight words meets a chunk of x: Word (the weight's bits), X (x's element), kChunk
// (elements a step), weights<kXor>() (a chunk of base words, XORed with the delta words at d), xs() (a
// chunk of x), fma() (acc += the chunks' products, lane-wise partial sums) and scalar conversions. Float x
// for every weight widened to fp32:
struct FloatX {
  using X = float;
  using WV = VF;
  using XV = VF;
  static constexpr uint32_t kChunk = kLanes;
  static XV xs(const X* x) { return load_vec<VF>(x); }
  static void fma(VF& acc, const WV& w, const XV& x) { acc += w * x; }
  static float xval(X x) { return x; }
};

struct Fp32Math : FloatX {
  using Word = uint32_t;
  template <bool kXor>
  static WV weights(const Word* a, const Word* d) {
    VU32 w = load_vec<VU32>(a);
    if (kXor) w ^= load_vec<VU32>(d);
    return (VF)w;
  }
  static float weight(Word w) { return bits_to_float(w); }
};

struct Bf16Math : FloatX {  // a bf16 is the top half of an fp32
  using Word = uint16_t;
  template <bool kXor>
  static WV weights(const Word* a, const Word* d) {
    VU16 h = load_vec<VU16>(a);
    if (kXor) h ^= load_vec<VU16>(d);
    return (VF)(__builtin_convertvector(h, VU32) << 16);
  }
  static float weight(Word w) { return bits_to_float((uint32_t)w << 16); }
};

struct Fp16Math : FloatX {
  using Word = uint16_t;
  template <bool kXor>
  static WV weights(const Word* a, const Word* d) {
    VU16 h = load_vec<VU16>(a);
    if (kXor) h ^= load_vec<VU16>(d);
#if XG_F16C && XG_LANES == 16
    return (VF)_mm512_maskz_cvtph_ps((__mmask16)0xffff, (__m256i)h);  // maskz: no "undefined" operand
#elif XG_F16C && XG_LANES == 8
    return (VF)_mm256_cvtph_ps((__m128i)h);
#else
    VF f;
    for (uint32_t l = 0; l < kLanes; ++l) f[l] = c10::detail::fp16_ieee_to_fp32_value(h[l]);
    return f;
#endif
  }
  static float weight(Word w) { return c10::detail::fp16_ieee_to_fp32_value(w); }
};

#if XG_BF16_DOT
// bf16 weights and bf16 x, two columns per fp32 lane: vdpbf16ps adds both products of a lane's pair to it.
// Its products are exact and its sums rounded to fp32, as widening would (denormal inputs count as zero).
using VH = uint16_t __attribute__((vector_size(4 * XG_LANES)));
struct Bf16DotMath {
  using Word = uint16_t;
  using X = uint16_t;
  using WV = VH;
  using XV = VH;
  static constexpr uint32_t kChunk = 2 * kLanes;
  template <bool kXor>
  static WV weights(const Word* a, const Word* d) {
    VH w = load_vec<VH>(a);
    if (kXor) w ^= load_vec<VH>(d);
    return w;
  }
  static XV xs(const X* x) { return load_vec<VH>(x); }
  static void fma(VF& acc, const WV& w, const XV& x) {
    acc = (VF)_mm512_dpbf16_ps((__m512)acc, (__m512bh)w, (__m512bh)x);
  }
  static float weight(Word w) { return bits_to_float((uint32_t)w << 16); }
  static float xval(X x) { return bits_to_float((uint32_t)x << 16); }
};
#endif

// ---- Folding accumulators into sums --------------------------------------------------------------------
// fold<H>(a, b): lanes in blocks of 2H; each block's low H lanes get a's block folded in half (lane + lane
// H above), its high H lanes b's. Folding vectors p and p + H for H = L/2, L/4, ..., 1 leaves lane q of
// vector 0 holding the whole sum of accumulator q.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define XG_HAS_SHUFFLEVECTOR 1
#endif
#endif

#ifdef XG_HAS_SHUFFLEVECTOR
constexpr int fold_index(uint32_t h, uint32_t i, bool high) {
  const uint32_t blk = i / (2 * h) * (2 * h), off = i % (2 * h);
  if (off < h) return (int)(blk + off + (high ? h : 0));  // from a
  return (int)(kLanes + blk + off - (high ? 0 : h));       // from b
}
template <uint32_t H, size_t... I>
inline __attribute__((always_inline)) VF fold(VF a, VF b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, fold_index(H, I, false)...) +
         __builtin_shufflevector(a, b, fold_index(H, I, true)...);
}
template <uint32_t H>
inline __attribute__((always_inline)) void fold_levels(VF* v) {
#pragma GCC unroll 16
  for (uint32_t p = 0; p < H; ++p) v[p] = fold<H>(v[p], v[p + H], std::make_index_sequence<kLanes>());
  if constexpr (H > 1) fold_levels<H / 2>(v);
}
#endif

inline float lane_sum(VF v) {
  float s = 0.f;
  for (uint32_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// s[q] = the sum of the lanes of acc[q], for Q accumulators (fewer than kLanes are folded with zeros).
template <int Q>
inline __attribute__((always_inline)) void sums_of(const VF* acc, float* s) {
#ifdef XG_HAS_SHUFFLEVECTOR
  if constexpr (Q > 1 && Q <= (int)kLanes) {
    VF v[kLanes];
#pragma GCC unroll 16
    for (uint32_t q = 0; q < kLanes; ++q) v[q] = (int)q < Q ? acc[q] : VF{};
    fold_levels<kLanes / 2>(v);
    memcpy(s, &v[0], Q * sizeof(float));
    return;
  }
#endif
  for (int q = 0; q < Q; ++q) s[q] = lane_sum(acc[q]);
}

// ---- The register block -----------------------------------------------------------------------------------
// Everything from here to the block is forced inline, so that its accumulators live in registers.
#define XG_INLINE inline __attribute__((always_inline))

// One chunk of columns: acc[j * NR + i] += W[i] x[j] lane-wise, each weight chunk loaded (and patched) once.
template <class M, int NR, int MR, bool kXor>
XG_INLINE void chunk_step(VF* acc, const typename M::Word* a, size_t sa, const typename M::Word* d, size_t sd,
                          const typename M::X* const* x, uint32_t xoff) {
  typename M::XV xv[MR];
#pragma GCC unroll 16
  for (int j = 0; j < MR; ++j) xv[j] = M::xs(x[j] + xoff);
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) {
    const typename M::WV wv = M::template weights<kXor>(a + i * sa, kXor ? d + i * sd : nullptr);
#pragma GCC unroll 16
    for (int j = 0; j < MR; ++j) M::fma(acc[j * NR + i], wv, xv[j]);
  }
}

// y[j][i] += sum over c < w of W[i][c] x[j][c], for i < NR, j < MR: W[i] = a[i * sa ..] (XOR d[i * sd ..]
// when kXor), x[j] and y[j] row pointers (at the tile's first column and the block's first output feature).
template <class M, int NR, int MR, bool kXor>
XG_INLINE void block(const typename M::Word* a, size_t sa, const typename M::Word* d, size_t sd, uint32_t w,
                     const typename M::X* const* x, float* const* y) {
  using Word = typename M::Word;
  using X = typename M::X;
  VF acc[NR * MR];
#pragma GCC unroll 16
  for (int q = 0; q < NR * MR; ++q) acc[q] = VF{};
  uint32_t c = 0;
  for (; c + M::kChunk <= w; c += M::kChunk)
    chunk_step<M, NR, MR, kXor>(acc, a + c, sa, kXor ? d + c : nullptr, sd, x, c);
  if (c < w) {  // the run's last columns, short of a chunk (a ragged tile), zero-padded to one
    const uint32_t n = w - c;
    Word wt[NR][M::kChunk], dt[NR][M::kChunk];
    X xt[MR][M::kChunk];
    const X* xtp[MR];
    memset(wt, 0, sizeof wt);  // here, not hoisted into every call as an initializer may be
    memset(dt, 0, sizeof dt);
    memset(xt, 0, sizeof xt);
    for (int i = 0; i < NR; ++i) {
      memcpy(wt[i], a + i * sa + c, n * sizeof(Word));
      if (kXor) memcpy(dt[i], d + i * sd + c, n * sizeof(Word));
    }
    for (int j = 0; j < MR; ++j) {
      memcpy(xt[j], x[j] + c, n * sizeof(X));
      xtp[j] = xt[j];
    }
    chunk_step<M, NR, MR, kXor>(acc, &wt[0][0], M::kChunk, &dt[0][0], M::kChunk, xtp, 0);
  }
  float s[NR * MR];
  sums_of<NR * MR>(acc, s);
#pragma GCC unroll 16
  for (int j = 0; j < MR; ++j)
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) y[j][i] += s[j * NR + i];
}

// ---- The pass over the weight ---------------------------------------------------------------------------
// A grid row (64 output features) is worked in bands of kBandCols columns along K. First the band is
// planned, tile by tile, into runs of adjacent tiles served alike:
//   base runs     the rows the base tiles serve as they are: the base's rows, zero tiles, sparse tiles (their
//                 corrections added after the band);
//   delta runs    one fine-tune's tiles decoded into its band matrix as delta words, XORed onto the base
//                 words in registers as they stream;
//   decoded runs  one fine-tune's conditioned tiles decoded whole into its band matrix (over a copy of the
//                 base: their context).
// Then each run is multiplied NR weight rows at a time along its whole width: one register block and one
// fold of its accumulators per run and NR rows, each weight row streaming along K (NR streams the
// prefetchers follow, not a tile's 64 rows side by side, each in its own page).
constexpr uint32_t kBandCols = 1024;

// A sparse tile is served as corrections to the base's products when its changed elements times the rows
// that use it are at most this share of the tile's elements: a correction costs about 20 cycles a row, a
// tile's decode and delta run about as much as 64 of them (measured on sparse deltas). Other sparse tiles
// are decoded (zeros and their few words) and run as delta words.
constexpr uint32_t kCorrectionShare = 64;

// The next band's payloads are prefetched in slices, one every this many weight rows.
constexpr uint32_t kPrefetchRows = 16;

enum RunKind : uint8_t { kBaseRun, kDeltaRun, kDecodedRun };

struct Run {
  RunKind kind;
  uint64_t c0;        // its first column in the weight
  uint32_t w;         // its width
  size_t group;       // delta and decoded runs: whose (its band matrix, its rows)
  size_t row0, rows;  // base runs: rows run_rows[row0, row0 + rows)
};

struct Correction {
  uint32_t r, c;
  float diff;  // patched weight - base weight
};

// NR weight rows (fewer, `nr`, on a ragged edge: one at a time) against `rows` rows of x (indices m[]): a =
// the first weight row (stride sa), d = its delta words (stride sd) when kXor; x (row stride k) and y at the
// run's first column and the block's first output feature. Rows of x 4 at a time, then 2, then 1.
template <class M, int NR, bool kXor>
inline void run_product(const typename M::Word* a, size_t sa, const typename M::Word* d, size_t sd, uint32_t nr,
                        uint32_t w, const int64_t* m, size_t rows, const typename M::X* x, size_t k, float* y,
                        size_t n) {
  const typename M::X* xp[4];
  float* yp[4];
  size_t j = 0;
  auto run = [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    for (int q = 0; q < MR; ++q) {
      xp[q] = x + (size_t)m[j + q] * k;
      yp[q] = y + (size_t)m[j + q] * n;
    }
    j += MR;
    if (nr == (uint32_t)NR) return block<M, NR, MR, kXor>(a, sa, d, sd, w, xp, yp);
    for (uint32_t i = 0; i < nr; ++i) {
      float* yi[MR];
      for (int q = 0; q < MR; ++q) yi[q] = yp[q] + i;
      block<M, 1, MR, kXor>(a + i * sa, sa, kXor ? d + i * sd : nullptr, sd, w, xp, yi);
    }
  };
  while (rows - j >= 4) run(std::integral_constant<int, 4>());
  if (rows - j >= 2) run(std::integral_constant<int, 2>());
  if (rows - j == 1) run(std::integral_constant<int, 1>());
}

// Appends a sparse tile's corrections (base tile `bt`, row stride k); false when an element, its patch or
// their difference is not finite (base x x plus a difference would not give patch x x), or when positions
// do not increase (a repeated position is two XORs, not two differences against the base).
template <class M>
inline bool sparse_corrections(const uint8_t* payload, codec::TileEntry e, uint32_t elems, uint32_t w,
                               const typename M::Word* bt, size_t k, std::vector<Correction>& out) {
  using Word = typename M::Word;
  const bool pow2 = (w & (w - 1)) == 0;  // tile widths are powers of two but on the ragged edge
  const uint32_t log2w = pow2 ? (uint32_t)__builtin_ctz(w) : 0;
  int64_t last = -1;
  for (uint32_t q = 0; q < e.n_exc; ++q) {
    const uint32_t i = codec::exception_position(payload, e, elems, q);
    if (i >= elems) continue;
    if ((int64_t)i <= last) return false;
    last = i;
    const uint32_t r = pow2 ? i >> log2w : i / w, c = pow2 ? i & (w - 1) : i % w;
    const Word b = bt[r * k + c];
    const Word f = (Word)(b ^ (Word)codec::exception_high_bits(payload, e, elems, sizeof(Word), q));
    const float bf = M::weight(b), ff = M::weight(f), diff = ff - bf;
    if (!std::isfinite(bf) || !std::isfinite(ff) || !std::isfinite(diff)) return false;
    out.push_back({r, c, diff});
  }
  return true;
}

// Grid rows [gr0, gr1) of the weight: y[m][n] += x[m] . W_group(m)[n] for their output features n. Returns
// false when a sparse tile could not be served as corrections (an element not finite): those rows' sums
// are then wrong and the caller computes the call another way.
template <class M>
bool fused_grid_rows(const FusedProblem& p, uint64_t gr0, uint64_t gr1) {
  using Word = typename M::Word;
  using X = typename M::X;
  const format::TileGrid& g = p.grid;
  const size_t k = g.cols, n = g.rows, n_groups = p.groups.size(), xk = p.x_stride;
  const uint64_t band_tiles = std::max<uint64_t>(1, kBandCols / g.tile_cols);
  // A band matrix's rows, a cache line more than the band apart: a power of two apart they would share L1 sets.
  const uint64_t band_w = band_tiles * g.tile_cols + 64 / sizeof(Word);
  const Word* base = static_cast<const Word*>(p.base);
  const X* x = static_cast<const X*>(p.x);
  std::vector<std::vector<Word>> matrix(n_groups);  // per group: its band matrix, tile_rows x band_w words
  std::vector<Run> runs;
  std::vector<int64_t> run_rows;
  std::vector<size_t> last_run(n_groups), as_base, last_as_base;
  std::vector<std::pair<size_t, uint64_t>> corrected;  // (group, grid column): sparse tiles to correct
  std::vector<Correction> corrections;
  std::vector<std::pair<const uint8_t*, uint64_t>> prefetch;  // the next band's payload bytes, per fine-tune
  bool exact = true;
  for (uint64_t gr = gr0; gr < gr1; ++gr) {
    const uint64_t r0 = gr * g.tile_rows;
    const uint32_t h = g.tile_height(gr * g.grid_cols());
    const Word* band_base = base + r0 * k;
    for (uint64_t b0 = 0; b0 < g.grid_cols(); b0 += band_tiles) {
      const uint64_t b1 = std::min(b0 + band_tiles, g.grid_cols());
      // 1. Plan the band, decoding as it goes.
      runs.clear();
      run_rows.clear();
      corrected.clear();
      last_as_base.clear();
      size_t base_run = SIZE_MAX;
      std::fill(last_run.begin(), last_run.end(), SIZE_MAX);
      for (uint64_t gc = b0; gc < b1; ++gc) {
        const uint64_t t = gr * g.grid_cols() + gc, c0 = g.tile_col0(t), col = c0 - b0 * g.tile_cols;
        const uint32_t w = g.tile_width(t), elems = h * w;
        as_base.clear();
        for (size_t gi = 0; gi < n_groups; ++gi) {
          const FusedGroup& grp = p.groups[gi];
          if (grp.section == nullptr) {
            as_base.push_back(gi);
            continue;
          }
          const codec::TileEntry e = codec::load_entry(grp.section, t);
          RunKind kind = kDeltaRun;
          if (e.codec == codec::kZero) {
            as_base.push_back(gi);
            continue;
          }
          if (e.codec == codec::kSparse && (uint64_t)e.n_exc * grp.rows.size() * kCorrectionShare <= elems) {
            corrected.emplace_back(gi, gc);
            as_base.push_back(gi);
            continue;
          }
          std::vector<Word>& mat = matrix[gi];
          if (mat.empty()) mat.resize((size_t)g.tile_rows * band_w);
          Word* words = mat.data() + col;
          const uint8_t* payload = grp.section + grp.offsets[t];
          if (e.codec == codec::kConditioned) {  // decoded in place over a copy of the base tile: its context
            kind = kDecodedRun;
            for (uint32_t r = 0; r < h; ++r) memcpy(words + r * band_w, band_base + r * k + c0, w * sizeof(Word));
            if (!codec::decode_conditioned<Word>(payload, e, elems, w, words, (uint32_t)band_w))
              throw format::FormatError("fine-tune " + std::to_string(grp.finetune) + ": tile " +
                                        std::to_string(t) +
                                        " does not decode against this base: its slots run past its payload, "
                                        "or its header, stream or escapes are malformed");
          } else {  // byteplane, raw, and sparse tiles with too many changes to correct
            codec::decode_tile_rows<Word>(payload, e, elems, w, words, (uint32_t)band_w);
          }
          size_t& last = last_run[gi];
          if (last != SIZE_MAX && runs[last].kind == kind && runs[last].c0 + runs[last].w == c0) {
            runs[last].w += w;
          } else {
            last = runs.size();
            runs.push_back({kind, c0, w, gi, 0, 0});
          }
        }
        if (as_base.empty()) continue;
        if (base_run != SIZE_MAX && as_base == last_as_base && runs[base_run].c0 + runs[base_run].w == c0) {
          runs[base_run].w += w;
          continue;
        }
        base_run = runs.size();
        runs.push_back({kBaseRun, c0, w, 0, run_rows.size(), 0});
        for (const size_t gi : as_base)
          run_rows.insert(run_rows.end(), p.groups[gi].rows.begin(), p.groups[gi].rows.end());
        runs.back().rows = run_rows.size() - runs.back().row0;
        last_as_base.swap(as_base);
      }
      // 2. The products, NR weight rows at a time along each run: as many as make kLanes accumulators with
      //    the widest block of x rows the band's runs use.
      size_t widest = 0;
      for (const Run& run : runs)
        widest = std::max(widest, run.kind == kBaseRun ? run.rows : p.groups[run.group].rows.size());
      // Meanwhile the next band's delta payloads are prefetched, a slice per step, so that their reads
      // overlap the base's instead of following them.
      uint64_t next_gr = gr, next_b0 = b0 + band_tiles;
      if (next_b0 >= g.grid_cols()) {
        next_gr = gr + 1;
        next_b0 = 0;
      }
      prefetch.clear();
      if (next_gr < gr1) {
        const uint64_t t0 = next_gr * g.grid_cols() + next_b0;
        const uint64_t t1 = next_gr * g.grid_cols() + std::min(next_b0 + band_tiles, g.grid_cols());
        for (const FusedGroup& grp : p.groups) {
          if (grp.section == nullptr) continue;
          // Payloads in tile order; a section only bounds-checked may not be: then nothing is prefetched.
          const uint64_t from = grp.offsets[t0];
          const uint64_t to = t1 < g.num_tiles() ? grp.offsets[t1] : grp.section_bytes;
          if (from < to && to <= grp.section_bytes) prefetch.push_back({grp.section + from, to - from});
        }
      }
      auto prefetch_slice = [&](uint32_t i) {  // the part of each range for weight rows [i, i + step)
        for (const auto& [at, bytes] : prefetch) {
          const uint64_t from = bytes * i / h, to = bytes * std::min<uint64_t>(h, i + kPrefetchRows) / h;
          for (uint64_t b = from & ~(uint64_t)63; b < to; b += 64) __builtin_prefetch(at + b, 0, 2);
        }
      };
      auto products = [&](auto nr_tag) {
        constexpr int NR = decltype(nr_tag)::value;
        for (uint32_t i = 0; i < h; i += NR) {
          const uint32_t nr = std::min<uint32_t>(NR, h - i);
          float* y = p.y + r0 + i;
          if (i % kPrefetchRows == 0) prefetch_slice(i);
          for (const Run& run : runs) {
            const Word* a = band_base + i * k + run.c0;
            const X* xr = x + run.c0;
            if (run.kind == kBaseRun) {
              run_product<M, NR, false>(a, k, nullptr, 0, nr, run.w, run_rows.data() + run.row0, run.rows, xr, xk,
                                        y, n);
              continue;
            }
            const std::vector<int64_t>& rows = p.groups[run.group].rows;
            const Word* words = matrix[run.group].data() + i * band_w + (run.c0 - b0 * g.tile_cols);
            if (run.kind == kDeltaRun)
              run_product<M, NR, true>(a, k, words, band_w, nr, run.w, rows.data(), rows.size(), xr, xk, y, n);
            else
              run_product<M, NR, false>(words, band_w, nullptr, 0, nr, run.w, rows.data(), rows.size(), xr, xk, y,
                                        n);
          }
        }
      };
      if (widest >= 4)
        products(std::integral_constant<int, std::max<int>(1, (int)kLanes / 4)>());
      else if (widest >= 2)
        products(std::integral_constant<int, (int)kLanes / 2>());
      else
        products(std::integral_constant<int, (int)kLanes>());
      // 3. The sparse tiles' corrections, the band's base words still in cache.
      for (const auto& [gi, gc] : corrected) {
        const FusedGroup& grp = p.groups[gi];
        const uint64_t t = gr * g.grid_cols() + gc, c0 = g.tile_col0(t);
        const codec::TileEntry e = codec::load_entry(grp.section, t);
        const uint32_t w = g.tile_width(t);
        corrections.clear();
        if (!sparse_corrections<M>(grp.section + grp.offsets[t], e, h * w, w, band_base + c0, k, corrections)) {
          exact = false;
          continue;
        }
        for (const int64_t m : grp.rows) {
          float* yr = p.y + (size_t)m * n + r0;
          const X* xr = x + (size_t)m * xk + c0;
          for (const Correction& cr : corrections) yr[cr.r] += cr.diff * M::xval(xr[cr.c]);
        }
      }
    }
  }
  return exact;
}

// All grid rows on ATen's threads; false as fused_grid_rows.
template <class M>
bool fused_run(const FusedProblem& p) {
  std::atomic<bool> exact{true};
  at::parallel_for(0, (int64_t)p.grid.grid_rows(), 1, [&](int64_t begin, int64_t end) {
    if (!fused_grid_rows<M>(p, (uint64_t)begin, (uint64_t)end)) exact = false;
  });
  return exact;
}

// The entry point of this instruction set: x is float, or bf16 for bf16 weights on the vdpbf16ps path.
// False as fused_grid_rows.
inline bool run(const FusedProblem& p) {
  switch (p.dtype) {
    case at::kFloat: return fused_run<Fp32Math>(p);
    case at::kHalf: return fused_run<Fp16Math>(p);
    case at::kBFloat16:
#if XG_BF16_DOT
      return fused_run<Bf16DotMath>(p);
#else
      return fused_run<Bf16Math>(p);
#endif
    default: TORCH_CHECK(false, "xorgemm: the fused CPU kernel does not take ", p.dtype, " weights");
  }
}
