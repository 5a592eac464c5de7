"""The pure-PyTorch reference kernels on their own: they are the fallback and the oracle of every native kernel."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch
from _tolerance import assert_within, fp32_sum_tolerance

from hf_int8 import Int8Config, ops
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
def test_outlier_columns_are_not_quantized_in_the_float_path(dtype):
    k, n = 48, 24
    w = torch.randn(n, k, generator=_gen(2))
    codes, scale = ref.quantize_weight(w)
    w_deq = ref.dequantize_weight(codes, scale).double()
    x = torch.zeros(5, k)
    x[:, [3, 30]] = torch.tensor([[20.0, -9.0]]).expand(5, 2) * torch.arange(1, 6.0).unsqueeze(1)
    x = x.to(dtype)
    out = ref.int8_linear(x, codes, scale, None, 6.0)
    # Only outlier columns are non-zero, so the int8 part is exactly 0 and the result is the fp32 product of the
    # (dtype-rounded) activations with the dequantized weight columns: 2 terms plus that 0, rounded in fp32 and cast
    # once. Compared with the exact fp64 product, not with another fp32 matmul: BLAS builds sum in different orders
    # (an fp32 x @ w_deq.T over all 48 columns differed from this in the last bit on a Zen 5 with MKL).
    x64 = x.double()
    tol = fp32_sum_tolerance(x64.abs() @ w_deq.abs().t(), 3, dtype, exact=x64 @ w_deq.t(), evaluations=1)
    assert_within(out.double(), x64 @ w_deq.t(), tol, str(dtype))


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
    w_deq = layer.dequantize()
    expected = torch.ones(4, 8) @ w_deq
    # Two fp32 evaluations of the same 8-term sum (the op's backward and this matmul may sum in different orders).
    assert_within(x.grad, expected, fp32_sum_tolerance(torch.ones(4, 8).double() @ w_deq.abs().double(), 8))
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert torch.allclose(layer.bias.grad, torch.full((8,), 4.0))


# ---------------------------------------------------------------------------------------------------------------
# The threshold is compared in float32, rounded once, exactly like quant_math.h's is_outlier.
# ---------------------------------------------------------------------------------------------------------------
# Thresholds whose float32 rounding matters: fp32 subnormals (1e-40, the smallest one 1.4e-45), values that are not
# float32 numbers (6.0000000001 and 5.9999999999 both round to 6.0; 0.1), float32's largest value, and positive
# values below half the smallest subnormal (1e-50, 7e-46), which round to 0.
ROUNDING_THRESHOLDS = [1e-40, 1.4e-45, 6.0000000001, 5.9999999999, 0.1, 3.4028234663852886e38, 1e-50, 7e-46]


def _c_float(value: float) -> float:
    """``static_cast<float>(value)`` as the C compiler does it (ctypes converts with a C cast), the kernels' rule."""
    return ctypes.c_float(value).value


def threshold_probe(threshold: float, rows: int = 3) -> torch.Tensor:
    """fp32 activations ``[rows, 9]`` around the float32 threshold: exactly it, its float32 neighbours above and below
    (both signs), zeros, NaN, and a normal value; one column per case, so the mask shows each comparison."""
    t32 = np.float32(_c_float(threshold))
    below = np.nextafter(t32, np.float32(0)) if t32 > 0 else np.float32(0)
    with np.errstate(over="ignore"):  # above float32's largest value is inf
        above = np.nextafter(t32, np.float32(np.inf))
    cols = [t32, -t32, below, -below, above, -above, 0.0, math.nan, 1.0]
    x = torch.zeros(rows, len(cols))
    x[rows - 1] = torch.tensor(np.array(cols, dtype=np.float32))
    return x


def test_threshold_as_float32_is_the_c_cast():
    for t in [*ROUNDING_THRESHOLDS, 0.0, 6.0, 2.0**-149, 2.0**-150, 2.0**-150 * (1 + 2.0**-40), 1e-45, 1e-46]:
        assert ref.threshold_as_float32(t) == _c_float(t), t
    assert ref.threshold_as_float32(6.0000000001) == 6.0 and ref.threshold_as_float32(1e-50) == 0.0
    assert ref.threshold_as_float32(1e-40) == float(np.float32(1e-40)) != 1e-40  # a subnormal, kept
    assert ref.threshold_as_float32(1e39) == math.inf and math.isnan(ref.threshold_as_float32(math.nan))


@pytest.mark.parametrize("threshold", ROUNDING_THRESHOLDS, ids=repr)
def test_reference_outlier_test_is_the_float32_comparison(threshold):
    """The reference's mask is ``t32 > 0 and |x| >= t32`` with ``t32 = (float)threshold``, what the kernels compute
    (quant_math.h ``is_outlier``); a positive threshold that rounds to 0 gives no outlier columns, as there."""
    x = threshold_probe(threshold)
    t32 = np.float32(_c_float(threshold))
    x32 = x.numpy()[-1]
    with np.errstate(invalid="ignore"):
        want = (np.abs(x32) >= t32) & (t32 > 0)  # numpy compares float32 with float32: no rounding of its own
    assert ref.outlier_columns(x, threshold).tolist() == want.tolist()
    _, _, mask = ref.quantize_activation(x, threshold)
    assert mask.tolist() == want.tolist()
    if t32 == 0:
        assert not mask.any(), "a threshold that rounds to 0 in float32 means no outlier columns, as in the kernels"


@pytest.mark.parametrize("threshold", [1e-50, 7e-46, 1e-300, 1e39, 3.5e38, 10**400])
def test_entry_points_refuse_thresholds_float32_cannot_hold(threshold):
    """A positive threshold that rounds to 0 in float32 would silently mean "no outliers" (the opposite of what a
    tiny threshold asks for); one past float32's range would round to inf. Every validated entry point refuses both,
    naming the value."""
    w, s = ref.quantize_weight(torch.randn(5, 10, generator=_gen()))
    x = torch.randn(3, 10, generator=_gen(1))
    calls = [
        lambda: ops.int8_linear(x, w, s, threshold=threshold),
        lambda: ops.quantize_activation(x, threshold),
        lambda: Int8Linear(10, 5, threshold=threshold),
        lambda: Int8Config(threshold=threshold),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert repr(threshold) in str(info.value)


@pytest.mark.parametrize("threshold", [1e-40, 1.4e-45, 6.0000000001, 3.4028234663852886e38])
def test_entry_points_accept_float32_thresholds_and_agree_with_the_op(threshold):
    """Subnormal, non-float32 and largest float32 thresholds are accepted everywhere and mean their float32 value."""
    x = threshold_probe(threshold)
    x[:2] = torch.randn(2, x.shape[1], generator=_gen(3))
    w, s = ref.quantize_weight(torch.randn(5, x.shape[1], generator=_gen()))
    got = ops.quantize_activation(x, threshold)
    want = ref.quantize_activation(x, ref.threshold_as_float32(threshold))
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)  # the NaN row's scale is NaN
    layer = Int8Linear(x.shape[1], 5, bias=False, threshold=threshold)
    layer.weight.data, layer.weight_scale.data = w, s
    assert Int8Config(threshold=threshold).threshold == threshold  # stored as given; compared as float32
    with torch.no_grad():
        out = layer(x)
    # The same op on the same inputs (the threshold rounds to the same float32 either way): bitwise, NaN included.
    again = torch.ops.hf_int8.int8_linear(x, w, s, None, ref.threshold_as_float32(threshold))
    torch.testing.assert_close(out, again, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(out[:2]).all()  # the probe row holds NaN and huge values; the others stay finite
