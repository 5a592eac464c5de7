// AVX-512 VNNI int8 GEMM kernels.
//
// VPDPBUSD multiplies unsigned by signed bytes. B (the weight) is the unsigned side, shifted by +128 (x ^ 0x80), and
// A (the activation codes) the signed side; acc - 128 * sum_k a[m, k] is then the exact s8 x s8 sum
// (quant_math.h, unshift_u8_accumulator). Exact for every int8 value, -128 included.
//
// small_m (decode, M <= 16): each B row is streamed from memory exactly once; MR rows of A (in cache) are dotted with
//   NR rows of B at a time, 64 bytes of K per step, then reduced horizontally 16 accumulators at a time (above 8 rows
//   in two passes, the second from L1). Bandwidth-bound by design at few rows: a thread's rows are read as NR long
//   contiguous streams (see stream_prefetch_bytes).
// packed (more rows, or 9-16 with many outlier columns without AVX512-BF16; gemm.cpp, choose()): B is packed per 16
//   columns into the VNNI layout [K/4][16][4] (u8), then a 12 x 32 register tile (24 accumulators) walks K four bytes
//   at a time with A broadcast from memory: no horizontal reductions, and the epilogue runs on the accumulators
//   straight from registers.
#include "hf_int8/cpu_avx512.h"
#include "hf_int8/cpu_kernels.h"

#if HF_INT8_X86
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace hf_int8::cpu::avx512 {

namespace {

// How the small-M kernel reads the weight. A thread's rows [n_begin, n_end) are split into NR equal slices and each
// tile takes the next row of every slice, so the kernel reads NR long contiguous streams (row after row), each with a
// software prefetch this far ahead, as the read-bandwidth probe of scripts/bench_linear.py does. The previous order,
// tiles of NR adjacent rows (NR short streams of K bytes, the next tile prefetched into L2, tuned on an Intel Xeon),
// read at ~70-75% of the probe's rate on an AMD EPYC Zen 5 in a standalone loop (1536 x 8960, 1 token, 2 threads),
// the slices at ~95-100%; bench_linear.py's "% of weight read" column shows the whole op. Not yet re-measured on
// Intel. The prefetch runs 1 KiB ahead in each of the 4 streams of up to 6 activation rows, 2 KiB ahead in each of the
// 3 streams of 7-8 rows: Qwen2.5-1.5B's greedy decode at batch 8 went from 91-93 to 98-99 tok/s (2 KiB for every row
// count left batch 4 unchanged; 3 KiB at 7-8 rows gave 94-98 against 99-101; timed by hand, alternating builds, on an
// AMD EPYC Zen 5, 2 threads).
constexpr int64_t stream_prefetch_bytes(int mr) { return mr <= 6 ? 1024 : 2048; }
constexpr int64_t kScalarOutliersMax = 8;

// ---------------------------------------------------------------------------------------------------------------
// small M
// ---------------------------------------------------------------------------------------------------------------
// Horizontal sums of 16 vectors at once: lane l of the result is the sum of v[l]'s 16 lanes. A tree of 15 adds and
// their shuffles, where 16 separate reductions take ~4 shuffles and ~4 adds each. The shuffles only move 32-bit
// lanes, so one tree serves int32 and fp32 (`add` on the bit patterns); the order of the additions is fixed (integer
// sums are exact anyway; float sums do not depend on the thread count).
template <typename Add>
HF_INT8_TARGET_AVX512 inline __m512i sum16(const __m512i v[16], Add add) {
  __m512i a[8], b[4], c[2];
  // Pairs of vectors: within each 128-bit block, lanes {0, 2} hold partial sums of v[2q], lanes {1, 3} of v[2q + 1].
  for (int q = 0; q < 8; ++q) {
    a[q] = add(_mm512_unpacklo_epi32(v[2 * q], v[2 * q + 1]), _mm512_unpackhi_epi32(v[2 * q], v[2 * q + 1]));
  }
  // Lane t of each 128-bit block: the block's sum for v[4q + t].
  for (int q = 0; q < 4; ++q) {
    b[q] = add(_mm512_unpacklo_epi64(a[2 * q], a[2 * q + 1]), _mm512_unpackhi_epi64(a[2 * q], a[2 * q + 1]));
  }
  // Sum the four 128-bit blocks: pairs of blocks first, then pairs of pairs.
  for (int q = 0; q < 2; ++q) {
    c[q] = add(_mm512_shuffle_i32x4(b[2 * q], b[2 * q + 1], 0x88), _mm512_shuffle_i32x4(b[2 * q], b[2 * q + 1], 0xDD));
  }
  return add(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

HF_INT8_TARGET_AVX512 inline __m512i add_epi32(__m512i x, __m512i y) { return _mm512_add_epi32(x, y); }
HF_INT8_TARGET_AVX512 inline __m512i add_ps_bits(__m512i x, __m512i y) {
  return _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(y)));
}

// out[i] = horizontal sum of the i-th stored vector, for n of them, 16 at a time (out of line, see dot_tile).
__attribute__((noinline)) HF_INT8_TARGET_AVX512 void reduce_rows(const int32_t* acc, int n, int32_t* out) {
  for (int g = 0; g < n; g += 16) {
    __m512i v[16];
    for (int i = 0; i < 16; ++i) v[i] = g + i < n ? _mm512_load_si512(acc + 16 * (g + i)) : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(out + g, mask16(n - g), sum16(v, add_epi32));
  }
}

HF_INT8_TARGET_AVX512 void reduce_rows_ps(const float* acc, int n, float* out) {
  for (int g = 0; g < n; g += 16) {
    __m512i v[16];
    for (int i = 0; i < 16; ++i) v[i] = g + i < n ? _mm512_load_si512(acc + 16 * (g + i)) : _mm512_setzero_si512();
    _mm512_mask_storeu_ps(out + g, mask16(n - g), _mm512_castsi512_ps(sum16(v, add_ps_bits)));
  }
}

// out[i * NR + j] = the horizontal sum of acc[i][j] (int32 or fp32) for an MR x NR register tile: the accumulators are
// stored and summed out of line (reduce_rows, reduce_rows_ps; see dot_tile).
template <int MR, int NR, typename V, typename T>
HF_INT8_TARGET_AVX512 inline void reduce_tile(const V (&acc)[MR][NR], T* out) {
  alignas(64) T stored[MR * NR * 16];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) std::memcpy(stored + (i * NR + j) * 16, &acc[i][j], sizeof(V));
  }
  if constexpr (std::is_same_v<T, float>) {
    reduce_rows_ps(stored, MR * NR, out);
  } else {
    reduce_rows(stored, MR * NR, out);
  }
}

