"""llmint8 under transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``).

transformers shards a model by turning the parameters its plan names into ``DTensor`` placeholders that are read from
the checkpoint slice by slice. That does not fit an llmint8 layer: its ``weight_scale`` is a buffer the plan never
names, a saved checkpoint stores the int8 codes flattened to 1-D (which a column split cannot slice), and quantizing
a column slice would give each rank scales of its own. So :class:`~hf_int8.nn.Int8Linear` layers are sharded here:

* ``update_parallel_plan`` (see :mod:`hf_int8.integration.quantizer`) renames every ``colwise*`` / ``rowwise*``
  style that covers an Int8Linear to ``llmint8_<style>``: the same style as transformers' for every other module,
  but the int8 ``weight`` and ``weight_scale`` of an Int8Linear become plain tensors of this rank's shard size (the
  bias is left to transformers: a ``DTensor`` sharded with the rows, or replicated and added once after the sum for
  rowwise).
* Loading reads the full tensor, quantizes it (or checks the saved one) as one process does, and keeps this rank's
  slice: colwise layers keep rows of the codes and their scales, rowwise layers keep columns of the codes and every
  row's scale (a row split of the input dimension does not change a row's absmax). Every rank's codes and scales are
  therefore exactly a slice of the single-process checkpoint, and ``save_pretrained`` gathers them back into one.
* ``forward`` runs transformers' local-tensor path (``_hf_quantized_needs_local_tp``): colwise layers see the whole
  input and compute their output columns exactly as one process does; rowwise layers see their slice of the input,
  quantize it over that slice (the activation row absmax and the outlier test are per shard) and their partial
  outputs are summed with an all-reduce. That sum is the only numerical difference from one process.

Shard sizes follow ``torch.distributed.tensor.Shard`` (the first ranks get ``ceil(n / world)``), so an input split by
transformers and the weight columns split here always agree.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..nn import Int8Linear
from ._compat import mark_local_tensor_parallel, parallel_styles, plan_key

T = TypeVar("T")

STYLE_PREFIX = "llmint8_"
_STYLE_FAMILIES = ("colwise", "rowwise")  # transformers' ColwiseParallel / RowwiseParallel styles


@dataclass(frozen=True)
class Int8Shard:
    """Where this rank's slice of an Int8Linear sits: ``dim`` 0 = output rows (colwise), 1 = input columns."""

    dim: int
    offset: int
    size: int
    full: int
    rank: int
    world: int
    mesh: Any  # the TP DeviceMesh, used to gather the layer back when saving

    def __deepcopy__(self, memo: dict) -> Int8Shard:
        return self  # immutable, and the process group behind ``mesh`` is not something a copy could duplicate

    def take(self, codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the full ``codes`` [out, in] and ``scale`` [out] (copies: the full ones are freed)."""
        end = self.offset + self.size
        if self.dim == 0:
            return codes[self.offset : end].clone(), scale[self.offset : end].clone()
        return codes[:, self.offset : end].contiguous(), scale


def shard_of(module: nn.Module) -> Int8Shard | None:
    """The :class:`Int8Shard` of a tensor-parallel Int8Linear, ``None`` for an unsharded one."""
    return getattr(module, "_hf_int8_tp", None)


def is_sharded(model: nn.Module) -> bool:
    """Whether any Int8Linear of ``model`` holds a tensor-parallel shard."""
    return any(shard_of(m) is not None for m in model.modules() if isinstance(m, Int8Linear))


def unsupported_sharding(module: nn.Module, name: str) -> str | None:
    """Why ``module`` cannot load as llmint8 (a plan style that made its int8 weight a DTensor), or ``None``."""
    if not _distributed_available():
        return None
    from torch.distributed.tensor import DTensor

    if isinstance(module._parameters.get("weight"), DTensor):
        return (
            f"{name} is an llmint8 layer sharded by a tensor-parallel style hf_int8 does not handle (its int8 weight "
            f"became a DTensor); llmint8 shards 'colwise*' and 'rowwise*' styles (given as 'llmint8_<style>' in a "
            f"custom tp_plan): use one of those or keep the layer in floating point with skip_modules"
        )
    return None


def _distributed_available() -> bool:
    return torch.distributed.is_available()


# ---- plan styles ------------------------------------------------------------------------------------------------
def _shard_int8_weight(module: Int8Linear, dim: int, mesh: Any) -> None:
    """Replace the meta int8 weight (and, for a row split, the scale) by placeholders of this rank's shard size."""
    from torch.distributed.tensor import Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    full = module.out_features if dim == 0 else module.in_features
    size, offset = Shard.local_shard_size_and_offset(full, world, rank)
    if size == 0:
        kind = "out_features" if dim == 0 else "in_features"
        raise ValueError(
            f"cannot shard an Int8Linear with {kind}={full} over {world} ranks: rank {rank} would hold nothing; keep "
            f"such small layers out of the tp_plan or in floating point (skip_modules)"
        )
    shape = (size, module.in_features) if dim == 0 else (module.out_features, size)
    module._parameters["weight"] = nn.Parameter(
        torch.empty(shape, dtype=torch.int8, device=module.weight.device), requires_grad=False
    )
    if dim == 0:
        module._buffers["weight_scale"] = torch.empty(size, dtype=torch.float32, device=module.weight_scale.device)
    module._hf_int8_tp = Int8Shard(  # type: ignore[assignment]  # torch's __setattr__ hint is too narrow
        dim, offset, size, full, rank, world, mesh
    )
    # transformers' colwise/rowwise styles then run forward on local tensors (the bias DTensor included)
    mark_local_tensor_parallel(module)


def _make_style(base: Any) -> Any:
    """A copy of the style ``base`` (same class and layouts) that shards Int8Linear weights as this module says."""
    _, colwise, _ = parallel_styles()
    dim = 0 if isinstance(base, colwise) else 1

    def shard_param(self: Any, module: nn.Module, param: str, mesh: Any) -> None:
        if isinstance(module, Int8Linear) and param == "weight":
            _shard_int8_weight(module, dim, mesh)
        else:
            super(cls, self).shard_param(module, param, mesh)

    # Any: a subclass, made at run time, of the (untyped) class of base
    cls: Any = type(f"Int8{type(base).__name__}", (type(base),), {"shard_param": shard_param, "__module__": __name__})
    style = cls.__new__(cls)
    style.__dict__.update(base.__dict__)
    return style


def register_styles() -> dict[str, str]:
    """Register ``llmint8_<style>`` for every colwise/rowwise style transformers knows; return {style: llmint8 name}.

    Idempotent. Nothing is registered when torch.distributed is unavailable (then no plan is applied anyway).
    """
    if not _distributed_available():
        return {}
    registry, colwise, rowwise = parallel_styles()
    names = {}
    for name in list(registry.keys()):
        base = registry[name]
        if name.startswith(STYLE_PREFIX) or type(base) not in (colwise, rowwise):
            continue
        ours = STYLE_PREFIX + name
        if ours not in registry:
            registry.register(ours, _make_style(base))
        names[name] = ours
    return names


def rewrite_plan(model: nn.Module, plan: dict[str, str] | None) -> None:
    """Point every colwise/rowwise rule of ``plan`` that covers an Int8Linear at its ``llmint8_`` style (in place).

    A rule keeps its meaning for the floating-point layers it also covers (lm_head, skipped modules).
    """
    if not plan:
        return
    styles = register_styles()
    if not styles:
        return
    int8_names = {plan_key(n) for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    for key, style in list(plan.items()):
        module_key = key.removesuffix(".weight")
        if module_key in int8_names and style in styles:
            plan[key] = styles[style]


# ---- saving -----------------------------------------------------------------------------------------------------
def _gather(local: torch.Tensor, shard: Int8Shard, full_shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """Every rank's ``local`` slice along ``dim`` put back together (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor, Shard

    stride = torch.empty(full_shape, device="meta").stride()
    whole = DTensor.from_local(
        local, shard.mesh, [Shard(dim)], run_check=False, shape=torch.Size(full_shape), stride=stride
    )
    return whole.full_tensor()


def gather_layer(module: Int8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The full int8 ``weight`` [out, in] and ``weight_scale`` [out] of a sharded Int8Linear (collective)."""
    shard = shard_of(module)
    if shard is None:
        return module.weight.detach(), module.weight_scale
    full_shape = (module.out_features, module.in_features)
    codes = _gather(module.weight.detach(), shard, full_shape, shard.dim)
    scale = module.weight_scale
    if shard.dim == 0:
        scale = _gather(scale, shard, (module.out_features,), 0)
    return codes, scale


def _check_local(model: nn.Module) -> list[str]:
    """What is wrong with this rank's int8 shards (checked before any collective starts)."""
    problems = []
    for name, module in model.named_modules():
        shard = shard_of(module)
        if shard is None:
            continue
        rows = shard.size if shard.dim == 0 else module.out_features
        cols = module.in_features if shard.dim == 0 else shard.size
        if module.weight.dtype != torch.int8 or tuple(module.weight.shape) != (rows, cols):
            problems.append(
                f"{name}.weight is {module.weight.dtype} {tuple(module.weight.shape)}, not torch.int8 {(rows, cols)}"
            )
        if module.weight_scale.dtype != torch.float32 or tuple(module.weight_scale.shape) != (rows,):
            problems.append(f"{name}.weight_scale is {module.weight_scale.dtype} {tuple(module.weight_scale.shape)}")
    return problems


@contextlib.contextmanager
def _full_layers(layers: list[tuple[Int8Linear, torch.Tensor, torch.Tensor]]):
    """Put the gathered full tensors into the layers for the duration of a save, then the shards back."""
    saved = [(m, m._parameters["weight"], m._buffers["weight_scale"]) for m, _, _ in layers]
    try:
        for module, codes, scale in layers:
            module._parameters["weight"] = nn.Parameter(codes, requires_grad=False)
            module._buffers["weight_scale"] = scale
        yield
    finally:
        for module, shard_weight, shard_scale in saved:
            module._parameters["weight"] = shard_weight
            module._buffers["weight_scale"] = shard_scale


def save_gathered(model: nn.Module, save_full: Callable[[], T], save_scratch: Callable[[str], T]) -> T:
    """Save a tensor-parallel llmint8 model: every rank calls this, rank 0 runs ``save_full()`` with the full int8
    layers in place (one ordinary llmint8 checkpoint, the same files one process writes); the other ranks run
    ``save_scratch(folder)`` into a scratch folder, taking part in transformers' gathers but writing nothing that
    counts."""
    import torch.distributed as dist

    group = next(s for s in map(shard_of, model.modules()) if s is not None).mesh.get_group()
    rank = dist.get_rank(group)
    # Agree that every rank's shards are sound before the gathers start: one rank raising alone would leave the
    # others waiting in a collective.
    problems = _check_local(model)
    flag = torch.tensor([len(problems)], dtype=torch.int64)
    dist.all_reduce(flag, group=group)
    if flag.item():
        detail = "\n  ".join(problems[:10]) or "(on another rank)"
        raise ValueError(f"refusing to save: {flag.item()} int8 shard problem(s), nothing was written:\n  {detail}")
    layers = []
    for _, module in model.named_modules():  # the same order on every rank: the gathers pair up
        if shard_of(module) is not None:
            codes, scale = gather_layer(module)
            if rank == 0:
                layers.append((module, codes, scale))
    try:
        if rank == 0:
            with _full_layers(layers):
                return save_full()
        # A scratch folder keeps the other ranks away from rank 0's staging and atomic swap.
        with tempfile.TemporaryDirectory(prefix="hf_int8-tp-rank") as scratch:
            return save_scratch(scratch)
    finally:
        dist.barrier(group=group)  # nobody reads the folder before rank 0 has swapped it in


# ---- reporting --------------------------------------------------------------------------------------------------
def int8_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of int8 codes and fp32 scales this process holds, split into sharded and unsharded Int8Linear layers."""
    out = {"sharded_codes": 0, "sharded_scales": 0, "unsharded_codes": 0, "unsharded_scales": 0}
    for module in model.modules():
        if isinstance(module, Int8Linear):
            kind = "sharded" if shard_of(module) is not None else "unsharded"
            out[f"{kind}_codes"] += module.weight.numel() * module.weight.element_size()
            out[f"{kind}_scales"] += module.weight_scale.numel() * module.weight_scale.element_size()
    return out


def world_size(model: nn.Module) -> int:
    """How many ranks the Int8Linear layers of ``model`` are sharded over (1 when they are not)."""
    return next((s.world for s in map(shard_of, model.modules()) if s is not None), 1)
