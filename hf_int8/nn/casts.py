"""One rule for dtype casts of llmint8 layers and models: every cast is refused, device moves are fine.

``nn.Module.to(dtype)``, ``.type``, ``.half``, ``.float``, ``.double``, ``.bfloat16`` and ``.cuda``/``.cpu`` all end
in ``module._apply(fn)`` with a function ``fn`` applied to every parameter and buffer. Whether ``fn`` casts is not
visible from outside, so it is asked: ``fn`` runs on one-element probe tensors of every dtype an llmint8 model holds
(int8 codes, fp32 scales, fp16/bf16/fp32/fp64 floating-point parts), on the devices the module's tensors are on. If
it changes the dtype of any probe, the call is refused with :func:`cast_error` before a single tensor of the module
is touched; otherwise it runs as usual (``.to(device)``, ``.cpu()``, ``.to_empty()``, ``.share_memory()``).

Why refuse instead of casting only the floating-point parts: ``.type(dtype)`` casts integer tensors too, float64 is
not a dtype the kernels run, and a model whose norms and embeddings changed precision behind an int8 checkpoint
would save as something else than what was loaded. transformers refuses ``.to(dtype)``/``.half()``/``.float()`` on
its own 8-bit (bitsandbytes) models for the same reasons: the dtype is chosen when loading.

:class:`~hf_int8.nn.Int8Linear` applies the rule to itself. A model holding Int8Linear layers needs the rule at its
root as well (:func:`guard_dtype_casts`; hf_int8's quantizer installs it on every llmint8 model): ``_apply`` walks
the submodules in order, so a refusal raised by the first Int8Linear would come after the layers before it (the
embeddings, say) had been cast.
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import Callable, Iterable

import torch
from torch import nn

# Every dtype an llmint8 model holds: a cast of any kind changes at least one of them.
_PROBE_DTYPES = (torch.int8, torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The fn a guarded root has already cleared: its Int8Linear layers need not probe it again (one probe per call).
_CLEARED: contextvars.ContextVar[object] = contextvars.ContextVar("hf_int8_cleared_apply_fn", default=None)


def requested_dtype(fn: Callable[[torch.Tensor], torch.Tensor], devices: Iterable[torch.device]) -> torch.dtype | None:
    """The dtype ``fn`` (a function for ``nn.Module._apply``) casts some tensor to, or ``None`` if it casts none."""
    for device in set(devices) or {torch.device("cpu")}:
        for dtype in _PROBE_DTYPES:
            try:
                out = fn(torch.zeros(1, dtype=dtype, device=device))
            except Exception:  # e.g. a move to a device this machine lacks: the real call reports that itself
                continue
            if isinstance(out, torch.Tensor) and out.dtype != dtype:
                return out.dtype
    return None


def cast_error(subject: str, requested: torch.dtype) -> ValueError:
    """The one error every refused cast raises, whichever spelling asked for it."""
    return ValueError(
        f"cannot cast {subject} to {requested!r}: llmint8 keeps its weights int8 and their scales float32, and "
        "casting only the other tensors (biases, norms, embeddings) would silently change the model's precision. "
        "Choose the dtype when loading (from_pretrained(..., dtype=...)), or dequantize first (model.dequantize(), "
        "Int8Linear.to_linear()). Moving to another device (.to(device), .cuda(), .cpu()) is fine."
    )


def check_apply(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], subject: str) -> None:
    """Raise :func:`cast_error` if ``fn`` would change the dtype of any tensor kind ``module`` may hold."""
    if _CLEARED.get() is fn:
        return
    devices = {t.device for t in module.parameters()} | {t.device for t in module.buffers()}
    requested = requested_dtype(fn, devices)
    if requested is not None:
        raise cast_error(subject, requested)


def _apply(self: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
    check_apply(self, fn, f"an llmint8 model ({type(self).__name__})")
    token = _CLEARED.set(fn)
    try:
        return type(self)._apply(self, fn, recurse)  # the class's, looked up now: a deepcopy rebinds to the copy
    finally:
        _CLEARED.reset(token)


# transformers' PreTrainedModel.half()/.float() refuse any quantized model with a message of their own, before
# _apply runs: route them through _apply so that they say, and allow, exactly what the other spellings do.
def _half(self: nn.Module) -> nn.Module:
    return nn.Module.half(self)


def _float(self: nn.Module) -> nn.Module:
    return nn.Module.float(self)


_GUARDS: dict[str, Callable[..., nn.Module]] = {"_apply": _apply, "half": _half, "float": _float}


def guard_dtype_casts(model: nn.Module) -> nn.Module:
    """Refuse every dtype cast of ``model`` (any spelling) before any of its tensors changes; return ``model``.

    hf_int8 does this for every llmint8 model it loads. Call it on a model of your own that holds Int8Linear layers,
    so that a refused cast leaves it whole (see the module docstring). :func:`unguard_dtype_casts` undoes it.
    """
    for name, function in _GUARDS.items():
        setattr(model, name, types.MethodType(function, model))
    return model


def unguard_dtype_casts(model: nn.Module) -> nn.Module:
    """Undo :func:`guard_dtype_casts` (used once a model is dequantized: casting is fine again); return ``model``."""
    for name, function in _GUARDS.items():
        current = model.__dict__.get(name)
        if getattr(current, "__func__", None) is function:
            del model.__dict__[name]
    return model