// out[i * NR + j] = sum_k a[i, k] * (b[j][k] + 128) for MR rows of A and NR rows of B, 64 bytes of K per step. The
// K tail is the last step with a byte mask (bytes past K load as 0 in A, so B's contribute nothing). Full steps load
// unmasked on purpose: on AMD Zen 5, masked loads of the streamed rows (all bytes enabled) left the hardware
// prefetcher behind (a 1-token, 1536 x 8960 call took 0.36 ms with them, 0.28 ms with unmasked loads, 2 threads, same
// prefetches). The accumulators are stored and reduced out of line: with the reduction inlined GCC spilled
// accumulators inside the loop. Not inlined either: inside its caller's loop GCC ran out of registers for the 8-token
// tile and reloaded activations from the stack (0.31 -> 0.45 ms for 8 tokens on 1536 x 8960). XInRegister: each
// activation vector is loaded once into a register for the NR products (the empty asm keeps GCC from folding it into
// each VPDPBUSD as a memory operand, NR loads instead of one); see kActivationsInL1Bytes for when.
template <int MR, int NR, bool Stream = true, bool XInRegister = false>
__attribute__((noinline)) HF_INT8_TARGET_AVX512 void dot_tile(const int8_t* a, int64_t lda,
                                                              const int8_t* const (&b)[NR], int64_t K, int32_t* out) {
  __m512i acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < K; k += 64) {
    const bool full = K - k >= 64;
    const __mmask64 m = full ? ~__mmask64(0) : ~__mmask64(0) >> (64 - (K - k));
    __m512i w[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const int8_t* row = b[j] + k;
      if (Stream) _mm_prefetch(reinterpret_cast<const char*>(row + stream_prefetch_bytes(MR)), _MM_HINT_T0);
      w[j] = _mm512_xor_si512(full ? _mm512_loadu_si512(row) : _mm512_maskz_loadu_epi8(m, row), flip);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const int8_t* x_row = a + i * lda + k;
      __m512i x = full ? _mm512_loadu_si512(x_row) : _mm512_maskz_loadu_epi8(m, x_row);
      if constexpr (XInRegister) asm("" : "+v"(x));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], w[j], x);
    }
  }
  reduce_tile<MR, NR>(acc, out);
}

constexpr int nr_for(int mr) { return mr <= 6 ? 4 : 3; }  // streams per thread (see stream_prefetch_bytes)

// dot_tile keeps each activation vector in a register while a tile's activations (rows x K bytes) fit in this many
// bytes of L1, and lets every product load it from memory above. Measured on an AMD EPYC Zen 5 (48 KiB L1D), 2
// threads, alternating builds (layers in x out): 16 tokens on 1536 x 8960 (K = 1536) 0.34-0.36 -> 0.29 ms in a
// register, 8 tokens on 8960 x 1536 (K = 8960, activations from L2) 0.26-0.30 -> 0.33-0.34 ms slower.
constexpr int64_t kActivationsInL1Bytes = 32 * 1024;

template <int MR, int NR, bool Stream = true>
HF_INT8_TARGET_AVX512 inline void dot_rows(const int8_t* a, int64_t lda, const int8_t* const (&b)[NR], int64_t K,
                                           int64_t x_bytes, int32_t* out) {
  if (x_bytes <= kActivationsInL1Bytes) {
    dot_tile<MR, NR, Stream, true>(a, lda, b, K, out);
  } else {
    dot_tile<MR, NR, Stream, false>(a, lda, b, K, out);
  }
}

// 7 activation rows are dotted as 8, the 8th zero. For the 7-row, 3-stream tile GCC ran out of general registers
// (7 row offsets, 3 streams, their prefetches) and moved one token's 64 bytes through the stack every step: a 1536 x
// 8960 layer (in x out) took 0.31-0.35 ms a call with 7 tokens and 0.21-0.24 ms with 8 (AMD EPYC Zen 5, 2 threads).
constexpr int kPaddedM = 7;

// Up to 16 dequantized outlier weights of one row, float(row[cols[c]]) * scale for c < J, in a register (lanes past J
// zero).
HF_INT8_TARGET_AVX512 inline __m512 gather16_dequantized(const int8_t* row, const int64_t* cols, int64_t J,
                                                         float scale, bool overread_ok) {
  __m512i codes;
  if (overread_ok) {
    const __m256i lo = gather_codes8(row, cols, mask8(J));
    const __m256i hi = J > 8 ? gather_codes8(row, cols + 8, mask8(J - 8)) : _mm256_setzero_si256();
    codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  } else {
    alignas(64) int32_t c[16] = {};
    for (int64_t j = 0; j < J; ++j) c[j] = row[cols[j]];
    codes = _mm512_load_si512(c);
  }
  return _mm512_mul_ps(_mm512_cvtepi32_ps(codes), _mm512_set1_ps(scale));
}

