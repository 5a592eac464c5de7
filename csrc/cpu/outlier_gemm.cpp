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
// - Otherwise outlier_product computes it up front for the epilogue to add:
//   - AVX512-BF16 + VBMI2 (Zen 4/5; Sapphire Rapids and later when the AMX GEMM does not run) when every outlier
//     activation is a bf16 number in the range above, as a bf16 model's activations are: VDPBF16PS multiplies pairs
//     of bf16 numbers exactly and accumulates in fp32, 32 multiply-adds per instruction against 16 for an fp32 FMA.
//     Register tiles of 12 tokens x 32 rows over column pairs; each strip's outlier codes are picked out of its rows
//     once with VPCOMPRESSB (per-code gathers cost half as much as the products). Like the AMX path, the int8 values
//     enter as they are and col_scale multiplies the finished sums. Other activations (fp32, fp16: two or three
//     pieces would cost as much as FMAs or more) take the FMA path.
//   - fp32 FMA register tiles (AVX-512: 8 tokens x 32 rows; AVX2: 4 x 16) over dequantized weights.
//   Both walk the outlier columns in chunks whose gathered weights fit in L1.
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

// split_row, 16 values at a time (a block holding Inf or NaN goes through split_row).
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
      const int u = split_row(x + j, std::min<int64_t>(16, J - j), p0 + j, p1 + j, p2 + j);
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
    _mm256_mask_storeu_epi16(p1 + j, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(h1, 16)));
    _mm256_mask_storeu_epi16(p2 + j, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(h2, 16)));
  }
  return std::max(used, needs3 != 0 ? 3 : (needs2 != 0 ? 2 : 1));
}

// ---------------------------------------------------------------------------------------------------------------
// AVX512-BF16 path.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kBf16TileRows = 12;    // tokens per register tile (2 x 12 accumulators)
constexpr int64_t kPairChunk = 256;  // outlier column pairs per pass over the tokens (table: 32 KiB, in L1)
// Taken from this share of outlier columns on (J >= K / this): below it the work that does not shrink with J
// (compressing whole weight rows, a pass over the product to scale it) outweighs the faster products. AMD EPYC Zen 5,
// 2 threads, bf16 activations, 16/128/512 tokens, 4096x4096, 4096x11008, 1536x8960, against the FMA path call by call
// in one process: with the path taken at every share (a throw-away A/B before this bound existed) it was 0.65-1.12x
// at 1-6.5% outlier columns; with the bound, `scripts/ab_cpu_isa.py --fractions 0.01,0.065,0.1,0.125,0.2 --tokens
// 16,128,512` printed 0.96-1.02x at 1-6.5% (same path), 1.02-1.32x at 10-12.5% and 1.20-1.57x at 20%
// (docs/results/ab_cpu_isa_zen5.json).
constexpr int64_t kBf16FromShare = 10;

// x[0 .. J) as bf16 at dst[0 .. J) (dst[J], the pad of an odd J, is left as it is: zero). False, with dst partly
// written, when a value is not exactly a bf16 number or lies outside [kBf16MinAbs, kBf16MaxAbs] (0, Inf and NaN pass:
// they propagate as in an fp32 FMA).
HF_INT8_TARGET_AVX512 bool bf16_row(const float* x, int64_t J, uint16_t* dst) {
  const __m512i low = _mm512_set1_epi32(0xFFFF);
  const __m512 max_abs = _mm512_set1_ps(kBf16MaxAbs), min_abs = _mm512_set1_ps(kBf16MinAbs);
  const __m512 inf = _mm512_set1_ps(INFINITY);
  for (int64_t j = 0; j < J; j += 16) {
    const __mmask16 k = avx512::mask16(J - j);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + j);
    const __m512i bits = _mm512_castps_si512(v);
    const __m512 a = _mm512_abs_ps(v);
    const __mmask16 bad =
        _mm512_test_epi32_mask(bits, low) |
        (_mm512_cmp_ps_mask(a, max_abs, _CMP_GT_OQ) & _mm512_cmp_ps_mask(a, inf, _CMP_NEQ_OQ)) |
        (_mm512_cmp_ps_mask(a, min_abs, _CMP_LT_OQ) & _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_OQ));
    if (bad != 0) return false;
    _mm256_mask_storeu_epi16(dst + j, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
  }
  return true;
}

// table[p - p0][c] = bf16(codes_c[2p]) | bf16(codes_c[2p + 1]) << 16 for p in [p0, p1), rounded up to 16 pairs (0
// past J; int8 values are exact in bf16), where codes_c = the compressed outlier codes of row n0 + c (`codes`, rows of
// `ld` bytes; `rows` of them are valid, the rest are 0): for each weight row, the VDPBF16PS lane of a pair of outlier
// columns. Built row by row in `scratch` ([32 rows][kPairChunk]), then turned to [pair][row] by 16 x 16 transposes.
HF_INT8_TARGET_AVX512 void gather_pairs(const int8_t* codes, int64_t ld, int64_t rows, int64_t J, int64_t p0,
                                        int64_t p1, uint32_t* scratch, uint32_t* table) {
  const int64_t padded = round_up(p1 - p0, 16);
  for (int64_t c = 0; c < kStripRows; ++c) {
    uint32_t* dst = scratch + c * kPairChunk;
    if (c >= rows) {
      std::memset(dst, 0, static_cast<size_t>(padded) * sizeof(uint32_t));
      continue;
    }
    const int8_t* row = codes + c * ld;
    for (int64_t q = 0; q < padded; q += 8) {  // 8 pairs: 16 codes
      const int64_t j = 2 * (p0 + q);
      const __m128i c8 = _mm_maskz_loadu_epi8(avx512::mask16(std::max<int64_t>(0, J - j)), row + j);
      const __m512i bf16 = _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c8))), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + q), _mm512_cvtepi32_epi16(bf16));
    }
  }
  for (int64_t b = 0; b < padded; b += 16) {
    for (int64_t c0 = 0; c0 < kStripRows; c0 += 16) {
      avx512::transpose16_block(scratch + c0 * kPairChunk + b, kPairChunk, table + b * kStripRows + c0, kStripRows);
    }
  }
}

