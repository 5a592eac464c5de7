// The outlier product of LLM.int8() when there are more than a few outlier columns:
//   product[m, n] = sum_j x_outlier[m, j] * w_outlier(n, j),   w_outlier(n, j) = float(b[n, col_j]) * col_scale[n]
// Real models have many outlier columns (Qwen2.5: 6.5% of a layer's input columns on average, 70% in its worst
// down_proj), so this product is a GEMM in its own right. Work is split into strips of 32 weight rows, each computed
// whole (every token, every outlier column) by one thread, so results do not depend on the thread count.
//
// - AMX-BF16 (Sapphire Rapids and later), fused into the AMX int8 GEMM (gemm_amx.cpp calls outlier_block for each
//   32 x 32 block it finishes): int8 weights are exact in bf16, and an fp32 activation is the exact sum of three bf16
//   numbers (its mantissa in 8-bit pieces; one piece for bf16 inputs, two for fp16), so TDPBF16PS, which forms exact
//   products and accumulates in fp32, computes the same sum as an fp32 FMA loop up to summation order. The
//   activations are split once per call into B tiles; each block of weight rows gathers its outlier weights once as
//   A tiles. col_scale[n] is applied to the finished sum (the bf16 operands must stay exact), which moves the result
//   by an fp32 rounding at most. Activations so large that |x| * 127 * J could overflow fp32 (above kBf16MaxAbs), or
//   so small that a bf16 piece would be subnormal (which AMX flushes to zero), make prepare_amx_outliers decline.
// - AVX512-BF16 (AMD Zen 4/5; Intel Sapphire Rapids and later when the AMX GEMM does not run), fused into the packed
//   VNNI GEMM the same way (PackedOutliers, prepared here): VDPBF16PS multiplies pairs of bf16 numbers exactly and
//   accumulates in fp32, 32 multiply-adds per instruction against 16 for an fp32 FMA; the same pieces and range.
// - Otherwise (AVX-512 without BF16, AVX2, values out of range) outlier_product computes it up front with fp32 FMA
//   register tiles (AVX-512: 8 tokens x 32 rows; AVX2: 4 x 16) over dequantized weights, walking the outlier columns
//   in chunks whose gathered weights fit in L1, for the epilogue to add.
// Not BLAS: a BLAS splits its work, and its fp32 sums, by the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "hf_int8/cpu_avx512.h"
#include "hf_int8/cpu_kernels.h"

#if HF_INT8_X86
#include <immintrin.h>
#endif

namespace hf_int8::cpu {

namespace {

constexpr int64_t kStripRows = 32;  // weight rows per work item (the product is padded to a multiple of this)
constexpr int64_t kJChunk = 256;    // FMA path: outlier columns per pass over the tokens (table: 32 KiB, in L1)

struct Problem {
  const float* x;  // [M, J]: the outlier columns of the activations
  int64_t M, J;
  const int8_t* b;  // [N, ldb]: int8 weight rows
  int64_t N, ldb;
  int64_t K;            // columns of b
  const int64_t* cols;  // [J]: the outlier column indices into K (ascending)
  const float* scale;   // [N]
  float* out;           // [M, ldo], ldo >= round_up(N, 32)
  int64_t ldo;
};

// ---------------------------------------------------------------------------------------------------------------
// FMA path. table[j - j0][c] = w_outlier(n0 + c, j) for j in [j0, j1) (0 past N).
// ---------------------------------------------------------------------------------------------------------------
void gather_chunk(const Problem& g, int64_t n0, int64_t j0, int64_t j1, float* table) {
  for (int64_t c = 0; c < kStripRows; ++c) {
    const int64_t n = n0 + c;
    if (n >= g.N) {
      for (int64_t j = j0; j < j1; ++j) table[(j - j0) * kStripRows + c] = 0.0f;
      continue;
    }
    const int8_t* row = g.b + n * g.ldb;
    const float scale = g.scale[n];
    for (int64_t j = j0; j < j1; ++j) table[(j - j0) * kStripRows + c] = static_cast<float>(row[g.cols[j]]) * scale;
  }
}

using TileFn = void (*)(const Problem&, int64_t m0, int64_t rows, int64_t n0, int64_t j0, int64_t j1,
                        const float* table);

// Scalar version, any CPU: out[m0 .. m0 + rows, n0 .. n0 + 32) (+)= x[., j0 .. j1) @ table.
void tile_generic(const Problem& g, int64_t m0, int64_t rows, int64_t n0, int64_t j0, int64_t j1, const float* table) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0;
    const float* xr = g.x + (m0 + r) * g.J;
    for (int64_t c = 0; c < kStripRows; ++c) {
      float acc = j0 == 0 ? 0.0f : o[c];
      for (int64_t j = j0; j < j1; ++j) acc = std::fma(xr[j], table[(j - j0) * kStripRows + c], acc);
      o[c] = acc;
    }
  }
}