// The outlier product of a tile, o[i * NR + j] = sum_c x_outlier[i, c] * w_outlier(n + j, c): 16 outlier weights of
// a row at a time are gathered (the row was just streamed, so it is in cache) and dequantized in a register, then
// multiplied with every token's activations of those columns into lane-wise partial sums (fixed order); the MR * NR
// partial vectors are reduced together. Nothing goes through memory: a gathered row written to a buffer and read back
// at once stalls on store forwarding (measured: 1 token, 100 outlier columns, K = 1536, 51-63% of a plain read of the
// weights with the buffer). Up to kScalarOutliersMax columns (most decode calls: a median of 0-3 per call in Qwen2.5)
// a row's few codes are dequantized one by one and multiplied with all tokens at once (x_by_column[c]: column c's
// activations, one lane per token), each token summing its columns in order with FMAs: cheaper than a gather and a
// reduction tree (1 token), and than one FMA chain per token (8 tokens, 4 columns: 0.30 -> 0.28 ms on 1536 x 8960).
template <int MR, int NR>
HF_INT8_TARGET_AVX512 void tile_outliers(const GemmProblem& p, const int64_t (&rows)[NR],
                                         const float (*x_by_column)[16], float* o) {
  const Epilogue& ep = p.ep;
  const int64_t J = ep.n_outliers;
  if (J <= kScalarOutliersMax) {
    for (int j = 0; j < NR; ++j) {
      const int8_t* row = p.b + rows[j] * p.ldb;
      const float scale = ep.col_scale[rows[j]];
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < J; ++c) {
        const __m512 w = _mm512_set1_ps(static_cast<float>(row[ep.outlier_cols[c]]) * scale);
        sum = _mm512_fmadd_ps(_mm512_load_ps(x_by_column[c]), w, sum);
      }
      alignas(64) float by_token[16];
      _mm512_store_ps(by_token, sum);
      for (int i = 0; i < MR; ++i) o[i * NR + j] = by_token[i];
    }
    return;
  }
  alignas(64) float partial[MR * NR * 16];
  for (int j = 0; j < NR; ++j) {
    const int8_t* row = p.b + rows[j] * p.ldb;
    const float scale = ep.col_scale[rows[j]];
    const bool overread_ok = rows[j] + 1 < p.N;
    __m512 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < J; c += 16) {
      const int64_t valid = std::min<int64_t>(16, J - c);
      const __m512 w = gather16_dequantized(row, ep.outlier_cols + c, valid, scale, overread_ok);
      for (int i = 0; i < MR; ++i) {
        acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask16(valid), ep.x_outlier + i * J + c), w, acc[i]);
      }
    }
    for (int i = 0; i < MR; ++i) _mm512_store_ps(partial + (i * NR + j) * 16, acc[i]);
  }
  reduce_rows_ps(partial, MR * NR, o);
}

// A thread's scratch for the small-M kernel: the AVX512-BF16 outlier product's (tile_outliers_bf16), and for 7 rows
// the activations as 8 (kPaddedM).
struct StreamScratch {
  int8_t* codes = nullptr;     // one row's picked codes: jp + 64 bytes, zero-filled past them
  uint16_t* w = nullptr;       // a tile's (or pair's) rows' codes as bf16: [jp / 32][rows][32]
  const int8_t* a8 = nullptr;  // [8, K]: A's 7 rows and a row of zeros
};

// o[i * NR + j] = sum over the outlier columns of x pieces (token g0 + i) x code(row j), for G tokens, unscaled: the
// G x NR accumulators stay in registers for the whole row (G * NR <= 24), each chunk's NR weight vectors and G token
// vectors are loaded once. `x` points at token g0 of chunk 0 (SmallOutliers::x_pieces' layout).
template <int G, int NR>
HF_INT8_TARGET_AVX512_BF16 inline void outlier_group(const uint16_t* x, int64_t x_chunk, int64_t x_piece, int n_pieces,
                                                     const uint16_t* w, int64_t chunks, float* o) {
  __m512 acc[G][NR];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < chunks; ++c) {
    __m512bh wj[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wj[j] = (__m512bh)_mm512_loadu_si512(w + (c * NR + j) * 32);
    const uint16_t* xc = x + c * x_chunk;
    for (int t = 0; t < n_pieces; ++t) {
      const uint16_t* xt = xc + t * x_piece;
#pragma GCC unroll 8
      for (int i = 0; i < G; ++i) {
        const __m512bh xi = (__m512bh)_mm512_loadu_si512(xt + i * 32);
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xi, wj[j]);
      }
    }
  }
  reduce_tile<G, NR>(acc, o);
}

// Tokens per outlier_group: its G x NR accumulators, NR weight vectors and one token vector fit the 32 registers.
constexpr int outlier_group_m(int nr) { return std::min(8, 24 / nr); }

// The outlier product of a tile on AVX512-BF16 (see SmallOutliers): o[i * NR + j] = col_scale(row j) * sum over the
// outlier columns of x_outlier[i, c] * code(row j, c). Each row's codes are picked (pick_columns, VPERMB) and
// converted to bf16 (exact) once, into scratch.w, then groups of up to 8 tokens dot them with their pieces, 32 columns
// per VDPBF16PS (same order of additions for every group size). Converting per token and chunk instead, with one
// accumulator per token and row, left the loop bound by loads and address arithmetic: 16 tokens, 70% outlier
// columns, 4096 x 4096 took 2.4 ms a call. Out of line: it needs the AVX512-BF16 target, which the int8 loop does not.
template <int MR, int NR>
__attribute__((noinline)) HF_INT8_TARGET_AVX512_BF16 void tile_outliers_bf16(const GemmProblem& p,
                                                                             const int64_t (&rows)[NR],
                                                                             const StreamScratch& scratch, float* o,
                                                                             int64_t prefetch_rows = 0) {
  const SmallOutliers& so = *p.ep.small_outliers;
  const int64_t chunks = so.jp / 32;
  for (int j = 0; j < NR; ++j) {
    const int8_t* ahead = prefetch_rows > 0 ? p.b + (rows[j] + prefetch_rows) * p.ldb : nullptr;
    pick_columns(p.b + rows[j] * p.ldb, *so.cols, scratch.codes, ahead);
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scratch.codes + c * 32));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
      // columns c .. c + 15 from lo, c + 16 .. c + 31 from hi
      _mm512_storeu_si512(scratch.w + (c * NR + j) * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
  const int64_t x_piece = p.M * 32, x_chunk = so.n_pieces * x_piece;
  // Groups of (nearly) equal size, at most outlier_group_m(NR) tokens: a group of one or two tokens would reload the
  // weight vectors for little work.
  constexpr int kGroups = (MR + outlier_group_m(NR) - 1) / outlier_group_m(NR);
  constexpr int kSmall = MR / kGroups, kLarge = kSmall + 1, kLargeGroups = MR % kGroups;
  int i0 = 0;
  for (int g = 0; g < kGroups; ++g) {
    if (g < kLargeGroups) {
      outlier_group<kLarge, NR>(so.x_pieces + i0 * 32, x_chunk, x_piece, so.n_pieces, scratch.w, chunks, o + i0 * NR);
      i0 += kLarge;
    } else {
      outlier_group<kSmall, NR>(so.x_pieces + i0 * 32, x_chunk, x_piece, so.n_pieces, scratch.w, chunks, o + i0 * NR);
      i0 += kSmall;
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) o[i * NR + j] *= p.ep.col_scale[rows[j]];
  }
}

