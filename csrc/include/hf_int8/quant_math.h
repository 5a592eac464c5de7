// Quantization math shared by the CPU and CUDA kernels (and mirrored by hf_int8/ops/reference.py).
//
// Every native kernel must produce the same int8 codes as the reference, bit for bit, so the float operations
// and their order are fixed here:
//   scale      = absmax / INT8_MAX                         (fp32; what dequantization multiplies by)
//   multiplier = absmax > 0 ? INT8_MAX / absmax : 0        (fp32; a zero row gives zero codes, never NaN)
//   code       = clamp(round_half_to_even(x * multiplier), -INT8_MAX, INT8_MAX), NaN -> 0
//   value      = float(acc) * (row_scale * col_scale)      (fp32 epilogue of the int32 GEMM)
// Compiled into the CPU build (plain inline functions) and the CUDA build (__host__ __device__).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HF_INT8_HD __host__ __device__ __forceinline__
#else
#define HF_INT8_HD inline
#endif

namespace hf_int8 {

// Largest magnitude of a symmetric int8 code; -128 is never produced.
constexpr int kInt8Max = 127;

HF_INT8_HD float scale_from_absmax(float absmax) { return absmax / static_cast<float>(kInt8Max); }

HF_INT8_HD float multiplier_from_absmax(float absmax) {
  return absmax > 0.0f ? static_cast<float>(kInt8Max) / absmax : 0.0f;
}

// Round half to even (the default FP rounding mode, like torch.round), clamp, and map NaN to 0.
HF_INT8_HD int8_t encode(float x, float multiplier) {
  float q = rintf(x * multiplier);
  if (q != q) return 0;
  q = fminf(fmaxf(q, -static_cast<float>(kInt8Max)), static_cast<float>(kInt8Max));
  return static_cast<int8_t>(q);
}

// An activation is an outlier when threshold > 0 and |x| >= threshold; its whole column then takes the fp path.
HF_INT8_HD bool is_outlier(float x, float threshold) { return threshold > 0.0f && fabsf(x) >= threshold; }

HF_INT8_HD float dequantize(int32_t acc, float row_scale, float col_scale) {
  return static_cast<float>(acc) * (row_scale * col_scale);
}

// u8 x s8 trick (VNNI on CPU): x_u8 = x_s8 + 128, so sum(x_u8 * w) = sum(x_s8 * w) + 128 * sum(w).
constexpr int kU8Shift = 128;

HF_INT8_HD int32_t unshift_u8_accumulator(int32_t acc_u8s8, int32_t weight_row_sum) {
  return acc_u8s8 - kU8Shift * weight_row_sum;
}

HF_INT8_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a rounded up to a multiple of b.
HF_INT8_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace hf_int8
