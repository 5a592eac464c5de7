"""Model cards and Hub uploads for llmint8 models.

Every llmint8 model that ``from_pretrained`` builds gets two instance-level hooks (installed by the quantizer):

* ``model.save_pretrained(out)`` writes ``out/README.md``: a model card with the quantization method, threshold,
  memory footprint, checkpoint format version and a usage snippet that starts with ``import hf_int8``. A README
  already in ``out`` is kept: only the card's hf_int8 section (between two HTML comments) is added or replaced, and
  its YAML metadata gains the ``llmint8`` / ``hf_int8`` tags.
* ``model.push_to_hub(repo)`` saves into a temporary folder (so with that card; a card already in the repo is merged
  the same way) and uploads it with one commit through ``huggingface_hub``. transformers' own ``push_to_hub`` would
  replace the card with its generic template after ``save_pretrained`` has written it.

:func:`write_model_card` and :func:`model_card` are usable on their own (the ``hf-int8`` CLI uses them).
"""

from __future__ import annotations

import os
import re
import tempfile
import types
from pathlib import Path
from typing import Any

from torch import nn

from .config import QUANT_METHOD
from .memory import memory_report

CARD_BEGIN = "<!-- hf_int8 model card: begin (regenerated on every save) -->"
CARD_END = "<!-- hf_int8 model card: end -->"
CARD_TAGS = ("hf_int8", QUANT_METHOD, "8-bit", "int8")
README = "README.md"
_MIB = 1024**2


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
    from . import __version__

    threshold = quantization_config.get("threshold")
    skip = quantization_config.get("skip_modules") or []
    version = quantization_config.get("format_version")
    import_line, cls = _auto_class(architectures)
    where = repo_id or "path/to/this/folder"
    rows = [
        ("quantization method", f"`{QUANT_METHOD}` (LLM.int8(): int8 weights with one fp32 scale per output row, "
                                "int8 x int8 matmul, outlier activation columns in floating point)"),
        ("outlier threshold", f"{threshold}" + (" (0: no outlier path)" if threshold == 0 else "")),
        ("extra modules kept in floating point", ", ".join(f"`{s}`" for s in skip) or "none (defaults only)"),
        ("checkpoint format version", f"{version}"),
        ("written by", f"hf_int8 {__version__}"),
    ]
    if footprint is not None:
        rest = footprint["float_layers"] + footprint["other_buffers"] + footprint["int8_layer_biases"]
        rows.append(("memory footprint", f"{footprint['total'] / _MIB:.2f} MiB "
                     f"(int8 weights {footprint['int8_weights'] / _MIB:.2f} MiB, fp32 scales "
                     f"{footprint['scales'] / _MIB:.2f} MiB, floating-point layers and buffers "
                     f"{rest / _MIB:.2f} MiB)"))
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
    config = model.config
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
    data = card.data if card is not None else ModelCardData()
    tags = list(data.tags or [])
    for tag in CARD_TAGS:
        if tag not in tags:
            tags.append(tag)
    data.tags = tags
    if not getattr(data, "library_name", None):
        data.library_name = "transformers"
    body = card.text if card is not None else ""
    pattern = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END) + r"\n?", re.DOTALL)
    if pattern.search(body):
        body = pattern.sub(lambda _: section, body, count=1)
    else:
        body = section + ("\n" + body.lstrip("\n") if body.strip() else "")
    return f"---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n"


def write_model_card(save_directory: str | os.PathLike, model: nn.Module, repo_id: str | None = None) -> Path:
    """Write (or refresh) ``save_directory/README.md`` for ``model``; return its path."""
    path = Path(save_directory) / README
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    path.write_text(model_card(model, repo_id, existing), encoding="utf-8")
    return path


def _remote_card(api, repo_id: str, token: Any, revision: str | None) -> str | None:
    """The README.md already in ``repo_id`` (``None`` when the repo has none)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        path = hf_hub_download(repo_id, README, revision=revision, token=token, endpoint=api.endpoint)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return Path(path).read_text(encoding="utf-8")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: Any = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
):
    """Create ``repo_id`` if needed and upload ``folder`` to it in one commit; returns the ``CommitInfo``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload llmint8 model (hf_int8)",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


_HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision")


def attach(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the llmint8 model card and ``model.push_to_hub`` upload it."""
    if "save_pretrained" in model.__dict__:
        return

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        hub = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        # Through the class, not the bound method captured above: after copy.deepcopy(model) that one would save
        # the original model's weights.
        result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and not getattr(self, "_hf_peft_config_loaded", False):
            write_model_card(save_directory, self, hub.get("repo_id"))
        if push_to_hub:
            repo_id = hub.pop("repo_id", None) or Path(save_directory).name
            push_folder(save_directory, repo_id, token=kwargs.get("token"), **hub)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: Any = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """Save with the llmint8 model card and upload to ``repo_id`` (same arguments as transformers')."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            existing = _remote_card(api, repo_id, token, revision)
            if existing is not None:
                Path(tmp, README).write_text(existing, encoding="utf-8")
            self.save_pretrained(tmp, max_shard_size=max_shard_size, repo_id=repo_id)
            if tags:
                card_path = Path(tmp, README)
                text = card_path.read_text(encoding="utf-8")
                from huggingface_hub import ModelCard

                card = ModelCard(text)
                card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
                card_path.write_text(f"---\n{card.data.to_yaml()}\n---\n\n{card.text.lstrip()}", encoding="utf-8")
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message or "Upload llmint8 model (hf_int8)",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )

    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(push_to_hub, model)


def detach(model: nn.Module) -> None:
    """Remove the hooks of :func:`attach` (``model.dequantize()`` does: the model is no longer llmint8)."""
    for name in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(name, None)