// The streams' results of up to kRun consecutive tiles, finished 16 adjacent outputs at a time (a tile's own NR
// outputs are far apart: one finish16 per output cost ~18% of an 8-token call).
constexpr int64_t kRun = 16;

template <int MR, int NR>
struct StreamRun {
  alignas(64) int32_t acc[NR][MR][kRun];
  alignas(64) float outliers[NR][MR][kRun];
  alignas(64) float x_by_column[kScalarOutliersMax][16];  // see tile_outliers
};

// Tile t of a run: rows[j] = first[j] + t. Its exact int32 sums and outlier products go to the run's lane t.
template <int MR, int NR>
HF_INT8_TARGET_AVX512 void stream_tile(const GemmProblem& p, const int64_t (&first)[NR], int64_t t, bool outliers,
                                       StreamRun<MR, NR>& run, const StreamScratch& scratch) {
  int64_t rows[NR];
  const int8_t* b[NR];
  for (int j = 0; j < NR; ++j) {
    rows[j] = first[j] + t;
    b[j] = p.b + rows[j] * p.ldb;
  }
  int32_t acc[MR * NR];
  if constexpr (MR == kPaddedM) {
    int32_t acc8[(MR + 1) * NR];
    dot_rows<MR + 1, NR>(scratch.a8, p.K, b, p.K, (MR + 1) * p.K, acc8);
    std::memcpy(acc, acc8, sizeof(acc));  // rows 0 .. 6 (acc8[i * NR + j])
  } else if constexpr (MR > kSmallTileM) {
    // Two passes over the tile's rows: the first streams them, the second reads them from L1.
    dot_rows<kSmallTileM, NR>(p.a, p.lda, b, p.K, MR * p.K, acc);
    dot_rows<MR - kSmallTileM, NR, false>(p.a + kSmallTileM * p.lda, p.lda, b, p.K, MR * p.K, acc + kSmallTileM * NR);
  } else {
    dot_rows<MR, NR>(p.a, p.lda, b, p.K, MR * p.K, acc);
  }
  float o[MR * NR];
  if (outliers && p.ep.small_outliers != nullptr) {
    tile_outliers_bf16<MR, NR>(p, rows, scratch, o);
  } else if (outliers) {
    tile_outliers<MR, NR>(p, rows, run.x_by_column, o);
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      run.acc[j][i][t] = acc[i * NR + j];
      if (outliers) run.outliers[j][i][t] = o[i * NR + j];
    }
  }
}

// 9-16 tokens (3 streams, two int8 passes) with the AVX512-BF16 outlier product: it runs on two tiles' rows at a time
// (6 rows, groups of up to 4 tokens: each token vector is loaded once for 6 products instead of 3), and while it picks
// each row's codes it prefetches into L2 the same stream's row of the next pair, which the next int8 pass then reads
// from L2 instead of memory (the outlier product had no memory reads to overlap). Measured on an AMD EPYC Zen 5, 2
// threads, 70% outlier columns, bf16 activations, three rounds alternating builds: 4096 x 4096 with 16 tokens
// 1.56-1.60 -> 1.29-1.35 ms, 4096 x 11008 (in x out) with 12 tokens 3.54-3.70 -> 3.06-3.17 ms; the
// prefetch two tiles ahead without the pairs was slower on the latter (3.26-4.84 ms). At 7-8 tokens (one int8 pass,
// which prefetches the rows itself) the pairs were 3-4% slower with 100 outlier columns: there a tile stays alone.
template <int MR, int NR>
constexpr bool kPairedOutliers = (MR > kSmallTileM) && (NR == 3);

// Tiles t and t + 1 of a run (just t when !pair): their int8 sums, then their outlier product on AVX512-BF16 together.
template <int MR, int NR>
HF_INT8_TARGET_AVX512 void stream_pair(const GemmProblem& p, const int64_t (&first)[NR], int64_t t, bool pair,
                                       StreamRun<MR, NR>& run, const StreamScratch& scratch) {
  stream_tile<MR, NR>(p, first, t, false, run, scratch);
  if (pair) stream_tile<MR, NR>(p, first, t + 1, false, run, scratch);
  constexpr int64_t kAhead = 2;  // rows: the same stream's row in the next pair
  int64_t rows[2 * NR];
  for (int u = 0; u < 2; ++u) {
    for (int j = 0; j < NR; ++j) rows[u * NR + j] = first[j] + t + u;  // rows[j] = first[j] + t for the first tile
  }
  float o[MR * 2 * NR];
  if (pair) {
    tile_outliers_bf16<MR, 2 * NR>(p, rows, scratch, o, kAhead);
  } else {
    int64_t one[NR];
    std::copy(rows, rows + NR, one);
    tile_outliers_bf16<MR, NR>(p, one, scratch, o, kAhead);
  }
  const int tiles = pair ? 2 : 1;
  for (int i = 0; i < MR; ++i) {
    for (int u = 0; u < tiles; ++u) {
      for (int j = 0; j < NR; ++j) run.outliers[j][i][t + u] = o[i * tiles * NR + u * NR + j];
    }
  }
}

