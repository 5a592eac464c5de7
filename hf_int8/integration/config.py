"""``Int8Config``: the ``quantization_config`` of the ``llmint8`` method."""

from __future__ import annotations

import numbers
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..checkpoint.format import FORMAT_VERSION, QUANT_METHOD
from ..ops import _check_threshold
from ..ops.constants import DEFAULT_THRESHOLD

__all__ = ["QUANT_METHOD", "Int8Config"]


class Int8Config(QuantizationConfigMixin):
    """LLM.int8() quantization config for ``from_pretrained(..., quantization_config=Int8Config())``.

    Args:
        threshold: outlier threshold. An activation column holding any ``|x| >= threshold`` in a batch goes through
            a floating-point matmul; the rest goes through int8. ``0`` disables the outlier path (pure int8). The
            comparison is in float32 with the threshold rounded once to float32 (``6.0000000001`` acts as ``6.0``);
            a positive value that rounds to 0 there (below ~7.0e-46) or exceeds float32's range is refused.
        skip_modules: names (or dotted suffixes) of extra modules to keep in floating point. They are *added* to the
            defaults (the output embedding / ``lm_head``, tied weights and the model's ``_keep_in_fp32_modules``),
            never replacing them.
        quantize_lm_head: also quantize the output head (``lm_head``) to int8 (default ``False``: it stays in
            floating point like every LLM.int8() implementation). A decode step reads the whole head, so this cuts
            its bytes by 2x (bf16) / 4x (fp32); its perplexity cost is measured in ``docs/speed.md``. With tied
            embeddings the head gets its own int8 copy of the embedding matrix and the embedding itself is
            unchanged; the model is then saved untied. ``skip_modules`` naming the head wins over this flag.
        format_version: on-disk layout version; written by this package, checked when loading.
    """

    quant_method = QUANT_METHOD  # type: ignore[assignment]  # a registered method is a str, not transformers' enum

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        skip_modules: list[str] | tuple[str, ...] | None = None,
        format_version: int = FORMAT_VERSION,
        quantize_lm_head: bool = False,
        **kwargs: Any,
    ) -> None:
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"Int8Config is for quant_method {QUANT_METHOD!r}, got quant_method {method!r}")
        if kwargs:
            raise ValueError(
                f"Int8Config got unknown keys {sorted(kwargs)!r}; known keys are "
                "['format_version', 'quant_method', 'quantize_lm_head', 'skip_modules', 'threshold']"
            )
        self.quant_method = QUANT_METHOD
        self.threshold = threshold
        self.skip_modules = list(skip_modules) if isinstance(skip_modules, (list, tuple)) else skip_modules
        self.format_version = format_version
        self.quantize_lm_head = quantize_lm_head
        self.post_init()

    def post_init(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad value."""
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real):  # numpy scalars are welcome, strings are not
            raise ValueError(f"threshold must be a number, got {t!r} of type {type(t).__name__}")
        # The same rule as every op entry point: finite, >= 0 (0 disables the outlier path), and usable in float32,
        # where the kernels compare (a positive value that rounds to 0 there, or one past float32's range, is
        # refused). The value itself is kept as given, so config.json shows it unchanged.
        _check_threshold(t)
        self.threshold = float(t)
        if self.skip_modules is not None:
            if not isinstance(self.skip_modules, list):
                raise ValueError(f"skip_modules must be a list of module names, got {self.skip_modules!r}")
            for name in self.skip_modules:
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"skip_modules entries must be non-empty strings, got {name!r}")
        if not isinstance(self.quantize_lm_head, bool):  # "false" from a hand-edited config.json would be truthy
            raise ValueError(f"quantize_lm_head must be True or False, got {self.quantize_lm_head!r}")
        v = self.format_version
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"format_version must be a positive integer, got {v!r}")
        if v > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses llmint8 format_version {v!r}, newer than the {FORMAT_VERSION} this hf_int8 "
                "understands; upgrade hf_int8"
            )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "quant_method": QUANT_METHOD,
            "threshold": self.threshold,
            "skip_modules": list(self.skip_modules) if self.skip_modules is not None else None,
            "format_version": self.format_version,
        }
        # Written only when set: checkpoints with a floating-point head keep the config older releases read, and an
        # older release refuses (unknown key) a checkpoint whose head is int8 instead of loading it as floats.
        if self.quantize_lm_head:
            out["quantize_lm_head"] = True
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Int8Config) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable config: equality by value, so deliberately not hashable