#if HF_INT8_X86
template <int R>
HF_INT8_TARGET_AVX512 void tile_avx512(const Problem& g, int64_t m0, int64_t n0, int64_t j0, int64_t j1,
                                       const float* table) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0;
    acc[r][0] = j0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(o);
    acc[r][1] = j0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(o + 16);
  }
  const float* x = g.x + m0 * g.J;
  for (int64_t j = j0; j < j1; ++j) {
    const __m512 w0 = _mm512_loadu_ps(table + (j - j0) * kStripRows);
    const __m512 w1 = _mm512_loadu_ps(table + (j - j0) * kStripRows + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * g.J + j]);
      acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0;
    _mm512_storeu_ps(o, acc[r][0]);
    _mm512_storeu_ps(o + 16, acc[r][1]);
  }
}

void tile_avx512_rows(const Problem& g, int64_t m0, int64_t rows, int64_t n0, int64_t j0, int64_t j1,
                      const float* table) {
  switch (rows) {
    case 8: tile_avx512<8>(g, m0, n0, j0, j1, table); break;
    case 7: tile_avx512<7>(g, m0, n0, j0, j1, table); break;
    case 6: tile_avx512<6>(g, m0, n0, j0, j1, table); break;
    case 5: tile_avx512<5>(g, m0, n0, j0, j1, table); break;
    case 4: tile_avx512<4>(g, m0, n0, j0, j1, table); break;
    case 3: tile_avx512<3>(g, m0, n0, j0, j1, table); break;
    case 2: tile_avx512<2>(g, m0, n0, j0, j1, table); break;
    default: tile_avx512<1>(g, m0, n0, j0, j1, table); break;
  }
}

// 16 of the strip's 32 rows (columns c0 .. c0 + 15 of the table), up to 4 tokens.
template <int R>
HF_INT8_TARGET_AVX2 void tile_avx2(const Problem& g, int64_t m0, int64_t n0, int64_t c0, int64_t j0, int64_t j1,
                                   const float* table) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0 + c0;
    acc[r][0] = j0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(o);
    acc[r][1] = j0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(o + 8);
  }
  const float* x = g.x + m0 * g.J;
  for (int64_t j = j0; j < j1; ++j) {
    const __m256 w0 = _mm256_loadu_ps(table + (j - j0) * kStripRows + c0);
    const __m256 w1 = _mm256_loadu_ps(table + (j - j0) * kStripRows + c0 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_set1_ps(x[r * g.J + j]);
      acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0 + c0;
    _mm256_storeu_ps(o, acc[r][0]);
    _mm256_storeu_ps(o + 8, acc[r][1]);
  }
}

void tile_avx2_rows(const Problem& g, int64_t m0, int64_t rows, int64_t n0, int64_t j0, int64_t j1,
                    const float* table) {
  for (int64_t c0 = 0; c0 < kStripRows; c0 += 16) {
    switch (rows) {
      case 4: tile_avx2<4>(g, m0, n0, c0, j0, j1, table); break;
      case 3: tile_avx2<3>(g, m0, n0, c0, j0, j1, table); break;
      case 2: tile_avx2<2>(g, m0, n0, c0, j0, j1, table); break;
      default: tile_avx2<1>(g, m0, n0, c0, j0, j1, table); break;
    }
  }
}
#endif  // HF_INT8_X86

