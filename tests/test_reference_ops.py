"""The pure-PyTorch reference kernels on their own: they are the fallback and the oracle of every native kernel."""

from __future__ import annotations

import pytest
import torch

from hf_int8 import ops
from hf_int8.nn import Int8Linear
from hf_int8.ops import reference as ref
from hf_int8.ops.constants import INT8_MAX

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 1), (7, 83), (83, 7), (33, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_round_trip_error_at_most_half_a_step(shape, dtype):
    w = (torch.randn(shape, generator=_gen()) * torch.logspace(-3, 2, shape[0]).unsqueeze(1)).to(dtype)
    codes, scale = ref.quantize_weight(w)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0],)
    assert int(codes.abs().max()) <= INT8_MAX
    # The row's absmax element maps exactly to +-127.
    assert (codes.abs().amax(dim=1) == INT8_MAX).all()
    err = (ref.dequantize_weight(codes, scale) - w.float()).abs()
    half_step = scale.unsqueeze(1) / 2
    assert (err <= half_step * (1 + 1e-5) + 1e-12).all()


def test_zero_rows_give_zero_codes_and_no_nan():
    w = torch.randn(5, 19, generator=_gen())
    w[2] = 0
    codes, scale = ref.quantize_weight(w)
    assert scale[2] == 0 and (codes[2] == 0).all()
    assert torch.isfinite(scale).all()
    x = torch.randn(4, 19, generator=_gen(1))
    x[1] = 0
    xq, row_scale, _ = ref.quantize_activation(x, 6.0)
    assert row_scale[1] == 0 and (xq[1] == 0).all()
    out = ref.int8_linear(x, codes, scale, torch.arange(5.0), 6.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.arange(5.0))  # zero input row gives exactly the bias
    assert (out[:, 2] == 2.0).all()  # zero weight row gives exactly its bias


def test_rounding_is_half_to_even():
    # absmax 127 makes the multiplier exactly 1: x * 1 lands on .5 boundaries.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5]])
    codes, _, _ = ref.quantize_activation(x, 0.0)
    assert codes.tolist() == [[127, 0, 2, 2, 0, -2, -2]]


def test_threshold_zero_means_no_outlier_columns():
    x = torch.randn(9, 31, generator=_gen()) * 100
    _, _, mask = ref.quantize_activation(x, 0.0)
    assert mask.dtype == torch.bool and mask.shape == (31,) and not mask.any()


def test_outlier_columns_detected_across_the_batch():
    x = torch.randn(6, 40, generator=_gen()).clamp(-3, 3)
    x[4, 7] = 6.0  # exactly the threshold counts (|x| >= threshold)
    x[0, 21] = -50.0
    codes, row_scale, mask = ref.quantize_activation(x, 6.0)
    assert mask.nonzero().flatten().tolist() == [7, 21]
    assert (codes[:, mask] == 0).all()
    # The row absmax ignores outlier columns entirely (paper semantics), not just the outlier elements.
    inlier_absmax = x[:, ~mask].abs().amax(dim=1)
    assert torch.allclose(row_scale, inlier_absmax / INT8_MAX)


@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_columns_are_exact_in_the_float_path(dtype):
    torch.manual_seed(0)
    k, n = 48, 24
    w = torch.randn(n, k, generator=_gen(2))
    codes, scale = ref.quantize_weight(w)
    w_deq = ref.dequantize_weight(codes, scale)
    x = torch.zeros(5, k)
    x[:, [3, 30]] = torch.tensor([[20.0, -9.0]]).expand(5, 2) * torch.arange(1, 6.0).unsqueeze(1)
    x = x.to(dtype)
    # Only outlier columns are non-zero: the int8 path contributes nothing and the result is the exact fp32 product
    # of the (dtype-rounded) activations with the dequantized weight columns.
    out = ref.int8_linear(x, codes, scale, None, 6.0)
    expected = (x.float() @ w_deq.t()).to(dtype)
    assert torch.equal(out, expected)


