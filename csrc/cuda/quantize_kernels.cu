// Quantization kernels: weight rows (quantize_weight) and LLM.int8() activations (quantize_activation).
//
// The float math is hf_int8/quant_math.h, the same functions the CPU kernels and the reference follow, so the int8
// codes and scales are bit-identical to the reference (this file must not be built with --use_fast_math: its
// approximate division and flush-to-zero would change them).
//
// Activation quantization, x [M, K]:
//   * threshold <= 0: one pass, one block per row: absmax (NaN-propagating, like torch.amax), codes, row scale.
//   * M == 1 (decoding one token): still one pass: a column is an outlier exactly when this row's element is, so
//     the row kernel classifies, masks, reduces and encodes, and writes the outlier mask itself.
//   * otherwise two kernels: a column scan (every thread owns 16 bytes of columns and walks a slice of the rows;
//     coalesced 16-byte loads; a flagged column is marked by a plain store of `true`, so racing blocks agree) and
//     the row kernel, which reads the mask. The second read of x is the only extra traffic, and it usually hits L2.
// Rows are cached in registers (up to kCacheGroups 16-byte groups per thread) between the absmax and the encode.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_utils.cuh"
#include "hf_int8/quant_math.h"
#include "launch.h"

namespace hf_int8 {
namespace cuda {
namespace {

constexpr int kCacheGroups = 4;
constexpr int kMaxRowThreads = 512;
constexpr int kScanThreads = 256;

// V consecutive elements of type T converted to float; V * sizeof(T) is 16 (vector path) or V == 1 (scalar path).
template <typename T, int V>
struct Group {
  float v[V];
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (V * sizeof(T) == 16) {
      const uint4 raw = ptx::load_cached16(p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = to_float(e[i]);
    } else {
      static_assert(V == 1, "group is one element or 16 bytes");
      v[0] = to_float(p[0]);
    }
  }
};

// V mask bytes (V in {1, 4, 8}) as a bit set: bit i set when column i of the group is an outlier.
template <int V>
__device__ __forceinline__ unsigned load_mask_bits(const bool* mask) {
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask);
  if constexpr (V == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(m);
    unsigned bits = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) bits |= (((raw.x >> (8 * i)) & 0xffu) ? 1u : 0u) << i;
#pragma unroll
    for (int i = 0; i < 4; ++i) bits |= (((raw.y >> (8 * i)) & 0xffu) ? 1u : 0u) << (i + 4);
    return bits;
  } else if constexpr (V == 4) {
    const uint32_t raw = *reinterpret_cast<const uint32_t*>(m);
    unsigned bits = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) bits |= (((raw >> (8 * i)) & 0xffu) ? 1u : 0u) << i;
    return bits;
  } else {
    static_assert(V == 1, "mask group of 1, 4 or 8");
    return m[0] ? 1u : 0u;
  }
}

template <int V>
__device__ __forceinline__ void store_codes(int8_t* dst, const int8_t (&c)[V]) {
  if constexpr (V == 8) {
    uint2 raw;
    raw.x = (uint32_t(uint8_t(c[0]))) | (uint32_t(uint8_t(c[1])) << 8) | (uint32_t(uint8_t(c[2])) << 16) |
            (uint32_t(uint8_t(c[3])) << 24);
    raw.y = (uint32_t(uint8_t(c[4]))) | (uint32_t(uint8_t(c[5])) << 8) | (uint32_t(uint8_t(c[6])) << 16) |
            (uint32_t(uint8_t(c[7])) << 24);
    *reinterpret_cast<uint2*>(dst) = raw;
  } else if constexpr (V == 4) {
    *reinterpret_cast<uint32_t*>(dst) = (uint32_t(uint8_t(c[0]))) | (uint32_t(uint8_t(c[1])) << 8) |
                                        (uint32_t(uint8_t(c[2])) << 16) | (uint32_t(uint8_t(c[3])) << 24);
  } else {
    dst[0] = c[0];
  }
}

template <int V>
__device__ __forceinline__ void store_mask_bits(bool* dst, unsigned bits) {
#pragma unroll
  for (int i = 0; i < V; ++i) dst[i] = (bits >> i) & 1u;
}

// Block-wide NaN-propagating max; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_nan_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_nan_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = 0.0f;
  for (int w = 0; w < warps; ++w) r = nan_max(r, scratch[w]);
  return r;
}

