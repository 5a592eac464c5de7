// The CUDA C++ dialect the hf_int8 kernels are written in, for a host compiler: execution-space keywords, built-in
// variables, the intrinsics the kernels call directly, half/bfloat16 conversions and the few runtime calls of their
// host code. Included through the stand-in cuda_runtime.h / cuda_fp16.h / cuda_bf16.h of this folder's parent, which
// the emulator's build puts first on the include path instead of the CUDA toolkit's.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "hf_int8_emu/runtime.h"

#define HF_INT8_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// One block runs at a time, so a function-level static is the block's shared memory.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

#define threadIdx (::hf_int8::emu::coords().thread_idx)
#define blockIdx (::hf_int8::emu::coords().block_idx)
#define blockDim (::hf_int8::emu::coords().block_dim)
#define gridDim (::hf_int8::emu::coords().grid_dim)

inline void __syncthreads() { ::hf_int8::emu::syncthreads(); }
[[noreturn]] inline void __trap() { ::hf_int8::emu::trap("__trap()"); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
// Single-rounding float operations; the emulator is compiled with -ffp-contract=off so nothing else fuses either.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  return ::hf_int8::emu::memset_async(p, value, bytes);
}
inline cudaError_t cudaGetLastError() { return ::hf_int8::emu::take_last_error(); }

// IEEE binary16 and bfloat16 storage types with the conversions of cuda_fp16.h / cuda_bf16.h (round to nearest
// even). binary16 uses the compiler's _Float16, whose conversions are correctly rounded.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}

inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  __nv_bfloat16 h;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
    h.bits = static_cast<uint16_t>((bits >> 16) | 0x40u);
    return h;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round half to even on the 16 dropped bits
  h.bits = static_cast<uint16_t>(bits >> 16);
  return h;
}

inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