void product_fma(Isa isa, const Problem& g) {
  int64_t rows_per_tile = 8;
  TileFn tile = tile_generic;
#if HF_INT8_X86
  if (isa >= Isa::kAvx512Vnni) {
    tile = tile_avx512_rows;
  } else if (isa >= Isa::kAvx2) {
    tile = tile_avx2_rows;
    rows_per_tile = 4;
  }
#endif
  const int64_t strips = ceil_div(g.N, kStripRows);
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> table(static_cast<size_t>(kJChunk * kStripRows));
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n0 = s * kStripRows;
      for (int64_t j0 = 0; j0 < g.J; j0 += kJChunk) {
        const int64_t j1 = std::min(g.J, j0 + kJChunk);
        gather_chunk(g, n0, j0, j1, table.data());
        for (int64_t m0 = 0; m0 < g.M; m0 += rows_per_tile) {
          tile(g, m0, std::min(rows_per_tile, g.M - m0), n0, j0, j1, table.data());
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// AMX-BF16 path.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kMaxPieces = 3;      // bf16 pieces of an fp32 value (8 + 8 + 8 mantissa bits)
constexpr int64_t kAmxJStep = 32;  // outlier columns per TDPBF16PS (16 pairs)
constexpr int64_t kAmxRows = 32;   // tokens per block (two A tiles)
// Activation magnitudes the bf16 paths (AMX, AVX512-BF16) take: below kBf16MaxAbs, |x| * 127 summed over any J that
// fits in memory stays far from fp32 overflow; from kBf16MinAbs up, every bf16 piece of x (down to 2^-16 of it) is a
// normal number, and so is every product and nonzero partial sum (multiples of the smallest piece's last bit): AMX and
// VDPBF16PS flush subnormals to zero, so this range is where they compute what fp32 FMAs compute.
constexpr float kBf16MaxAbs = 1e30f;
constexpr float kBf16MinAbs = 0x1p-100f;

#if HF_INT8_X86
// The top 8 significant bits of v as bf16 (truncated, so never rounded up into the next binade or to infinity).
inline uint16_t bf16_truncate(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// The bf16 pieces an activation of the output dtype (= the input dtype of int8_linear) needs at most: its significant
// bits in 8-bit slices.
inline int max_pieces_for(OutKind kind) {
  return kind == OutKind::kBF16 ? 1 : (kind == OutKind::kF16 ? 2 : kMaxPieces);
}

// Splits v into bf16 pieces whose exact sum is v (pieces past the first are 0 when v has few significant bits).
// Inf and NaN go whole into the first piece (a remainder Inf - Inf would be NaN).
inline int split_bf16(float v, uint16_t* pieces) {
  for (int t = 0; t < kMaxPieces; ++t) pieces[t] = 0;
  if (!std::isfinite(v)) {
    pieces[0] = std::isnan(v) ? 0x7FC0 : bf16_truncate(v);
    return 1;
  }
  int used = 0;
  float rest = v;
  for (int t = 0; t < kMaxPieces && rest != 0.0f; ++t) {
    pieces[t] = bf16_truncate(rest);
    rest -= bf16_to_float(pieces[t]);  // exact: the remaining low bits of the mantissa
    used = t + 1;
  }
  return used;
}

// Splits x[0 .. J) into pieces t = 0..2 at piece[t][j]; returns how many pieces the row needs (1-3), or 0 when a value
// is outside the range the AMX path takes.
int split_row(const float* x, int64_t J, uint16_t* p0, uint16_t* p1, uint16_t* p2) {
  int used = 1;
  for (int64_t j = 0; j < J; ++j) {
    const float v = x[j], a = std::fabs(v);
    if ((a > kBf16MaxAbs && !std::isinf(a)) || (a < kBf16MinAbs && a != 0.0f)) return 0;
    uint16_t piece[kMaxPieces];
    used = std::max(used, split_bf16(v, piece));
    p0[j] = piece[0];
    p1[j] = piece[1];
    p2[j] = piece[2];
  }
  return used;
}

// split_row, 16 values at a time (a block holding Inf or NaN goes through split_row); p1 and p2 may be nullptr when
// the caller keeps fewer pieces.
HF_INT8_TARGET_AVX512 int split_row_avx512(const float* x, int64_t J, uint16_t* p0, uint16_t* p1, uint16_t* p2) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512 max_abs = _mm512_set1_ps(kBf16MaxAbs), min_abs = _mm512_set1_ps(kBf16MinAbs);
  const __m512i exponent = _mm512_set1_epi32(0x7F800000);  // all ones: Inf or NaN
  __mmask16 needs2 = 0, needs3 = 0;
  int used = 1;
  for (int64_t j = 0; j < J; j += 16) {
    const __mmask16 k = avx512::mask16(J - j);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + j);
    if (_mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exponent), exponent) != 0) {
      uint16_t spare[2][16];  // the pieces the caller does not keep
      const int u = split_row(x + j, std::min<int64_t>(16, J - j), p0 + j, p1 != nullptr ? p1 + j : spare[0],
                              p2 != nullptr ? p2 + j : spare[1]);
      if (u == 0) return 0;
      used = std::max(used, u);
      continue;
    }
    const __m512 a = _mm512_abs_ps(v);
    const __mmask16 out_of_range =
        _mm512_cmp_ps_mask(a, max_abs, _CMP_GT_OQ) |
        (_mm512_cmp_ps_mask(a, min_abs, _CMP_LT_OQ) & _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_OQ));
    if (out_of_range != 0) return 0;
    // Truncating to bf16 keeps the top 8 significant bits; each remainder is exact in fp32.
    const __m512i h0 = _mm512_and_si512(_mm512_castps_si512(v), high);
    const __m512 r1 = _mm512_sub_ps(v, _mm512_castsi512_ps(h0));
    const __m512i h1 = _mm512_and_si512(_mm512_castps_si512(r1), high);
    const __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(h1));
    const __m512i h2 = _mm512_and_si512(_mm512_castps_si512(r2), high);
    needs2 |= _mm512_test_epi32_mask(h1, h1);
    needs3 |= _mm512_test_epi32_mask(h2, h2);
    _mm256_mask_storeu_epi16(p0 + j, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(h0, 16)));
    if (p1 != nullptr) _mm256_mask_storeu_epi16(p1 + j, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(h1, 16)));
    if (p2 != nullptr) _mm256_mask_storeu_epi16(p2 + j, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(h2, 16)));
  }
  return std::max(used, needs3 != 0 ? 3 : (needs2 != 0 ? 2 : 1));
}

