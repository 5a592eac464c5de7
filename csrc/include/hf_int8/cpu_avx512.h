// AVX-512 helpers shared by the CPU kernels (quantization, VNNI and AMX GEMMs, outlier product): lane masks, a
// 16 x 16 dword transpose, an int8 gather, and the epilogue that turns 16 accumulators of one row into the output
// dtype (the same operations, in the same order, as finish_element() in cpu_kernels.h and as the reference).
//
// Include this header in every file that uses AVX-512 intrinsics. GCC 12 reports -Wuninitialized and
// -Wmaybe-uninitialized inside its own intrinsics (avx512fintrin.h): _mm512_undefined_epi32() and friends are
// written `__m512i __Y = __Y;` on purpose, the "don't care" source of a masked builtin whose lanes are all
// overwritten, and once inlined GCC 12 flags that self-initialisation (GCC bug 105593, fixed in GCC 13). The
// warnings are false positives about the compiler's own headers, so they are silenced here, once; the pragma
// applies to the rest of the including file.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "hf_int8/cpu_kernels.h"

#if HF_INT8_X86
#include <immintrin.h>

namespace hf_int8::cpu::avx512 {

HF_INT8_TARGET_AVX512 inline __mmask16 mask16(int64_t n_valid) {
  return n_valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n_valid) - 1u);
}

HF_INT8_TARGET_AVX512 inline __mmask32 mask32(int64_t n_valid) {
  return n_valid >= 32 ? ~__mmask32(0) : (__mmask32(1) << n_valid) - 1;
}

HF_INT8_TARGET_AVX512 inline __mmask64 low_mask64(int64_t n_valid) {
  return n_valid >= 64 ? ~__mmask64(0) : (__mmask64(1) << n_valid) - 1;
}

// Keeps GCC from contracting the dequantizing multiply with a following add (see rounded() in cpu_kernels.h).
HF_INT8_TARGET_AVX512 inline __m512 rounded16(__m512 v) {
  asm("" : "+v"(v));
  return v;
}

// fp32 -> bf16, round to nearest even, NaN -> quiet NaN (as c10::BFloat16).
HF_INT8_TARGET_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// In-register transpose of a 16 x 16 matrix of dwords (r[i] holds row i).
HF_INT8_TARGET_AVX512 inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int q = 0; q < 8; ++q) {
    t[2 * q] = _mm512_unpacklo_epi32(r[2 * q], r[2 * q + 1]);
    t[2 * q + 1] = _mm512_unpackhi_epi32(r[2 * q], r[2 * q + 1]);
  }
  for (int q = 0; q < 4; ++q) {
    u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  // u[4q + c], 128-bit lane L, holds rows 4q..4q+3 of column 4L + c.
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
    r[0 + c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[4 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// A 16 x 16 block of dwords, transposed from memory to memory: row i of src (src_ld dwords apart) becomes column i of
// dst (rows dst_ld dwords apart).
HF_INT8_TARGET_AVX512 inline void transpose16_block(const void* src, int64_t src_ld, void* dst, int64_t dst_ld) {
  const auto* from = static_cast<const int32_t*>(src);
  auto* to = static_cast<int32_t*>(dst);
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(from + i * src_ld);
  transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(to + i * dst_ld, r[i]);
}

HF_INT8_TARGET_AVX512 inline __mmask8 mask8(int64_t n_valid) {
  return n_valid >= 8 ? __mmask8(0xFF) : __mmask8((1u << n_valid) - 1u);
}

// The int8 values row[cols[0 .. 8)] (lanes in mask k) as int32. The gather reads 4 bytes at each row + cols[c]: the
// caller makes sure the 3 bytes past the column may be read (any weight row but the buffer's last).
HF_INT8_TARGET_AVX512 inline __m256i gather_codes8(const int8_t* row, const int64_t* cols, __mmask8 k) {
  const __m512i idx = _mm512_maskz_loadu_epi64(k, cols);
  const __m256i bytes = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), k, idx, row, 1);
  return _mm256_srai_epi32(_mm256_slli_epi32(bytes, 24), 24);  // sign-extend the low byte
}

// Finishes out[m, n .. n + n_valid) from the int32 accumulators `acc` (already exact: shift correction applied).
// `outliers`, when given, holds the 16 values of the outlier product for these outputs (fused AMX path).
HF_INT8_TARGET_AVX512 inline void finish16(const GemmProblem& p, int64_t m, int64_t n, int64_t n_valid, __m512i acc,
                                           const float* outliers = nullptr) {
  const Epilogue& ep = p.ep;
  const __mmask16 k = mask16(n_valid);
  if (ep.kind == OutKind::kInt32) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(ep.out) + m * ep.ldo + n, k, acc);
    return;
  }
  const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(ep.row_scale[m]), _mm512_maskz_loadu_ps(k, ep.col_scale + n));
  __m512 v = rounded16(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale));
  if (outliers != nullptr) {
    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, outliers));
  } else if (ep.outlier_product != nullptr) {
    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, ep.outlier_product + m * ep.outlier_product_ld + n));
  } else if (ep.n_outliers > 0) {
    __m512 o = _mm512_setzero_ps();
    const float* xo = ep.x_outlier + m * ep.n_outliers;
    for (int64_t j = 0; j < ep.n_outliers; ++j) {
      o = _mm512_fmadd_ps(_mm512_set1_ps(xo[j]), _mm512_maskz_loadu_ps(k, ep.w_outlier_t + j * p.N + n), o);
    }
    v = _mm512_add_ps(v, o);
  }
  if (ep.bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, ep.bias + n));
  switch (ep.kind) {
    case OutKind::kF32: _mm512_mask_storeu_ps(static_cast<float*>(ep.out) + m * ep.ldo + n, k, v); break;
    case OutKind::kBF16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(ep.out) + m * ep.ldo + n, k, to_bf16(v));
      break;
    case OutKind::kF16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(ep.out) + m * ep.ldo + n, k,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default: break;
  }
}

}  // namespace hf_int8::cpu::avx512

#endif  // HF_INT8_X86