// One block per row. Mode: mask_in != nullptr -> outlier columns given; fuse_mask_out != nullptr -> this is the only
// row (M == 1) and it classifies its own elements; both null -> no outliers (threshold <= 0, or weights).
template <typename T, int V>
__global__ void __launch_bounds__(kMaxRowThreads)
    hf_int8_quantize_rows_kernel(const T* __restrict__ x, int64_t k, float threshold, const bool* __restrict__ mask_in,
                                 bool* __restrict__ fuse_mask_out, int8_t* __restrict__ codes,
                                 float* __restrict__ row_scale) {
  __shared__ float scratch[kMaxRowThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * k;
  int8_t* cr = codes + row * k;
  const int64_t groups = k / V;

  // Inlier values of group g (outlier columns read as 0, like masked_fill), and their outlier bits.
  auto fetch = [&](int64_t g, Group<T, V>& grp) -> unsigned {
    grp.load(xr + g * V);
    unsigned bits = 0;
    if (mask_in != nullptr) {
      bits = load_mask_bits<V>(mask_in + g * V);
    } else if (fuse_mask_out != nullptr) {
#pragma unroll
      for (int i = 0; i < V; ++i) bits |= (is_outlier(grp.v[i], threshold) ? 1u : 0u) << i;
      store_mask_bits<V>(fuse_mask_out + g * V, bits);
    }
#pragma unroll
    for (int i = 0; i < V; ++i)
      if ((bits >> i) & 1u) grp.v[i] = 0.0f;
    return bits;
  };

  Group<T, V> cache[kCacheGroups];
  float amax = 0.0f;
#pragma unroll
  for (int c = 0; c < kCacheGroups; ++c) {
    const int64_t g = int64_t(c) * blockDim.x + threadIdx.x;
    if (g < groups) {
      fetch(g, cache[c]);
#pragma unroll
      for (int i = 0; i < V; ++i) amax = nan_max(amax, fabsf(cache[c].v[i]));
    }
  }
  for (int64_t g = int64_t(kCacheGroups) * blockDim.x + threadIdx.x; g < groups; g += blockDim.x) {
    Group<T, V> grp;
    fetch(g, grp);
#pragma unroll
    for (int i = 0; i < V; ++i) amax = nan_max(amax, fabsf(grp.v[i]));
  }
  amax = block_nan_max(amax, scratch);
  const float multiplier = multiplier_from_absmax(amax);
  if (threadIdx.x == 0) row_scale[row] = scale_from_absmax(amax);

  auto encode_store = [&](int64_t g, const Group<T, V>& grp) {
    int8_t c[V];
#pragma unroll
    for (int i = 0; i < V; ++i) c[i] = encode(grp.v[i], multiplier);
    store_codes<V>(cr + g * V, c);
  };
#pragma unroll
  for (int c = 0; c < kCacheGroups; ++c) {
    const int64_t g = int64_t(c) * blockDim.x + threadIdx.x;
    if (g < groups) encode_store(g, cache[c]);
  }
  for (int64_t g = int64_t(kCacheGroups) * blockDim.x + threadIdx.x; g < groups; g += blockDim.x) {
    Group<T, V> grp;
    // The mask was already written by this thread in the first sweep; re-deriving it is idempotent.
    fetch(g, grp);
    encode_store(g, grp);
  }
}

// Column scan: mask[c] = true when any row in this block's row slice has |x[r, c]| >= threshold. The mask is
// zeroed before the launch; concurrent blocks only ever store `true`.
template <typename T, int V>
__global__ void __launch_bounds__(kScanThreads)
    hf_int8_outlier_columns_kernel(const T* __restrict__ x, int64_t m, int64_t k, float threshold,
                                   bool* __restrict__ mask) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g * V >= k) return;
  const int64_t rows_per_slice = (m + gridDim.y - 1) / gridDim.y;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_slice;
  const int64_t r1 = r0 + rows_per_slice < m ? r0 + rows_per_slice : m;
  unsigned bits = 0;
  for (int64_t r = r0; r < r1; ++r) {
    Group<T, V> grp;
    grp.load(x + r * k + g * V);
#pragma unroll
    for (int i = 0; i < V; ++i) bits |= (is_outlier(grp.v[i], threshold) ? 1u : 0u) << i;
  }
#pragma unroll
  for (int i = 0; i < V; ++i)
    if ((bits >> i) & 1u) mask[g * V + i] = true;
}

