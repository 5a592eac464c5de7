"""``FloatLinear``: the ``nn.Linear`` layers an llmint8 model keeps in floating point, with a fast CPU decode path."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


class FloatLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, state dict and results up to fp32 summation order) whose bf16 forward on CPU
    runs :func:`hf_int8.ops.float_linear`.

    The llmint8 quantizer gives this class to the linear layers it leaves in floating point (the output head and
    ``skip_modules``). At decode such a layer is a matrix-vector product, which the native kernel (x86 CPUs with
    AVX2, best with AVX512-BF16) runs at the memory's read rate, ~3x torch's bf16 linear on an AMD Zen 5. It serves
    bf16 inputs on CPU when no gradient is needed and the native kernels are built; everything else (other dtypes
    and devices, training, the reference-only build) is torch's linear, as in ``nn.Linear``. ``model.dequantize()``
    turns these layers back into ``nn.Linear``.
    """

    # False for a layer whose parameters are not plain tensors (tensor parallelism's DTensors): torch's linear only.
    native_forward: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if (
            self.native_forward
            and x.device.type == "cpu"
            and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu"
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.device.type == "cpu"))
            and not (
                torch.is_grad_enabled()
                and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
            )
            and ops.float_linear_is_native()
        ):
            return ops.float_linear(x, weight, bias)
        # Not super().forward: tensor parallelism and accelerate's hooks keep this bound method, and dequantize() may
        # have turned the instance back into an nn.Linear since.
        return nn.functional.linear(x, weight, bias)
