"""``Int8HfQuantizer``: the transformers side of the ``llmint8`` method.

This is the one module of hf_int8 that touches transformers internals (the v5 quantizer hooks and the weight
conversion ops of ``transformers.core_model_loading``).

Quantize on load: ``_process_model_before_weight_loading`` swaps ``nn.Linear``/``Conv1D`` for :class:`Int8Linear`
on the meta model; then each floating-point weight is quantized by :class:`Int8QuantizeOp` right after it is read
from the checkpoint, so only one full-precision tensor is alive at a time. Loading a saved llmint8 checkpoint runs
:class:`Int8DeserializeOp`, which checks the int8 codes and their scales before they reach the model.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from . import hub, integrity, ops, saving, tp
from .config import Int8Config
from .nn import Int8Linear, casts

SCALE_NAME = "weight_scale"
logger = logging.getLogger(__name__)


def safetensors_metadata(config: Int8Config) -> dict[str, str]:
    """String metadata written into every llmint8 safetensors header (next to transformers' ``format: pt``)."""
    from . import __version__

    return {
        "quant_method": config.quant_method,
        "llmint8_format_version": str(config.format_version),
        "llmint8_weight_layout": "int8 codes flattened row-major [out*in]; weight_scale fp32 [out]",
        "loader": "import hf_int8 before from_pretrained (pip install hf_int8)",
        "hf_int8_version": __version__,
    }


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

    def __init__(self, hf_quantizer: Int8HfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, **kwargs: Any) -> dict[str, Any]:
        result = {}
        for name, value in input_dict.items():
            value = _as_tensor(value)
            module, _ = get_module_from_name(model, name)
            if getattr(module, "_hf_int8_from_conv1d", False):
                value = value.t()  # Conv1D stores [in, out]; the int8 layout is always [out, in]
            prefix = name.rpartition(".")[0]
            if problem := tp.unsupported_sharding(module, prefix):
                _record_error(module, problem)
                continue
            if not value.is_floating_point():
                _record_error(module, f"cannot quantize {name}: expected a floating-point weight, got {value.dtype!r}")
                continue
            # A NaN/Inf anywhere in a row makes that row's scale non-finite (absmax propagates it): checking the
            # [out] scales is as strict as scanning the whole weight, at a fraction of the cost.
            # Not ops.quantize_weight (its NaN/Inf diagnosis runs below, only when needed), but the same routing: the
            # reference kernel on a device whose native kernels cannot serve it (ops/_health.py).
            codes, scale = ops.op_for("quantize_weight", value.device)(value.contiguous())
            if not bool(torch.isfinite(scale).all()):
                bad = (~torch.isfinite(value)).sum().item()
                value, problem = self._reread_overflowed(name, value, bad, module)
                if problem:
                    _record_error(module, problem)
                    continue
                codes, scale = ops.quantize_weight(value.contiguous())
            if (shard := tp.shard_of(module)) is not None:
                # Quantized whole, then sliced: this rank's codes and scales are exactly those one process has
                codes, scale = shard.take(codes, scale)
            result[name] = codes
            result[f"{prefix}.{SCALE_NAME}"] = scale
            module._is_hf_initialized = True
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
            bad = (~torch.isfinite(original)).sum().item()
        return None, f"cannot quantize {name}: {path} holds {bad} NaN/Inf values in it (damaged checkpoint?)"


class Int8DeserializeOp(_SharesQuantizer, ConversionOps):
    """Check and pass through a saved int8 ``weight`` and its ``weight_scale``."""

    def __init__(self, hf_quantizer: Int8HfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
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
            _record_error(module, problem)
            return {}
        if "weight" not in tensors or SCALE_NAME not in tensors:
            missing = "weight" if "weight" not in tensors else SCALE_NAME
            _record_error(module, f"llmint8 checkpoint is missing {prefix}.{missing}")
            return {}
        codes, scale = tensors["weight"], tensors[SCALE_NAME]
        if codes.dim() == 1 and codes.numel() == module.out_features * module.in_features:
            codes = codes.view(module.out_features, module.in_features)  # stored flat: see Int8SerializeOp
        try:
            check_quantized_tensors(prefix, codes, scale, module.out_features, module.in_features)
        except ValueError as exc:
            _record_error(module, str(exc))
            return {}
        if (shard := tp.shard_of(module)) is not None:
            codes, scale = shard.take(codes, scale)  # checked whole, kept in part (tensor parallelism)
        module._is_hf_initialized = True
        module._hf_int8_loaded = True
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

    def convert(self, input_dict: dict[str, Any], model=None, full_layer_name=None, **kwargs) -> dict[str, Any]:
        tensors = {key: _as_tensor(value) for key, value in input_dict.items()}
        module = get_module_from_name(model, full_layer_name)[0] if model is not None and full_layer_name else None
        if not isinstance(module, Int8Linear) or set(tensors) != {"weight"}:
            return tensors
        return {full_layer_name: tensors["weight"].reshape(-1)}

    @property
    def reverse_op(self) -> ConversionOps:
        return _Identity()


def _record_error(module: nn.Module, message: str) -> None:
    """Remember a loading problem on the module; ``_process_model_after_weight_loading`` raises them all at once.

    Raising inside a conversion op would only surface as transformers' generic "issues during automatic
    conversion" error, with the tensor's name buried in a log report.
    """
    module._hf_int8_errors = [*getattr(module, "_hf_int8_errors", []), message]


def check_quantized_tensors(prefix: str, codes: torch.Tensor, scale: torch.Tensor, out_f: int, in_f: int) -> None:
    """Raise ``ValueError`` naming the tensor unless ``codes``/``scale`` are a valid int8 layer of that shape."""
    if codes.dtype != torch.int8:
        raise ValueError(f"{prefix}.weight must be int8 in an llmint8 checkpoint, got {codes.dtype!r}")
    if tuple(codes.shape) != (out_f, in_f):
        raise ValueError(f"{prefix}.weight must have shape {(out_f, in_f)}, got {tuple(codes.shape)}")
    if scale.dtype != torch.float32:
        raise ValueError(f"{prefix}.{SCALE_NAME} must be float32, got {scale.dtype!r}")
    if tuple(scale.shape) != (out_f,):
        raise ValueError(f"{prefix}.{SCALE_NAME} must have shape ({out_f},), got {tuple(scale.shape)}")
    bad = (~torch.isfinite(scale) | (scale < 0)).sum().item()
    if bad:
        raise ValueError(f"{prefix}.{SCALE_NAME} holds {bad} NaN, infinite or negative scales")
    if codes.shape[1] == 0:
        return
    # One pass over the codes (aminmax): no -128, and each row's largest magnitude is exactly INT8_MAX (what
    # quantization maps the row absmax to) or, for an all-zero row (scale 0), zero. A row breaking that was not
    # written by llmint8, or was damaged since.
    row_min, row_max = torch.aminmax(codes, dim=1)
    if bool((row_min == -128).any()):
        raise ValueError(f"{prefix}.weight holds the code -128, which llmint8 never writes (damaged checkpoint?)")
    row_max = torch.maximum(row_max, -row_min)
    zero_scale = scale == 0
    for bad_rows, what in (
        (zero_scale & (row_max != 0), f"{SCALE_NAME} is 0 but the row's codes are not all zero"),
        (~zero_scale & (row_max != ops.INT8_MAX), f"the scale is positive but no code reaches +-{ops.INT8_MAX}"),
    ):
        if bool(bad_rows.any()):
            rows = bad_rows.nonzero().flatten()
            raise ValueError(
                f"{prefix}.weight: in {rows.numel()} row(s) {what} (first: row {rows[0].item()}); llmint8 maps every "
                f"row's largest value to +-{ops.INT8_MAX} (damaged checkpoint?)"
            )


class _Identity(ConversionOps):
    """Pass-through op whose reverse is itself (see ``get_weight_conversions``)."""

    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return Int8SerializeOp()


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
        new._hf_int8_from_conv1d = is_conv1d
        new.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(module.bias.requires_grad)
        parent, child = get_module_from_name(model, name)
        parent._modules[child] = new
        replaced.append(name)
    return replaced


def _refuse_dtype_cast(model: nn.Module) -> None:
    """Refuse every dtype cast of ``model`` (``.to(dtype)``, ``.type``, ``.half``, ``.float``, ``.double``,
    ``.bfloat16``, ``._apply``) with one ``ValueError``, before any tensor changes: an llmint8 model is loaded in its
    dtype, not cast afterwards (see :mod:`hf_int8.nn.casts`). Device moves stay allowed."""
    casts.guard_dtype_casts(model)


class Int8HfQuantizer(HfQuantizer):
    """LLM.int8() quantizer for transformers' ``from_pretrained`` (``quant_method="llmint8"``)."""

    requires_calibration = False
    quantization_config: Int8Config
    serialized_names = {"weight": ["weight", SCALE_NAME]}

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

    def update_parallel_plan(self, model: nn.Module, plan: dict[str, str]) -> None:
        # Int8Linear layers are sharded by hf_int8's own copies of the colwise/rowwise styles (see hf_int8.tp)
        super().update_parallel_plan(model, plan)
        tp.rewrite_plan(model, plan)

    # ---- model surgery --------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        user_skip = list(self.quantization_config.skip_modules or [])
        module_names = [name for name, _ in model.named_modules()]
        for pattern in user_skip:
            if all(should_convert_module(name, [pattern]) for name in module_names if name):
                raise ValueError(
                    f"skip_modules entry {pattern!r} matches no module of {type(model).__name__}; "
                    f"module names look like {module_names[1:4]!r}"
                )
        skip = self.get_modules_to_not_convert(model, user_skip, model._keep_in_fp32_modules, add_default_skips=True)
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
        self._int8_head_after_loading = None
        if getattr(self.quantization_config, "quantize_lm_head", False):
            self._plan_int8_head(model, user_skip, list(model._keep_in_fp32_modules or []))
        self.quantized_module_names = replace_with_int8_linear(
            model, self.modules_to_not_convert, self.quantization_config.threshold
        )
        model.config.quantization_config = self.quantization_config
        self._check_checkpoint(model, kwargs.get("checkpoint_files"))

    def _plan_int8_head(self, model: nn.Module, user_skip: list[str], keep_in_fp32: list[str]) -> None:
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

    def _quantize_tied_head(self, model: nn.Module, head_name: str) -> None:
        """Replace the loaded (tied) head by an int8 copy and untie it, so it saves and reloads as its own layer."""
        head = model.get_submodule(head_name)
        if head.weight.device.type == "meta":
            raise ValueError(
                f"quantize_lm_head=True cannot quantize {head_name!r}: its weight (tied to the input embedding) is "
                f"offloaded (device {head.weight.device}); keep it on cpu/cuda in the device_map"
            )
        int8_head = Int8Linear.from_float(head, threshold=self.quantization_config.threshold)
        int8_head._hf_int8_loaded = True
        int8_head._hf_int8_from_conv1d = False
        parent, child = get_module_from_name(model, head_name)
        parent._modules[child] = int8_head
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
        tied_keys = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied_keys, dict):
            tied_keys.pop(f"{head_name}.weight", None)
        self.quantized_module_names = sorted({*self.quantized_module_names, head_name})

    def _check_checkpoint(self, model: nn.Module, checkpoint_files: list[str] | None) -> None:
        """Refuse damaged, incomplete or mismatched checkpoint files before a single weight is loaded."""
        files = [os.fspath(f) for f in checkpoint_files or []]
        if not self.pre_quantized:  # a floating-point source may be a .bin or .gguf: transformers checks those
            files = [f for f in files if f.endswith(".safetensors")]
        summary = integrity.check_checkpoint_files(files)
        self.checkpoint_index = summary.tensor_index()
        if self.pre_quantized:
            integrity.check_llmint8_layout(summary, model, SCALE_NAME)
            if files and not summary.sealed:
                logger.warning(
                    "hf_int8: %s carries no hf_int8 seal (not written by hf_int8's save_pretrained): its structure "
                    "and int8 layers are checked, but damaged bytes cannot be detected",
                    ", ".join(os.path.basename(f) for f in files),
                )

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
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
        return [WeightConverter("weight", "weight", [_Identity()])]

    def get_new_dtype(self, converter, param, dtype):
        targets = getattr(converter, "target_patterns", None) or []
        if any(str(t).endswith(SCALE_NAME) for t in targets):
            return None  # scales stay fp32 whatever dtype the model is loaded in
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # Conversion ops are deep-copied per tensor by transformers, so they mark the module, not the quantizer.
        source = getattr(model.config, "name_or_path", "") or "the checkpoint"
        problems = []
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
        if getattr(self, "_int8_head_after_loading", None):
            self._quantize_tied_head(model, self._int8_head_after_loading)
        model.is_loaded_in_8bit = True
        _refuse_dtype_cast(model)
        hub.attach(model)  # save_pretrained / push_to_hub write the llmint8 model card
        saving.install(model)  # ... into a staging folder that replaces the target atomically, sealed
        if tp.is_sharded(model):
            tp.install(model)  # ... after gathering the tensor-parallel int8 shards onto rank 0
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        # int8 weights are saved flattened (see Int8SerializeOp; this covers save_original_format=False too) and the
        # safetensors header names the method, so that any tool reading it can tell what the tensors are.
        state_dict = model.state_dict()
        for name, module in model.named_modules():
            if isinstance(module, Int8Linear) and f"{name}.weight" in state_dict:
                state_dict[f"{name}.weight"] = state_dict[f"{name}.weight"].reshape(-1)
        return state_dict, safetensors_metadata(self.quantization_config)

    # ---- capabilities ---------------------------------------------------------------------------------------
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
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
                if getattr(module, "_hf_int8_from_conv1d", False):
                    conv = Conv1D(module.out_features, module.in_features).to(device=linear.weight.device, dtype=dtype)
                    conv.weight.data = linear.weight.data.t().contiguous()
                    if linear.bias is not None:
                        conv.bias.data = linear.bias.data
                    else:
                        conv.bias = None
                    linear = conv
                parent._modules[child] = linear
        casts.unguard_dtype_casts(model)  # casting is fine again once the model is floating point
        saving.uninstall(model)
        hub.detach(model)
        model.is_loaded_in_8bit = False
        return model
