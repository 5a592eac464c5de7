"""The per-model hooks of an llmint8 model, installed by one function and removed by one.

:func:`install` (run by the quantizer on every llmint8 model it loads) gives the model

* a dtype-cast refusal (``.to(dtype)``, ``.half()``, ...: an llmint8 model is loaded in its dtype, see
  :mod:`hf_int8.nn.casts`); device moves stay allowed;
* one ``save_pretrained``: check the int8 layers, then write into a staging folder (transformers' save, the llmint8
  model card), seal, swap it in atomically (:mod:`hf_int8.checkpoint.staging`), optionally push. A tensor-parallel
  model gathers its int8 shards onto rank 0 first. Multi-process and adapter-only saves keep transformers' own
  protocol (written in place, with the card);
* ``push_to_hub`` that uploads with the llmint8 card (:func:`hf_int8.integration.hub.push_model`).

:func:`uninstall` (``model.dequantize()``) removes all three. Both are idempotent and independent of call order.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from ..checkpoint import staging
from ..checkpoint.card import write_model_card
from ..checkpoint.format import layer_problems
from ..nn import Int8Linear, casts
from . import hub, tp
from ._compat import has_peft_adapters

if TYPE_CHECKING:  # not at run time: the start-up hook imports hf_int8 while transformers is still initialising
    from transformers import PreTrainedModel

_INNER = "_hf_int8_inner_save_pretrained"  # a save_pretrained the instance had before install (kept, restored)
# Keyword arguments of save_pretrained that concern the Hub upload, not transformers' save
_HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision")
_PUSH_KWARGS = ("commit_message", "commit_description", "create_pr", "private", "revision", "token", "max_shard_size")


def check_int8_layers(model: nn.Module) -> None:
    """Raise ``ValueError`` before anything is written if an Int8Linear of ``model`` could not be loaded back.

    The loader's rules (:func:`hf_int8.checkpoint.format.layer_problems`), short of reading every int8 code. Casts
    of an llmint8 model are refused, but a tensor replaced by hand (``layer.weight.data = w.half()``) would otherwise
    be saved, sealed, into a checkpoint that hf_int8 refuses to load.
    """
    problems = [
        problem
        for name, module in model.named_modules()
        if isinstance(module, Int8Linear)
        for problem in layer_problems(
            name, module.weight, module.weight_scale, module.out_features, module.in_features, check_codes=False
        )
    ]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(
            f"refusing to save: {len(problems)} problem(s) in the Int8Linear layers, the checkpoint would not load "
            f"back (were their tensors replaced after loading?); nothing was written:\n  {shown}"
        )


def _inner(model: PreTrainedModel) -> Callable[..., Any]:
    # Through the class, not a bound method captured at install time: after copy.deepcopy(model) that one would save
    # the original model's weights.
    return model.__dict__.get(_INNER) or functools.partial(type(model).save_pretrained, model)


def save_unstaged(
    model: PreTrainedModel, folder: str | os.PathLike, *, repo_id: str | None = None, **kwargs: Any
) -> Any:
    """transformers' save of ``model`` plus the llmint8 model card, written into ``folder`` as is: for a caller that
    stages (and seals) the folder itself through :func:`hf_int8.checkpoint.staging.write_folder`, like the CLI."""
    check_int8_layers(model)
    result = _inner(model)(folder, **kwargs)
    write_model_card(folder, model, repo_id)
    return result


def _save(model: PreTrainedModel, save_directory: str | os.PathLike, args: tuple, push: bool, kwargs: dict) -> Any:
    """Save ``model`` (one process, or rank 0 with the full layers) and push it when asked."""
    hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
    adapters_only = has_peft_adapters(model)  # an adapter-only save writes no int8 layer and no card
    main = kwargs.get("is_main_process", True) is not False
    if not adapters_only:
        check_int8_layers(model)

    def write(folder: str) -> Any:
        result = _inner(model)(folder, *args, **kwargs)
        if main and not adapters_only:
            write_model_card(folder, model, hub_kwargs.get("repo_id"))
        return result

    if args or not main or kwargs.get("distributed_checkpoint", False) or adapters_only:
        result = write(os.fspath(save_directory))  # multi-process or adapter-only saves: transformers' protocol
    else:
        result = staging.write_folder(save_directory, write, keep_files=True, seal=True)
    if push and main:
        repo_id = hub_kwargs.get("repo_id") or os.path.basename(os.path.realpath(os.fspath(save_directory)))
        push_kwargs = {k: v for k, v in {**kwargs, **hub_kwargs}.items() if k in _PUSH_KWARGS}
        model.push_to_hub(repo_id, **push_kwargs)  # type: ignore[arg-type]  # typeshed's wraps() drops self binding
    return result


def _save_pretrained(
    self: PreTrainedModel, save_directory: str | os.PathLike, *args: Any, push_to_hub: bool = False, **kwargs: Any
) -> Any:
    """``save_pretrained`` of an llmint8 model: staged, sealed, swapped in atomically, with the llmint8 model card."""
    if tp.is_sharded(self):
        scratch_kwargs = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}
        return tp.save_gathered(
            self,
            lambda: _save(self, save_directory, args, push_to_hub, kwargs),
            lambda scratch: type(self).save_pretrained(self, scratch, *args, **scratch_kwargs),
        )
    return _save(self, save_directory, args, push_to_hub, kwargs)


def _push_to_hub(self: PreTrainedModel, repo_id: str, **kwargs: Any) -> Any:
    """Save with the llmint8 model card and upload to ``repo_id`` (same arguments as transformers')."""
    return hub.push_model(self, repo_id, **kwargs)


def install(model: PreTrainedModel) -> None:
    """Install the hooks of this module on ``model`` (idempotent)."""
    casts.guard_dtype_casts(model)
    current = model.__dict__.get("save_pretrained")
    if getattr(current, "__func__", None) is not _save_pretrained:
        if current is not None:
            model.__dict__[_INNER] = current
        hook = types.MethodType(_save_pretrained, model)
        model.save_pretrained = hook  # type: ignore[method-assign]  # a per-instance hook, on purpose
    model.push_to_hub = types.MethodType(_push_to_hub, model)  # type: ignore[assignment]  # a per-instance hook


def uninstall(model: PreTrainedModel) -> None:
    """Remove the hooks of :func:`install` (a ``save_pretrained`` the model had before comes back)."""
    casts.unguard_dtype_casts(model)
    model.__dict__.pop("push_to_hub", None)
    current = model.__dict__.get("save_pretrained")
    if getattr(current, "__func__", None) is _save_pretrained:
        del model.__dict__["save_pretrained"]
        inner = model.__dict__.pop(_INNER, None)
        if inner is not None:
            model.save_pretrained = inner  # type: ignore[method-assign]  # the instance's own hook, restored
