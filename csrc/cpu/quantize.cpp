// LLM.int8() quantization on CPU: ops quantize_activation and quantize_weight, and the fused activation quantizer
// that int8_linear runs before its GEMM.
//
// Activation quantization of x [M, K] with threshold t (the same float math as hf_int8/ops/reference.py):
//   * pass 1 (only when t > 0): per-row absmax and the outlier column set (a column is an outlier when any row has
//     |x| >= t there). The set needs every row, so this pass must finish before any row can be encoded;
//   * pass 2, per row: its absmax over the non-outlier columns (reusing pass 1's when there are no outlier columns,
//     computing it here when t == 0, so that t == 0 reads x once), then the codes, the row sum of the codes and the
//     row scale. Outlier columns get code 0.
// Rows are split into fixed blocks for the threads; each block ORs its outlier columns into its own bitmap and the
// bitmaps are combined in block order, so the result never depends on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "hf_int8/cpu_avx512.h"
#include "hf_int8/cpu_kernels.h"

namespace hf_int8::cpu {

namespace {

constexpr int64_t kRowBlock = 16;  // rows per parallel work item
constexpr int64_t kBitsPerWord = 16;

template <InKind kIn>
inline float load_scalar(const void* x, int64_t i) {
  if constexpr (kIn == InKind::kF32) {
    return static_cast<const float*>(x)[i];
  } else if constexpr (kIn == InKind::kBF16) {
    return static_cast<float>(static_cast<const c10::BFloat16*>(x)[i]);
  } else {
    return static_cast<float>(static_cast<const c10::Half*>(x)[i]);
  }
}

inline bool column_is_outlier(const uint16_t* bits, int64_t k) {
  return (bits[k / kBitsPerWord] >> (k % kBitsPerWord)) & 1u;
}

inline float nan_or(bool nan, float v) { return nan ? std::numeric_limits<float>::quiet_NaN() : v; }

// ---------------------------------------------------------------------------------------------------------------
// Scalar rows (any CPU; also compiled with AVX2 enabled, where GCC vectorizes them).
// ---------------------------------------------------------------------------------------------------------------
// absmax of a row (NaN if the row holds a NaN, like torch.amax) and, when threshold > 0, its outlier columns.
template <InKind kIn>
__attribute__((always_inline)) inline float row_stats_scalar(const void* x, int64_t K, float threshold,
                                                             uint16_t* bits) {
  float absmax = 0.0f;
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    const float v = load_scalar<kIn>(x, k);
    const float a = std::fabs(v);
    nan |= (v != v);
    absmax = a > absmax ? a : absmax;
    if (bits != nullptr && is_outlier(v, threshold)) bits[k / kBitsPerWord] |= uint16_t(1u << (k % kBitsPerWord));
  }
  return nan_or(nan, absmax);
}

// absmax over the non-outlier columns (outlier columns count as 0, as after masked_fill in the reference).
template <InKind kIn>
__attribute__((always_inline)) inline float row_masked_absmax_scalar(const void* x, int64_t K, const uint16_t* bits) {
  float absmax = 0.0f;
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    if (column_is_outlier(bits, k)) continue;
    const float v = load_scalar<kIn>(x, k);
    const float a = std::fabs(v);
    nan |= (v != v);
    absmax = a > absmax ? a : absmax;
  }
  return nan_or(nan, absmax);
}

// Codes of a row; returns their sum.
template <InKind kIn>
__attribute__((always_inline)) inline int32_t row_encode_scalar(const void* x, int64_t K, float multiplier,
                                                                const uint16_t* bits, int8_t* codes) {
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    const bool outlier = bits != nullptr && column_is_outlier(bits, k);
    const int8_t c = outlier ? int8_t(0) : encode(load_scalar<kIn>(x, k), multiplier);
    codes[k] = c;
    sum += c;
  }
  return sum;
}

#if HF_INT8_X86
// ---------------------------------------------------------------------------------------------------------------
// AVX-512 rows.
// ---------------------------------------------------------------------------------------------------------------
template <InKind kIn>
HF_INT8_TARGET_AVX512 inline __m512 load16(const void* x, int64_t k, __mmask16 m) {
  if constexpr (kIn == InKind::kF32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + k);
  } else if constexpr (kIn == InKind::kBF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + k);
    return _mm512_cvtph_ps(h);
  }
}

HF_INT8_TARGET_AVX512 inline __m512 abs16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)));
}

template <InKind kIn>
HF_INT8_TARGET_AVX512 float row_stats_avx512(const void* x, int64_t K, float threshold, uint16_t* bits) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  const __m512 vt = _mm512_set1_ps(threshold);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = avx512::mask16(K - k);
    const __m512 v = load16<kIn>(x, k, m);
    const __m512 a = abs16(v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, a);
    if (bits != nullptr) bits[k / kBitsPerWord] |= _mm512_mask_cmp_ps_mask(m, a, vt, _CMP_GE_OQ);
  }
  return nan_or(nan != 0, _mm512_reduce_max_ps(vmax));
}

