"""Convert llmint8 checkpoints to bitsandbytes 8-bit checkpoints and back, file to file.

The two formats hold the same int8 codes: one int8 row per output feature, quantized by row absmax. They differ in
how the row scale is written and where:

==========================  ====================================  ==============================================
tensor                      llmint8 (hf_int8)                     bitsandbytes 8-bit (``load_in_8bit=True``)
==========================  ====================================  ==============================================
``<layer>.weight``          int8, flattened ``[out * in]``        int8 ``[out, in]``
row scale                   ``<layer>.weight_scale`` fp32 ``[out]``  ``<layer>.SCB`` fp32 ``[out]``
                            ``= absmax / 127``                      ``= absmax``
layout marker               (none)                                ``<layer>.weight_format`` uint8 scalar, 0 = row
config.json                 ``{"quant_method": "llmint8", ...}``   ``BitsAndBytesConfig(load_in_8bit=True, ...)``
==========================  ====================================  ==============================================

How exact each direction is (checked in ``tests/test_interop.py``):

* int8 codes are copied bit for bit both ways (only reshaped).
* bitsandbytes -> llmint8: ``weight_scale = fp32(SCB / 127)``, correctly rounded: exactly the scale hf_int8's own
  quantizer computes from the same row absmax. The codes are bitsandbytes' own; they equal what hf_int8 would have
  written except at rounding ties (bitsandbytes multiplies by ``127 / absmax`` computed as a reciprocal times 127,
  hf_int8 by the correctly rounded quotient): ~1e-4 of the codes, one step apart, for fp16 source weights.
  bitsandbytes casts fp32 source weights to fp16 before quantizing, so from an fp32 source more codes differ.
* llmint8 -> bitsandbytes: ``SCB = fp32(weight_scale * 127)``, correctly rounded. That is the original row absmax for
  ~99.4% of rows and one fp32 ulp away (2^-23 relative) for the rest, because ``absmax -> absmax / 127`` is not
  one-to-one in fp32. The dequantized weights bitsandbytes computes differ from hf_int8's by at most ~1.2e-7 relative.
* llmint8 -> bitsandbytes -> llmint8 gives back every ``weight_scale`` bit for bit; bitsandbytes -> llmint8 ->
  bitsandbytes gives back ``SCB`` up to that one ulp on ~0.6% of rows.

Which layers are int8 is decided the way each loader decides it, on a model built on the meta device: modules that
one format keeps in floating point and the other would quantize are listed in the target's skip list, and a layer
bitsandbytes quantized but llmint8 always keeps in floating point (the output head, ``_keep_in_fp32_modules``) is
dequantized (``codes * SCB / 127``, in the checkpoint's dtype). Nothing here needs bitsandbytes installed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import staging
from ..checkpoint.card import card_section, merge_card, strip_card
from ..checkpoint.format import (
    CONFIG_NAME,
    README,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    SCALE_NAME,
    WEIGHT_NAME,
    check_layer_tensors,
    safetensors_metadata,
    unflatten_codes,
)
from ..ops.constants import INT8_MAX
from ._compat import Conv1D, should_convert_module
from .config import QUANT_METHOD, Int8Config

if TYPE_CHECKING:  # not at run time: the start-up hook imports hf_int8 while transformers is still initialising
    from transformers import PreTrainedModel

BNB_SCALE_NAME = "SCB"
BNB_FORMAT_NAME = "weight_format"
BNB_ROW_FORMAT = 0
"""``weight_format`` value of bitsandbytes' row-major int8 layout, the only one it saves."""

