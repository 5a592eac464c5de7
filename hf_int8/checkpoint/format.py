"""The llmint8 checkpoint format, in one place: names, version, code layout, tensor rules, file names, metadata.

An llmint8 checkpoint is an ordinary Transformers folder (``config.json`` with ``quantization_config =
{"quant_method": "llmint8", ...}``, ``model*.safetensors`` shards and their index). Each int8 layer ``<layer>`` holds

* ``<layer>.weight``: int8 codes, stored flattened row-major ``[out * in]`` (``[out, in]`` in memory), in
  ``[-INT8_MAX, INT8_MAX]``; every row's largest magnitude is exactly ``INT8_MAX``, or 0 for an all-zero row;
* ``<layer>.weight_scale``: float32 ``[out]``, finite and >= 0, the row's absmax / ``INT8_MAX``;
* ``<layer>.bias``: optional, floating point.

Everything here is plain torch/safetensors: no transformers import (see ``tests/test_import_graph.py``).
"""

from __future__ import annotations

import re
from typing import Protocol

import torch

from .._version import __version__
from ..ops.constants import INT8_MAX

QUANT_METHOD = "llmint8"
"""``quantization_config.quant_method`` of an llmint8 checkpoint."""

FORMAT_VERSION: int = 1
"""Version of the on-disk llmint8 checkpoint layout (``quantization_config.format_version``; see docs/format.md)."""

WEIGHT_NAME = "weight"
SCALE_NAME = "weight_scale"
SERIALIZED_NAMES = (WEIGHT_NAME, SCALE_NAME)
"""The tensors an int8 layer writes, in the order the loader expects them."""

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
README = "README.md"

WEIGHT_LAYOUT = "int8 codes flattened row-major [out*in]; weight_scale fp32 [out]"

_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)([.\-].*)?\.(safetensors|bin)(\.index\.json)?$")
# Weight files of other frameworks or tools (never tokenizer or config files)
_FOREIGN_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")


def is_weight_file(name: str, *, shards_only: bool = False, any_framework: bool = False) -> bool:
    """Whether the file ``name`` holds weights of a checkpoint (a saved folder replaces all of these, never mixes).

    Default: a Transformers checkpoint's weights and their indexes (``model*.safetensors``, ``pytorch_model*.bin``,
    ``*.index.json``). ``shards_only``: only the ``model*.safetensors`` shards themselves (what the seal covers).
    ``any_framework``: also any other framework's weight file (``.h5``, ``.gguf``, ``.pt``, ...), e.g. to tell them
    from the tokenizer files of a source folder.
    """
    match = _WEIGHT_FILE.match(name)
    if shards_only:
        return match is not None and match.group(3) == "safetensors" and match.group(4) is None
    return match is not None or (any_framework and name.endswith(_FOREIGN_WEIGHT_SUFFIXES))