// Rows first[j] .. first[j] + count of every stream j, count <= kRun.
template <int MR, int NR>
HF_INT8_TARGET_AVX512 void stream_run(const GemmProblem& p, const int64_t (&first)[NR], int64_t count,
                                      const StreamScratch& scratch) {
  StreamRun<MR, NR> run;
  const bool outliers = p.ep.kind != OutKind::kInt32 && p.ep.n_outliers > 0;
  if (outliers && p.ep.n_outliers <= kScalarOutliersMax) {
    for (int64_t c = 0; c < p.ep.n_outliers; ++c) {
      for (int i = 0; i < 16; ++i) run.x_by_column[c][i] = i < MR ? p.ep.x_outlier[i * p.ep.n_outliers + c] : 0.0f;
    }
  }
  bool paired = false;
  if constexpr (kPairedOutliers<MR, NR>) {
    paired = outliers && p.ep.small_outliers != nullptr;
    for (int64_t t = 0; paired && t < count; t += 2) stream_pair<MR, NR>(p, first, t, t + 1 < count, run, scratch);
  }
  for (int64_t t = 0; !paired && t < count; ++t) stream_tile<MR, NR>(p, first, t, outliers, run, scratch);
  const __mmask16 valid = mask16(count);
  const auto exact = [&](int j, int row) HF_INT8_TARGET_AVX512 {
    return _mm512_sub_epi32(_mm512_maskz_load_epi32(valid, run.acc[j][row]),
                            _mm512_set1_epi32(kU8Shift * p.a_rowsum[row]));
  };
  const Epilogue& ep = p.ep;
  if (ep.piece_unit != nullptr) {
    // Rows [0, T) are the tokens, T + 2i and T + 2i + 1 token i's outlier pieces: its outlier product is
    // unit * (256 * hi + lo) times the row's weight scale. hi and lo are exact in fp32 (gemm.cpp, kPieceMaxCols),
    // 256 * hi + lo is rounded once, as is the product with the scale.
    const int64_t T = ep.piece_tokens;
    for (int64_t i = 0; i < T; ++i) {
      for (int j = 0; j < NR; ++j) {
        const __m512 hi = _mm512_cvtepi32_ps(exact(j, static_cast<int>(T + 2 * i)));
        const __m512 lo = _mm512_cvtepi32_ps(exact(j, static_cast<int>(T + 2 * i + 1)));
        const __m512 sum =
            _mm512_mul_ps(_mm512_fmadd_ps(hi, _mm512_set1_ps(256.0f), lo), _mm512_set1_ps(ep.piece_unit[i]));
        const __m512 scale = _mm512_maskz_loadu_ps(valid, ep.col_scale + first[j]);
        alignas(64) float product[16];
        _mm512_store_ps(product, _mm512_mul_ps(sum, scale));
        finish16(p, i, first[j], count, exact(j, static_cast<int>(i)), product);
      }
    }
    return;
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) finish16(p, i, first[j], count, exact(j, i), outliers ? run.outliers[j][i] : nullptr);
  }
}

template <int MR>
HF_INT8_TARGET_AVX512 void small_m_rows(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  constexpr int NR = nr_for(MR);
  const int64_t slice = (n_end - n_begin) / NR;  // rows per stream (stream_prefetch_bytes)
  // tile_outliers_bf16's scratch; the codes zero-filled, so that the bytes past the picked ones are always
  // initialized.
  const int64_t jp = p.ep.small_outliers != nullptr ? p.ep.small_outliers->jp : 0;
  std::vector<int8_t> codes(p.ep.small_outliers != nullptr ? static_cast<size_t>(jp + 64) : 0);
  std::vector<uint16_t> w_storage;
  std::vector<int8_t> a8_storage;
  int8_t* a8 = nullptr;
  if constexpr (MR == kPaddedM) {
    a8 = line_aligned(a8_storage, static_cast<size_t>((MR + 1) * p.K));  // zero-filled: row MR stays 0
    for (int i = 0; i < MR; ++i) std::memcpy(a8 + i * p.K, p.a + i * p.lda, static_cast<size_t>(p.K));
  }
  const int64_t w_rows = kPairedOutliers<MR, NR> ? 2 * NR : NR;
  const StreamScratch scratch{codes.data(), line_aligned(w_storage, static_cast<size_t>(w_rows * jp)), a8};
  for (int64_t t0 = 0; t0 < slice; t0 += kRun) {
    int64_t first[NR];
    for (int j = 0; j < NR; ++j) first[j] = n_begin + j * slice + t0;
    stream_run<MR, NR>(p, first, std::min(kRun, slice - t0), scratch);
  }
  const int64_t rest = n_begin + NR * slice;  // fewer than NR rows: one stream
  for (int64_t n = rest; n < n_end; n += kRun) stream_run<MR, 1>(p, {n}, std::min(kRun, n_end - n), scratch);
}

// ---------------------------------------------------------------------------------------------------------------
// packing
// ---------------------------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------------------------
// packed large-M microkernel: MR rows x 32 columns (two B panels), full K. A is packed too ([K/4][MR][4]), so the
// loop walks three pointers and keeps 2 * MR accumulators, two B vectors and one broadcast in the 32 registers.
// ---------------------------------------------------------------------------------------------------------------
// Epilogue of an MR x 32 tile from its stored accumulators (kept out of line: inlined into the microkernel, its
// register demand made GCC spill accumulators inside the K loop). `o`, when given, holds the tile's outlier sums
// (unscaled, MR x 32): col_scale multiplies each finished sum, as on the AMX path (outlier_block).
__attribute__((noinline)) HF_INT8_TARGET_AVX512 void finish_tile32(const GemmProblem& p, int64_t m0, int mr,
                                                                   const int32_t* c, const float* o, int64_t n0,
                                                                   int64_t n_valid) {
  alignas(64) float scaled[32];
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  if (o != nullptr) {  // (int32 outputs have no scales)
    s0 = _mm512_maskz_loadu_ps(mask16(n_valid), p.ep.col_scale + n0);
    if (n_valid > 16) s1 = _mm512_maskz_loadu_ps(mask16(n_valid - 16), p.ep.col_scale + n0 + 16);
  }
  for (int i = 0; i < mr; ++i) {
    const __m512i corr = _mm512_set1_epi32(kU8Shift * p.a_rowsum[m0 + i]);
    if (o != nullptr) {
      _mm512_store_ps(scaled, _mm512_mul_ps(_mm512_load_ps(o + i * 32), s0));
      _mm512_store_ps(scaled + 16, _mm512_mul_ps(_mm512_load_ps(o + i * 32 + 16), s1));
    }
    finish16(p, m0 + i, n0, n_valid, _mm512_sub_epi32(_mm512_load_si512(c + i * 32), corr),
             o != nullptr ? scaled : nullptr);
    if (n_valid > 16) {
      finish16(p, m0 + i, n0 + 16, n_valid - 16, _mm512_sub_epi32(_mm512_load_si512(c + i * 32 + 16), corr),
               o != nullptr ? scaled + 16 : nullptr);
    }
  }
}

