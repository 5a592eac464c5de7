"""Hub uploads of llmint8 checkpoints, through ``huggingface_hub`` (one commit per upload).

transformers' own ``push_to_hub`` would replace the model card with its generic template after ``save_pretrained``
has written it, so an llmint8 model's ``push_to_hub`` (installed by :mod:`hf_int8.integration.hooks`) is
:func:`push_model`: save with the llmint8 card (merged into the card already in the repo) into a temporary folder,
upload it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..checkpoint.format import README

if TYPE_CHECKING:  # not at run time: the start-up hook imports hf_int8 while transformers is still initialising
    from transformers import PreTrainedModel

COMMIT_MESSAGE = "Upload llmint8 model (hf_int8)"


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
        commit_message=commit_message or COMMIT_MESSAGE,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def _remote_card(api: Any, repo_id: str, token: Any, revision: str | None) -> str | None:
    """The README.md already in ``repo_id`` (``None`` when the repo has none)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        path = hf_hub_download(repo_id, README, revision=revision, token=token, endpoint=api.endpoint)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return Path(path).read_text(encoding="utf-8")


def _add_tags(card_path: Path, tags: list[str]) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(card_path.read_text(encoding="utf-8"))
    data = cast(ModelCardData, card.data)  # a ModelCard parses its metadata into ModelCardData (card_data_class)
    data.tags = list(dict.fromkeys([*(data.tags or []), *tags]))
    card_path.write_text(f"---\n{data.to_yaml()}\n---\n\n{card.text.lstrip()}", encoding="utf-8")


def push_model(
    model: PreTrainedModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: Any = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    tags: list[str] | None = None,
):
    """Save ``model`` with the llmint8 model card and upload it to ``repo_id`` (transformers' arguments)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        existing = _remote_card(api, repo_id, token, revision)
        if existing is not None:
            Path(tmp, README).write_text(existing, encoding="utf-8")
        model.save_pretrained(tmp, max_shard_size=max_shard_size, repo_id=repo_id)
        if tags:
            _add_tags(Path(tmp, README), tags)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or COMMIT_MESSAGE,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
