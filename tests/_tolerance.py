"""One derivation of the floating-point tolerances the test suite uses (a helper module, not a test file).

When may two floating-point results be compared bitwise? Only when our own code fixes the order of every rounding on
both sides: int8 codes, scales and outlier masks against the reference (quant_math.h spells the fp32 operations out),
int32 products, one native kernel against itself (other thread counts, other strides, concurrent calls), the same
tensors saved and reloaded and run through the same model. An fp32 sum computed by MKL, oneDNN, cuBLAS or by our
kernels in another order is not bitwise reproducible: BLAS builds block, vectorize and use FMA differently on each
CPU (an AVX-512 Zen 5 and an AVX2 Zen 3 disagree in the last bits of the same ``x @ w.T``), and the native outlier
product sums in its own order. Those comparisons use the bound below.

Error model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 3.1): an ``n``-term dot
product or sum evaluated in fp32 in **any** order, with or without FMA, satisfies
``|fl(s) - s| <= gamma_n * sum_i |x_i * y_i|`` with ``gamma_n = n*u / (1 - n*u)`` and ``u = 2**-24`` (fp32's unit
roundoff). Two evaluations of the same sum are therefore within ``2 * gamma_n * sum_i |x_i * y_i|`` of each other.
Underflow adds an absolute error of at most fp32's smallest normal number per operation (also when the hardware
flushes subnormals to zero, as AMX does). A final cast to bf16 / fp16 rounds each side once more, by at most
``u_out * |value|`` (``u_out`` = 2^-8 bf16, 2^-11 fp16) plus half the spacing of that dtype's subnormals.
"""

from __future__ import annotations

import torch

U32 = 2.0**-24
"""Unit roundoff of fp32 (half an ulp of 1.0): one correctly rounded fp32 operation errs by at most this, relative."""

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}

_FP32_UNDERFLOW = torch.finfo(torch.float32).smallest_normal  # absolute error of one fp32 operation near zero


def gamma(n: int, u: float = U32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of an ``n``-term fp sum or dot product."""
    if n < 0 or n * u >= 1:
        raise ValueError(f"gamma_n needs 0 <= n < 1/u, got n={n!r} with u={u!r}")
    return n * u / (1 - n * u)


def fp32_sum_tolerance(
    magnitude: torch.Tensor,
    n_terms: int,
    out_dtype: torch.dtype = torch.float32,
    *,
    exact: torch.Tensor | None = None,
    evaluations: int = 2,
) -> torch.Tensor:
    """Largest ``|a - b|`` between two results of the same real sum computed in fp32 (each then cast to ``out_dtype``).

    Args:
        magnitude: ``sum_i |term_i|`` per output element, in fp64 (for a product: ``|x| @ |w|.T``).
        n_terms: how many terms each output element sums in fp32 (in any order).
        out_dtype: the dtype both results are cast to once at the end (fp32: no cast).
        exact: the exact sum (fp64), to bound the output rounding; ``magnitude`` (always >= ``|sum|``) if omitted.
        evaluations: 2 when both sides are fp32 evaluations, 1 when the other side is the exact fp64 value.
    """
    if evaluations not in (1, 2):
        raise ValueError(f"evaluations must be 1 or 2, got {evaluations!r}")
    mag = magnitude.double()
    one_side = gamma(n_terms) * mag + n_terms * _FP32_UNDERFLOW
    tol = evaluations * one_side
    if out_dtype != torch.float32:
        value = (mag if exact is None else exact.double().abs()) + one_side  # |fp32 result| before the cast
        info = torch.finfo(out_dtype)
        half_subnormal_step = info.smallest_normal * info.eps / 2
        tol = tol + evaluations * (UNIT_ROUNDOFF[out_dtype] * value + half_subnormal_step)
    return tol


def assert_within(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: torch.Tensor | float, what: str = ""
) -> None:
    """Same dtype and shape, NaN and +-inf in the same places, each finite element within ``tolerance`` of its peer."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    )
    a, e = actual.double(), expected.double()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN positions differ"
    infinite = e.isinf()
    assert torch.equal(a.isinf(), infinite) and torch.equal(a[infinite], e[infinite]), f"{what}: +-inf differ"
    finite = torch.isfinite(e)
    tol = torch.as_tensor(tolerance, dtype=torch.float64).expand_as(e)[finite]
    diff = (a - e).abs()[finite]
    if diff.numel() == 0:
        return
    excess = diff - tol
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{what}: {int((excess > 0).sum())} of {diff.numel()} elements outside the derived tolerance; worst "
        f"|diff| {float(diff[worst]):.4g} where the bound is {float(tol[worst]):.4g}"
    )


def int8_linear_terms(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(exact, magnitude, n_terms)`` of ``int8_linear(x, weight, weight_scale, bias, threshold)`` as fp32 sums.

    Every implementation quantizes ``x`` identically (codes, row scales and outlier masks are bit-identical: tested
    on their own) and computes the int8 part ``float(acc) * (row_scale * col_scale)`` with the same fp32 operations
    (quant_math.h). What may differ is the fp32 sum over the outlier columns (any order and blocking; the AMX-BF16
    kernel sums up to three exact bf16 partial products per column and applies the weight scale after the sum,
    csrc/cpu/outlier_gemm.cpp) and where the int8 part and the bias join it. So each output element is a sum of
    ``n_terms = 3 * outlier_columns + 3`` fp32 terms; ``exact`` is that sum in fp64 (with the int8 part as fp32
    computes it) and ``magnitude`` the sum of its terms' absolute values. A NaN/Inf activation makes its row
    non-finite in both, like its outputs (:func:`assert_within` compares those by position only).
    """
    from hf_int8.ops import reference as ref

    x2d = x.reshape(-1, x.shape[-1])
    codes, row_scale, mask = ref.quantize_activation(x2d, threshold)
    int8_part = (ref.int8_matmul(codes, weight).float() * (row_scale.unsqueeze(1) * weight_scale.float())).double()
    magnitude, exact = int8_part.abs(), int8_part.clone()
    n_outliers = int(mask.sum())
    if n_outliers:
        cols = mask.nonzero().squeeze(1)
        w_o = ref.dequantize_weight(weight.index_select(1, cols), weight_scale).double()
        x_o = x2d.index_select(1, cols).double()
        magnitude += x_o.abs() @ w_o.abs().t()
        exact += x_o @ w_o.t()
    if bias is not None:
        magnitude += bias.double().abs()
        exact += bias.double()
    shape = (*x.shape[:-1], weight.shape[0])
    return exact.reshape(shape), magnitude.reshape(shape), 3 * n_outliers + 3


def int8_linear_tolerance(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Largest ``|a - b|`` between two implementations of ``int8_linear`` on these arguments (see
    :func:`int8_linear_terms`), each output cast once to ``out_dtype`` (default ``x.dtype``)."""
    exact, magnitude, n_terms = int8_linear_terms(x, weight, weight_scale, bias, threshold)
    return fp32_sum_tolerance(magnitude, n_terms, x.dtype if out_dtype is None else out_dtype, exact=exact)
