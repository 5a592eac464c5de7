"""hf_int8: LLM.int8() as a first-class transformers quantization method, ``quant_method="llmint8"``.

Installing the package is enough: its start-up hook (``hf_int8_autoload``) imports this module as soon as a program
imports transformers' quantizer registry, and ``hf_int8.peft`` when it imports peft. ``import hf_int8`` registers the
method too (idempotent). Then ``from_pretrained(path, quantization_config=Int8Config())`` (or
``{"quant_method": "llmint8"}``) quantizes on load, and a saved llmint8 checkpoint reloads as int8 with no extra
argument.
"""

from __future__ import annotations

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from . import ops
from ._extension import load_extensions
from ._extension import status as extension_status
from ._version import __version__ as __version__
from .checkpoint.memory import MemoryReport, memory_report
from .integration.config import QUANT_METHOD, Int8Config
from .integration.quantizer import Int8HfQuantizer
from .nn import Int8Linear

load_extensions()

# Registration is idempotent so that importlib.reload(hf_int8) does not hit transformers' "already registered".
if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
    register_quantization_config(QUANT_METHOD)(Int8Config)
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
    register_quantizer(QUANT_METHOD)(Int8HfQuantizer)


def implementations() -> dict[str, str]:
    """Which kernel serves each op on each device type, e.g. ``{"int8_linear[cpu]": "native (avx512-vnni)"}``."""
    return ops.implementations()


__all__ = [
    "Int8Config",
    "Int8HfQuantizer",
    "Int8Linear",
    "MemoryReport",
    "extension_status",
    "implementations",
    "memory_report",
    "ops",
]
