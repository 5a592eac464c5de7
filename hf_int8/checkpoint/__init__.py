"""The llmint8 checkpoint on disk: its format, integrity checks and seal, staged writes, the model card.

Nothing here imports transformers (``tests/test_import_graph.py`` checks it): this layer sits between the kernels
(:mod:`hf_int8.ops`, :mod:`hf_int8.nn`) and :mod:`hf_int8.integration`.
"""