// The outlier sums of an MR x 32 tile, o[i * 32 + c] = sum over pairs of VDPBF16PS(x pieces of token i, outlier codes
// of weight row c), unscaled: the register tile of micro_packed, on bf16 pairs instead of int8 quads (see
// PackedOutliers). Out of line: it needs the AVX512-BF16 target, which the int8 loop does not.
template <int MR, int NP>
__attribute__((noinline)) HF_INT8_TARGET_AVX512_BF16 void outlier_tile(const uint32_t* xo, const uint32_t* pa,
                                                                       const uint32_t* pb, int64_t pairs, float* o) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(pa + q * kPanelCols);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(pb + q * kPanelCols);
#pragma GCC unroll 3
    for (int t = 0; t < NP; ++t) {
      const uint32_t* xq = xo + (q * NP + t) * kPackedRows;
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(xq[i]));
        acc0[i] = _mm512_dpbf16_ps(acc0[i], w0, x);
        acc1[i] = _mm512_dpbf16_ps(acc1[i], w1, x);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_store_ps(o + i * 32, acc0[i]);
    _mm512_store_ps(o + i * 32 + 16, acc1[i]);
  }
}

// Where a tile's outlier operands are: the token panel's pieces and the block's outlier panels (nullptr: none).
struct TileOutliers {
  const uint32_t* x = nullptr;  // x_pairs of the tile's token panel
  const uint32_t* panels = nullptr;
  int64_t pairs = 0;
  int n_pieces = 0;
};

template <int MR>
HF_INT8_TARGET_AVX512 void micro_packed(const GemmProblem& p, int64_t m0, const int8_t* xa, const uint8_t* pa,
                                        const uint8_t* pb, int64_t kq, int64_t n0, int64_t n_valid,
                                        const TileOutliers& to, int64_t q) {
  __m512i acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_si512();
    acc1[i] = _mm512_setzero_si512();
  }
  for (int64_t g = 0; g < kq; ++g) {
    const __m512i w0 = _mm512_loadu_si512(pa + g * 64);
    const __m512i w1 = _mm512_loadu_si512(pb + g * 64);
    const int8_t* xg = xa + g * (MR * 4);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t xi;
      std::memcpy(&xi, xg + i * 4, sizeof(xi));
      const __m512i x = _mm512_set1_epi32(xi);
      acc0[i] = _mm512_dpbusd_epi32(acc0[i], w0, x);
      acc1[i] = _mm512_dpbusd_epi32(acc1[i], w1, x);
    }
  }
  alignas(64) int32_t c[MR * 32];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_store_si512(c + i * 32, acc0[i]);
    _mm512_store_si512(c + i * 32 + 16, acc1[i]);
  }
  alignas(64) float o[MR * 32];
  if (to.panels != nullptr) {
    const int64_t words = outlier_panel_words(to.pairs);
    const uint32_t* oa = to.panels + q * words;
    const uint32_t* ob = n_valid > kPanelCols ? oa + words : oa;  // an odd last panel: its pair is not stored
    switch (to.n_pieces) {
      case 1: outlier_tile<MR, 1>(to.x, oa, ob, to.pairs, o); break;
      case 2: outlier_tile<MR, 2>(to.x, oa, ob, to.pairs, o); break;
      default: outlier_tile<MR, 3>(to.x, oa, ob, to.pairs, o); break;
    }
  }
  finish_tile32(p, m0, MR, c, to.panels != nullptr ? o : nullptr, n0, n_valid);
}

template <int MR>
HF_INT8_TARGET_AVX512 void packed_rows(const GemmProblem& p, int64_t m0, const int8_t* xa, const uint8_t* panels,
                                       int64_t n_panels, int64_t kq, int64_t n_begin, int64_t n_end,
                                       const TileOutliers& to) {
  const int64_t panel_bytes = kq * 64;
  for (int64_t q = 0; q < n_panels; q += 2) {
    const uint8_t* pa = panels + q * panel_bytes;
    const uint8_t* pb = q + 1 < n_panels ? pa + panel_bytes : pa;  // odd count: the second half is not stored
    const int64_t n0 = n_begin + q * kPanelCols;
    micro_packed<MR>(p, m0, xa, pa, pb, kq, n0, std::min<int64_t>(2 * kPanelCols, n_end - n0), to, q);
  }
}

template <int... MRs>
HF_INT8_TARGET_AVX512 void packed_tail(int mr, const GemmProblem& p, int64_t m0, const int8_t* xa,
                                       const uint8_t* panels, int64_t n_panels, int64_t kq, int64_t n_begin,
                                       int64_t n_end, const TileOutliers& to, std::integer_sequence<int, MRs...>) {
  ((mr == MRs + 1 ? packed_rows<MRs + 1>(p, m0, xa, panels, n_panels, kq, n_begin, n_end, to) : void()), ...);
}

