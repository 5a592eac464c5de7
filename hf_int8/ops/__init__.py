"""The ``hf_int8`` op registry.

Every op is declared once here with ``torch.library`` (schema + fake implementation, so ``torch.compile`` and meta
tensors see through it). Its default kernel is the named pure-PyTorch function of :mod:`hf_int8.ops.reference`,
registered for ``CompositeExplicitAutograd``. Native kernels from ``csrc/`` register for the ``CPU`` or ``CUDA``
dispatch key of the same op and take precedence there; nothing else changes. :func:`implementations` says which
kernel each op dispatches to.

The public Python functions below validate user-facing arguments with clear errors, then call the op, or its
``reference_<op>`` twin for a device the native kernels cannot serve (:mod:`hf_int8.ops._health`: no device code
for that GPU, or a failed self-check on first use; decided once per device).
"""

from __future__ import annotations

import numbers

import torch

from . import _health, reference
from ._health import NativeKernelFallbackWarning
from .constants import DEFAULT_THRESHOLD, INT8_MAX

__all__ = [
    "CUDA_OP_NAMES",
    "DEFAULT_THRESHOLD",
    "INT8_MAX",
    "OP_NAMES",
    "NativeKernelFallbackWarning",
    "dequantize_weight",
    "float_linear",
    "float_linear_is_native",
    "implementations",
    "int8_linear",
    "int8_matmul",
    "int8_scaled_matmul",
    "quantize_activation",
    "quantize_weight",
    "reference",
]

NAMESPACE = "hf_int8"
_lib = torch.library.Library(NAMESPACE, "DEF")

_SCHEMAS = {
    "quantize_weight": "quantize_weight(Tensor weight) -> (Tensor, Tensor)",
    "quantize_activation": "quantize_activation(Tensor x, float threshold) -> (Tensor, Tensor, Tensor)",
    "int8_matmul": "int8_matmul(Tensor a, Tensor b) -> Tensor",
    "int8_scaled_matmul": (
        "int8_scaled_matmul(Tensor a, Tensor b, Tensor row_scale, Tensor col_scale, Tensor? bias, "
        "ScalarType out_dtype) -> Tensor"
    ),
    "int8_linear": (
        "int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, float threshold) -> Tensor"
    ),
    "float_linear": "float_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
}
OP_NAMES: tuple[str, ...] = tuple(_SCHEMAS)
# Ops with a native CUDA kernel: all but float_linear, whose native kernel is a CPU decode kernel (on a GPU,
# FloatLinear runs torch's own linear; a direct call of the op there runs the reference).
CUDA_OP_NAMES: tuple[str, ...] = tuple(name for name in OP_NAMES if name != "float_linear")

