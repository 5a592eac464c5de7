// Shared helpers of the PyTorch-facing wrappers (quantize_ops.cpp, gemm_ops.cpp): argument checks that name the
// offending value, dtype mapping, device properties.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <string>

#include "launch.h"

namespace hf_int8 {
namespace cuda {

// torch-style dtype names for error messages ("torch.int8", not ATen's "Char").
inline const char* dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return c10::toString(s);
  }
}

// The DType of a float32 / float16 / bfloat16 scalar type; a ValueError naming `name` for any other.
inline DType float_dtype(at::ScalarType s, const char* name) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "hf_int8 (CUDA): ", name, " must be float32, bfloat16 or float16, got ", dtype_name(s));
  }
  return DType::kFloat32;
}

inline DType float_dtype(const at::Tensor& t, const char* name) { return float_dtype(t.scalar_type(), name); }

inline DType out_dtype_tag(at::ScalarType s) { return float_dtype(s, "out_dtype"); }

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "hf_int8 (CUDA): ", name, " must be a CUDA tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "hf_int8 (CUDA): ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "hf_int8 (CUDA): ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType s) {
  TORCH_CHECK_VALUE(t.scalar_type() == s, "hf_int8 (CUDA): ", name, " must have dtype ", dtype_name(s), ", got ",
                    dtype_name(t.scalar_type()));
}

// The kernels index columns with 32-bit integers in a few places (outlier column lists).
inline void check_k(int64_t k) {
  TORCH_CHECK_VALUE(k < INT_MAX, "hf_int8 (CUDA): the feature dimension must be below 2^31, got ", k);
}

struct DeviceInfo {
  int sm_count;
  int capability;  // major * 10 + minor
};

inline DeviceInfo device_info(int device) {
  static std::array<std::atomic<int>, 64> sm_cache{};
  static std::array<std::atomic<int>, 64> cc_cache{};
  TORCH_CHECK(device >= 0 && device < 64, "hf_int8 (CUDA): device index out of range: ", device);
  int sm = sm_cache[device].load();
  int cc = cc_cache[device].load();
  if (sm == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cc = major * 10 + minor;
    cc_cache[device].store(cc);
    sm_cache[device].store(sm);
  }
  return {sm, cc};
}

// Tensor cores with int8 mma (and ldmatrix) need Turing or newer.
inline DeviceInfo require_turing(int device) {
  const DeviceInfo info = device_info(device);
  TORCH_CHECK(info.capability >= 75,
              "hf_int8 (CUDA): int8 tensor-core kernels need compute capability 7.5 or "
              "newer, device ",
              device, " has ", info.capability / 10, ".", info.capability % 10);
  return info;
}

}  // namespace cuda
}  // namespace hf_int8
