"""Modules of hf_int8."""

from .casts import guard_dtype_casts, unguard_dtype_casts
from .float_linear import FloatLinear
from .int8_linear import Int8Linear

__all__ = ["FloatLinear", "Int8Linear", "guard_dtype_casts", "unguard_dtype_casts"]