int row_threads(int64_t groups) {
  const int64_t per_pass = ceil_div(groups, kCacheGroups);
  int64_t t = ceil_div(per_pass, 32) * 32;
  if (t < 32) t = 32;
  if (t > kMaxRowThreads) t = kMaxRowThreads;
  return static_cast<int>(t);
}

template <typename T, int V>
void launch_rows(const T* x, int64_t m, int64_t k, float threshold, const bool* mask_in, bool* fuse_mask_out,
                 int8_t* codes, float* row_scale, cudaStream_t stream) {
  launch_kernel(hf_int8_quantize_rows_kernel<T, V>, dim3(static_cast<unsigned>(m)), dim3(row_threads(k / V)), stream,
                x, k, threshold, mask_in, fuse_mask_out, codes, row_scale);
}

template <typename T, int V>
void launch_scan(const T* x, int64_t m, int64_t k, float threshold, bool* mask, cudaStream_t stream) {
  const int64_t groups = k / V;
  const unsigned gx = static_cast<unsigned>(ceil_div(groups, kScanThreads));
  // Enough row slices for ~4 waves of blocks on a large GPU, each slice at least 8 rows long.
  int64_t gy = ceil_div(2048, gx);
  const int64_t max_slices = ceil_div(m, 8);
  if (gy > max_slices) gy = max_slices;
  if (gy > 65535) gy = 65535;
  if (gy < 1) gy = 1;
  launch_kernel(hf_int8_outlier_columns_kernel<T, V>, dim3(gx, static_cast<unsigned>(gy)), dim3(kScanThreads), stream,
                x, m, k, threshold, mask);
}

template <typename T>
cudaError_t quantize_activation_typed(const T* x, int64_t m, int64_t k, float threshold, int8_t* codes,
                                      float* row_scale, bool* mask, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = k % kVec == 0 && aligned16(x);
  const bool outliers = threshold > 0.0f;
  cudaError_t err = cudaSuccess;
  if (!(outliers && m == 1)) {  // the single-row kernel writes every mask byte itself
    err = cudaMemsetAsync(mask, 0, static_cast<size_t>(k), stream);
    if (err != cudaSuccess) return err;
  }
  if (m == 0 || k == 0) {
    if (m > 0) launch_rows<T, 1>(x, m, k, threshold, nullptr, nullptr, codes, row_scale, stream);  // scales = 0
    return cudaGetLastError();
  }
  const bool* mask_in = nullptr;
  bool* fuse = nullptr;
  if (outliers && m == 1) {
    fuse = mask;
  } else if (outliers) {
    if (vec) {
      launch_scan<T, kVec>(x, m, k, threshold, mask, stream);
    } else {
      launch_scan<T, 1>(x, m, k, threshold, mask, stream);
    }
    mask_in = mask;
  }
  if (vec) {
    launch_rows<T, kVec>(x, m, k, threshold, mask_in, fuse, codes, row_scale, stream);
  } else {
    launch_rows<T, 1>(x, m, k, threshold, mask_in, fuse, codes, row_scale, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t quantize_weight_typed(const T* w, int64_t n, int64_t k, int8_t* codes, float* scale, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  if (k % kVec == 0 && aligned16(w)) {
    launch_rows<T, kVec>(w, n, k, 0.0f, nullptr, nullptr, codes, scale, stream);
  } else {
    launch_rows<T, 1>(w, n, k, 0.0f, nullptr, nullptr, codes, scale, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_quantize_weight(const void* w, DType dtype, int64_t n, int64_t k, int8_t* codes, float* scale,
                                   cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return quantize_weight_typed(static_cast<const __half*>(w), n, k, codes, scale, stream);
    case DType::kBFloat16:
      return quantize_weight_typed(static_cast<const __nv_bfloat16*>(w), n, k, codes, scale, stream);
    case DType::kFloat32: return quantize_weight_typed(static_cast<const float*>(w), n, k, codes, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_quantize_activation(const void* x, DType dtype, int64_t m, int64_t k, float threshold,
                                       int8_t* codes, float* row_scale, bool* mask, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return quantize_activation_typed(static_cast<const __half*>(x), m, k, threshold, codes, row_scale, mask, stream);
    case DType::kBFloat16:
      return quantize_activation_typed(static_cast<const __nv_bfloat16*>(x), m, k, threshold, codes, row_scale, mask,
                                       stream);
    case DType::kFloat32:
      return quantize_activation_typed(static_cast<const float*>(x), m, k, threshold, codes, row_scale, mask, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace hf_int8