// Re-lays row-major pieces [n_pieces][mp][jp] as B tiles: for each piece, 16-token panel and step of 32 columns, a
// 16 x 16 transpose of 32-bit pairs gives [16 column pairs][16 tokens][2] bf16.
HF_INT8_TARGET_AVX512 void to_b_tiles_panel(const uint16_t* src, int64_t jp, uint16_t* dst) {
  for (int64_t st = 0; st < jp / kAmxJStep; ++st) {  // rows of jp bf16 = jp / 2 dwords; 32 bf16 = 16 dwords
    avx512::transpose16_block(src + st * kAmxJStep, jp / 2, dst + st * 512, 16);
  }
}

void to_b_tiles(const uint16_t* rows, int64_t n_pieces, int64_t mp, int64_t jp, uint16_t* tiles) {
  const int64_t panels = mp / 16, steps = jp / kAmxJStep;
  at::parallel_for(0, n_pieces * panels, 1, [&](int64_t q0, int64_t q1) {
    // q: piece q / panels, tokens (q % panels) * 16 ..; pieces and panels are contiguous in both layouts.
    for (int64_t q = q0; q < q1; ++q) to_b_tiles_panel(rows + q * 16 * jp, jp, tiles + q * steps * 512);
  });
}

#endif  // HF_INT8_X86

}  // namespace

int64_t outlier_product_cols(int64_t N) { return round_up(N, kStripRows); }

std::vector<uint64_t> outlier_column_bits(const int64_t* cols, int64_t J, int64_t K) {
  std::vector<uint64_t> bits(static_cast<size_t>(ceil_div(K, 64)), 0u);
  for (int64_t j = 0; j < J; ++j) {
    const int64_t k = cols[j];
    if (k < 0 || k >= K || (j > 0 && k <= cols[j - 1])) return {};
    bits[static_cast<size_t>(k / 64)] |= uint64_t{1} << (k % 64);
  }
  return bits;
}

bool prepare_amx_outliers(Isa isa, const GemmProblem& p, std::vector<uint16_t>& storage, AmxOutliers& out) {
#if HF_INT8_X86
  if (isa < Isa::kAmx || !amx::bf16_available()) return false;
  const int64_t M = p.M, J = p.ep.n_outliers;
  const int64_t mp = round_up(M, kAmxRows), jp = round_up(J, kAmxJStep);
  std::vector<uint16_t> rows(static_cast<size_t>(kMaxPieces * mp * jp), 0);  // [piece][mp][jp], row-major
  uint16_t* pieces = rows.data();
  const float* x = p.ep.x_outlier;
  std::vector<uint8_t> row_pieces(static_cast<size_t>(M), 0);  // 0: a value outside the AMX range
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(J, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      uint16_t* p0 = pieces + m * jp;
      row_pieces[static_cast<size_t>(m)] =
          static_cast<uint8_t>(split_row_avx512(x + m * J, J, p0, p0 + mp * jp, p0 + 2 * mp * jp));
    }
  });
  int n_pieces = 1;
  for (const uint8_t used : row_pieces) {
    if (used == 0) return false;
    n_pieces = std::max<int>(n_pieces, used);
  }
  storage.resize(static_cast<size_t>(n_pieces * mp * jp));
  to_b_tiles(pieces, n_pieces, mp, jp, storage.data());
  out.pieces = storage.data();
  out.mp = mp;
  out.jp = jp;
  out.n_pieces = n_pieces;
  return true;