_FORMATS = ("llmint8", "bnb")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, tensor or field at fault."""


@dataclass
class ConversionReport:
    """What a conversion did."""

    target: str
    source: str
    output: str
    int8_layers: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    dequantized: list[str] = field(default_factory=list)
    threshold: float = 0.0
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"converted {self.source} -> {self.output} ({self.target})",
            f"  int8 layers: {len(self.int8_layers)}, threshold {self.threshold}",
            f"  linear layers kept in floating point: {', '.join(self.kept_float) or 'none'}",
        ]
        if self.dequantized:
            lines.append(
                "  dequantized (int8 in the source, always floating point in llmint8): " + ", ".join(self.dequantized)
            )
        lines.append(f"  files: {', '.join(self.files)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint folder
# ---------------------------------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ConversionError(f"{folder} has no {CONFIG_NAME}: not a transformers checkpoint folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc


def weight_files(folder: Path) -> tuple[list[str], dict[str, str], dict[str, Any] | None]:
    """``(shard file names, tensor name -> file name, index json or None)`` of a safetensors checkpoint folder."""
    index_path = folder / SAFE_INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise ConversionError(f"{index_path} lists {name!r}, which is missing from {folder}")
        return files, dict(weight_map), index
    if (folder / SAFE_WEIGHTS).is_file():
        with safe_open(folder / SAFE_WEIGHTS, "pt") as handle:
            keys = list(handle.keys())
        return [SAFE_WEIGHTS], {key: SAFE_WEIGHTS for key in keys}, None
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {pickles!r}: pickle checkpoints are not read, re-save with safetensors)" if pickles else ""
    raise ConversionError(f"{folder} has no {SAFE_WEIGHTS} or {SAFE_INDEX}{hint}")


def checkpoint_format(folder: str | os.PathLike) -> str:
    """``"llmint8"``, ``"bnb"`` (bitsandbytes 8-bit), ``"bnb-4bit"``, another quant_method, or ``"float"``."""
    config = read_config(Path(folder))
    qcfg = config.get("quantization_config")
    if not qcfg:
        return "float"
    if qcfg.get("load_in_8bit") or qcfg.get("_load_in_8bit"):
        return "bnb"
    if qcfg.get("load_in_4bit") or qcfg.get("_load_in_4bit"):
        return "bnb-4bit"
    return str(qcfg.get("quant_method"))


def _float_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _meta_model(config_dict: dict[str, Any]) -> PreTrainedModel:
    """The checkpoint's model class built on the meta device (no memory, no weights), without quantization."""
    import transformers
    from transformers import AutoConfig

    plain = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = plain.get("model_type")
    if not model_type:
        raise ConversionError(f"{CONFIG_NAME} has no model_type")
    config = AutoConfig.for_model(**plain)
    architectures = plain.get("architectures") or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        raise ConversionError(
            f"{CONFIG_NAME} names architectures {architectures!r}, which transformers {transformers.__version__} "
            "does not have"
        )
    with torch.device("meta"):
        return model_cls(config)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, Conv1D)]


def _linear_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of the linear-like module ``name``."""
    module = model.get_submodule(name)
    if type(module) is nn.Linear:
        return module.out_features, module.in_features
    conv = cast(Conv1D, module)  # the other kind _linear_names selects
    in_f, out_f = conv.weight.shape  # transformers Conv1D stores [in, out]
    return out_f, in_f


def _llmint8_selection(config_dict: dict[str, Any], threshold: float, skip: list[str] | None) -> list[str]:
    """Names of the layers hf_int8's loader makes int8 for this config and skip list (its own selection code)."""
    from .quantizer import Int8HfQuantizer  # on use: the quantizer module imports this one's neighbours

    model = _meta_model(config_dict)
    quantizer = Int8HfQuantizer(Int8Config(threshold=threshold, skip_modules=skip or None), pre_quantized=False)
    quantizer._process_model_before_weight_loading(model)
    return sorted(quantizer.quantized_module_names)


def _bnb_selection(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the linear layers transformers' bitsandbytes 8-bit loader quantizes with ``llm_int8_skip_modules``."""
    patterns = list(skip) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(name for name in _linear_names(model) if should_convert_module(name, patterns))


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} is not empty (pass overwrite=True / --overwrite to replace it)")


def _copy_other_files(src: Path, tmp: Path, skip: set[str]) -> None:
    for entry in src.iterdir():
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, tmp / entry.name)
        else:
            shutil.copy2(entry, tmp / entry.name)


def _write_index(tmp: Path, index: dict[str, Any] | None, new_map: dict[str, str], sizes: int) -> None:
    if index is None:
        return
    meta = dict(index.get("metadata") or {})
    meta["total_size"] = sizes
    (tmp / SAFE_INDEX).write_text(
        json.dumps({"metadata": meta, "weight_map": dict(sorted(new_map.items()))}, indent=2) + "\n"
    )