// out[m0 .. m0 + R, n0 .. n0 + 32) (+)= sum over pairs [p0, p1) of x pair . table pair (unscaled sums).
template <int R>
HF_INT8_TARGET_AVX512_BF16 void tile_bf16(const Problem& g, const uint32_t* x_pairs, int64_t pairs, int64_t m0,
                                          int64_t n0, int64_t p0, int64_t p1, const uint32_t* table) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0;
    acc[r][0] = p0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(o);
    acc[r][1] = p0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(o + 16);
  }
  const uint32_t* x = x_pairs + m0 * pairs;
  for (int64_t p = p0; p < p1; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(table + (p - p0) * kStripRows);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(table + (p - p0) * kStripRows + 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * pairs + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xv);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xv);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0;
    _mm512_storeu_ps(o, acc[r][0]);
    _mm512_storeu_ps(o + 16, acc[r][1]);
  }
}

template <int... Rs>
void tile_bf16_for(const Problem& g, const uint32_t* x_pairs, int64_t pairs, int64_t m0, int64_t rows, int64_t n0,
                   int64_t p0, int64_t p1, const uint32_t* table, std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? tile_bf16<Rs + 1>(g, x_pairs, pairs, m0, n0, p0, p1, table) : void()), ...);
}

void tile_bf16_rows(const Problem& g, const uint32_t* x_pairs, int64_t pairs, int64_t m0, int64_t rows, int64_t n0,
                    int64_t p0, int64_t p1, const uint32_t* table) {
  tile_bf16_for(g, x_pairs, pairs, m0, rows, n0, p0, p1, table, std::make_integer_sequence<int, kBf16TileRows>{});
}

// out[., n0 .. n0 + 32) *= col_scale (0 past N): the sums of int8 values become the sums of dequantized weights.
HF_INT8_TARGET_AVX512 void scale_strip(const Problem& g, int64_t n0) {
  const int64_t valid = g.N - n0;  // >= 1
  const __m512 s0 = _mm512_maskz_loadu_ps(avx512::mask16(valid), g.scale + n0);
  const __m512 s1 =
      valid > 16 ? _mm512_maskz_loadu_ps(avx512::mask16(valid - 16), g.scale + n0 + 16) : _mm512_setzero_ps();
  for (int64_t m = 0; m < g.M; ++m) {
    float* o = g.out + m * g.ldo + n0;
    _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), s0));
    _mm512_storeu_ps(o + 16, _mm512_mul_ps(_mm512_loadu_ps(o + 16), s1));
  }
}

// The product on AVX512-BF16; false (nothing written) when an activation is outside what the path computes exactly.
bool product_bf16(const Problem& g) {
  constexpr int64_t kRowsPerTile = kBf16TileRows;
  const int64_t pairs = ceil_div(g.J, 2);
  // x as bf16 pairs [M][pairs]; uint32 storage, written as 16-bit lanes by bf16_row (intrinsic stores may alias)
  std::vector<uint32_t> x_pairs(static_cast<size_t>(g.M * pairs), 0u);
  std::vector<uint8_t> row_ok(static_cast<size_t>(g.M), 0);
  at::parallel_for(0, g.M, std::max<int64_t>(1, 16384 / std::max<int64_t>(g.J, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      row_ok[static_cast<size_t>(m)] =
          bf16_row(g.x + m * g.J, g.J, reinterpret_cast<uint16_t*>(x_pairs.data() + m * pairs)) ? 1 : 0;
    }
  });
  for (const uint8_t ok : row_ok) {
    if (ok == 0) return false;
  }
  // compress_columns keeps K's order: the codes line up with x's outlier columns only if cols ascend
  const std::vector<uint64_t> bits = outlier_column_bits(g.cols, g.J, g.K);
  if (bits.empty()) return false;
  const int64_t strips = ceil_div(g.N, kStripRows);
  const int64_t ld_codes = round_up(g.J + 64, 64);
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    std::vector<int8_t> codes(static_cast<size_t>(kStripRows * ld_codes));  // the strip's outlier codes
    std::vector<uint32_t> scratch(static_cast<size_t>(kStripRows * kPairChunk));
    std::vector<uint32_t> table(static_cast<size_t>(kPairChunk * kStripRows));
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n0 = s * kStripRows, rows = std::min(kStripRows, g.N - n0);
      for (int64_t c = 0; c < rows; ++c)
        avx512::compress_columns(g.b + (n0 + c) * g.ldb, g.K, bits.data(), codes.data() + c * ld_codes);
      for (int64_t p0 = 0; p0 < pairs; p0 += kPairChunk) {
        const int64_t p1 = std::min(pairs, p0 + kPairChunk);
        gather_pairs(codes.data(), ld_codes, rows, g.J, p0, p1, scratch.data(), table.data());
        for (int64_t m0 = 0; m0 < g.M; m0 += kRowsPerTile) {
          tile_bf16_rows(g, x_pairs.data(), pairs, m0, std::min(kRowsPerTile, g.M - m0), n0, p0, p1, table.data());
        }
      }
      scale_strip(g, n0);
    }
  });
  return true;
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
#if HF_INT8_X86
  if (isa >= Isa::kAvx512Bf16 && g.J * kBf16FromShare >= g.K && product_bf16(g)) return;
#endif
  product_fma(isa, g);
}

}  // namespace hf_int8::cpu
