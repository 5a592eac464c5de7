"""Property-based tests (hypothesis) of every op against the reference, over random shapes, dtypes and thresholds.

Each op is run through ``torch.ops.hf_int8`` (the native kernel when one is registered for the device, else the
reference) and compared with ``hf_int8.ops.reference``; the reference itself is checked against the properties
that define LLM.int8() (exact int32 accumulation, half-step rounding error, outlier columns, zero rows).

Budget: every test has a fixed ``max_examples`` and a per-example deadline; examples are small tensors, so the whole
file runs in well under a minute on 2 cores. Examples are derandomized (the same in every CI run); set
``HF_INT8_PROPERTIES_RANDOM=1`` to explore new ones and ``HF_INT8_PROPERTIES_EXAMPLES`` to run more.
"""

from __future__ import annotations

import ctypes
import math
import os

import pytest
import torch
from _tolerance import assert_within, fp32_sum_tolerance, gamma, int8_linear_terms, int8_linear_tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_int8 import Int8Linear, ops
from hf_int8.ops import reference as ref
from hf_int8.ops.constants import INT8_MAX

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
    ),
]

PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("HF_INT8_PROPERTIES_EXAMPLES", "80")),
    deadline=5_000,  # ms per example (examples take milliseconds; the margin absorbs a busy shared machine)
    derandomize=os.environ.get("HF_INT8_PROPERTIES_RANDOM", "0") == "0",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


@st.composite
def float_matrices(draw, max_rows: int = 33, max_cols: int = 130, min_rows: int = 0):
    """A float matrix with structure that matters to LLM.int8(): outlier columns, zero rows, ties, magnitudes."""
    rows = draw(st.integers(min_rows, max_rows))
    cols = draw(st.integers(1, max_cols))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "outliers", "ties", "zero rows", "wide range"]))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 3.0, 50.0]))
    x = torch.randn(rows, cols, generator=g) * scale
    if kind == "outliers" and rows:
        cols_hit = torch.randint(0, cols, (draw(st.integers(1, 4)),), generator=g)
        x[:, cols_hit] *= draw(st.sampled_from([10.0, 100.0, 1000.0]))
    elif kind == "ties" and rows:
        # Half-integers with a row absmax of exactly 127: the multiplier is 1 and x.5 values test the rounding.
        x = torch.randint(-254, 255, (rows, cols), generator=g).float() / 2
        x[:, 0] = 127.0
    elif kind == "zero rows" and rows:
        x[torch.rand(rows, generator=g) < 0.4] = 0.0
    elif kind == "wide range" and rows:
        x *= torch.logspace(-4, 4, rows).unsqueeze(1)
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype)


# 1e-40 (an fp32 subnormal) and 6.0000000001 (6.0 in fp32) check that every implementation rounds the threshold to
# fp32 once, like the kernels' static_cast<float>; the raw ops also take 1e-50, which rounds to 0 (no outliers) and
# which the validated entry points (Int8Linear, ops.*) refuse.
thresholds = st.sampled_from([0.0, 0.5, 2.0, 6.0, 6.0, 20.0, 1e6, 1e-40, 6.0000000001])
raw_thresholds = st.sampled_from([0.0, 0.5, 2.0, 6.0, 20.0, 1e6, 1e-40, 6.0000000001, 1e-50])