class _Reader:
    """Lazy access to any tensor of a (possibly sharded) checkpoint."""

    def __init__(self, folder: Path, key_to_file: dict[str, str]) -> None:
        self.folder, self.key_to_file = folder, key_to_file
        self.handles: dict[str, safe_open] = {}  # file name -> open file, entered

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def get(self, key: str) -> torch.Tensor:
        name = self.key_to_file[key]
        if name not in self.handles:
            self.handles[name] = safe_open(self.folder / name, "pt")
            self.handles[name].__enter__()
        return self.handles[name].get_tensor(key)

    def keys_in(self, name: str) -> list[str]:
        return sorted(k for k, f in self.key_to_file.items() if f == name)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()


def _tqdm(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="file")


# ---------------------------------------------------------------------------------------------------------------
# The conversion skeleton, shared by both directions
# ---------------------------------------------------------------------------------------------------------------
# (reader, tensor name, module prefix) -> the tensors to write in its place (empty: written with another tensor)
ConvertLayer = Callable[[_Reader, str, str], dict[str, torch.Tensor]]


@dataclass
class _Plan:
    """What one conversion writes: which layers it rewrites and how, and the folder's new config/card/metadata."""

    src: Path
    config: dict[str, Any]
    files: list[str]
    key_to_file: dict[str, str]
    index: dict[str, Any] | None
    layers: set[str]  # module prefixes whose tensors go through convert_layer
    convert_layer: ConvertLayer
    quantization_config: dict[str, Any]
    metadata: dict[str, str]
    desc: str
    card: Callable[[str | None], str | None]  # existing README text -> new README text (None: write none)
    seal: bool


def _write_converted(plan: _Plan, out: Path, overwrite: bool, progress: bool) -> list[str]:
    """Write ``out`` from ``plan`` through one staged folder (``out`` never half-written); return its file names."""
    _check_output(out, overwrite)

    def write(folder: str) -> None:
        tmp = Path(folder)
        reader = _Reader(plan.src, plan.key_to_file)
        try:
            new_map, total = {}, 0
            for name in _tqdm(plan.files, progress, plan.desc):
                tensors: dict[str, torch.Tensor] = {}
                for key in reader.keys_in(name):
                    prefix = key.rpartition(".")[0]
                    tensors.update(
                        plan.convert_layer(reader, key, prefix) if prefix in plan.layers else {key: reader.get(key)}
                    )
                save_file(tensors, tmp / name, metadata=plan.metadata)
                total += sum(t.numel() * t.element_size() for t in tensors.values())
                new_map.update({k: name for k in tensors})
        finally:
            reader.close()
        new_config = {**plan.config, "quantization_config": plan.quantization_config}
        _copy_other_files(plan.src, tmp, {CONFIG_NAME, SAFE_INDEX, README, *plan.files})
        (tmp / CONFIG_NAME).write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        _write_index(tmp, plan.index, new_map, total)
        readme = plan.src / README
        card = plan.card(readme.read_text(encoding="utf-8") if readme.is_file() else None)
        if card is not None:
            (tmp / README).write_text(card, encoding="utf-8")

    staging.write_folder(out, write, keep_files=False, seal=plan.seal)
    return sorted(p.name for p in out.iterdir())


def _read_source(
    src: Path,
) -> tuple[dict[str, Any], list[str], dict[str, str], dict[str, Any] | None, PreTrainedModel]:
    config = read_config(src)
    files, key_to_file, index = weight_files(src)
    return config, files, key_to_file, index, _meta_model(config)


