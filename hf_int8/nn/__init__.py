"""Modules of hf_int8."""

from .int8_linear import Int8Linear

__all__ = ["Int8Linear"]
