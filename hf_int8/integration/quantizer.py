"""``Int8HfQuantizer``: the transformers side of the ``llmint8`` method (its ``HfQuantizer`` hooks).

Quantize on load: ``_process_model_before_weight_loading`` swaps ``nn.Linear``/``Conv1D`` for :class:`Int8Linear`
on the meta model and checks the checkpoint files; the tensors then go through the ops of
:mod:`hf_int8.integration.conversion`; ``_process_model_after_weight_loading`` reports every loading problem at once
and installs the model hooks (:mod:`hf_int8.integration.hooks`). Private transformers names come from
:mod:`hf_int8.integration._compat`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

# From its module, not transformers.quantizers: the start-up hook imports hf_int8 while that package is still
# being initialised (right after transformers.quantizers.auto)
from transformers.quantizers.base import HfQuantizer

from ..checkpoint import integrity
from ..checkpoint.format import SCALE_NAME, SERIALIZED_NAMES, flatten_codes, safetensors_metadata
from ..nn import FloatLinear, Int8Linear
from . import hooks, tp
from ._compat import (
    Conv1D,
    ConversionOps,
    WeightConverter,
    get_module_from_name,
    keep_in_fp32_modules,
    keys_to_ignore_on_load_missing,
    should_convert_module,
)
from .config import Int8Config
from .conversion import Identity, Int8DeserializeOp, Int8QuantizeOp

if TYPE_CHECKING:  # not at run time: the start-up hook imports hf_int8 while transformers is still initialising
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def replace_with_int8_linear(model: nn.Module, skip: list[str], threshold: float) -> list[str]:
    """Swap every ``nn.Linear`` / ``Conv1D`` not matched by ``skip`` for an :class:`Int8Linear`; return their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not should_convert_module(name, skip):
            continue
        is_conv1d = isinstance(module, Conv1D)
        if type(module) is not nn.Linear and not is_conv1d:
            continue
        if is_conv1d:
            in_features, out_features = module.weight.shape
        else:
            in_features, out_features = module.in_features, module.out_features
        with torch.device("meta"):
            new = Int8Linear(
                in_features,
                out_features,
                bias=module.bias is not None,
                threshold=threshold,
                bias_dtype=module.bias.dtype if module.bias is not None else None,
            )
        new._hf_int8_from_conv1d = is_conv1d  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow
        new.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(module.bias.requires_grad)
        parent, child = get_module_from_name(model, name)
        parent._modules[child] = new
        replaced.append(name)
    return replaced


