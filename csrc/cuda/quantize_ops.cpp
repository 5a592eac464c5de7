// CUDA kernels of hf_int8::quantize_weight and hf_int8::quantize_activation (PyTorch side: checks, allocation,
// device guard, current stream). The kernels are in quantize_kernels.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "launch.h"
#include "ops_common.h"

namespace hf_int8 {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_weight_cuda(const at::Tensor& weight) {
  check_dim(weight, "weight", 2);
  const DType dtype = float_dtype(weight, "weight");
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0);
  const int64_t k = w.size(1);
  check_k(k);
  at::Tensor codes = at::empty({n, k}, w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({n}, w.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_quantize_weight(w.data_ptr(), dtype, n, k, codes.data_ptr<int8_t>(), scale.data_ptr<float>(),
                                        c10::cuda::getCurrentCUDAStream()));
  return {codes, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activation_cuda(const at::Tensor& x, double threshold) {
  check_dim(x, "x", 2);
  const DType dtype = float_dtype(x, "x");
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0);
  const int64_t k = xc.size(1);
  check_k(k);
  at::Tensor codes = at::empty({m, k}, xc.options().dtype(at::kChar));
  at::Tensor row_scale = at::empty({m}, xc.options().dtype(at::kFloat));
  at::Tensor mask = at::empty({k}, xc.options().dtype(at::kBool));
  C10_CUDA_CHECK(launch_quantize_activation(xc.data_ptr(), dtype, m, k, static_cast<float>(threshold),
                                            codes.data_ptr<int8_t>(), row_scale.data_ptr<float>(),
                                            mask.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream()));
  return {codes, row_scale, mask};
}

}  // namespace
}  // namespace cuda
}  // namespace hf_int8

TORCH_LIBRARY_IMPL(hf_int8, CUDA, m) {
  m.impl("quantize_weight", &hf_int8::cuda::quantize_weight_cuda);
  m.impl("quantize_activation", &hf_int8::cuda::quantize_activation_cuda);
}