def _dispatch(name: str, device: str):
    op = getattr(torch.ops.hf_int8, name)

    def call(*args):
        out = op(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
        return tuple(o.cpu() for o in out) if isinstance(out, (tuple, list)) else out.cpu()

    return call


# ---------------------------------------------------------------------------------------------------------------
# quantize_weight / dequantize_weight
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(w=float_matrices(min_rows=1))
def test_quantize_weight(device, w):
    codes, scale = _dispatch("quantize_weight", device)(w)
    r_codes, r_scale = ref.quantize_weight(w)
    assert torch.equal(codes, r_codes) and torch.equal(scale, r_scale), "native and reference codes differ"
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
    w32 = w.float()
    absmax = w32.abs().amax(dim=1)
    assert torch.equal(scale, absmax / INT8_MAX) or torch.allclose(scale, absmax / INT8_MAX, rtol=EPS32, atol=0)
    assert int(codes.abs().max()) <= INT8_MAX and not (codes == -128).any()
    row_max = codes.abs().amax(dim=1).int()
    assert torch.equal(row_max == INT8_MAX, absmax > 0) and (row_max[absmax == 0] == 0).all()
    err = (ops.dequantize_weight(codes, scale).double() - w32.double()).abs()
    assert (err <= scale.double().unsqueeze(1) * (0.5 + 1e-5)).all()


# ---------------------------------------------------------------------------------------------------------------
# quantize_activation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(x=float_matrices(), threshold=raw_thresholds)
def test_quantize_activation(device, x, threshold):
    codes, row_scale, mask = _dispatch("quantize_activation", device)(x, threshold)
    r_codes, r_scale, r_mask = ref.quantize_activation(x, threshold)
    assert torch.equal(mask, r_mask) and torch.equal(codes, r_codes) and torch.equal(row_scale, r_scale)
    x32 = x.float()
    t32 = ctypes.c_float(threshold).value  # the C conversion the kernels apply: round to nearest fp32
    expected_mask = (x32.abs() >= t32).any(dim=0) if t32 > 0 else torch.zeros_like(mask)
    assert torch.equal(mask, expected_mask)
    assert (codes[:, mask] == 0).all()
    inliers = x32[:, ~mask]
    absmax = inliers.abs().amax(dim=1) if inliers.shape[1] else torch.zeros(x.shape[0])
    assert torch.allclose(row_scale, absmax / INT8_MAX, rtol=EPS32, atol=0)
    err = (codes[:, ~mask].double() * row_scale.double().unsqueeze(1) - inliers.double()).abs()
    assert (err <= row_scale.double().unsqueeze(1) * (0.5 + 1e-5)).all()


# ---------------------------------------------------------------------------------------------------------------
# int8_matmul / int8_scaled_matmul
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def int8_operands(draw):
    m, k, n = draw(st.integers(0, 40)), draw(st.integers(1, 300)), draw(st.integers(1, 70))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    low = draw(st.sampled_from([-127, 0]))
    a = torch.randint(low, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    if draw(st.booleans()) and m:  # saturated rows: the largest possible partial sums
        a[0] = 127
        b[0] = -127
    return a, b, g


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(operands=int8_operands())
def test_int8_matmul_is_exact(device, operands):
    a, b, _ = operands
    exact = (a.long() @ b.long().t()).int()
    assert torch.equal(_dispatch("int8_matmul", device)(a, b), exact)
    assert torch.equal(ref.int8_matmul(a, b), exact)


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(operands=int8_operands(), out_dtype=st.sampled_from(DTYPES), with_bias=st.booleans())
def test_int8_scaled_matmul(device, operands, out_dtype, with_bias):
    a, b, g = operands
    row_scale = torch.rand(a.shape[0], generator=g) / 50
    col_scale = torch.rand(b.shape[0], generator=g) / 50
    bias = torch.randn(b.shape[0], generator=g).to(out_dtype) if with_bias else None
    out = _dispatch("int8_scaled_matmul", device)(a, b, row_scale, col_scale, bias, out_dtype)
    expected = ref.int8_scaled_matmul(a, b, row_scale, col_scale, bias, out_dtype)
    product = (a.double() @ b.double().t()) * row_scale.double().unsqueeze(1) * col_scale.double()
    exact = product + (bias.double() if bias is not None else 0)
    magnitude = product.abs() + (bias.double().abs() if bias is not None else 0)
    # The int32 product is exact (and exact in fp32: K * 127^2 < 2^24); float(acc) * (row_scale * col_scale) + bias
    # rounds three times in fp32 (tests/_tolerance.py), then once to the output dtype.
    tol = fp32_sum_tolerance(magnitude, 3, out_dtype, exact=exact)
    assert_within(out, expected, tol, "dispatched vs reference")
    tol = fp32_sum_tolerance(magnitude, 3, out_dtype, exact=exact, evaluations=1)
    assert_within(expected.double(), exact, tol, "reference vs exact")


# ---------------------------------------------------------------------------------------------------------------
# int8_linear (and Int8Linear over any leading shape)
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def linear_cases(draw):
    x = draw(float_matrices(max_rows=24, max_cols=96))
    n = draw(st.integers(1, 48))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(n, x.shape[1], generator=g) * draw(st.sampled_from([0.01, 0.1, 1.0]))
    if draw(st.booleans()):
        w[torch.rand(n, generator=g) < 0.2] = 0.0
    codes, scale = ref.quantize_weight(w)
    if x.dtype == torch.float16 and x.numel():  # keep true results inside fp16's range (overflow: see inputs tests)
        peak = (x.float().abs() @ w.abs().t()).max().item()
        if peak > 3e4:
            x = (x.float() * (3e4 / peak)).half()
    bias = torch.randn(n, generator=g).to(x.dtype) if draw(st.booleans()) else None
    return x, codes, scale, bias, draw(thresholds)


def _reference_error_bound(x, codes, scale, bias, threshold):
    """``(exact, bound)``: how far the reference int8_linear may be from ``x @ W_deq.T + bias`` computed in fp64.

    Quantization: an inlier activation is off by at most half its row step, ``row_scale / 2``, plus the fp32
    roundings of ``x * multiplier`` and ``multiplier * row_scale`` (``gamma_3 * |x|``), times sum |W_deq| of the
    inlier columns. Float: the fp32 sums of tests/_tolerance.py against the exact quantized terms, plus the two
    roundings of the int8 part's dequantization (``gamma_2``), then one rounding to the output dtype.
    """
    x32 = x.float()
    w_deq = ref.dequantize_weight(codes, scale).double()
    _, row_scale, mask = ref.quantize_activation(x, threshold)
    inlier_absmax = x32[:, ~mask].abs().amax(dim=1) if bool((~mask).any()) else torch.zeros(x.shape[0])
    step = row_scale.double() / 2 + gamma(3) * inlier_absmax.double()
    quant = step.unsqueeze(1) * w_deq[:, ~mask].abs().sum(dim=1).unsqueeze(0)
    exact = x.double() @ w_deq.t() + (bias.double() if bias is not None else 0)
    exact_q, magnitude_q, n_terms = int8_linear_terms(x, codes, scale, bias, threshold)
    fp = fp32_sum_tolerance(magnitude_q, n_terms, x.dtype, exact=exact_q, evaluations=1) + gamma(2) * magnitude_q
    return exact, quant + fp


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(case=linear_cases())
def test_int8_linear(device, case):
    x, codes, scale, bias, threshold = case
    out = _dispatch("int8_linear", device)(x, codes, scale, bias, threshold)
    expected = ref.int8_linear(x, codes, scale, bias, threshold)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], codes.shape[0])
    assert torch.isfinite(out).all() and torch.isfinite(expected).all()
    # Same quantization on both sides: only the fp32 summation order and the final rounding may differ.
    assert_within(out, expected, int8_linear_tolerance(x, codes, scale, bias, threshold), "dispatched vs reference")
    exact, bound = _reference_error_bound(x, codes, scale, bias, threshold)
    assert_within(expected.double(), exact, bound, "reference vs exact")


@PROPERTY_SETTINGS
@given(case=linear_cases(), leading=st.lists(st.integers(0, 3), max_size=3))
def test_int8_linear_module_over_leading_shapes(case, leading):
    x, codes, scale, bias, threshold = case
    k, n = x.shape[1], codes.shape[0]
    rows = math.prod(leading)
    flat = x.repeat(rows // max(x.shape[0], 1) + 1, 1)[:rows] if x.shape[0] else torch.ones(rows, k, dtype=x.dtype)
    layer = Int8Linear(k, n, bias=bias is not None, threshold=threshold)
    layer.weight.data, layer.weight_scale.data = codes, scale
    if bias is not None:
        layer.bias.data = bias
    with torch.no_grad():
        out = layer(flat.reshape(*leading, k))
        assert out.shape == (*leading, n) and out.dtype == x.dtype
        # Bitwise: the op flattens the leading dimensions itself, so this is the very same [rows, K] call.
        assert torch.equal(out.reshape(rows, n), layer(flat))