// The outlier codes of weight rows [0, n_rows) (n_rows <= 16) as one outlier panel: panel[q][r] = bf16(code of
// outlier column 2q) | bf16(code of column 2q + 1) << 16 for row r, 0 past the outlier columns and past n_rows. Each
// row's codes are picked into `codes` (16 rows of ld_codes bytes), widened to bf16 pairs row by row into `rows` (16
// rows of round_up(pairs, 16) dwords), then transposed 16 x 16.
HF_INT8_TARGET_AVX512_BF16 void pack_outlier_panel(const int8_t* b, int64_t ldb, int64_t n_rows,
                                                   const PackedOutliers& o, int8_t* codes, int64_t ld_codes,
                                                   uint32_t* rows, uint32_t* panel) {
  const int64_t padded = round_up(o.pairs, 16);
  for (int64_t r = 0; r < kPanelCols; ++r) {
    uint32_t* dst = rows + r * padded;
    if (r >= n_rows) {
      std::memset(dst, 0, static_cast<size_t>(padded) * sizeof(uint32_t));
      continue;
    }
    int8_t* row_codes = codes + r * ld_codes;
    pick_columns(b + r * ldb, *o.cols, row_codes);
    const int64_t n_codes = o.cols->count;
    for (int64_t q = 0; q < padded; q += 16) {  // 16 pairs: 32 codes, converted by VCVTNE2PS2BF16 (exact)
      const int64_t j = 2 * q;
      const __m256i c = _mm256_maskz_loadu_epi8(mask32(std::max<int64_t>(0, n_codes - j)), row_codes + j);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
      _mm512_storeu_si512(dst + q, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // codes j .. j + 15 from lo, then hi
    }
  }
  alignas(64) uint32_t block[16 * 16];
  for (int64_t q = 0; q < padded; q += 16) {
    transpose16_block(rows + q, padded, block, 16);
    const int64_t n = std::min<int64_t>(16, o.pairs - q);
    std::memcpy(panel + q * kPanelCols, block, static_cast<size_t>(n * kPanelCols) * sizeof(uint32_t));
  }
}

}  // namespace

HF_INT8_TARGET_AVX512 void pack_panel(const int8_t* b, int64_t ldb, int64_t n_rows, int64_t K, int64_t kq, bool flip,
                                      uint8_t* panel) {
  const __m512i flip_bits = _mm512_set1_epi8(flip ? static_cast<char>(0x80) : 0);
  int64_t g = 0;
  if (n_rows == kPanelCols) {
    // 16 groups of 4 bytes (64 columns of K) from each of the 16 rows: one 16 x 16 dword transpose.
    for (; 4 * (g + 16) <= K; g += 16) {
      __m512i r[16];
      for (int n = 0; n < 16; ++n) r[n] = _mm512_loadu_si512(b + n * ldb + 4 * g);
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(panel + (g + j) * 64, _mm512_xor_si512(r[j], flip_bits));
    }
  }
  const uint8_t pad = flip ? 0x80 : 0x00;
  for (; g < kq; ++g) {
    uint8_t* dst = panel + g * 64;
    for (int64_t n = 0; n < kPanelCols; ++n) {
      for (int64_t t = 0; t < 4; ++t) {
        const int64_t k = 4 * g + t;
        dst[n * 4 + t] = (n < n_rows && k < K) ? static_cast<uint8_t>(b[n * ldb + k]) ^ (flip ? 0x80 : 0x00) : pad;
      }
    }
  }
}

template <int... Ms>
HF_INT8_TARGET_AVX512 void small_m_for(const GemmProblem& p, int64_t n_begin, int64_t n_end,
                                       std::integer_sequence<int, Ms...>) {
  ((p.M == Ms + 1 ? small_m_rows<Ms + 1>(p, n_begin, n_end) : void()), ...);
}

HF_INT8_TARGET_AVX512 void small_m(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  small_m_for(p, n_begin, n_end, std::make_integer_sequence<int, kSmallMaxM>{});
}

void pack_rows(const GemmProblem& p, int64_t m_begin, int64_t m_end, int8_t* x_panels) {
  const int64_t kq = ceil_div(p.K, 4);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kPackedRows) {
    const int64_t rows = std::min<int64_t>(kPackedRows, p.M - m0);
    int8_t* dst = x_panels + m0 * kq * 4;  // panel of `rows` rows: [kq][rows][4]
    for (int64_t i = 0; i < rows; ++i) {
      const int8_t* src = p.a + (m0 + i) * p.lda;
      const int64_t full = p.K / 4;
      for (int64_t g = 0; g < full; ++g) std::memcpy(dst + (g * rows + i) * 4, src + 4 * g, 4);
      for (int64_t g = full; g < kq; ++g) {
        for (int64_t t = 0; t < 4; ++t) dst[(g * rows + i) * 4 + t] = 4 * g + t < p.K ? src[4 * g + t] : 0;
      }
    }
  }
}

HF_INT8_TARGET_AVX512_VBMI void pick_columns(const int8_t* src, const ColumnPicker& c, int8_t* dst,
                                             const int8_t* prefetch_l2) {
  int64_t written = 0;
  for (size_t i = 0; i < c.words.size(); ++i) {
    const int64_t at = c.words[i] * 64, valid = std::min<int64_t>(64, c.K - at);
    if (prefetch_l2 != nullptr) _mm_prefetch(reinterpret_cast<const char*>(prefetch_l2 + at), _MM_HINT_T1);
    // (a masked load only for a partial last word: it must not read past the row)
    const __m512i v =
        valid == 64 ? _mm512_loadu_si512(src + at) : _mm512_maskz_loadu_epi8(low_mask64(valid), src + at);
    const __m512i index = _mm512_loadu_si512(c.index.data() + i * 64);
    _mm512_storeu_si512(dst + written, _mm512_maskz_permutexvar_epi8(low_mask64(c.taken[i]), index, v));
    written += c.taken[i];
  }
}