# ---------------------------------------------------------------------------------------------------------------
# Code layout
# ---------------------------------------------------------------------------------------------------------------
def flatten_codes(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` codes as stored: flattened row-major to ``[out * in]``.

    Stored flat so that a loader without hf_int8 fails on a size mismatch instead of reading int8 codes as
    floating-point weights.
    """
    return codes.reshape(-1)


def unflatten_codes(codes: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Stored codes back to ``[out, in]`` (a view, no copy); any other shape is returned as is, for the checks."""
    if codes.dim() == 1 and codes.numel() == out_features * in_features:
        return codes.view(out_features, in_features)
    return codes


# ---------------------------------------------------------------------------------------------------------------
# Tensor rules
# ---------------------------------------------------------------------------------------------------------------
class TensorInfo(Protocol):
    """What a header entry of a safetensors file tells about a tensor without reading it."""

    @property
    def dtype(self) -> str: ...  # safetensors dtype name ("I8", "F32", ...)

    @property
    def shape(self) -> tuple[int, ...]: ...


def _dtype_is(value: torch.Tensor | TensorInfo, dtype: torch.dtype, header_name: str) -> tuple[bool, str]:
    """Whether a tensor or header entry has ``dtype`` (``header_name`` in safetensors' spelling), and its dtype."""
    if isinstance(value, torch.Tensor):
        return value.dtype == dtype, repr(value.dtype)
    return value.dtype == header_name, value.dtype


def layer_problems(
    prefix: str,
    codes: torch.Tensor | TensorInfo,
    scale: torch.Tensor | TensorInfo,
    out_features: int,
    in_features: int,
    *,
    check_codes: bool = True,
) -> list[str]:
    """Why ``codes``/``scale`` are not a valid int8 layer ``prefix`` of shape ``[out, in]`` (empty list: valid).

    The one rule used on load (header entries before reading, then tensors), on save and by the converters.
    ``codes``/``scale`` are tensors (values checked too, unless on the meta device) or safetensors header entries
    (dtype and shape only). Codes are ``[out, in]``; an entry may also be stored flat. ``check_codes=False`` skips
    the pass over the codes (the scales are always checked): a save checks what it can without reading every code.
    """
    problems = []
    is_tensor = isinstance(codes, torch.Tensor)
    codes_ok, codes_dtype = _dtype_is(codes, torch.int8, "I8")
    scale_ok, scale_dtype = _dtype_is(scale, torch.float32, "F32")
    shape = (out_features, in_features)
    # A header entry may hold the codes as stored (flat); a tensor must already be [out, in] (see unflatten_codes)
    shapes = (shape,) if is_tensor else (shape, (out_features * in_features,))
    if not codes_ok:
        problems.append(f"{prefix}.{WEIGHT_NAME} must be int8, got {codes_dtype}")
    elif tuple(codes.shape) not in shapes:
        problems.append(f"{prefix}.{WEIGHT_NAME} must have shape {list(shape)}, got {list(codes.shape)}")
    if not scale_ok:
        problems.append(f"{prefix}.{SCALE_NAME} must be float32, got {scale_dtype}")
    elif tuple(scale.shape) != (out_features,):
        problems.append(f"{prefix}.{SCALE_NAME} must have shape {[out_features]}, got {list(scale.shape)}")
    if problems or not isinstance(codes, torch.Tensor) or not isinstance(scale, torch.Tensor):
        return problems  # header entries: dtype and shape are all there is to check
    if scale.device.type == "meta":  # meta: offloaded, the values are elsewhere
        return problems
    bad = (~torch.isfinite(scale) | (scale < 0)).sum().item()
    if bad:
        return [f"{prefix}.{SCALE_NAME} holds {bad} NaN, infinite or negative scales"]
    if not check_codes or in_features == 0 or codes.device.type == "meta":
        return []
    # One pass over the codes (aminmax): no -128, and each row's largest magnitude is exactly INT8_MAX (what
    # quantization maps the row absmax to) or, for an all-zero row (scale 0), zero. A row breaking that was not
    # written by llmint8, or was damaged since.
    row_min, row_max = torch.aminmax(codes, dim=1)
    if bool((row_min == -128).any()):
        return [f"{prefix}.{WEIGHT_NAME} holds the code -128, which llmint8 never writes (damaged checkpoint?)"]
    row_max = torch.maximum(row_max, -row_min)
    zero_scale = scale == 0
    for bad_rows, what in (
        (zero_scale & (row_max != 0), f"{SCALE_NAME} is 0 but the row's codes are not all zero"),
        (~zero_scale & (row_max != INT8_MAX), f"the scale is positive but no code reaches +-{INT8_MAX}"),
    ):
        if bool(bad_rows.any()):
            rows = bad_rows.nonzero().flatten()
            return [
                f"{prefix}.{WEIGHT_NAME}: in {rows.numel()} row(s) {what} (first: row {rows[0].item()}); llmint8 maps "
                f"every row's largest value to +-{INT8_MAX} (damaged checkpoint?)"
            ]
    return []


def check_layer_tensors(
    prefix: str, codes: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int
) -> None:
    """Raise ``ValueError`` naming the tensor unless ``codes``/``scale`` are a valid int8 layer (see
    :func:`layer_problems`)."""
    problems = layer_problems(prefix, codes, scale, out_features, in_features)
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------
def safetensors_metadata(format_version: int = FORMAT_VERSION) -> dict[str, str]:
    """String metadata written into every llmint8 safetensors header (next to transformers' ``format: pt``)."""
    return {
        "quant_method": QUANT_METHOD,
        "llmint8_format_version": str(format_version),
        "llmint8_weight_layout": WEIGHT_LAYOUT,
        "loader": "import hf_int8 before from_pretrained (pip install hf_int8)",
        "hf_int8_version": __version__,
    }
