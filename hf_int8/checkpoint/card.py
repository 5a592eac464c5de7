"""The llmint8 model card: the hf_int8 section of a checkpoint's ``README.md``, merged into any card already there.

The section (between two HTML comments) names the quantization method, threshold, memory footprint, checkpoint
format version and a usage snippet that starts with ``import hf_int8``. A README already present is kept: only the
hf_int8 section is added or replaced, and its YAML metadata gains the ``llmint8`` / ``hf_int8`` tags.
``save_pretrained`` of an llmint8 model writes it (see :mod:`hf_int8.integration.hooks`), the converters too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, cast

from torch import nn

from .._version import __version__
from .format import QUANT_METHOD, README
from .memory import memory_report

CARD_BEGIN = "<!-- hf_int8 model card: begin (regenerated on every save) -->"
CARD_END = "<!-- hf_int8 model card: end -->"
CARD_TAGS = ("hf_int8", QUANT_METHOD, "8-bit", "int8")
_MIB = 1024**2
_SECTION = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END) + r"\n?", re.DOTALL)


def _auto_class(architectures: list[str] | None) -> tuple[str, str]:
    """``(import line, class name)`` a user should load this architecture with."""
    arch = (architectures or [""])[0]
    for suffix, auto in (
        ("ForCausalLM", "AutoModelForCausalLM"),
        ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
        ("ForTokenClassification", "AutoModelForTokenClassification"),
        ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
        ("ForMaskedLM", "AutoModelForMaskedLM"),
    ):
        if arch.endswith(suffix):
            seq2seq = any(k in arch for k in ("T5", "Bart", "Pegasus", "Marian"))
            if suffix == "ForConditionalGeneration" and not seq2seq:
                return f"from transformers import {arch}", arch
            return f"from transformers import {auto}", auto
    if arch:
        return f"from transformers import {arch}", arch
    return "from transformers import AutoModel", "AutoModel"


def card_section(
    quantization_config: dict[str, Any],
    architectures: list[str] | None,
    repo_id: str | None,
    footprint: dict[str, int] | None,
    int8_layers: int | None,
    float_linear_layers: list[str] | None,
) -> str:
    """The hf_int8 part of the model card (Markdown between :data:`CARD_BEGIN` and :data:`CARD_END`)."""
    threshold = quantization_config.get("threshold")
    skip = quantization_config.get("skip_modules") or []
    version = quantization_config.get("format_version")
    import_line, cls = _auto_class(architectures)
    where = repo_id or "path/to/this/folder"
    rows = [
        (
            "quantization method",
            f"`{QUANT_METHOD}` (LLM.int8(): int8 weights with one fp32 scale per output row, "
            "int8 x int8 matmul, outlier activation columns in floating point)",
        ),
        ("outlier threshold", f"{threshold}" + (" (0: no outlier path)" if threshold == 0 else "")),
        ("extra modules kept in floating point", ", ".join(f"`{s}`" for s in skip) or "none (defaults only)"),
        ("checkpoint format version", f"{version}"),
        ("written by", f"hf_int8 {__version__}"),
    ]
    if footprint is not None:
        rest = footprint["float_layers"] + footprint["other_buffers"] + footprint["int8_layer_biases"]
        rows.append(
            (
                "memory footprint",
                f"{footprint['total'] / _MIB:.2f} MiB "
                f"(int8 weights {footprint['int8_weights'] / _MIB:.2f} MiB, fp32 scales "
                f"{footprint['scales'] / _MIB:.2f} MiB, floating-point layers and buffers "
                f"{rest / _MIB:.2f} MiB)",
            )
        )
    if int8_layers is not None:
        rows.append(("int8 linear layers", f"{int8_layers}"))
    if float_linear_layers is not None:
        shown = ", ".join(f"`{n}`" for n in float_linear_layers[:8])
        more = f" and {len(float_linear_layers) - 8} more" if len(float_linear_layers) > 8 else ""
        rows.append(("linear layers left in floating point", (shown + more) or "none"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    return f"""{CARD_BEGIN}
# llmint8 (LLM.int8()) 8-bit checkpoint

> **Load it with `import hf_int8` first** (`pip install hf_int8`). The `llmint8` method is a transformers plugin:
> without the import, transformers does not know it and refuses this checkpoint with a size-mismatch error (the int8
> weights are stored flattened so that they can never be read as floating-point weights by mistake). Do not pass
> `ignore_mismatched_sizes=True` to get past that error: the model would load with random weights.

{table}

## Usage

```python
import hf_int8  # registers quant_method="llmint8" with transformers; must come before from_pretrained
{import_line}

model = {cls}.from_pretrained("{where}", device_map="auto")
print(model.get_memory_footprint())
```

The int8 weights stay int8 in memory (`dtype=` only sets the precision of the layers that are not quantized).
LoRA adapters train on top with PEFT (a plain `LoraConfig`), and `hf-int8 convert --to bnb` turns this
checkpoint into a bitsandbytes 8-bit one.
{CARD_END}
"""


def model_card(model: nn.Module, repo_id: str | None = None, existing: str | None = None) -> str:
    """Full README.md text for ``model``: ``existing`` (a card already there) with its hf_int8 section refreshed."""
    config: Any = model.config  # a transformers PretrainedConfig (this layer does not import transformers)
    qcfg = config.quantization_config
    qdict = qcfg.to_dict() if hasattr(qcfg, "to_dict") else dict(qcfg)
    report = memory_report(model)
    section = card_section(
        qdict,
        getattr(config, "architectures", None) or [type(model).__name__],
        repo_id,
        report.as_dict(),
        report.num_int8_layers,
        report.float_linear_layers,
    )
    return merge_card(existing, section)


def merge_card(existing: str | None, section: str) -> str:
    """Put ``section`` into the card text ``existing`` (replacing an older hf_int8 section) and tag its metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(existing) if existing and existing.strip() else None
    # ModelCard.data is declared as the base CardData but built as ModelCard's card_data_class, ModelCardData
    data = cast(ModelCardData, card.data) if card is not None else ModelCardData()
    tags = list(data.tags or [])
    for tag in CARD_TAGS:
        if tag not in tags:
            tags.append(tag)
    data.tags = tags
    if not getattr(data, "library_name", None):
        data.library_name = "transformers"
    body = card.text if card is not None else ""
    if _SECTION.search(body):
        body = _SECTION.sub(lambda _: section, body, count=1)
    else:
        body = section + ("\n" + body.lstrip("\n") if body.strip() else "")
    return f"---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n"


def write_model_card(save_directory: str | os.PathLike, model: nn.Module, repo_id: str | None = None) -> Path:
    """Write (or refresh) ``save_directory/README.md`` for ``model``; return its path."""
    path = Path(save_directory) / README
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    path.write_text(model_card(model, repo_id, existing), encoding="utf-8")
    return path


def strip_card(text: str) -> str:
    """``text`` without its hf_int8 section and tags (a card for a checkpoint that is no longer llmint8)."""
    text = _SECTION.sub("", text)
    for tag in CARD_TAGS:
        text = re.sub(rf"(?m)^- {re.escape(tag)}\n", "", text)
    return text