template <InKind kIn>
HF_INT8_TARGET_AVX512 float row_masked_absmax_avx512(const void* x, int64_t K, const uint16_t* bits) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = avx512::mask16(K - k) & __mmask16(~bits[k / kBitsPerWord]);
    const __m512 v = load16<kIn>(x, k, m);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, abs16(v));
  }
  return nan_or(nan != 0, _mm512_reduce_max_ps(vmax));
}

template <InKind kIn>
HF_INT8_TARGET_AVX512 int32_t row_encode_avx512(const void* x, int64_t K, float multiplier, const uint16_t* bits,
                                                int8_t* codes) {
  const __m512 vmul = _mm512_set1_ps(multiplier);
  const __m512 lo = _mm512_set1_ps(-static_cast<float>(kInt8Max));
  const __m512 hi = _mm512_set1_ps(static_cast<float>(kInt8Max));
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = avx512::mask16(K - k);
    const __mmask16 keep = bits != nullptr ? __mmask16(m & ~bits[k / kBitsPerWord]) : m;
    const __m512 v = load16<kIn>(x, k, keep);  // outlier columns load as 0, like masked_fill(mask, 0)
    const __m512 q = _mm512_mul_ps(v, vmul);
    const __mmask16 ordered = _mm512_cmp_ps_mask(q, q, _CMP_ORD_Q);
    __m512 r = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    const __m512i c = _mm512_cvtps_epi32(_mm512_maskz_mov_ps(ordered, r));  // NaN -> 0
    vsum = _mm512_add_epi32(vsum, c);
    _mm_mask_storeu_epi8(codes + k, m, _mm512_cvtepi32_epi8(c));
  }
  return _mm512_reduce_add_epi32(vsum);
}
#endif  // HF_INT8_X86

// ---------------------------------------------------------------------------------------------------------------
// Per-ISA row functions behind one interface.
// ---------------------------------------------------------------------------------------------------------------
struct RowOps {
  float (*stats)(const void*, int64_t, float, uint16_t*);
  float (*masked_absmax)(const void*, int64_t, const uint16_t*);
  int32_t (*encode)(const void*, int64_t, float, const uint16_t*, int8_t*);
};

template <InKind kIn>
float stats_generic(const void* x, int64_t K, float t, uint16_t* bits) {
  return row_stats_scalar<kIn>(x, K, t, bits);
}
template <InKind kIn>
float masked_absmax_generic(const void* x, int64_t K, const uint16_t* bits) {
  return row_masked_absmax_scalar<kIn>(x, K, bits);
}
template <InKind kIn>
int32_t encode_generic(const void* x, int64_t K, float mul, const uint16_t* bits, int8_t* codes) {
  return row_encode_scalar<kIn>(x, K, mul, bits, codes);
}

#if HF_INT8_X86
template <InKind kIn>
HF_INT8_TARGET_AVX2 float stats_avx2(const void* x, int64_t K, float t, uint16_t* bits) {
  return row_stats_scalar<kIn>(x, K, t, bits);
}
template <InKind kIn>
HF_INT8_TARGET_AVX2 float masked_absmax_avx2(const void* x, int64_t K, const uint16_t* bits) {
  return row_masked_absmax_scalar<kIn>(x, K, bits);
}
template <InKind kIn>
HF_INT8_TARGET_AVX2 int32_t encode_avx2(const void* x, int64_t K, float mul, const uint16_t* bits, int8_t* codes) {
  return row_encode_scalar<kIn>(x, K, mul, bits, codes);
}
#endif

template <InKind kIn>
RowOps row_ops_for(Isa isa) {
#if HF_INT8_X86
  if (isa >= Isa::kAvx512Vnni) {
    return {&row_stats_avx512<kIn>, &row_masked_absmax_avx512<kIn>, &row_encode_avx512<kIn>};
  }
  if (isa >= Isa::kAvx2) return {&stats_avx2<kIn>, &masked_absmax_avx2<kIn>, &encode_avx2<kIn>};
#endif
  (void)isa;
  return {&stats_generic<kIn>, &masked_absmax_generic<kIn>, &encode_generic<kIn>};
}

RowOps row_ops(Isa isa, InKind in) {
  switch (in) {
    case InKind::kF32: return row_ops_for<InKind::kF32>(isa);
    case InKind::kBF16: return row_ops_for<InKind::kBF16>(isa);
    default: return row_ops_for<InKind::kF16>(isa);
  }
}

int64_t element_size(InKind in) { return in == InKind::kF32 ? 4 : 2; }

}  // namespace

