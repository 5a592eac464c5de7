"""The weight conversion ops of the ``llmint8`` method: what transformers runs on each checkpoint tensor.

Quantize on load (:class:`Int8QuantizeOp`): each floating-point weight is quantized right after it is read, so only
one full-precision tensor is alive at a time. Loading a saved llmint8 checkpoint (:class:`Int8DeserializeOp`) checks
the int8 codes and their scales (by :func:`hf_int8.checkpoint.format.layer_problems`) before they reach the model.
Saving (:class:`Int8SerializeOp`) stores the codes flattened (see :mod:`hf_int8.checkpoint.format`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .. import ops
from ..checkpoint import integrity
from ..checkpoint.format import SCALE_NAME, WEIGHT_NAME, flatten_codes, layer_problems, unflatten_codes
from ..nn import Int8Linear
from . import tp
from ._compat import ConversionOps, get_module_from_name, mark_initialized


def _as_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, list) else value


class _SharesQuantizer:
    """transformers deep-copies a converter, and so its ops, once per checkpoint tensor: share the quantizer (and the
    checkpoint index it holds) instead of copying it hundreds of times (that was most of a reload's time)."""

    def __deepcopy__(self, memo: dict) -> _SharesQuantizer:
        clone = copy.copy(self)
        memo[id(self)] = clone
        return clone


class Int8QuantizeOp(_SharesQuantizer, ConversionOps):
    """Quantize one floating-point ``weight`` into int8 codes plus its ``weight_scale`` as it is loaded."""

    def __init__(self, hf_quantizer: Any) -> None:
        self.hf_quantizer = hf_quantizer

    # ConversionOps.convert names source_patterns and target_patterns; transformers passes them by keyword
    # (core_model_loading), so the **kwargs of these ops takes them: compatible at run time, not to mypy.
    def convert(  # type: ignore[override]  # transformers passes the patterns by keyword
        self, input_dict: dict[str, Any], model: nn.Module | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        result = {}
        for name, value in input_dict.items():
            value = _as_tensor(value)
            module, _ = get_module_from_name(model, name)
            if getattr(module, "_hf_int8_from_conv1d", False):
                value = value.t()  # Conv1D stores [in, out]; the int8 layout is always [out, in]
            prefix = name.rpartition(".")[0]
            if problem := tp.unsupported_sharding(module, prefix):
                record_error(module, problem)
                continue
            if not value.is_floating_point():
                record_error(module, f"cannot quantize {name}: expected a floating-point weight, got {value.dtype!r}")
                continue
            # A NaN/Inf anywhere in a row makes that row's scale non-finite (absmax propagates it): checking the
            # [out] scales is as strict as scanning the whole weight, at a fraction of the cost.
            # Not ops.quantize_weight (its NaN/Inf diagnosis runs below, only when needed), but the same routing: the
            # reference kernel on a device whose native kernels cannot serve it (ops/_health.py).
            codes, scale = ops.op_for("quantize_weight", value.device)(value.contiguous())
            if not bool(torch.isfinite(scale).all()):
                bad = int((~torch.isfinite(value)).sum().item())
                value, problem = self._reread_overflowed(name, value, bad, module)
                if problem:
                    record_error(module, problem)
                    continue
                if value is None:
                    raise RuntimeError(f"re-reading {name} gave neither a tensor nor a problem")
                codes, scale = ops.quantize_weight(value.contiguous())
            if (shard := tp.shard_of(module)) is not None:
                # Quantized whole, then sliced: this rank's codes and scales are exactly those one process has
                codes, scale = shard.take(codes, scale)
            result[name] = codes
            result[f"{prefix}.{SCALE_NAME}"] = scale
            mark_initialized(module)
            module._hf_int8_loaded = True
        return result

    def _reread_overflowed(
        self, name: str, value: torch.Tensor, bad: int, module: nn.Module
    ) -> tuple[torch.Tensor | None, str | None]:
        """Weights beyond the load dtype's range (e.g. |w| > 65504 loaded with ``dtype=torch.float16``) reach this
        op as Inf: transformers casts before quantizing. The int8 codes and fp32 scales do not care about the load
        dtype, so read the tensor again in the precision it is stored in and quantize that.
        """
        located = getattr(self.hf_quantizer, "checkpoint_index", {}).get(name)
        if located is None:
            return None, (
                f"cannot quantize {name}: it holds {bad} NaN/Inf values (a damaged checkpoint, or weights beyond the "
                f"range of {value.dtype} when loaded in it)"
            )
        path, entry = located
        stored_bits = integrity.DTYPE_BITS.get(entry.dtype, 0)
        if entry.dtype.startswith(("F", "BF")) and stored_bits > torch.finfo(value.dtype).bits:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                original = f.get_tensor(name).float()
            if getattr(module, "_hf_int8_from_conv1d", False):
                original = original.t()
            if bool(torch.isfinite(original).all()):
                return original, None
            bad = int((~torch.isfinite(original)).sum().item())
        return None, f"cannot quantize {name}: {path} holds {bad} NaN/Inf values in it (damaged checkpoint?)"


class Int8DeserializeOp(_SharesQuantizer, ConversionOps):
    """Check and pass through a saved int8 ``weight`` and its ``weight_scale``."""

    def __init__(self, hf_quantizer: Any) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(  # type: ignore[override]  # transformers passes the patterns by keyword
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if model is None or full_layer_name is None:
            raise ValueError(
                "Int8DeserializeOp.convert needs the model and full_layer_name (transformers passes both), got "
                f"model={type(model).__name__}, full_layer_name={full_layer_name!r}"
            )
        tensors = {key: _as_tensor(value) for key, value in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        if not isinstance(module, Int8Linear):
            # The pattern "weight" also matches floating-point layers (norms, embeddings, lm_head): pass them on, in
            # the dtype the model asks for. transformers does not cast tensors that go through a quantizer's load
            # op, so an fp32 checkpoint reloaded with dtype=torch.bfloat16 would otherwise keep fp32 norms.
            if "weight" not in tensors:
                return tensors
            weight, wanted = tensors["weight"], getattr(getattr(module, "weight", None), "dtype", None)
            if weight.is_floating_point() and wanted is not None and wanted.is_floating_point:
                weight = weight.to(wanted)
            return {full_layer_name: weight}
        prefix = full_layer_name.rpartition(".")[0]
        if problem := tp.unsupported_sharding(module, prefix):
            record_error(module, problem)
            return {}
        if WEIGHT_NAME not in tensors or SCALE_NAME not in tensors:
            missing = WEIGHT_NAME if WEIGHT_NAME not in tensors else SCALE_NAME
            record_error(module, f"llmint8 checkpoint is missing {prefix}.{missing}")
            return {}
        codes = unflatten_codes(tensors[WEIGHT_NAME], module.out_features, module.in_features)
        scale = tensors[SCALE_NAME]
        if problems := layer_problems(prefix, codes, scale, module.out_features, module.in_features):
            for problem in problems:
                record_error(module, problem)
            return {}
        if (shard := tp.shard_of(module)) is not None:
            codes, scale = shard.take(codes, scale)  # checked whole, kept in part (tensor parallelism)
        mark_initialized(module)
        module._hf_int8_loaded = True  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow
        return {full_layer_name: codes, f"{prefix}.{SCALE_NAME}": scale}

    @property
    def reverse_op(self) -> ConversionOps:
        return Int8SerializeOp()


class Int8SerializeOp(ConversionOps):
    """Saving: store each int8 weight flattened to 1-D ``[out * in]`` (row-major; the scale stays ``[out]``).

    This is what makes an llmint8 checkpoint fail loudly when it is loaded without ``import hf_int8``: stock
    transformers (and ``load_state_dict``) then see a size mismatch for every int8 layer instead of silently reading
    the int8 codes as floating-point weights. :class:`Int8DeserializeOp` restores ``[out, in]`` (a view, no copy).
    """

    def convert(  # type: ignore[override]  # transformers passes the patterns by keyword
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        tensors = {key: _as_tensor(value) for key, value in input_dict.items()}
        if model is None or not full_layer_name:
            return tensors
        module = get_module_from_name(model, full_layer_name)[0]
        if not isinstance(module, Int8Linear) or set(tensors) != {"weight"}:
            return tensors
        return {full_layer_name: flatten_codes(tensors["weight"])}

    @property
    def reverse_op(self) -> ConversionOps:
        return Identity()


def record_error(module: nn.Module, message: str) -> None:
    """Remember a loading problem on the module; ``_process_model_after_weight_loading`` raises them all at once.

    Raising inside a conversion op would only surface as transformers' generic "issues during automatic
    conversion" error, with the tensor's name buried in a log report.
    """
    errors = [*getattr(module, "_hf_int8_errors", []), message]
    module._hf_int8_errors = errors  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow


class Identity(ConversionOps):
    """Pass-through op whose reverse is itself (see ``get_weight_conversions``)."""

    def convert(  # type: ignore[override]  # transformers passes the patterns by keyword
        self, input_dict: dict[str, Any], **kwargs: Any
    ) -> dict[str, Any]:
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return Int8SerializeOp()
