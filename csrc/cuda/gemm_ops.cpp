// CUDA kernels of hf_int8::int8_matmul, hf_int8::int8_scaled_matmul and hf_int8::int8_linear (PyTorch side:
// checks naming the offending value, allocation, device guard, current stream). Kernels: gemm_kernels.cu and
// quantize_kernels.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "launch.h"
#include "ops_common.h"

namespace hf_int8 {
namespace cuda {
namespace {

// Rows the tensor-core kernel's grid can cover (gridDim.y <= 65535 tiles of 128 rows).
constexpr int64_t kMaxRows = int64_t(65535) * 128;

// Shapes and dtypes are checked before devices (check_int8_devices), so that every message can be exercised
// without a GPU (tests/test_cuda_build.py redispatches CPU tensors to these kernels).
void check_int8_shapes(const at::Tensor& a, const at::Tensor& b) {
  check_dtype(a, "a", at::kChar);
  check_dtype(b, "b", at::kChar);
  check_dim(a, "a", 2);
  check_dim(b, "b", 2);
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "hf_int8 (CUDA): a [M, K] and b [N, K] must share K, got a ", a.sizes(),
                    " and b ", b.sizes());
  TORCH_CHECK_VALUE(a.size(0) <= kMaxRows, "hf_int8 (CUDA): at most ", kMaxRows, " rows per call, got ", a.size(0));
  check_k(a.size(1));
}

void check_int8_devices(const at::Tensor& a, const at::Tensor& b) {
  check_cuda(a, "a");
  check_cuda(b, "b");
  check_same_device(b, "b", a, "a");
}

at::Tensor float_vector(const at::Tensor& t, const char* name, int64_t len, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, "hf_int8 (CUDA): ", name, " must have shape (", len, ",), got ",
                    t.sizes());
  float_dtype(t, name);
  check_cuda(t, name);
  check_same_device(t, name, ref, "the int8 operand");
  return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
}

at::Tensor checked_bias(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& ref) {
  if (!bias.has_value()) return at::Tensor();
  const at::Tensor& b = *bias;
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == n, "hf_int8 (CUDA): bias must have shape (", n, ",), got ",
                    b.sizes());
  float_dtype(b, "bias");
  check_cuda(b, "bias");
  check_same_device(b, "bias", ref, "the int8 operand");
  return b.contiguous();
}

void set_bias(GemmArgs& args, const at::Tensor& bias) {
  if (bias.defined()) {
    args.bias = bias.data_ptr();
    args.bias_dtype = float_dtype(bias, "bias");
  }
}

// Arguments of out = a . b^T (contiguous int8 operands) on this device; scales, bias and outliers are left unset.
GemmArgs gemm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, DType out_dtype,
                   const DeviceInfo& info) {
  GemmArgs args;
  args.a = a.data_ptr<int8_t>();
  args.b = b.data_ptr<int8_t>();
  args.m = a.size(0);
  args.n = b.size(0);
  args.k = a.size(1);
  args.out = out.data_ptr();
  args.out_dtype = out_dtype;
  args.sm_count = info.sm_count;
  return args;
}

// `need` bytes of device scratch for split-K (launch.h); an undefined tensor when that is 0 (K is not split). The
// caller keeps it alive until the launch is queued (the caching allocator orders its reuse on the stream).
at::Tensor split_workspace(size_t need, const at::Tensor& like, void** ptr, size_t* bytes) {
  *ptr = nullptr;
  *bytes = need;
  if (need == 0) return at::Tensor();
  at::Tensor ws = at::empty({static_cast<int64_t>(need)}, like.options().dtype(at::kByte));
  *ptr = ws.data_ptr();
  return ws;
}

