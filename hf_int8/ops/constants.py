"""Named numeric constants of LLM.int8() shared by the reference ops and the module (the checkpoint format's own
constants live in :mod:`hf_int8.checkpoint.format`)."""

INT8_MAX: int = 127
"""Largest magnitude of a symmetric int8 code: codes live in [-INT8_MAX, INT8_MAX] (-128 is never produced)."""

DEFAULT_THRESHOLD: float = 6.0
"""Outlier threshold of the LLM.int8() paper: an activation with |x| >= threshold sends its column to the fp path."""