HF_INT8_TARGET_AVX512 void pick_columns16(const uint16_t* row, const ColumnPicker& c, uint16_t* dst) {
  int64_t written = 0;
  for (size_t i = 0; i < c.words.size(); ++i) {
    const int64_t at = c.words[i] * 32, valid = std::min<int64_t>(32, c.K - at);
    const __m512i v = _mm512_maskz_loadu_epi16(mask32(valid), row + at);
    const __m512i index = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(&c.index[i * 32])));
    _mm512_storeu_si512(dst + written, _mm512_maskz_permutexvar_epi16(mask32(c.taken[i]), index, v));
    written += c.taken[i];
  }
  // zeros up to the next multiple of 32 (the last store covers part of it)
  for (int64_t j = written; j < round_up(written, 32); ++j) dst[j] = 0;
}

HF_INT8_TARGET_AVX512 void gather_columns16(const uint16_t* x, int64_t ldx, int64_t m_begin, int64_t m_end,
                                            const ColumnPicker& c, bool bf16, float* out) {
  std::vector<uint16_t> picked(static_cast<size_t>(c.count + 32));
  for (int64_t m = m_begin; m < m_end; ++m) {
    pick_columns16(x + m * ldx, c, picked.data());
    float* dst = out + m * c.count;
    for (int64_t j = 0; j < c.count; j += 16) {
      const __mmask16 k = mask16(c.count - j);
      const __m256i h = _mm256_maskz_loadu_epi16(k, picked.data() + j);
      const __m512 f =
          bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
      _mm512_mask_storeu_ps(dst + j, k, f);
    }
  }
}

HF_INT8_TARGET_AVX512 void packed(const GemmProblem& p, const int8_t* x_panels, int64_t n_begin, int64_t n_end,
                                  uint8_t* panels, uint32_t* outlier_panels) {
  const int64_t kq = ceil_div(p.K, 4);
  const int64_t n_panels = ceil_div(n_end - n_begin, kPanelCols);
  // b_keep: each panel's rows are reduced to their K kept columns first, then packed from there.
  const int64_t ld_kept = round_up(p.K + 64, 64);
  std::vector<int8_t> kept(p.b_keep != nullptr ? static_cast<size_t>(kPanelCols * ld_kept) : 0);
  const PackedOutliers* po = p.ep.packed_outliers;
  const int64_t ld_codes = po != nullptr ? round_up(2 * po->pairs + 64, 64) : 0;
  std::vector<int8_t> codes(static_cast<size_t>(kPanelCols * ld_codes));
  std::vector<uint32_t> code_rows(po != nullptr ? static_cast<size_t>(kPanelCols * round_up(po->pairs, 16)) : 0);
  for (int64_t q = 0; q < n_panels; ++q) {
    const int64_t n0 = n_begin + q * kPanelCols, rows = std::min<int64_t>(kPanelCols, n_end - n0);
    const int8_t* b = p.b + n0 * p.ldb;
    int64_t ldb = p.ldb;
    // Picking the kept columns is the rows' first touch (from memory): the next panel's rows are prefetched into L2 on
    // the way. Measured on an AMD EPYC Zen 5, 2 threads, bf16 activations, 70% outlier columns, alternating builds: 24
    // tokens on 1536 x 8960 1.62-1.75 -> 1.47-1.56 ms, 32 tokens on 4096 x 4096 2.19 -> 1.99-2.04 ms. The same
    // prefetch in pack_panel (no columns kept out, 6.5% outlier columns, 32 tokens) changed nothing measurable.
    if (p.b_keep != nullptr) {
      const int8_t* next = q + 1 < n_panels ? p.b + (n0 + kPanelCols) * p.ldb : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        pick_columns(b + r * p.ldb, *p.b_keep, kept.data() + r * ld_kept,
                     next == nullptr ? nullptr : next + r * p.ldb);
      }
      b = kept.data();
      ldb = ld_kept;
    }
    pack_panel(b, ldb, rows, p.K, kq, /*flip=*/true, panels + q * kq * 64);
    // After the rows were read in order (and are in cache): picking a few outlier columns first made its scattered
    // loads the rows' first touch, which the hardware prefetcher does not cover.
    if (po != nullptr) {
      pack_outlier_panel(p.b + n0 * p.ldb, p.ldb, rows, *po, codes.data(), ld_codes, code_rows.data(),
                         outlier_panels + q * outlier_panel_words(po->pairs));
    }
  }
  TileOutliers to;
  if (po != nullptr) {
    to.panels = outlier_panels;
    to.pairs = po->pairs;
    to.n_pieces = po->n_pieces;
  }
  const int64_t x_panel_words = po != nullptr ? po->pairs * po->n_pieces * kPackedRows : 0;
  int64_t m0 = 0;
  for (; m0 + kPackedRows <= p.M; m0 += kPackedRows) {
    if (po != nullptr) to.x = po->x_pairs + m0 / kPackedRows * x_panel_words;
    packed_rows<kPackedRows>(p, m0, x_panels + m0 * kq * 4, panels, n_panels, kq, n_begin, n_end, to);
  }
  if (m0 < p.M) {
    if (po != nullptr) to.x = po->x_pairs + m0 / kPackedRows * x_panel_words;
    packed_tail(static_cast<int>(p.M - m0), p, m0, x_panels + m0 * kq * 4, panels, n_panels, kq, n_begin, n_end, to,
                std::make_integer_sequence<int, kPackedRows - 1>{});
  }
}

}  // namespace hf_int8::cpu::avx512

#else  // not x86: the driver never calls these

namespace hf_int8::cpu::avx512 {
void pack_panel(const int8_t*, int64_t, int64_t, int64_t, int64_t, bool, uint8_t*) {}
void small_m(const GemmProblem&, int64_t, int64_t) {}
void pack_rows(const GemmProblem&, int64_t, int64_t, int8_t*) {}
void packed(const GemmProblem&, const int8_t*, int64_t, int64_t, uint8_t*, uint32_t*) {}
void pick_columns(const int8_t*, const ColumnPicker&, int8_t*, const int8_t*) {}
void gather_columns16(const uint16_t*, int64_t, int64_t, int64_t, const ColumnPicker&, bool, float*) {}
void pick_columns16(const uint16_t*, const ColumnPicker&, uint16_t*) {}
}  // namespace hf_int8::cpu::avx512

#endif  // HF_INT8_X86