#else
  (void)isa, (void)p, (void)storage, (void)out;
  return false;
#endif
}

#if HF_INT8_X86
namespace {
// One token panel of PackedOutliers::x_pairs, pieces [0, n_pieces), from `rows` (split rows as dwords, [16
// rows][stride pieces][padded], rows past the panel's tokens zero): for each piece and block of 16 pairs, a 16 x 16
// transpose whose first kPackedRows lanes are the panel's tokens.
HF_INT8_TARGET_AVX512 void store_x_panel(const uint32_t* rows, int64_t pairs, int64_t padded, int stride, int n_pieces,
                                         uint32_t* panel) {
  constexpr int64_t kRows = avx512::kPackedRows;
  const __mmask16 tokens = avx512::mask16(kRows);
  for (int t = 0; t < n_pieces; ++t) {
    for (int64_t q0 = 0; q0 < pairs; q0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows + (i * stride + t) * padded + q0);
      avx512::transpose16(r);
      for (int64_t q = q0; q < std::min(pairs, q0 + 16); ++q) {
        _mm512_mask_storeu_epi32(panel + (q * n_pieces + t) * kRows, tokens, r[q - q0]);
      }
    }
  }
}

// Whether the bf16 numbers v[0 .. n) are all in the range the bf16 paths take exactly (split_row's rule: 0, Inf, NaN
// or a magnitude in [kBf16MinAbs, kBf16MaxAbs]).
HF_INT8_TARGET_AVX512 bool bf16_in_range(const uint16_t* v, int64_t n) {
  const __m512 max_abs = _mm512_set1_ps(kBf16MaxAbs), min_abs = _mm512_set1_ps(kBf16MinAbs);
  const __m512 inf = _mm512_set1_ps(INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __m256i h = _mm256_maskz_loadu_epi16(avx512::mask16(n - j), v + j);
    const __m512 a = _mm512_abs_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    const __mmask16 bad =
        (_mm512_cmp_ps_mask(a, max_abs, _CMP_GT_OQ) & _mm512_cmp_ps_mask(a, inf, _CMP_NEQ_OQ)) |
        (_mm512_cmp_ps_mask(a, min_abs, _CMP_LT_OQ) & _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_OQ));
    if (bad != 0) return false;
  }
  return true;
}
}  // namespace
#endif

bool prepare_small_outliers(Isa isa, const GemmProblem& p, std::vector<uint16_t>& x_pieces, ColumnPicker& cols,
                            SmallOutliers& out) {
#if HF_INT8_X86
  if (isa < Isa::kAvx512Bf16 || p.ep.x_outlier == nullptr) return false;
  const int64_t M = p.M, J = p.ep.n_outliers;
  const std::vector<uint64_t> bits = outlier_column_bits(p.ep.outlier_cols, J, p.K);
  if (bits.empty()) return false;
  cols = make_column_picker(bits, p.K);
  const int max_pieces = max_pieces_for(p.ep.kind);
  const int64_t jp = round_up(J, 32);
  std::vector<uint16_t> split(static_cast<size_t>(max_pieces * M * jp), 0);  // [piece][M][jp]
  int n_pieces = 1;
  for (int64_t i = 0; i < M; ++i) {
    uint16_t* p0 = split.data() + i * jp;
    const int used = split_row_avx512(p.ep.x_outlier + i * J, J, p0, max_pieces > 1 ? p0 + M * jp : nullptr,
                                      max_pieces > 2 ? p0 + 2 * M * jp : nullptr);
    if (used == 0 || used > max_pieces) return false;
    n_pieces = std::max(n_pieces, used);
  }
  uint16_t* dst = line_aligned(x_pieces, static_cast<size_t>(n_pieces * M * jp));
  for (int64_t c = 0; c < jp / 32; ++c) {
    for (int t = 0; t < n_pieces; ++t) {
      for (int64_t i = 0; i < M; ++i) {
        std::memcpy(dst + ((c * n_pieces + t) * M + i) * 32, split.data() + (t * M + i) * jp + c * 32,
                    32 * sizeof(uint16_t));
      }
    }
  }
  out.x_pieces = dst;
  out.jp = jp;
  out.n_pieces = n_pieces;
  out.cols = &cols;
  return true;
#else
  (void)isa, (void)p, (void)x_pieces, (void)cols, (void)out;
  return false;
#endif
}

