"""hf_int8.checkpoint.staging.write_folder on plain files: what each option keeps, and nothing changes on failure.

The save_pretrained guarantees built on it (kills mid-save, read-only folders, concurrent saves) are in
test_saving.py and test_concurrency.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_int8.checkpoint import staging
from hf_int8.checkpoint.integrity import SEAL_KEY


def _old(target: Path) -> None:
    target.mkdir()
    (target / "model.safetensors").write_text("stale weights")
    (target / "tokenizer.json").write_text("{}")
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("kept")


def _write(folder: str) -> str:
    save_file({"w": torch.zeros(2)}, str(Path(folder) / "model.safetensors"))
    (Path(folder) / "config.json").write_text("{}")
    return "done"


def _entries(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_keep_files_replaces_weights_and_keeps_everything_else(tmp_path):
    target = tmp_path / "out"
    _old(target)
    assert staging.write_folder(target, _write, keep_files=True) == "done"
    assert _entries(target) == {"model.safetensors", "config.json", "tokenizer.json", "notes", "notes/a.txt"}
    with safe_open(target / "model.safetensors", "pt") as f:
        assert SEAL_KEY not in (f.metadata() or {})  # seal=False: not sealed


def test_without_keep_files_the_new_folder_replaces_the_old_one_and_seal_seals(tmp_path):
    target = tmp_path / "out"
    _old(target)
    staging.write_folder(target, _write, keep_files=False, seal=True)
    assert _entries(target) == {"model.safetensors", "config.json"}
    with safe_open(target / "model.safetensors", "pt") as f:
        assert SEAL_KEY in f.metadata()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or retired folder left behind


def test_a_failing_writer_changes_nothing(tmp_path):
    target = tmp_path / "out"
    _old(target)
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def fail(folder: str) -> None:
        _write(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        staging.write_folder(target, fail, keep_files=False)
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_new_folder_is_created_with_its_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    staging.write_folder(target, _write, keep_files=False)
    assert _entries(target) == {"model.safetensors", "config.json"}


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(NotADirectoryError, match="it is a file"):
        staging.write_folder(tmp_path / "out", _write)