for _name, _schema in _SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only.
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_fake(f"{NAMESPACE}::quantize_weight")
def _quantize_weight_fake(weight):
    n, k = weight.shape
    return weight.new_empty((n, k), dtype=torch.int8), weight.new_empty((n,), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::quantize_activation")
def _quantize_activation_fake(x, threshold):
    m, k = x.shape
    return (
        x.new_empty((m, k), dtype=torch.int8),
        x.new_empty((m,), dtype=torch.float32),
        x.new_empty((k,), dtype=torch.bool),
    )


@torch.library.register_fake(f"{NAMESPACE}::int8_matmul")
def _int8_matmul_fake(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.register_fake(f"{NAMESPACE}::int8_scaled_matmul")
def _int8_scaled_matmul_fake(a, b, row_scale, col_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.register_fake(f"{NAMESPACE}::int8_linear")
def _int8_linear_fake(x, weight, weight_scale, bias, threshold):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::float_linear")
def _float_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---------------------------------------------------------------------------------------------------------------
# Autograd: gradients flow to the input (and bias) through the dequantized weight; int8 weights get none.
# ---------------------------------------------------------------------------------------------------------------
def _int8_linear_setup_context(ctx, inputs, output):
    x, weight, weight_scale, bias, _threshold = inputs
    ctx.save_for_backward(weight, weight_scale)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _int8_linear_backward(ctx, grad_out):
    weight, weight_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = reference.dequantize_weight(weight, weight_scale, grad_out.dtype)
        grad_x = (grad_out @ w).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


torch.library.register_autograd(
    f"{NAMESPACE}::int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup_context
)


def _float_linear_setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _float_linear_backward(ctx, grad_out):
    """nn.Linear's gradients (FloatLinear only calls the op without them; this keeps a direct call differentiable)."""
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
    if ctx.needs_input_grad[0]:
        grad_x = grad_out @ weight
    if ctx.needs_input_grad[1]:
        grad_weight = flat_grad.t() @ x.reshape(-1, x.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = flat_grad.sum(0)
    return grad_x, grad_weight, grad_bias


torch.library.register_autograd(
    f"{NAMESPACE}::float_linear", _float_linear_backward, setup_context=_float_linear_setup_context
)


# ---------------------------------------------------------------------------------------------------------------
# Reference twins ``reference_<op>``: same schema, fake implementation and autograd, but only the reference kernel
# (no native kernel registers for them). The entry points call them on a device whose native kernels cannot serve
# it, so that a fallback keeps autograd, meta tensors and torch.compile exactly as the real op has them.
# ---------------------------------------------------------------------------------------------------------------
_FAKES = {
    "quantize_weight": _quantize_weight_fake,
    "quantize_activation": _quantize_activation_fake,
    "int8_matmul": _int8_matmul_fake,
    "int8_scaled_matmul": _int8_scaled_matmul_fake,
    "int8_linear": _int8_linear_fake,
    "float_linear": _float_linear_fake,
}
for _name, _schema in _SCHEMAS.items():
    _lib.define(f"reference_{_schema}")
    _lib.impl(f"reference_{_name}", getattr(reference, _name), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::reference_{_name}", _FAKES[_name])
torch.library.register_autograd(
    f"{NAMESPACE}::reference_int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup_context
)
torch.library.register_autograd(
    f"{NAMESPACE}::reference_float_linear", _float_linear_backward, setup_context=_float_linear_setup_context
)


def op_for(name: str, device: torch.device):
    """``torch.ops.hf_int8.<name>`` for tensors on ``device``, or its reference twin where the native kernels cannot
    serve that device (decided at its first op, then one dict lookup per call)."""
    return getattr(torch.ops.hf_int8, name if _health.native_kernels_serve(device) else f"reference_{name}")


# ---------------------------------------------------------------------------------------------------------------
# Public, validated entry points.
# ---------------------------------------------------------------------------------------------------------------
def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in reference.FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got dtype {t.dtype!r}")


def _check_int8_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype!r} of shape {tuple(weight.shape)}")
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (weight.shape[0],):
        raise ValueError(
            f"weight_scale must be float32 of shape ({weight.shape[0]},), "
            f"got {weight_scale.dtype!r} of shape {tuple(weight_scale.shape)}"
        )


def _check_threshold(threshold: float) -> float:
    """Refuse an unusable outlier threshold; return it as the kernels compare it (rounded once to float32).

    The threshold is compared in float32 everywhere (:func:`reference.threshold_as_float32`), so two values are
    refused besides negative, NaN, infinite and non-numbers: a positive one that rounds to 0 in float32 (below
    2**-150 ~ 7.0e-46, e.g. ``1e-50``), which would silently mean "no outlier columns" instead of "every non-zero
    column", and one beyond float32's range (it would round to inf). The float32 subnormals from 1.4e-45 up are kept.
    """
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not threshold >= 0:
        raise ValueError(f"threshold must be a finite number >= 0 (0 disables the outlier path), got {threshold!r}")
    try:
        t32 = reference.threshold_as_float32(float(threshold))
    except OverflowError:  # an int or Fraction too large for a double
        t32 = float("inf")
    if t32 == float("inf"):
        raise ValueError(f"threshold must be a finite number >= 0 within float32's range (3.4e38), got {threshold!r}")
    if t32 == 0 and threshold > 0:
        raise ValueError(
            f"threshold {threshold!r} is positive but rounds to 0 in float32 (outlier thresholds are compared in "
            "float32): use 0 to disable the outlier path, or a threshold >= 1.4e-45"
        )
    return t32


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization of a 2-D float weight: ``(codes int8 [N, K], scale fp32 [N])``.

    A weight holding NaN or Inf is refused with ``ValueError`` (its row could only quantize to a NaN or infinite
    scale). The op underneath, ``torch.ops.hf_int8.quantize_weight``, does not check: there such a row gets all-zero
    codes and a non-finite scale, so only that output feature is NaN.
    """
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    codes, scale = op_for("quantize_weight", weight.device)(weight.contiguous())
    if weight.device.type != "meta" and not torch.compiler.is_compiling():
        # The row absmax propagates NaN/Inf into the row's scale, so checking the [N] scales finds every bad row
        # without a second pass over the [N, K] weight (that pass was most of a quantize-on-load's time).
        bad_rows = ~torch.isfinite(scale)
        if bool(bad_rows.any()):
            bad = ~torch.isfinite(weight[bad_rows])
            row = int(bad_rows.nonzero()[0])
            col = int((~torch.isfinite(weight[row])).nonzero()[0])
            raise ValueError(
                f"weight holds {int(bad.sum())} NaN/Inf values (first: {weight[row, col].item()!r} at row {row}, "
                f"column {col}); int8 quantization needs finite weights"
            )
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale[:, None]`` as ``dtype``."""
    _check_int8_weight(codes, scale)
    return reference.dequantize_weight(codes, scale, dtype)


def quantize_activation(
    x: torch.Tensor, threshold: float = DEFAULT_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8() activation quantization of 2-D ``x``: ``(codes int8, row_scale fp32, outlier_mask bool)``."""
    _check_float("x", x)
    _check_threshold(threshold)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, features], got shape {tuple(x.shape)}")
    return op_for("quantize_activation", x.device)(x.contiguous(), float(threshold))


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ b.T`` of int8 ``a [M, K]`` and ``b [N, K]``."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"a and b must be 2-D int8 tensors, got {a.dtype!r} {tuple(a.shape)} and {b.dtype!r} {tuple(b.shape)}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner dimensions differ: a has {a.shape[1]} columns, b has {b.shape[1]}")
    return op_for("int8_matmul", a.device)(a.contiguous(), b.contiguous())


def int8_scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantized int8 GEMM ``(a @ b.T) * row_scale[:, None] * col_scale + bias`` as ``out_dtype``."""
    if out_dtype not in reference.FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype!r}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a [M, K] and b [N, K] must share K, got {tuple(a.shape)} and {tuple(b.shape)}")
    if tuple(row_scale.shape) != (a.shape[0],) or tuple(col_scale.shape) != (b.shape[0],):
        raise ValueError(
            f"row_scale must have shape ({a.shape[0]},) and col_scale ({b.shape[0]},), "
            f"got {tuple(row_scale.shape)} and {tuple(col_scale.shape)}"
        )
    return op_for("int8_scaled_matmul", a.device)(
        a.contiguous(), b.contiguous(), row_scale.float().contiguous(), col_scale.float().contiguous(), bias, out_dtype
    )


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> torch.Tensor:
    """LLM.int8() linear: ``x [..., K]`` times int8 ``weight [N, K]`` (row scales ``weight_scale``) plus ``bias``."""
    _check_float("x", x)
    _check_int8_weight(weight, weight_scale)
    _check_threshold(threshold)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have {weight.shape[1]} features in its last dimension, got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the int8 weight is on {weight.device}")
    if weight_scale.device != weight.device:
        raise ValueError(f"weight_scale is on {weight_scale.device} but the int8 weight is on {weight.device}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but the int8 weight is on {weight.device}")
    return op_for("int8_linear", x.device)(x.contiguous(), weight, weight_scale, bias, float(threshold))


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight [N, K]^T + bias`` in fp32, cast once to ``x.dtype`` (weight and bias of x's dtype).

    The kernel of :class:`hf_int8.nn.FloatLinear`, the layers an llmint8 model keeps in floating point. The native CPU
    kernel streams the weight for bf16 inputs of up to 16 tokens with AVX512-BF16, up to 4 on AVX2 (decode); every
    other call runs torch's own linear. Differentiable like ``nn.Linear`` (:class:`~hf_int8.nn.FloatLinear` calls it
    only where no gradient is needed).
    """
    _check_float("x", x)
    if weight.dim() != 2 or weight.dtype != x.dtype:
        raise ValueError(
            f"weight must be a 2-D tensor of x's dtype {x.dtype!r}, "
            f"got {weight.dtype!r} of shape {tuple(weight.shape)}"
        )
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have {weight.shape[1]} features in its last dimension, got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) and x's dtype {x.dtype!r}, "
            f"got {bias.dtype!r} of shape {tuple(bias.shape)}"
        )
    if bias is not None and bias.device != weight.device:
        raise ValueError(f"bias is on {bias.device} but the weight is on {weight.device}")
    return op_for("float_linear", x.device)(x, weight, bias)


@torch.compiler.assume_constant_result  # torch.compile: decided while tracing, a constant in the graph
def float_linear_is_native() -> bool:
    """Whether the native CPU kernel serves :func:`float_linear` in this process (built, and the CPU's native
    kernels passed their self-check). Without it the op would run the fp32 reference, far slower than torch's own
    linear, so :class:`hf_int8.nn.FloatLinear` only calls it when this is true."""
    registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::float_linear", "CPU")
    return registered and _health.native_kernels_serve(torch.device("cpu"))


def implementations() -> dict[str, str]:
    """Which kernel each op runs on each device type: ``{"int8_linear": {"cpu": "native", ...}}`` flattened.

    Returns e.g. ``{"int8_linear[cpu]": "native (avx512-vnni)", "int8_linear[cuda]": "reference"}``. A device whose
    native kernels were found unusable reads ``"reference (fallback: <reason>)"``; a CUDA device judged so far also
    gets its own entry (``"int8_linear[cuda:0]"``), and ``[cuda]`` shows a fallback if any CUDA device has one. The
    CPU (and the current CUDA device, once CUDA is initialised) is judged here if no op has run there yet.
    """
    from .._extension import cpu_isa

    _health.native_kernels_serve(torch.device("cpu"))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        _health.native_kernels_serve(torch.device("cuda", torch.cuda.current_device()))
    verdicts = _health.verdicts()
    found = {}
    for name in OP_NAMES:
        qualified = f"{NAMESPACE}::{name}"
        for key, device in (("CPU", "cpu"), ("CUDA", "cuda")):
            native = torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)
            if native and device == "cpu":
                found[f"{name}[{device}]"] = f"native ({cpu_isa()})"
            else:
                found[f"{name}[{device}]"] = "native" if native else "reference"
            if not native:
                continue
            base = found[f"{name}[{device}]"]
            for judged, verdict in sorted(verdicts.items()):
                if torch.device(judged).type != device:
                    continue
                served = base if verdict.native else f"reference (fallback: {verdict.reason})"
                if device == "cuda":
                    found[f"{name}[{judged}]"] = served
                if not verdict.native:
                    found[f"{name}[{device}]"] = served
    return found