def test_int8_linear_matches_float_within_tolerance_and_outliers_help():
    torch.manual_seed(0)
    m, k, n = 16, 256, 64
    w = torch.randn(n, k, generator=_gen(3)) / 16
    x = torch.randn(m, k, generator=_gen(4))
    x[:, [5, 77, 200]] *= 25  # three outlier feature columns, as in real LLM activations
    exact = x.double() @ w.double().t()
    codes, scale = ref.quantize_weight(w)

    def rel_err(threshold):
        out = ref.int8_linear(x, codes, scale, None, threshold).double()
        return ((out - exact).norm() / exact.norm()).item()

    with_outliers, without = rel_err(6.0), rel_err(0.0)
    assert with_outliers < 0.02
    assert without > 2 * with_outliers


def test_int8_matmul_is_exact():
    a = torch.randint(-127, 128, (83, 300), dtype=torch.int8, generator=_gen())
    b = torch.randint(-127, 128, (29, 300), dtype=torch.int8, generator=_gen(1))
    assert torch.equal(ref.int8_matmul(a, b), (a.long() @ b.long().t()).int())
    assert ref.int8_matmul(a[:0], b).shape == (0, 29)


def test_leading_dims_and_empty_batches():
    layer = Int8Linear.from_float(torch.nn.Linear(10, 3))
    assert layer(torch.randn(2, 3, 4, 10)).shape == (2, 3, 4, 3)
    assert layer(torch.randn(0, 10)).shape == (0, 3)
    assert layer(torch.randn(10)).shape == (3,)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda w, s: ops.int8_linear(torch.randn(3, 11), w, s), "11"),
        (lambda w, s: ops.int8_linear(torch.randn(3, 10).double(), w, s), "float64"),
        (lambda w, s: ops.int8_linear(torch.randn(3, 10), w.float(), s), "float32"),
        (lambda w, s: ops.int8_linear(torch.randn(3, 10), w, s.half()), "float16"),
        (lambda w, s: ops.int8_linear(torch.randn(3, 10), w, s, threshold=-1.0), "-1.0"),
        (lambda w, s: ops.int8_linear(torch.randn(3, 10), w, s, threshold=float("nan")), "nan"),
        (lambda w, s: ops.int8_linear(torch.randn(3, 10), w, s, bias=torch.zeros(4)), "(4,)"),
        (lambda w, s: ops.quantize_weight(torch.randn(2, 3, 4)), "(2, 3, 4)"),
    ],
)
def test_bad_op_arguments_raise_value_error_naming_them(call, fragment):
    w, s = ref.quantize_weight(torch.randn(5, 10))
    with pytest.raises(ValueError) as info:
        call(w, s)
    assert fragment in str(info.value)


def _opcheck_cases():
    g = _gen(7)
    w, s = ref.quantize_weight(torch.randn(12, 20, generator=g))
    x = torch.randn(5, 20, generator=g)
    x[1, 4] = 9.0
    a = torch.randint(-127, 128, (5, 20), dtype=torch.int8, generator=g)
    return [
        (torch.ops.hf_int8.quantize_weight.default, (torch.randn(12, 20, generator=g),)),
        (torch.ops.hf_int8.quantize_activation.default, (x, 6.0)),
        (torch.ops.hf_int8.int8_matmul.default, (a, w)),
        (torch.ops.hf_int8.int8_scaled_matmul.default, (a, w, torch.rand(5), s, torch.randn(12), torch.bfloat16)),
        (torch.ops.hf_int8.int8_linear.default, (x, w, s, torch.randn(12), 6.0)),
        (torch.ops.hf_int8.int8_linear.default, (x.clone().requires_grad_(), w, s, None, 0.0)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_gradients_flow_to_inputs_not_to_int8_weights():
    linear = torch.nn.Linear(32, 8)
    layer = Int8Linear.from_float(linear)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    expected = torch.ones(4, 8) @ layer.dequantize()
    assert torch.allclose(x.grad, expected, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert torch.allclose(layer.bias.grad, torch.full((8,), 4.0))
