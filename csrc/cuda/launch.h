// Host-side interface between the PyTorch op wrappers (*_ops.cpp, compiled by the host compiler with ATen) and the
// CUDA kernels (*.cu, compiled by nvcc without any PyTorch header, which keeps the nvcc part of the build short).
// Everything here is plain C++: raw pointers, sizes, a dtype tag and the stream to launch on.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hf_int8 {
namespace cuda {

// Element types the kernels read or write. The wrappers map at::ScalarType onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3 };

// Row-wise absmax quantization of w [n, k] (kFloat32/kFloat16/kBFloat16): codes [n, k] int8, scale [n] fp32.
cudaError_t launch_quantize_weight(const void* w, DType dtype, int64_t n, int64_t k, int8_t* codes, float* scale,
                                   cudaStream_t stream);

// LLM.int8() activation quantization of x [m, k]: outlier_mask [k] (columns holding any |x| >= threshold;
// all false when threshold <= 0), codes [m, k] (0 in outlier columns) and row_scale [m] (absmax of the inlier
// columns / INT8_MAX). `mask` must hold k bytes.
cudaError_t launch_quantize_activation(const void* x, DType dtype, int64_t m, int64_t k, float threshold,
                                       int8_t* codes, float* row_scale, bool* mask, cudaStream_t stream);

// C = A[m, k] . B[n, k]^T with int32 accumulation, then an epilogue chosen by the arguments:
//  * out_dtype == kInt32: the raw accumulators (int8_matmul); scales, bias and outliers must be null.
//  * otherwise (int8_scaled_matmul, int8_linear): acc * (row_scale[i] * col_scale[j]) in fp32, plus, when
//    outlier_mask is set, sum over outlier columns c of x[i, c] * (B[j, c] * col_scale[j]), plus bias[j], rounded
//    once to out_dtype.
struct GemmArgs {
  const int8_t* a = nullptr;
  const int8_t* b = nullptr;
  int64_t m = 0, n = 0, k = 0;
  void* out = nullptr;
  DType out_dtype = DType::kInt32;
  const float* row_scale = nullptr;
  const float* col_scale = nullptr;
  const void* bias = nullptr;
  DType bias_dtype = DType::kFloat32;
  const bool* outlier_mask = nullptr;
  const void* x = nullptr;
  DType x_dtype = DType::kFloat32;
  int sm_count = 1;  // multiprocessors of the device (sizes the split of K)
  // Scratch for split-K, at least int8_gemm_workspace_bytes(m, n, k, sm_count, ...) bytes on the device (may be
  // null when that is 0); the launch zeroes what needs zeros on the stream before the GEMM.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Bytes of device scratch launch_int8_gemm needs for these sizes (0 when K is not split; fp16_outliers: an outlier
// mask with fp16/bf16 activations, whose product may be split too), and the number of blocks that share each tile
// of C (1: no split-K).
size_t int8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int sm_count, bool fp16_outliers);
// The same for exactly these arguments (the pointers may still be null).
size_t int8_gemm_workspace_bytes_for(const GemmArgs& args);
int int8_gemm_splits(int64_t m, int64_t n, int64_t k, int sm_count);

// Which kernel launch_int8_gemm uses for m rows: "gemv_dp4a" (m <= kDecodeMaxM), "imma_64x64" or "imma_128x128".
constexpr int64_t kDecodeMaxM = 8;
constexpr int64_t kSmallTileMaxM = 64;
const char* gemm_kernel_for(int64_t m);

cudaError_t launch_int8_gemm(const GemmArgs& args, cudaStream_t stream);

// LLM.int8() linear layer, x [m, k] (x_dtype) times int8 weight [n, k] -> out [m, n] (x_dtype): quantizes x into the
// caller's workspace (codes [m, k], row_scale [m], mask [k]), then runs the GEMM with the outlier epilogue when
// threshold > 0. Shared by the PyTorch wrapper (gemm_ops.cpp) and the CUDA emulator's driver (csrc/cuda_emu).
struct LinearArgs {
  const void* x = nullptr;
  DType x_dtype = DType::kFloat32;
  int64_t m = 0, n = 0, k = 0;
  const int8_t* weight = nullptr;
  const float* weight_scale = nullptr;
  const void* bias = nullptr;
  DType bias_dtype = DType::kFloat32;
  float threshold = 0.0f;
  void* out = nullptr;
  int8_t* codes = nullptr;
  float* row_scale = nullptr;
  bool* mask = nullptr;
  int sm_count = 1;
  void* workspace = nullptr;  // as GemmArgs::workspace
  size_t workspace_bytes = 0;
};

cudaError_t launch_int8_linear(const LinearArgs& args, cudaStream_t stream);
// Bytes of device scratch (LinearArgs::workspace) launch_int8_linear needs for these arguments: it decides, from the
// threshold and x's dtype, which GEMM it runs (the pointers may still be null).
size_t int8_linear_workspace_bytes(const LinearArgs& args);

// Value of __CUDA_ARCH_LIST__ the device code was compiled for, e.g. "800,900".
const char* compiled_arch_list();

}  // namespace cuda
}  // namespace hf_int8
