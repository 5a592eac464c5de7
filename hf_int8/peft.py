"""LoRA adapters from PEFT on top of a frozen llmint8 model.

PEFT only wraps layer types it knows; :class:`~hf_int8.Int8Linear` is registered with a ``LoraConfig`` through
PEFT's custom-module hook::

    import hf_int8
    from hf_int8.peft import lora_config
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model)          # freezes the base, fp32 norms, input grads
    model = get_peft_model(model, lora_config(r=8, target_modules=["q_proj", "v_proj"]))

A plain ``LoraConfig`` works too after ``hf_int8.peft.register(config)``. The base layer always runs the int8 kernel,
in training as in inference (no "dequantize the weight on every call" path); its backward pass multiplies the output
gradient by the dequantized weight to give the input gradient, and the int8 weight never receives a gradient.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as _LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from . import ops
from .nn import Int8Linear


class Int8LoraLinear(_LoraLinear):
    """A LoRA adapter around a frozen :class:`Int8Linear`: ``int8_linear(x) + B(A(dropout(x))) * scaling``.

    ``merge`` / ``unmerge`` (and so ``merge_and_unload``) add the adapter's delta to the dequantized weight and
    quantize the sum again: the merged layer stays int8, within half a quantization step per weight of the exact sum.
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        variants = [name for name in ("use_dora", "use_bdlora", "arrow_config", "velora_config", "kasa_config")
                    if getattr(config, name, None)]
        if variants:
            raise ValueError(f"hf_int8's Int8LoraLinear supports plain LoRA only, got LoraConfig options {variants!r}")
        return None

    def _requantize(self, adapter: str, sign: float, safe: bool) -> None:
        base: Int8Linear = self.get_base_layer()
        merged = base.dequantize(torch.float32) + sign * self.get_delta_weight(adapter).float()
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {adapter!r} into {base!r} gives NaN/Inf weights; adapter broken?")
        codes, scale = ops.quantize_weight(merged)
        base.weight.data = codes
        base.weight_scale.data = scale
        if self.lora_bias[adapter] and base.bias is not None:
            base.bias.data = base.bias.data + sign * self.lora_B[adapter].bias.data.to(base.bias.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            warnings.warn("merging a LoRA adapter into an llmint8 layer re-quantizes its weight (rounding error)",
                          stacklevel=2)
            self._requantize(adapter, 1.0, safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._requantize(adapter, -1.0, False)


def register(config: LoraConfig) -> LoraConfig:
    """Let ``config`` target :class:`Int8Linear` layers (PEFT's custom-module hook); returns ``config``."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"config must be a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({Int8Linear: Int8LoraLinear})
    return config


def lora_config(**kwargs: Any) -> LoraConfig:
    """``LoraConfig(**kwargs)`` that works on llmint8 models."""
    return register(LoraConfig(**kwargs))


def load_adapter(model: nn.Module, adapter_path: str, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` for an adapter trained on an llmint8 base (the saved config is re-registered)."""
    config = register(LoraConfig.from_pretrained(adapter_path))
    return PeftModel.from_pretrained(model, adapter_path, config=config, **kwargs)
