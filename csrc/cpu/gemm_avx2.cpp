// AVX2 int8 GEMM: the fallback for x86-64 CPUs without AVX-512 VNNI, for few tokens (decode). With more tokens
// oneDNN's AVX2 int8 GEMM (at::_int_mm) is faster than this kernel; gemm.cpp then runs it and finish_rows() below
// applies the fused epilogue to its int32 result.
//
// Bytes are sign-extended to 16 bits (VPMOVSXBW) and multiplied pairwise into int32 (VPMADDWD): exact for every int8
// value, -128 included, with no +128 shift (the u8 x s8 VPMADDUBSW would saturate). Dot-product form: MR rows of A
// against NR rows of B, 16 bytes of K per step, reduced horizontally at the end. B rows are walked in blocks that
// stay in L2 while every row block of A passes over them, so B is read from memory once.
#include "hf_int8/cpu_kernels.h"

#if HF_INT8_X86
#include <immintrin.h>

#include <algorithm>

namespace hf_int8::cpu::avx2 {

namespace {

constexpr int64_t kBlockBytes = 256 * 1024;  // B rows per block: about this many bytes

HF_INT8_TARGET_AVX2 inline int32_t reduce8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// Horizontal sums of the stored accumulators plus the K tail [k_done, K), done out of line: inlined, they made GCC
// spill accumulators inside the main loop.
__attribute__((noinline)) HF_INT8_TARGET_AVX2 void finish_sums(const int8_t* a, int64_t lda, const int8_t* b,
                                                               int64_t ldb, int64_t K, int64_t k_done, int mr, int nr,
                                                               const int32_t* stored, int32_t* out) {
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) {
      int32_t s = reduce8(_mm256_load_si256(reinterpret_cast<const __m256i*>(stored + (i * nr + j) * 8)));
      for (int64_t t = k_done; t < K; ++t) s += int32_t(a[i * lda + t]) * int32_t(b[j * ldb + t]);
      out[i * nr + j] = s;
    }
  }
}

template <int MR, int NR>
HF_INT8_TARGET_AVX2 void dot_tile(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t K,
                                  int32_t* out) {
  __m256i acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  }
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i w[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j * ldb + k)));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i * lda + k)));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(w[j], x));
    }
  }
  alignas(32) int32_t stored[MR * NR * 8];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(stored + (i * NR + j) * 8), acc[i][j]);
  }
  finish_sums(a, lda, b, ldb, K, k, MR, NR, stored, out);
}

template <int MR>
HF_INT8_TARGET_AVX2 void rows_against_block(const GemmProblem& p, int64_t m0, int64_t n_begin, int64_t n_end) {
  constexpr int NR = MR <= 2 ? 4 : 2;
  int32_t acc[MR * NR];
  const int8_t* a = p.a + m0 * p.lda;
  int64_t n = n_begin;
  for (; n + NR <= n_end; n += NR) {
    dot_tile<MR, NR>(a, p.lda, p.b + n * p.ldb, p.ldb, p.K, acc);
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NR; ++j) finish_element(p, m0 + i, n + j, acc[i * NR + j]);
    }
  }
  for (; n < n_end; ++n) {
    dot_tile<MR, 1>(a, p.lda, p.b + n * p.ldb, p.ldb, p.K, acc);
    for (int i = 0; i < MR; ++i) finish_element(p, m0 + i, n, acc[i]);
  }
}

// fp32 -> bf16 / fp16 for 8 lanes, round to nearest even (NaN -> quiet NaN for bf16, as c10::BFloat16).
HF_INT8_TARGET_AVX2 inline __m128i to_bf16x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// Same operations as finish_element() for out[m, n .. n + 8).
HF_INT8_TARGET_AVX2 inline void finish8(const GemmProblem& p, int64_t m, int64_t n, __m256i acc) {
  const Epilogue& ep = p.ep;
  if (ep.kind == OutKind::kInt32) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int32_t*>(ep.out) + m * ep.ldo + n), acc);
    return;
  }
  const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(ep.row_scale[m]), _mm256_loadu_ps(ep.col_scale + n));
  __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale);
  asm("" : "+x"(v));  // no FMA contraction with the adds below (see rounded() in cpu_kernels.h)
  if (ep.outlier_product != nullptr) {
    v = _mm256_add_ps(v, _mm256_loadu_ps(ep.outlier_product + m * ep.outlier_product_ld + n));
  } else if (ep.n_outliers > 0) {
    __m256 o = _mm256_setzero_ps();
    const float* xo = ep.x_outlier + m * ep.n_outliers;
    for (int64_t j = 0; j < ep.n_outliers; ++j) {
      o = _mm256_fmadd_ps(_mm256_set1_ps(xo[j]), _mm256_loadu_ps(ep.w_outlier_t + j * p.N + n), o);
    }
    v = _mm256_add_ps(v, o);
  }
  if (ep.bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(ep.bias + n));
  switch (ep.kind) {
    case OutKind::kF32: _mm256_storeu_ps(static_cast<float*>(ep.out) + m * ep.ldo + n, v); break;
    case OutKind::kBF16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(ep.out) + m * ep.ldo + n), to_bf16x8(v));
      break;
    case OutKind::kF16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(ep.out) + m * ep.ldo + n),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default: break;
  }
}

}  // namespace

HF_INT8_TARGET_AVX2 void finish_rows(const GemmProblem& p, const int32_t* acc, int64_t ld_acc, int64_t m_begin,
                                     int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    const int32_t* row = acc + m * ld_acc;
    int64_t n = 0;
    for (; n + 8 <= p.N; n += 8) finish8(p, m, n, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + n)));
    for (; n < p.N; ++n) finish_element(p, m, n, row[n]);
  }
}

HF_INT8_TARGET_AVX2 void gemm(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t block = std::max<int64_t>(4, kBlockBytes / std::max<int64_t>(p.K, 1));
  for (int64_t nb = n_begin; nb < n_end; nb += block) {
    const int64_t ne = std::min(n_end, nb + block);
    int64_t m0 = 0;
    for (; m0 + 4 <= p.M; m0 += 4) rows_against_block<4>(p, m0, nb, ne);
    switch (p.M - m0) {
      case 3: rows_against_block<3>(p, m0, nb, ne); break;
      case 2: rows_against_block<2>(p, m0, nb, ne); break;
      case 1: rows_against_block<1>(p, m0, nb, ne); break;
      default: break;
    }
  }
}

}  // namespace hf_int8::cpu::avx2

#else  // not x86

namespace hf_int8::cpu::avx2 {
void gemm(const GemmProblem&, int64_t, int64_t) {}
void finish_rows(const GemmProblem&, const int32_t*, int64_t, int64_t, int64_t) {}
}  // namespace hf_int8::cpu::avx2

#endif  // HF_INT8_X86
