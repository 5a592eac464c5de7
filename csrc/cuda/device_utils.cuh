// Small device helpers shared by the hf_int8 CUDA kernels: typed loads/stores by run-time dtype tag, NaN-propagating
// max, warp reductions, and the one kernel-launch helper. No PyTorch header is included here (see launch.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "launch.h"
#include "ptx.cuh"

namespace hf_int8 {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Element `i` of a float tensor whose dtype is only known at run time (uniform branch: same tag for the launch).
__device__ __forceinline__ float load_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Round-to-nearest-even stores, like at::Tensor.to(dtype).
__device__ __forceinline__ void store_float(void* p, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// max that propagates NaN like torch.amax (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, ptx::shfl_xor(v, offset));
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += ptx::shfl_xor(v, offset);
  return v;
}

// Butterfly sum: every lane ends with the same value, added in the same order on every run (deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = __fadd_rn(v, ptx::shfl_xor(v, offset));
  return v;
}

// Launches `kernel` over grid x block on `stream` (dynamic shared memory: none). Every launch goes through here so
// that the CUDA emulator (csrc/cuda_emu) can run the same host code: it runs the grid block by block on the CPU.
template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#if defined(HF_INT8_CUDA_EMULATION)
  (void)stream;
  ::hf_int8::emu::launch(kernel, grid, block, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace hf_int8
