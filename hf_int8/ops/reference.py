"""Pure-PyTorch reference kernels of the ``hf_int8`` ops.

These are the default implementation of every op (registered for ``CompositeExplicitAutograd``, so they run on any
device that has no native kernel) and the oracle the native kernels are tested against. They favour obviously
correct code over speed, with one exception: :func:`int8_matmul` uses ``torch._int_mm`` where it is exact and
available, because an int32 GEMM in plain PyTorch does not exist on every device.

The float math is spelled out so that native kernels can reproduce it bit for bit (see
``csrc/include/hf_int8/quant_math.h``):

* a row's scale is ``absmax / INT8_MAX`` (fp32), its reciprocal multiplier ``INT8_MAX / absmax`` (0 for a zero row);
* a code is ``round_half_to_even(x * multiplier)`` clamped to ``[-INT8_MAX, INT8_MAX]`` (NaN gives 0);
* the dequantized product is ``acc * (row_scale * col_scale)`` in fp32, plus the outlier product and the bias, cast
  once to the output dtype;
* an activation is an outlier when ``t > 0 and |x| >= t`` in fp32, where ``t`` is the threshold rounded once to fp32
  (:func:`threshold_as_float32`, the kernels' ``static_cast<float>``).
"""

from __future__ import annotations

import math
import struct

import torch

from .constants import INT8_MAX

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _int8_max_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float(INT8_MAX))


def _row_scale(absmax: torch.Tensor) -> torch.Tensor:
    """``absmax / INT8_MAX`` as one correctly rounded fp32 division on every device.

    Not ``absmax / INT8_MAX`` with a Python scalar: on CUDA, ATen turns division by a scalar into a multiplication
    by its reciprocal (rounded twice), which differs from the native kernels (quant_math.h) in the last bit.
    """
    return torch.div(absmax, _int8_max_like(absmax))


def _row_multiplier(absmax: torch.Tensor) -> torch.Tensor:
    """``INT8_MAX / absmax`` per row, 0 where the row is all zeros (so a zero row gives zero codes, never NaN).

    A tensor-by-tensor division: Python's reflected ``INT8_MAX / safe`` computes ``reciprocal(safe) * INT8_MAX``,
    which differs from the correctly rounded quotient (and from quant_math.h) in about a quarter of the rows.
    """
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.where(absmax > 0, torch.div(_int8_max_like(safe), safe), torch.zeros_like(absmax))