bool prepare_packed_outliers(Isa isa, const GemmProblem& p, std::vector<uint32_t>& x_pairs, ColumnPicker& cols,
                             PackedOutliers& out) {
#if HF_INT8_X86
  if (isa < Isa::kAvx512Bf16) return false;
  const int64_t M = p.M, J = p.ep.n_outliers, K = p.b_keep != nullptr ? p.b_keep->K : p.K;
  const std::vector<uint64_t> bits = outlier_column_bits(p.ep.outlier_cols, J, K);
  if (bits.empty()) return false;
  cols = make_column_picker(bits, K);
  const int n_pieces = max_pieces_for(p.ep.kind);
  const int64_t pairs = ceil_div(J, 2), padded = round_up(pairs, 16);
  constexpr int64_t kRows = avx512::kPackedRows;
  const int64_t panels = ceil_div(M, kRows), panel_words = pairs * n_pieces * kRows;
  x_pairs.resize(static_cast<size_t>(panels * panel_words));
  std::vector<uint8_t> panel_ok(static_cast<size_t>(panels), 0);
  const float* x = p.ep.x_outlier;
  // No x_outlier: bf16 activations, whose outlier values are their own single pieces, picked straight from x.
  ColumnPicker x_cols;
  if (x == nullptr) {
    if (p.ep.x_kind != InKind::kBF16 || n_pieces != 1) return false;
    x_cols = make_column_picker(bits, K, /*lane_bytes=*/2);
  }
  const auto* x16 = static_cast<const uint16_t*>(p.ep.x);
  at::parallel_for(0, panels, std::max<int64_t>(1, 4096 / std::max<int64_t>(J, 1)), [&](int64_t q0, int64_t q1) {
    // [16 rows][kMaxPieces][padded] dwords: the panel's split rows (zero past its tokens and past J)
    std::vector<uint32_t> rows(static_cast<size_t>(16 * kMaxPieces * padded), 0u);
    for (int64_t q = q0; q < q1; ++q) {
      bool ok = true;
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t m = q * kRows + i;
        auto* dst = reinterpret_cast<uint16_t*>(rows.data() + i * kMaxPieces * padded);
        if (m >= M) {
          std::memset(dst, 0, static_cast<size_t>(kMaxPieces * padded) * sizeof(uint32_t));
          continue;
        }
        if (x == nullptr) {  // (the picked row may spill into the unused second piece's place: J + 32 values fit)
          avx512::pick_columns16(x16 + m * p.ep.x_ld, x_cols, dst);
          ok = ok && bf16_in_range(dst, J);
          continue;
        }
        // Pieces past n_pieces are not stored (a value that needs them fails the row: `used` says so).
        const int used = split_row_avx512(x + m * J, J, dst, n_pieces > 1 ? dst + 2 * padded : nullptr,
                                          n_pieces > 2 ? dst + 4 * padded : nullptr);
        ok = ok && used != 0 && used <= n_pieces;
      }
      panel_ok[static_cast<size_t>(q)] = ok ? 1 : 0;
      if (ok) store_x_panel(rows.data(), pairs, padded, kMaxPieces, n_pieces, x_pairs.data() + q * panel_words);
    }
  });
  for (const uint8_t ok : panel_ok) {
    if (ok == 0) return false;
  }
  out.x_pairs = x_pairs.data();
  out.pairs = pairs;
  out.n_pieces = n_pieces;
  out.cols = &cols;
  return true;
#else
  (void)isa, (void)p, (void)x_pairs, (void)cols, (void)out;
  return false;
#endif
}

int64_t amx_outlier_tile_elems(int64_t jp) { return jp / kAmxJStep * 1024; }

