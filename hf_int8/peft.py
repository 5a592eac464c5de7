"""LoRA adapters from PEFT on top of a frozen llmint8 model, with PEFT's own API and no hf_int8 call.

PEFT wraps only layer types it knows. Importing this module teaches PEFT's LoRA about :class:`~hf_int8.Int8Linear`:
a plain ``LoraConfig`` then targets int8 layers by name or with ``target_modules="all-linear"``, through every entry
point (``get_peft_model``, ``PeftModel.from_pretrained``, transformers' ``model.add_adapter`` / ``load_adapter``,
``merge_and_unload``). The start-up hook imports it as soon as a program imports ``peft`` (see ``hf_int8_autoload``),
so user code needs no hf_int8 line::

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model)          # freezes the base, fp32 norms, input grads
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

With the hook off (``HF_INT8_NO_AUTOLOAD=1``), ``import hf_int8.peft`` does the same. The base layer always runs the
int8 kernel, in training as in inference (no "dequantize the weight on every call" path); its backward pass multiplies
the output gradient by the dequantized weight to give the input gradient, and the int8 weight never receives a
gradient.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, cast

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from . import ops
from .integration._compat import lora_custom_modules, patch_all_linear_expansion, patch_lora_layer_factory
from .nn import Int8Linear


class Int8LoraLinear(LoraLinear):
    """A LoRA adapter around a frozen :class:`Int8Linear`: ``int8_linear(x) + B(A(dropout(x))) * scaling``.

    ``merge`` / ``unmerge`` (and so ``merge_and_unload``) add the adapter's delta to the dequantized weight and
    quantize the sum again: the merged layer stays int8, within half a quantization step per weight of the exact sum.
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = cast(Int8Linear, module)  # PEFT passes the base layer: _dispatch_int8 wraps Int8Linear layers only
        return base.in_features, base.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        variants = [
            name
            for name in ("use_dora", "use_bdlora", "arrow_config", "velora_config", "kasa_config")
            if getattr(config, name, None)
        ]
        if variants:
            raise ValueError(f"hf_int8's Int8LoraLinear supports plain LoRA only, got LoraConfig options {variants!r}")
        return None

    def _requantize(self, adapter: str, sign: float, safe: bool) -> None:
        base = cast(Int8Linear, self.get_base_layer())  # _dispatch_int8 wraps Int8Linear layers only
        merged = base.dequantize(torch.float32) + sign * self.get_delta_weight(adapter).float()
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {adapter!r} into {base!r} gives NaN/Inf weights; adapter broken?")
        codes, scale = ops.quantize_weight(merged)
        base.weight.data = codes
        base.weight_scale.data = scale
        if self.lora_bias[adapter] and base.bias is not None:
            lora_b = cast(nn.Linear, self.lora_B[adapter])  # PEFT's LoRA B of a Linear layer is an nn.Linear
            base.bias.data = base.bias.data + sign * lora_b.bias.data.to(base.bias.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            warnings.warn(
                "merging a LoRA adapter into an llmint8 layer re-quantizes its weight (rounding error)", stacklevel=2
            )
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


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _claimed_by_user(config: LoraConfig, layer: nn.Module) -> bool:
    """True when the user registered their own LoRA layer for this type (PEFT's custom-module API): theirs wins."""
    return any(isinstance(layer, key) for key in lora_custom_modules(config))


def _dispatch_int8(create_new_module):
    """Wrap ``LoraModel._create_new_module``: an :class:`Int8Linear` target becomes an :class:`Int8LoraLinear`."""

    @functools.wraps(create_new_module)
    def create(lora_config, adapter_name, target, **kwargs):
        base = _base_layer(target)
        if not isinstance(base, Int8Linear) or _claimed_by_user(lora_config, base):
            return create_new_module(lora_config, adapter_name, target, **kwargs)
        if kwargs.get("fan_in_fan_out", False):
            # An Int8Linear holds its weight as [out, in] even when it replaced a GPT-2 Conv1D ([in, out]).
            warnings.warn(
                f"fan_in_fan_out=True does not apply to {type(base).__name__} (weights are stored [out, in]): using "
                "fan_in_fan_out=False",
                stacklevel=2,
            )
            kwargs["fan_in_fan_out"] = lora_config.fan_in_fan_out = False
        return Int8LoraLinear(target, adapter_name, config=lora_config, **kwargs)

    return create


def _all_linear_with_int8(include_all_linear):
    """Wrap PEFT's ``target_modules="all-linear"`` expansion so that it also selects :class:`Int8Linear` layers."""

    @functools.wraps(include_all_linear)
    def include(peft_config, model):
        target = getattr(peft_config, "target_modules", None)
        if not (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
            return include_all_linear(peft_config, model)
        inside_adapters = {
            f"{prefix}.{suffix}"
            for prefix, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)
            for suffix, _ in cast(nn.Module, module).named_modules()  # a tuner layer is an nn.Module as well
            if suffix
        }
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        int8 = {
            name
            for name, module in model.named_modules()
            if isinstance(module, Int8Linear) and module is not output and name not in inside_adapters
        }
        peft_config = include_all_linear(peft_config, model)
        if int8:
            peft_config.target_modules = set(peft_config.target_modules or ()) | int8
        return peft_config

    return include


def install() -> None:
    """Teach PEFT's LoRA about :class:`Int8Linear` (idempotent; runs when this module is imported)."""
    patch_lora_layer_factory(_dispatch_int8)
    patch_all_linear_expansion(_all_linear_with_int8)


install()
