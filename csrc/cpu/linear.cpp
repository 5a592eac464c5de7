// op int8_linear on CPU: LLM.int8() linear layer in three steps, with nothing materialised but the int8 codes.
//   1. quantize x (quantize.cpp; one pass per row once the outlier columns are known): codes, row scales, row sums of
//      the codes (for the VNNI +128 shift) and the outlier columns;
//   2. int8 GEMM whose epilogue dequantizes, adds the outlier product (from x's outlier columns, gathered by gemm() in
//      the form its path needs) and the bias in fp32 and writes x.dtype once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "hf_int8/cpu_kernels.h"

namespace hf_int8::cpu {

namespace {

OutKind out_kind_of(InKind in) {
  switch (in) {
    case InKind::kBF16: return OutKind::kBF16;
    case InKind::kF16: return OutKind::kF16;
    default: return OutKind::kF32;
  }
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                           const std::optional<at::Tensor>& bias, double threshold) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  check_cpu(weight_scale, "weight_scale");
  const InKind in = in_kind(x, "x");
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kChar && weight.dim() == 2,
                    "hf_int8::int8_linear: weight must be a 2-D int8 tensor, got ", weight.scalar_type(), " of shape ",
                    weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "hf_int8::int8_linear: x must have ", K,
                    " features in its last dimension, got shape ", x.sizes());
  TORCH_CHECK_VALUE(
      weight_scale.dim() == 1 && weight_scale.size(0) == N && at::isFloatingType(weight_scale.scalar_type()),
      "hf_int8::int8_linear: weight_scale must be a float tensor of shape (", N, ",), got ",
      weight_scale.scalar_type(), " of shape ", weight_scale.sizes());
  at::Tensor bias_f;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N && at::isFloatingType(bias->scalar_type()),
                      "hf_int8::int8_linear: bias must be a float tensor of shape (", N, ",), got ",
                      bias->scalar_type(), " of shape ", bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous();
  }

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const at::Tensor x2d = x.contiguous().view({M, K});
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape);

  const Isa isa = selected_isa();
  at::Tensor codes = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor row_scale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rowsum = at::empty({M}, x.options().dtype(at::kInt));
  std::vector<uint8_t> col_mask(static_cast<size_t>(K));
  ActQuantOut q;
  q.codes = codes.data_ptr<int8_t>();
  q.row_scale = row_scale.data_ptr<float>();
  q.rowsum = rowsum.data_ptr<int32_t>();
  q.col_mask = col_mask.data();
  const int64_t n_outliers =
      quantize_activation_into(isa, in, x2d.data_ptr(), M, K, K, static_cast<float>(threshold), q);

  at::Tensor cols;
  if (n_outliers > 0) {
    cols = at::empty({n_outliers}, at::kLong);
    int64_t* c = cols.data_ptr<int64_t>();
    for (int64_t k = 0, j = 0; k < K; ++k) {
      if (col_mask[static_cast<size_t>(k)]) c[j++] = k;
    }
  }
  const at::Tensor w = weight.contiguous();
  const at::Tensor ws = weight_scale.to(at::kFloat).contiguous();

  GemmProblem p = gemm_problem(codes, w, out, out_kind_of(in));
  p.a_rowsum = rowsum.data_ptr<int32_t>();
  p.ep.row_scale = row_scale.data_ptr<float>();
  p.ep.col_scale = ws.data_ptr<float>();
  p.ep.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.ep.n_outliers = n_outliers;
  p.ep.outlier_cols = n_outliers > 0 ? cols.data_ptr<int64_t>() : nullptr;
  p.ep.x = x2d.data_ptr();  // gemm() gathers the outlier columns from it as its path needs them
  p.ep.x_kind = in;
  p.ep.x_ld = K;
  gemm(isa, p);
  return out.view(out_shape);
}

}  // namespace

}  // namespace hf_int8::cpu

TORCH_LIBRARY_IMPL(hf_int8, CPU, m) { m.impl("int8_linear", &hf_int8::cpu::int8_linear_cpu); }