// A tiles of the outlier weights: for each step of 32 outlier columns, rows n0 .. n0 + 31 as [32 rows][32 columns]
// bf16 (two tiles of 16 rows x 64 bytes). int8 values are exact in bf16; rows past N and columns past J are zero.
#if HF_INT8_X86
HF_INT8_TARGET_AVX512 void gather_amx_outlier_tiles(const GemmProblem& p, const AmxOutliers& o, int64_t n0,
                                                    uint16_t* tiles) {
  std::memset(tiles, 0, static_cast<size_t>(amx_outlier_tile_elems(o.jp)) * sizeof(uint16_t));
  const int64_t J = p.ep.n_outliers;
  const int64_t* cols = p.ep.outlier_cols;
  for (int64_t r = 0; r < std::min(kStripRows, p.N - n0); ++r) {
    const int64_t n = n0 + r;
    const int8_t* row = p.b + n * p.ldb;
    uint16_t* dst = tiles + r * kAmxJStep;
    if (n + 1 == p.N) {  // the vector gather reads 4 bytes: not past the end of the weight
      for (int64_t j = 0; j < J; ++j) {
        dst[(j / kAmxJStep) * 1024 + j % kAmxJStep] = bf16_truncate(static_cast<float>(row[cols[j]]));
      }
      continue;
    }
    for (int64_t j = 0; j < J; j += 8) {  // 8 columns never straddle a step of 32
      const __mmask8 k = avx512::mask8(J - j);
      const __m256 codes = _mm256_cvtepi32_ps(avx512::gather_codes8(row, cols + j, k));
      const __m128i bf16 = _mm256_cvtepi32_epi16(_mm256_srli_epi32(_mm256_castps_si256(codes), 16));
      _mm_mask_storeu_epi16(dst + (j / kAmxJStep) * 1024 + j % kAmxJStep, k, bf16);
    }
  }
}
#else
void gather_amx_outlier_tiles(const GemmProblem&, const AmxOutliers&, int64_t, uint16_t*) {}
#endif

#if HF_INT8_X86
namespace amx {
HF_INT8_TARGET_AMX_BF16 void outlier_block(const GemmProblem& p, const AmxOutliers& o, const uint16_t* tiles,
                                           int64_t m0, int64_t n0, float* block) {
  const int64_t steps = o.jp / kAmxJStep, panels = o.mp / 16;
  // C^T: weight rows x tokens. A = weight tiles, B = activation pieces (two 16-token panels).
  alignas(64) float ct[kStripRows * kAmxRows];
  constexpr int64_t kLd = kAmxRows * sizeof(float);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, tiles + s * 1024, 64);
    _tile_loadd(5, tiles + s * 1024 + 512, 64);
    for (int t = 0; t < o.n_pieces; ++t) {
      const uint16_t* b = o.pieces + ((t * panels + m0 / 16) * steps + s) * 512;
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + steps * 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, ct, kLd);
  _tile_stored(1, ct + 16, kLd);
  _tile_stored(2, ct + 16 * kAmxRows, kLd);
  _tile_stored(3, ct + 16 * kAmxRows + 16, kLd);
  // col_scale multiplies the finished sums (the tiles hold the raw int8 values), then the block is transposed to
  // [token][weight row], the layout the epilogue reads.
  for (int64_t i = 0; i < kStripRows; ++i) {
    const float scale = n0 + i < p.N ? p.ep.col_scale[n0 + i] : 0.0f;
    float* row = ct + i * kAmxRows;
    _mm512_store_ps(row, _mm512_mul_ps(_mm512_load_ps(row), _mm512_set1_ps(scale)));
    _mm512_store_ps(row + 16, _mm512_mul_ps(_mm512_load_ps(row + 16), _mm512_set1_ps(scale)));
  }
  for (int64_t nh = 0; nh < kStripRows; nh += 16) {
    for (int64_t mh = 0; mh < kAmxRows; mh += 16) {
      avx512::transpose16_block(ct + nh * kAmxRows + mh, kAmxRows, block + mh * kStripRows + nh, kStripRows);
    }
  }
}
}  // namespace amx
#else
namespace amx {
void outlier_block(const GemmProblem&, const AmxOutliers&, const uint16_t*, int64_t, int64_t, float*) {}
}  // namespace amx
#endif

void outlier_product(Isa isa, const GemmProblem& p, float* out, int64_t ldo) {
  const Problem g{
      p.ep.x_outlier, p.M, p.ep.n_outliers, p.b, p.N, p.ldb, p.K, p.ep.outlier_cols, p.ep.col_scale, out, ldo};
  product_fma(isa, g);
}

}  // namespace hf_int8::cpu