# ---------------------------------------------------------------------------------------------------------------
# llmint8 -> bitsandbytes
# ---------------------------------------------------------------------------------------------------------------
def to_bnb(
    src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = False
) -> ConversionReport:
    """Convert the llmint8 checkpoint folder ``src`` into a bitsandbytes 8-bit checkpoint folder ``out``."""
    from transformers import BitsAndBytesConfig

    src, out = Path(src), Path(out)
    kind = checkpoint_format(src)
    if kind != QUANT_METHOD:
        raise ConversionError(f"{src} is a {kind!r} checkpoint, not an llmint8 one (config.json quantization_config)")
    config, files, key_to_file, index, model = _read_source(src)
    qcfg = Int8Config.from_dict(config["quantization_config"])
    linears = _linear_names(model)
    quantized = sorted(n for n in linears if f"{n}.{SCALE_NAME}" in key_to_file)
    if not quantized:
        raise ConversionError(f"{src} holds no {SCALE_NAME} tensor: no int8 layer to convert")
    stray = sorted(
        k.rpartition(".")[0]
        for k in key_to_file
        if k.endswith(f".{SCALE_NAME}") and k.rpartition(".")[0] not in quantized
    )
    if stray:
        raise ConversionError(f"{src} has {SCALE_NAME} tensors for modules that are not linear layers: {stray[:5]!r}")
    kept_float = sorted(set(linears) - set(quantized))
    if _bnb_selection(model, kept_float) != quantized:
        raise ConversionError("could not express the llmint8 layer selection as llm_int8_skip_modules")
    missing = [p for p in quantized if f"{p}.{WEIGHT_NAME}" not in key_to_file]
    if missing:
        raise ConversionError(f"{src} has {SCALE_NAME} but no weight for {missing[:5]!r}")

    def convert_layer(reader: _Reader, key: str, prefix: str) -> dict[str, torch.Tensor]:
        leaf = key.rpartition(".")[2]
        if leaf == SCALE_NAME:
            return {}  # written with its weight
        if leaf != WEIGHT_NAME:
            return {key: reader.get(key)}
        out_f, in_f = _linear_shape(model, prefix)
        codes = unflatten_codes(reader.get(key), out_f, in_f)
        scale = reader.get(f"{prefix}.{SCALE_NAME}")
        check_layer_tensors(prefix, codes, scale, out_f, in_f)
        return {
            key: codes.contiguous(),
            f"{prefix}.{BNB_SCALE_NAME}": (scale.double() * INT8_MAX).float(),
            f"{prefix}.{BNB_FORMAT_NAME}": torch.tensor(BNB_ROW_FORMAT, dtype=torch.uint8),
        }

    bnb_config = BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=qcfg.threshold, llm_int8_skip_modules=kept_float or None
    )
    plan = _Plan(
        src,
        config,
        files,
        key_to_file,
        index,
        set(quantized),
        convert_layer,
        bnb_config.to_dict(),
        {"format": "pt"},
        "convert to bitsandbytes",
        # keep the user's card, without the llmint8 section and tags that no longer apply
        lambda existing: strip_card(existing) if existing is not None else None,
        seal=False,
    )
    written = _write_converted(plan, out, overwrite, progress)
    return ConversionReport("bnb", str(src), str(out), quantized, kept_float, [], qcfg.threshold, written)


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes -> llmint8
# ---------------------------------------------------------------------------------------------------------------
def to_llmint8(
    src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = False
) -> ConversionReport:
    """Convert the bitsandbytes 8-bit checkpoint folder ``src`` into an llmint8 checkpoint folder ``out``."""
    src, out = Path(src), Path(out)
    kind = checkpoint_format(src)
    if kind == "bnb-4bit":
        raise ConversionError(f"{src} is a bitsandbytes 4-bit checkpoint; llmint8 is 8-bit: only 8-bit converts")
    if kind != "bnb":
        raise ConversionError(f"{src} is a {kind!r} checkpoint, not a bitsandbytes 8-bit one (load_in_8bit)")
    config, files, key_to_file, index, model = _read_source(src)
    bnb = config["quantization_config"]
    if bnb.get("llm_int8_has_fp16_weight"):
        raise ConversionError(
            f"{src} was saved with llm_int8_has_fp16_weight=True (floating-point weights, no int8 codes): quantize it "
            "with `hf-int8 quantize` instead"
        )
    threshold = bnb.get("llm_int8_threshold", 6.0)
    linears = _linear_names(model)
    bnb_int8 = sorted(n for n in linears if f"{n}.{BNB_SCALE_NAME}" in key_to_file)
    if not bnb_int8:
        raise ConversionError(f"{src} holds no {BNB_SCALE_NAME} tensor: no int8 layer to convert")
    default_int8 = _llmint8_selection(config, threshold, None)
    skip = sorted(set(default_int8) - set(bnb_int8))  # floating point in bitsandbytes: keep them so
    dequantize = sorted(set(bnb_int8) - set(default_int8))  # llmint8 always keeps these in floating point
    int8_layers = sorted(set(bnb_int8) - set(dequantize))
    if _llmint8_selection(config, threshold, skip) != int8_layers:
        raise ConversionError("could not express the bitsandbytes layer selection as llmint8 skip_modules")
    missing = [p for p in bnb_int8 if f"{p}.{WEIGHT_NAME}" not in key_to_file]
    if missing:
        raise ConversionError(f"{src} has {BNB_SCALE_NAME} but no weight for {missing[:5]!r}")
    qcfg = Int8Config(threshold=threshold, skip_modules=skip or None)
    float_dtype = _float_dtype(config)
    sizes = {"int8_weights": 0, "scales": 0, "int8_layer_biases": 0, "float_layers": 0, "other_buffers": 0}
    int8_set, deq_set = set(int8_layers), set(dequantize)

    def convert_layer(reader: _Reader, key: str, prefix: str) -> dict[str, torch.Tensor]:
        leaf = key.rpartition(".")[2]
        if leaf in (BNB_SCALE_NAME, BNB_FORMAT_NAME):
            return {}  # written with the weight
        if leaf != WEIGHT_NAME:
            tensor = reader.get(key)
            sizes["int8_layer_biases" if prefix in int8_set and leaf == "bias" else "float_layers"] += (
                tensor.numel() * tensor.element_size()
            )
            return {key: tensor}
        out_f, in_f = _linear_shape(model, prefix)
        codes, scale = reader.get(key), _bnb_scale(reader, prefix, key_to_file)
        check_layer_tensors(prefix, codes, scale, out_f, in_f)
        if prefix in deq_set:
            weight = (codes.float() * scale.unsqueeze(1)).to(float_dtype)
            if type(model.get_submodule(prefix)) is not nn.Linear:
                weight = weight.t().contiguous()  # back to Conv1D's [in, out]
            sizes["float_layers"] += weight.numel() * weight.element_size()
            return {key: weight}
        sizes["int8_weights"] += codes.numel()
        sizes["scales"] += scale.numel() * 4
        return {key: codes.reshape(-1), f"{prefix}.{SCALE_NAME}": scale}

    def card(existing: str | None) -> str:
        totals = {**sizes, "total": sum(sizes.values())}  # complete once every tensor has been converted
        section = card_section(
            qcfg.to_dict(),
            config.get("architectures"),
            None,
            totals,
            len(int8_layers),
            sorted(set(linears) - set(int8_layers)),
        )
        return merge_card(existing, section)

    plan = _Plan(
        src,
        config,
        files,
        key_to_file,
        index,
        int8_set | deq_set,
        convert_layer,
        qcfg.to_dict(),
        {**safetensors_metadata(qcfg.format_version), "format": "pt"},
        "convert to llmint8",
        card,
        seal=True,  # the same damage detection on load as a folder hf_int8's save_pretrained wrote
    )
    written = _write_converted(plan, out, overwrite, progress)
    return ConversionReport(
        "llmint8",
        str(src),
        str(out),
        int8_layers,
        sorted(set(linears) - set(bnb_int8)),
        dequantize,
        threshold,
        written,
    )