int64_t quantize_activation_into(Isa isa, InKind in, const void* x, int64_t M, int64_t K, int64_t ldx, float threshold,
                                 const ActQuantOut& out) {
  const RowOps ops = row_ops(isa, in);
  const int64_t esize = element_size(in);
  const auto* xb = static_cast<const char*>(x);
  const int64_t words = ceil_div(K, kBitsPerWord) + 1;  // +1: the AVX-512 loop reads one word per 16 columns
  const int64_t n_blocks = ceil_div(M, kRowBlock);
  const int64_t grain = std::max<int64_t>(1, 32768 / (kRowBlock * std::max<int64_t>(K, 1)));
  std::vector<uint16_t> bits(static_cast<size_t>(words), 0);
  int64_t n_outliers = 0;

  if (threshold > 0.0f && M > 0) {
    // Pass 1: row absmax (kept in row_scale until pass 2) and each block's outlier columns.
    std::vector<uint16_t> block_bits(static_cast<size_t>(n_blocks * words), 0);
    at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        uint16_t* bb = block_bits.data() + b * words;
        for (int64_t m = b * kRowBlock; m < std::min(M, (b + 1) * kRowBlock); ++m) {
          out.row_scale[m] = ops.stats(xb + m * ldx * esize, K, threshold, bb);
        }
      }
    });
    for (int64_t b = 0; b < n_blocks; ++b) {
      for (int64_t w = 0; w < words; ++w) bits[w] |= block_bits[b * words + w];
    }
    // No bit past column K is ever set. Word by word: scanning column by column cost ~10 us a 1-token call at K =
    // 8960.
    for (const uint16_t word : bits) n_outliers += __builtin_popcount(word);
  }
  if (out.col_mask != nullptr) {
    std::memset(out.col_mask, 0, static_cast<size_t>(K));
    for (int64_t w = 0; n_outliers > 0 && w < words; ++w) {
      for (uint32_t word = bits[w]; word != 0; word &= word - 1) {
        out.col_mask[w * kBitsPerWord + __builtin_ctz(word)] = 1;
      }
    }
  }

  // Pass 2: absmax over the inlier columns, codes, row sums, scales.
  const uint16_t* mask = n_outliers > 0 ? bits.data() : nullptr;
  const bool have_absmax = threshold > 0.0f;
  at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t m = b0 * kRowBlock; m < std::min(M, b1 * kRowBlock); ++m) {
      const char* row = xb + m * ldx * esize;
      float absmax;
      if (mask != nullptr) {
        absmax = ops.masked_absmax(row, K, mask);
      } else if (have_absmax) {
        absmax = out.row_scale[m];
      } else {
        absmax = ops.stats(row, K, 0.0f, nullptr);
      }
      const int32_t sum = ops.encode(row, K, multiplier_from_absmax(absmax), mask, out.codes + m * K);
      if (out.rowsum != nullptr) out.rowsum[m] = sum;
      out.row_scale[m] = scale_from_absmax(absmax);
    }
  });
  return n_outliers;
}

// ---------------------------------------------------------------------------------------------------------------
// Ops.
// ---------------------------------------------------------------------------------------------------------------
InKind in_kind(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return InKind::kF32;
    case at::kBFloat16: return InKind::kBF16;
    case at::kHalf: return InKind::kF16;
    default:
      TORCH_CHECK_VALUE(false, "hf_int8: ", name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return InKind::kF32;  // not reached
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "hf_int8 CPU kernel: ", name, " must be on the CPU, got ", t.device());
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activation_cpu(const at::Tensor& x, double threshold) {
  check_cpu(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "hf_int8::quantize_activation: x must be 2-D [tokens, features], got shape ",
                    x.sizes());
  const InKind in = in_kind(x, "x");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor codes = at::empty({M, K}, xc.options().dtype(at::kChar));
  at::Tensor row_scale = at::empty({M}, xc.options().dtype(at::kFloat));
  at::Tensor mask = at::empty({K}, xc.options().dtype(at::kBool));
  ActQuantOut out;
  out.codes = codes.data_ptr<int8_t>();
  out.row_scale = row_scale.data_ptr<float>();
  out.col_mask = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  quantize_activation_into(selected_isa(), in, xc.data_ptr(), M, K, K, static_cast<float>(threshold), out);
  return {codes, row_scale, mask};
}

std::tuple<at::Tensor, at::Tensor> quantize_weight_cpu(const at::Tensor& weight) {
  check_cpu(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "hf_int8::quantize_weight: weight must be 2-D [out_features, in_features], ",
                    "got shape ", weight.sizes());
  const InKind in = in_kind(weight, "weight");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor codes = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({N}, w.options().dtype(at::kFloat));
  ActQuantOut out;
  out.codes = codes.data_ptr<int8_t>();
  out.row_scale = scale.data_ptr<float>();
  // Row-wise absmax quantization is activation quantization without outlier columns (threshold 0).
  quantize_activation_into(selected_isa(), in, w.data_ptr(), N, K, K, 0.0f, out);
  return {codes, scale};
}

}  // namespace

}  // namespace hf_int8::cpu

TORCH_LIBRARY_IMPL(hf_int8, CPU, m) {
  m.impl("quantize_activation", &hf_int8::cpu::quantize_activation_cpu);
  m.impl("quantize_weight", &hf_int8::cpu::quantize_weight_cpu);
}
