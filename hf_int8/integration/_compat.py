"""Every use of a transformers or PEFT name that is not public API, in one module.

hf_int8 plugs into transformers through its public quantizer registry, but the weight conversion machinery, the
module lookup helpers and a few model attributes it must read or set have no public equivalent. Each one is here,
with why it is needed, so that a transformers or PEFT upgrade is checked in one file (``tests/test_import_graph.py``
keeps private imports out of every other module). The ``HfQuantizer`` hook methods (``_process_model_*``,
``_dequantize``) are the subclass contract of transformers' quantizer API: they are defined by
:class:`~hf_int8.integration.quantizer.Int8HfQuantizer`, not called from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

# Loading ops: transformers runs every checkpoint tensor through ConversionOps (quantize on load, deserialize a saved
# checkpoint, serialize on save); a WeightConverter routes tensors to them. No public API exposes these.
from transformers.core_model_loading import ConversionOps, WeightConverter

# GPT-2 style layers: quantized like nn.Linear, with the weight stored [in, out].
from transformers.pytorch_utils import Conv1D

# Module lookup by parameter name and transformers' own skip-pattern matching, so hf_int8 selects layers exactly as
# the other quantizers do.
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

__all__ = [
    "Conv1D",
    "ConversionOps",
    "WeightConverter",
    "get_module_from_name",
    "should_convert_module",
]


# ---- model attributes -------------------------------------------------------------------------------------------
def keep_in_fp32_modules(model: nn.Module) -> list[str]:
    """Modules the model class keeps in fp32 (``_keep_in_fp32_modules``): never quantized, as for every method."""
    return list(getattr(model, "_keep_in_fp32_modules", None) or [])


def keys_to_ignore_on_load_missing(model: nn.Module) -> list[str]:
    """Regexes of keys a checkpoint may lack (``_keys_to_ignore_on_load_missing``): not reported as missing."""
    return list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])


def has_peft_adapters(model: nn.Module) -> bool:
    """Whether transformers' PEFT integration loaded adapters (``_hf_peft_config_loaded``): save_pretrained then
    writes the adapters only."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def mark_initialized(module: nn.Module) -> None:
    """Tell the loader a module's tensors came from the checkpoint (``_is_hf_initialized``): no random init."""
    module._is_hf_initialized = True  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow


def mark_local_tensor_parallel(module: nn.Module) -> None:
    """Make transformers' colwise/rowwise styles run ``forward`` on local tensors (``_hf_quantized_needs_local_tp``):
    an int8 layer holds plain-tensor shards, not DTensors."""
    module._hf_quantized_needs_local_tp = True  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow


# ---- tensor parallelism (imported on use: torch.distributed may be missing) -------------------------------------
def parallel_styles() -> tuple[Any, type, type]:
    """``(ALL_PARALLEL_STYLES registry, ColwiseParallel, RowwiseParallel)``: hf_int8 registers int8 copies of the
    colwise/rowwise styles there."""
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, ColwiseParallel, RowwiseParallel

    return ALL_PARALLEL_STYLES, ColwiseParallel, RowwiseParallel


def plan_key(module_name: str) -> str:
    """A module name as a ``tp_plan`` key (layer numbers as ``*``), with transformers' own helper."""
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    return replace_layer_number_by_wildcard(module_name)


# ---- PEFT (imported on use: peft is optional) -------------------------------------------------------------------
_PATCHED = "_hf_int8_patched"


def lora_custom_modules(config: Any) -> dict:
    """LoRA layer types the user registered with PEFT's custom-module API (``LoraConfig._custom_modules``)."""
    return getattr(config, "_custom_modules", None) or {}


def patch_lora_layer_factory(wrap: Callable[[Callable], Callable]) -> None:
    """Wrap ``LoraModel._create_new_module`` (PEFT picks the LoRA layer class for a target there; no public hook),
    once."""
    from peft.tuners.lora.model import LoraModel

    if not getattr(LoraModel._create_new_module, _PATCHED, False):
        wrapped = wrap(LoraModel._create_new_module)
        setattr(wrapped, _PATCHED, True)
        LoraModel._create_new_module = staticmethod(wrapped)  # type: ignore[method-assign]  # deliberate patch


def patch_all_linear_expansion(wrap: Callable[[Callable], Callable]) -> None:
    """Wrap ``tuners_utils._maybe_include_all_linear_layers`` (where PEFT expands ``target_modules="all-linear"`` to
    ``nn.Linear`` layers only), once."""
    from peft.tuners import tuners_utils

    if not getattr(tuners_utils._maybe_include_all_linear_layers, _PATCHED, False):
        wrapped = wrap(tuners_utils._maybe_include_all_linear_layers)
        setattr(wrapped, _PATCHED, True)
        tuners_utils._maybe_include_all_linear_layers = wrapped