def _bnb_scale(reader: _Reader, prefix: str, key_to_file: dict[str, str]) -> torch.Tensor:
    """The llmint8 ``weight_scale`` of a bitsandbytes layer: ``SCB / 127``, after checking its layout marker."""
    fmt_key = f"{prefix}.{BNB_FORMAT_NAME}"
    if fmt_key in reader:
        fmt = reader.get(fmt_key)
        if fmt.numel() != 1 or int(fmt.item()) != BNB_ROW_FORMAT:
            raise ConversionError(
                f"{fmt_key} in {key_to_file[fmt_key]} is {fmt.tolist()!r}; only the row-major layout "
                f"({BNB_ROW_FORMAT}) is supported"
            )
    scb = reader.get(f"{prefix}.{BNB_SCALE_NAME}")
    if scb.dtype != torch.float32:
        raise ConversionError(f"{prefix}.{BNB_SCALE_NAME} must be float32, got {scb.dtype!r}")
    return (scb.double() / INT8_MAX).float()


def convert(
    src: str | os.PathLike, out: str | os.PathLike, to: str, *, overwrite: bool = False, progress: bool = False
) -> ConversionReport:
    """Convert ``src`` into format ``to`` (``"bnb"`` or ``"llmint8"``) in the new folder ``out``."""
    if to not in _FORMATS:
        raise ValueError(f"to must be one of {_FORMATS!r}, got {to!r}")
    if Path(src).resolve() == Path(out).resolve():
        raise ValueError(f"output folder must differ from the source, got {str(out)!r} for both")
    fn = to_bnb if to == "bnb" else to_llmint8
    return fn(src, out, overwrite=overwrite, progress=progress)