at::Tensor int8_matmul_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_int8_shapes(a, b);
  check_int8_devices(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  const DeviceInfo info = require_turing(a.get_device());
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  at::Tensor out = at::empty({ac.size(0), bc.size(0)}, ac.options().dtype(at::kInt));
  GemmArgs args = gemm_args(ac, bc, out, DType::kInt32, info);
  const at::Tensor workspace =
      split_workspace(int8_gemm_workspace_bytes_for(args), ac, &args.workspace, &args.workspace_bytes);
  C10_CUDA_CHECK(launch_int8_gemm(args, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor int8_scaled_matmul_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_scale,
                                   const at::Tensor& col_scale, const std::optional<at::Tensor>& bias,
                                   at::ScalarType out_dtype) {
  const DType out_tag = out_dtype_tag(out_dtype);
  check_int8_shapes(a, b);
  TORCH_CHECK_VALUE(row_scale.dim() == 1 && row_scale.size(0) == a.size(0),
                    "hf_int8 (CUDA): row_scale must have shape (", a.size(0), ",), got ", row_scale.sizes());
  TORCH_CHECK_VALUE(col_scale.dim() == 1 && col_scale.size(0) == b.size(0),
                    "hf_int8 (CUDA): col_scale must have shape (", b.size(0), ",), got ", col_scale.sizes());
  float_dtype(row_scale, "row_scale");
  float_dtype(col_scale, "col_scale");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == b.size(0), "hf_int8 (CUDA): bias must have shape (",
                      b.size(0), ",), got ", bias->sizes());
    float_dtype(*bias, "bias");
  }
  check_int8_devices(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  const DeviceInfo info = require_turing(a.get_device());
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  const at::Tensor rs = float_vector(row_scale, "row_scale", ac.size(0), ac);
  const at::Tensor cs = float_vector(col_scale, "col_scale", bc.size(0), ac);
  const at::Tensor bias_c = checked_bias(bias, bc.size(0), ac);
  at::Tensor out = at::empty({ac.size(0), bc.size(0)}, ac.options().dtype(out_dtype));
  GemmArgs args = gemm_args(ac, bc, out, out_tag, info);
  args.row_scale = rs.data_ptr<float>();
  args.col_scale = cs.data_ptr<float>();
  set_bias(args, bias_c);
  const at::Tensor workspace =
      split_workspace(int8_gemm_workspace_bytes_for(args), ac, &args.workspace, &args.workspace_bytes);
  C10_CUDA_CHECK(launch_int8_gemm(args, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                            const std::optional<at::Tensor>& bias, double threshold) {
  const DType x_tag = float_dtype(x, "x");
  check_dtype(weight, "weight", at::kChar);
  check_dim(weight, "weight", 2);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "hf_int8 (CUDA): x must have ", weight.size(1),
                    " features in its last dimension, got shape ", x.sizes());
  const int64_t n = weight.size(0);
  const int64_t k = weight.size(1);
  check_k(k);
  TORCH_CHECK_VALUE(weight_scale.dim() == 1 && weight_scale.size(0) == n,
                    "hf_int8 (CUDA): weight_scale must have shape (", n, ",), got ", weight_scale.sizes());
  float_dtype(weight_scale, "weight_scale");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "hf_int8 (CUDA): bias must have shape (", n, ",), got ",
                      bias->sizes());
    float_dtype(*bias, "bias");
  }
  check_cuda(x, "x");
  check_cuda(weight, "weight");
  check_same_device(weight, "weight", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo info = require_turing(x.get_device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor cs = float_vector(weight_scale, "weight_scale", n, wc);
  const at::Tensor bias_c = checked_bias(bias, n, wc);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  int64_t m = 1;
  for (const int64_t s : out_shape) m *= s;
  out_shape.push_back(n);
  TORCH_CHECK_VALUE(m <= kMaxRows, "hf_int8 (CUDA): at most ", kMaxRows, " tokens per call, got ", m);
  at::Tensor out = at::empty(out_shape, xc.options());
  if (m == 0 || n == 0) return out;

  at::Tensor codes = at::empty({m, k}, xc.options().dtype(at::kChar));
  at::Tensor row_scale = at::empty({m}, xc.options().dtype(at::kFloat));
  at::Tensor mask = at::empty({k}, xc.options().dtype(at::kBool));
  LinearArgs args;
  args.x = xc.data_ptr();
  args.x_dtype = x_tag;
  args.m = m;
  args.n = n;
  args.k = k;
  args.weight = wc.data_ptr<int8_t>();
  args.weight_scale = cs.data_ptr<float>();
  if (bias_c.defined()) {
    args.bias = bias_c.data_ptr();
    args.bias_dtype = float_dtype(bias_c, "bias");
  }
  args.threshold = static_cast<float>(threshold);
  args.out = out.data_ptr();
  args.codes = codes.data_ptr<int8_t>();
  args.row_scale = row_scale.data_ptr<float>();
  args.mask = mask.data_ptr<bool>();
  args.sm_count = info.sm_count;
  const at::Tensor workspace =
      split_workspace(int8_linear_workspace_bytes(args), xc, &args.workspace, &args.workspace_bytes);
  C10_CUDA_CHECK(launch_int8_linear(args, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace hf_int8

TORCH_LIBRARY_IMPL(hf_int8, CUDA, m) {
  m.impl("int8_matmul", &hf_int8::cuda::int8_matmul_cuda);
  m.impl("int8_scaled_matmul", &hf_int8::cuda::int8_scaled_matmul_cuda);
  m.impl("int8_linear", &hf_int8::cuda::int8_linear_cuda);
}
