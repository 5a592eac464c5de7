"""Everything that touches transformers or PEFT: the quantizer and its conversion ops, the config, the model hooks,
Hub uploads, tensor parallelism and the bitsandbytes converters. Private transformers/PEFT names are used only
through :mod:`hf_int8.integration._compat`.
"""
