"""``Int8Linear``: an ``nn.Linear`` replacement holding an int8 weight and running LLM.int8() in ``forward``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from .. import ops
from ..ops.constants import DEFAULT_THRESHOLD
from . import casts


class FloatLinearLike(Protocol):
    """What :meth:`Int8Linear.from_float` reads: ``nn.Linear`` (weight ``[out, in]``) or transformers' ``Conv1D``."""

    @property
    def weight(self) -> torch.Tensor: ...

    @property
    def bias(self) -> torch.Tensor | None: ...


class Int8Linear(nn.Module):
    """LLM.int8() linear layer.

    State: ``weight`` (int8 ``[out_features, in_features]``, a frozen ``Parameter``), ``weight_scale`` (fp32
    ``[out_features]`` buffer, ``weight ~= weight.int8 * weight_scale[:, None]``) and an optional floating-point
    ``bias``. ``forward`` accepts fp32, bf16 and fp16 inputs of any leading shape and returns the input dtype.

    Moving the module with ``.to(device)`` moves the int8 codes as they are: nothing is quantized or dequantized
    as a side effect. Every dtype cast (``.to(dtype)``, ``.type``, ``.half``, ``.float``, ``.double``,
    ``.bfloat16``) raises ``ValueError`` and leaves the layer as it was: the int8 codes and fp32 scales never change
    dtype, and the bias keeps the dtype it was created with (see :mod:`hf_int8.nn.casts`).
    """

    weight: nn.Parameter
    weight_scale: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ops._check_threshold(threshold)
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = float(threshold)
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, linear: FloatLinearLike, threshold: float = DEFAULT_THRESHOLD) -> Int8Linear:
        """Quantize an ``nn.Linear`` (or a transformers ``Conv1D``, whose weight is stored ``[in, out]``)."""
        weight = linear.weight.detach()
        if type(linear).__name__ == "Conv1D":
            weight = weight.t()
        out_features, in_features = weight.shape
        module = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            threshold=threshold,
            device=weight.device,
            bias_dtype=linear.bias.dtype if linear.bias is not None else None,
        )
        codes, scale = ops.quantize_weight(weight.contiguous())
        module.weight.data = codes
        module.weight_scale.data = scale
        if linear.bias is not None and module.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The floating-point weight ``[out_features, in_features]`` these int8 codes stand for."""
        return ops.dequantize_weight(self.weight, self.weight_scale, dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (used by ``model.dequantize()``)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device, dtype=dtype
        )
        linear.weight.data = self.dequantize(dtype)
        if self.bias is not None:
            linear.bias.data = self.bias.detach().to(dtype)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias: torch.Tensor | None = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return ops.int8_linear(x, self.weight, self.weight_scale, bias, self.threshold)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Int8Linear:
        # Every dtype cast (.to(dtype), .type, .half, .float, .double, .bfloat16) ends here: refuse it before any
        # tensor changes (see hf_int8.nn.casts). .type(dtype) would even turn the int8 codes into floats.
        casts.check_apply(self, fn, "an Int8Linear layer")
        weight, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.int8 or self.weight_scale.dtype != torch.float32:
            # fn cast real tensors but not the probes: put the codes and scales back as they were, and refuse.
            cast_to = self.weight.dtype if self.weight.dtype != torch.int8 else self.weight_scale.dtype
            self.weight, self.weight_scale = weight, scale
            raise casts.cast_error("an Int8Linear layer", cast_to)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={self.threshold}"
        )
