"""Named numeric constants of LLM.int8() shared by the reference ops, the module and the checkpoint format."""

INT8_MAX: int = 127
"""Largest magnitude of a symmetric int8 code: codes live in [-INT8_MAX, INT8_MAX] (-128 is never produced)."""

DEFAULT_THRESHOLD: float = 6.0
"""Outlier threshold of the LLM.int8() paper: an activation with |x| >= threshold sends its column to the fp path."""

FORMAT_VERSION: int = 1
"""Version of the on-disk llmint8 checkpoint layout (see README, "Checkpoint format")."""