def use_float_linear(model: nn.Module) -> None:
    """Give every ``nn.Linear`` left in floating point (output head, ``skip_modules``) the class :class:`FloatLinear`
    (same parameters and state dict, a faster bf16 decode on CPU). The class is swapped in place, before the weights
    load, so that tied weights, accelerate's hooks and transformers' loading see the same module."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FloatLinear


def restore_linear(model: nn.Module) -> None:
    """Turn :class:`FloatLinear` layers back into ``nn.Linear`` (``model.dequantize()``)."""
    for module in model.modules():
        if type(module) is FloatLinear:
            module.__class__ = nn.Linear  # type: ignore[assignment]  # a class swap in place, on purpose


def keep_distributed_on_torch(model: nn.Module) -> None:
    """FloatLinear layers whose parameters are not plain tensors (tensor parallelism's ``DTensor``) run torch's linear:
    the native kernel takes plain CPU tensors. Their class stays (transformers' TP hooks hold their forward)."""
    for module in model.modules():
        if type(module) is FloatLinear and any(type(p.data) is not torch.Tensor for p in module.parameters()):
            module.native_forward = False


class Int8HfQuantizer(HfQuantizer):
    """LLM.int8() quantizer for transformers' ``from_pretrained`` (``quant_method="llmint8"``)."""

    requires_calibration = False
    quantization_config: Int8Config
    serialized_names = {"weight": list(SERIALIZED_NAMES)}

    def __init__(self, quantization_config: Int8Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self.quantized_module_names: list[str] = []
        self.checkpoint_index: dict[str, tuple[str, integrity.TensorEntry]] = {}  # tensor name -> (file, entry)

    # ---- environment and placement -------------------------------------------------------------------------
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            for key, device in device_map.items():
                kind = device if isinstance(device, str) else ("cuda" if isinstance(device, int) else str(device))
                kind = kind.split(":")[0]
                if kind not in ("cpu", "cuda", "disk", "meta"):
                    raise ValueError(f"llmint8 runs on cpu, cuda or disk offload; device_map[{key!r}] is {device!r}")

    def update_device_map(self, device_map: dict[str, Any] | None) -> dict[str, Any] | None:
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    @property
    def quantized_element_size(self) -> float:
        return 1

    def update_parallel_plan(self, model: PreTrainedModel, plan: dict[str, str]) -> None:
        # Int8Linear layers are sharded by hf_int8's own copies of the colwise/rowwise styles (see hf_int8.tp)
        super().update_parallel_plan(model, plan)
        tp.rewrite_plan(model, plan)

    # ---- model surgery --------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        user_skip = list(self.quantization_config.skip_modules or [])
        module_names = [name for name, _ in model.named_modules()]
        for pattern in user_skip:
            if all(should_convert_module(name, [pattern]) for name in module_names if name):
                raise ValueError(
                    f"skip_modules entry {pattern!r} matches no module of {type(model).__name__}; "
                    f"module names look like {module_names[1:4]!r}"
                )
        keep_fp32 = keep_in_fp32_modules(model)
        skip = self.get_modules_to_not_convert(model, user_skip, keep_fp32, add_default_skips=True)
        # transformers' default names the module of the model's last parameter; when that is a head's bias
        # ("classifier.bias") the head itself would not match, so strip the parameter suffix. A bare base model
        # (BertModel) has no head: its last module (the pooler) is an ordinary layer and gets quantized.
        has_head = getattr(model, "base_model", model) is not model
        self.modules_to_not_convert = sorted(
            {
                name.removesuffix(".bias").removesuffix(".weight")
                for name in skip
                if has_head or not name.endswith(".bias") or name.removesuffix(".bias") in user_skip
            }
        )
        self._int8_head_after_loading: str | None = None
        if getattr(self.quantization_config, "quantize_lm_head", False):
            self._plan_int8_head(model, user_skip, keep_fp32)
        self.quantized_module_names = replace_with_int8_linear(
            model, self.modules_to_not_convert, self.quantization_config.threshold
        )
        use_float_linear(model)
        model.config.quantization_config = self.quantization_config
        self._check_checkpoint(model, kwargs.get("checkpoint_files"))

    def _plan_int8_head(self, model: PreTrainedModel, user_skip: list[str], keep_in_fp32: list[str]) -> None:
        """``quantize_lm_head=True``: take the output head off the skip list, or (tied head) quantize it after loading.

        A head the user skips, or one the model keeps in fp32, stays floating point. A head tied to the input
        embedding cannot become an Int8Linear before loading (the tie would hand it the float embedding): it is
        loaded tied and replaced afterwards by an int8 copy, leaving the embedding untouched.
        """
        head = model.get_output_embeddings()
        if head is None or type(head) is not nn.Linear:
            return
        head_name = next(name for name, module in model.named_modules() if module is head)
        if any(not should_convert_module(head_name, [p]) for p in user_skip + keep_in_fp32):
            return
        tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
        inputs = model.get_input_embeddings()
        tied = f"{head_name}.weight" in tied_keys or (inputs is not None and head.weight is inputs.weight)
        if tied and not self.pre_quantized:
            self._int8_head_after_loading = head_name
            return
        self.modules_to_not_convert = [
            name for name in self.modules_to_not_convert if name != head_name and not head_name.startswith(name + ".")
        ]

    def _quantize_tied_head(self, model: PreTrainedModel, head_name: str) -> None:
        """Replace the loaded (tied) head by an int8 copy and untie it, so it saves and reloads as its own layer."""
        head = cast(nn.Linear, model.get_submodule(head_name))  # _plan_int8_head picks an nn.Linear head only
        if head.weight.device.type == "meta":
            raise ValueError(
                f"quantize_lm_head=True cannot quantize {head_name!r}: its weight (tied to the input embedding) is "
                f"offloaded (device {head.weight.device}); keep it on cpu/cuda in the device_map"
            )
        int8_head = Int8Linear.from_float(head, threshold=self.quantization_config.threshold)
        int8_head._hf_int8_loaded = True  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow
        int8_head._hf_int8_from_conv1d = False  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow
        parent, child = get_module_from_name(model, head_name)
        parent._modules[child] = int8_head
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
        tied_keys = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied_keys, dict):
            tied_keys.pop(f"{head_name}.weight", None)
        self.quantized_module_names = sorted({*self.quantized_module_names, head_name})

    def _check_checkpoint(self, model: PreTrainedModel, checkpoint_files: list[str] | None) -> None:
        """Refuse damaged, incomplete or mismatched checkpoint files before a single weight is loaded."""
        files = [os.fspath(f) for f in checkpoint_files or []]
        if not self.pre_quantized:  # a floating-point source may be a .bin or .gguf: transformers checks those
            files = [f for f in files if f.endswith(".safetensors")]
        summary = integrity.check_checkpoint_files(files)
        self.checkpoint_index = summary.tensor_index()
        if self.pre_quantized:
            integrity.check_llmint8_layout(
                summary,
                model,
                tied_keys=dict(getattr(model, "all_tied_weights_keys", None) or {}),
                ignore_missing=keys_to_ignore_on_load_missing(model),
            )
            if files and not summary.sealed:
                logger.warning(
                    "hf_int8: %s carries no hf_int8 seal (not written by hf_int8's save_pretrained): its structure "
                    "and int8 layers are checked, but damaged bytes cannot be detected",
                    ", ".join(os.path.basename(f) for f in files),
                )

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, Int8Linear) and name == "weight"

    def get_quantize_ops(self) -> ConversionOps:
        return Int8QuantizeOp(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": Int8DeserializeOp}

    def get_weight_conversions(self):
        if self.pre_quantized:
            return super().get_weight_conversions()
        # Work around transformers' disk offload while quantizing on load: its offload index is only rewritten
        # for params that went through a WeightConverter, otherwise it keeps pointing at the fp checkpoint tensor.
        return [WeightConverter("weight", "weight", [Identity()])]

    def get_new_dtype(self, converter, param, dtype):
        targets = getattr(converter, "target_patterns", None) or []
        if any(str(t).endswith(SCALE_NAME) for t in targets):
            return None  # scales stay fp32 whatever dtype the model is loaded in
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        # Conversion ops are deep-copied per tensor by transformers, so they mark the module, not the quantizer.
        source = getattr(model.config, "name_or_path", "") or "the checkpoint"
        problems: list[str] = []
        for name, module in model.named_modules():
            if not isinstance(module, Int8Linear):
                continue
            located = self.checkpoint_index.get(f"{name}.weight")
            in_file = f" (in {located[0]})" if located else ""
            problems.extend(f"{message}{in_file}" for message in getattr(module, "_hf_int8_errors", []))
            if not getattr(module, "_hf_int8_loaded", False) and not getattr(module, "_hf_int8_errors", None):
                problems.append(f"{name}.weight was not found in the checkpoint")
        if problems:
            shown = "\n  ".join(problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise ValueError(
                f"refusing to load {source!s} as an llmint8 model, {len(problems)} problem(s):\n  {shown}{more}"
            )
        for name, module in model.named_modules():
            if isinstance(module, Int8Linear):
                if module.weight_scale.dtype != torch.float32 and module.weight_scale.device.type != "meta":
                    raise ValueError(f"{name}.{SCALE_NAME} was loaded as {module.weight_scale.dtype!r}, not float32")
        if head_name := getattr(self, "_int8_head_after_loading", None):
            self._quantize_tied_head(model, head_name)
        keep_distributed_on_torch(model)
        model.is_loaded_in_8bit = True  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow
        hooks.install(model)  # dtype casts refused; save_pretrained / push_to_hub staged, sealed, with the card
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        # int8 weights are saved flattened (see Int8SerializeOp; this covers save_original_format=False too) and the
        # safetensors header names the method, so that any tool reading it can tell what the tensors are.
        state_dict = model.state_dict()
        for name, module in model.named_modules():
            if isinstance(module, Int8Linear) and f"{name}.weight" in state_dict:
                state_dict[f"{name}.weight"] = flatten_codes(state_dict[f"{name}.weight"])
        return state_dict, safetensors_metadata(self.quantization_config.format_version)

    # ---- capabilities ---------------------------------------------------------------------------------------
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        if tp.is_sharded(model):
            raise ValueError(
                "cannot dequantize a tensor-parallel llmint8 model (its Int8Linear layers hold shards); load the "
                f"checkpoint without tp_plan to dequantize it, got a model sharded over {tp.world_size(model)} ranks"
            )
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if dtype is None or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            dtype = torch.float32
        for name, module in list(model.named_modules()):
            if isinstance(module, Int8Linear):
                parent, child = get_module_from_name(model, name)
                linear = module.to_linear(dtype)
                replacement: nn.Module = linear
                if getattr(module, "_hf_int8_from_conv1d", False):
                    conv = Conv1D(module.out_features, module.in_features).to(device=linear.weight.device, dtype=dtype)
                    conv.weight.data = linear.weight.data.t().contiguous()
                    if linear.bias is not None:
                        conv.bias.data = linear.bias.data
                    else:
                        conv.bias = None
                    replacement = conv
                parent._modules[child] = replacement
        restore_linear(model)
        hooks.uninstall(model)  # casting is fine again once the model is floating point
        model.is_loaded_in_8bit = False  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow
        return model