def _encode(values: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """Round ``values * multiplier`` (rows scaled by ``multiplier[:, None]``) to symmetric int8 codes."""
    scaled = values * multiplier.unsqueeze(-1)
    return torch.round(scaled).clamp_(-INT8_MAX, INT8_MAX).nan_to_num_(0.0).to(torch.int8)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization of a weight ``[N, K]``: returns ``(codes int8 [N, K], scale fp32 [N])``.

    ``weight ~= codes * scale[:, None]``; each element is off by at most half a step (``scale / 2``).
    """
    w = weight.float()
    absmax = w.abs().amax(dim=1) if w.shape[1] > 0 else w.new_zeros(w.shape[0])
    codes = _encode(w, _row_multiplier(absmax))
    return codes, _row_scale(absmax)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_weight`: ``codes * scale[:, None]`` computed in fp32, returned as ``dtype``."""
    return (codes.float() * scale.float().unsqueeze(1)).to(dtype)


def threshold_as_float32(threshold: float) -> float:
    """The outlier threshold as every kernel compares it: ``threshold`` rounded once to the nearest float32.

    The ops take the threshold as a double (schema ``float``); the native kernels convert it with
    ``static_cast<float>`` (round to nearest, ties to even) and compare ``|x| >= t`` in fp32 (quant_math.h,
    ``is_outlier``). This is that rounding, done in Python, so that the reference and the validated entry points
    see the very same ``t``: ``6.0000000001`` is ``6.0``, ``1e-40`` a float32 subnormal, a positive value below
    half the smallest subnormal (2**-150, ~7.0e-46; e.g. ``1e-50``) is ``0.0`` (no outlier columns), a value past
    float32's range is ``inf``. The validated entry points refuse those last two (``hf_int8.ops._check_threshold``).
    """
    try:
        # struct's "f" is the C double -> float conversion; it refuses (rather than rounds to inf) an overflow.
        return struct.unpack("<f", struct.pack("<f", threshold))[0]
    except OverflowError:
        return math.copysign(math.inf, threshold)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask ``[K]``: columns of ``x [M, K]`` holding any outlier activation.

    An activation is an outlier when ``t > 0 and |x| >= t``, with ``x`` converted to fp32 and ``t`` the threshold
    rounded once to fp32 (:func:`threshold_as_float32`), exactly like quant_math.h's ``is_outlier``: a threshold of
    0 (or one that rounds to 0) means no outlier columns, and NaN activations are never outliers.
    """
    t32 = threshold_as_float32(threshold)
    if not t32 > 0 or x.shape[0] == 0:
        return torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    # t32 is a float32 value, so comparing with the fp32 tensor involves no further rounding of the threshold.
    return (x.float().abs() >= t32).any(dim=0)


def quantize_activation(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8() activation quantization of ``x [M, K]``.

    Returns ``(codes int8 [M, K], row_scale fp32 [M], outlier_mask bool [K])``. Outlier columns (see
    :func:`outlier_columns`) are left out of each row's absmax (as in the paper) and their codes are 0: they go
    through the floating-point path instead.
    """
    x32 = x.float()
    mask = outlier_columns(x32, threshold)
    inliers = x32.masked_fill(mask, 0.0)
    absmax = inliers.abs().amax(dim=1) if x32.shape[1] > 0 else x32.new_zeros(x32.shape[0])
    codes = _encode(inliers, _row_multiplier(absmax))
    return codes, _row_scale(absmax), mask


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 ``a [M, K]`` and ``b [N, K]``, accumulated in int32: ``[M, N]``."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if k == 1:
        # torch._int_mm on CPU misreads b.t() when K == 1 (a [1, N] view with strides (1, 1)) and returns
        # uninitialised memory; with one column the product is an outer product anyway.
        return a.int() * b.int().t()
    if a.device.type == "cpu":
        return torch._int_mm(a.contiguous(), b.t())
    if a.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:
        return torch._int_mm(a.contiguous(), b.t().contiguous().t())
    # fp64 holds every partial sum exactly (|sum| <= K * 127^2 << 2^53), so this is exact wherever fp64 matmul exists.
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantized int8 GEMM: ``(a @ b.T) * row_scale[:, None] * col_scale[None, :] + bias`` as ``out_dtype``."""
    acc = int8_matmul(a, b).float()
    out = acc * (row_scale.float().unsqueeze(1) * col_scale.float().unsqueeze(0))
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
) -> torch.Tensor:
    """LLM.int8() linear layer: ``x [..., K]`` (fp32/bf16/fp16) times int8 ``weight [N, K]`` -> ``[..., N]``.

    Inlier columns go through int8 x int8 -> int32; outlier columns (``|x| >= threshold`` anywhere in the batch) go
    through an fp32 matmul against the dequantized weight columns. Both parts and the bias are summed in fp32 and
    cast once to ``x.dtype``, so fp16 never holds a partial result.
    """
    out_features = weight.shape[0]
    leading = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    codes, row_scale, mask = quantize_activation(x2d, threshold)
    acc = int8_matmul(codes, weight).float()
    out = acc * (row_scale.unsqueeze(1) * weight_scale.float().unsqueeze(0))
    if bool(mask.any()):
        cols = mask.nonzero().squeeze(1)
        w_outlier = dequantize_weight(weight.index_select(1, cols), weight_scale)
        out = out + x2d.index_select(1, cols).float() @ w_outlier.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*leading, out_features)


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A floating-point linear layer, ``x [..., K] @ weight [N, K]^T + bias``, summed in fp32 and cast once to
    ``x.dtype``: what the layers an llmint8 model keeps in floating point compute (bf16 x bf16 products are exact in
    fp32, so only the order of the fp32 additions may differ between implementations)."""
    out = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)
