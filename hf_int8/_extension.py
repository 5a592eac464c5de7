"""Loading of the native kernels built from ``csrc/`` (``hf_int8._C`` for CPU, ``hf_int8._C_cuda`` for CUDA).

Importing an extension registers its kernels with the ``hf_int8`` op registry (``TORCH_LIBRARY_IMPL`` blocks). When
an extension was not built, or ``HF_INT8_DISABLE_NATIVE=1`` is set, the reference kernels serve every op and
:func:`status` says why.
"""

from __future__ import annotations

import importlib
import logging
import os

logger = logging.getLogger(__name__)

DISABLE_ENV = "HF_INT8_DISABLE_NATIVE"

_modules: dict[str, object] = {}
_reasons: dict[str, str] = {}


def _load(module_name: str) -> None:
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        _reasons[module_name] = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]!r}"
        return
    try:
        _modules[module_name] = importlib.import_module(module_name)
    except ImportError as exc:  # not built, or built against another torch: the reference kernels take over
        _reasons[module_name] = f"not loaded: {exc}"
        logger.info("hf_int8: %s not loaded (%s); using the reference kernels", module_name, exc)


def load_extensions() -> None:
    """Import the native extensions once (idempotent)."""
    for name in ("hf_int8._C", "hf_int8._C_cuda"):
        if name not in _modules and name not in _reasons:
            _load(name)


def cpu_module():
    """The loaded CPU extension module, or ``None``."""
    return _modules.get("hf_int8._C")


def cuda_module():
    """The loaded CUDA extension module, or ``None``."""
    return _modules.get("hf_int8._C_cuda")


def cpu_isa() -> str:
    """Instruction set the native CPU kernels dispatch to on this machine (e.g. ``"avx512-vnni"``), or ``"none"``."""
    module = cpu_module()
    return module.cpu_isa() if module is not None and hasattr(module, "cpu_isa") else "none"


def status() -> dict[str, str]:
    """One line per extension: ``"loaded"`` or the reason it is not."""
    out = {}
    for name in ("hf_int8._C", "hf_int8._C_cuda"):
        out[name] = "loaded" if name in _modules else _reasons.get(name, "not attempted")
    return out
