"""The ``hf-int8`` command line: quantize, inspect, convert, and its exit codes.

Most tests call ``hf_int8.cli.main`` in this process (same code path as the console script, much faster); one runs
the installed console script / ``python -m hf_int8.cli`` for real. ``--push-to-hub`` is covered in test_hub.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import save_fp_model
from transformers import AutoModelForCausalLM

import hf_int8  # noqa: F401
from hf_int8 import Int8Linear, cli
from hf_int8.nn import FloatLinear


@pytest.fixture(scope="module")
def fp_path(tmp_path_factory) -> Path:
    return save_fp_model(tmp_path_factory.mktemp("cli") / "fp", outlier_scale=40.0)


@pytest.fixture(scope="module")
def quantized(fp_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-q") / "q"
    assert cli.main(["--quiet", "quantize", str(fp_path), str(out), "--skip", "down_proj"]) == 0
    return out


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["--quiet", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quantize_writes_a_loadable_llmint8_folder(quantized, fp_path):
    files = {p.name for p in quantized.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in files if f.startswith(".")]  # no staging leftovers
    qcfg = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "llmint8" and qcfg["skip_modules"] == ["down_proj"]
    model = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear)
    assert type(model.model.layers[0].mlp.down_proj) is FloatLinear and type(model.lm_head) is FloatLinear


def test_quantize_prints_a_summary(fp_path, tmp_path, capsys):
    code, out, _ = _run(["quantize", str(fp_path), str(tmp_path / "q"), "--threshold", "0"], capsys)
    assert code == 0
    assert "with llmint8 (threshold 0.0)" in out and "14 int8 layers" in out and "lm_head" in out
    assert "x of the source checkpoint" in out and "tokenizer files copied: tokenizer.json" in out


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--threshold", "-1"], 2, "threshold must be a finite number >= 0 (0 disables the outlier path), got -1.0"),
        (["--threshold", "nan"], 2, "got nan"),
        (["--skip", "no_such_layer"], 3, "skip_modules entry 'no_such_layer' matches no module"),
    ],
)
def test_quantize_bad_options(fp_path, tmp_path, capsys, args, code, message):
    got, _, err = _run(["quantize", str(fp_path), str(tmp_path / "q"), *args], capsys)
    assert got == code and message in err and err.startswith("hf-int8 quantize: error:")
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def test_quantize_input_and_output_errors(fp_path, quantized, tmp_path, capsys):
    code, _, err = _run(["quantize", str(tmp_path / "missing"), str(tmp_path / "a")], capsys)
    assert code == 3 and "missing" in err
    code, _, err = _run(["quantize", str(quantized), str(tmp_path / "b")], capsys)
    assert code == 3 and "already quantized (quant_method 'llmint8')" in err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    code, _, err = _run(["quantize", str(fp_path), str(occupied)], capsys)
    assert code == 4 and "--overwrite" in err and (occupied / "notes.txt").read_text() == "keep me"
    code, _, _ = _run(["quantize", str(fp_path), str(occupied), "--overwrite"], capsys)
    assert code == 0 and (occupied / "model.safetensors").is_file() and not (occupied / "notes.txt").exists()
    with pytest.raises(SystemExit) as exc:  # argparse: unknown option
        cli.main(["quantize", str(fp_path), str(tmp_path / "c"), "--thresold", "3"])
    assert exc.value.code == 2


def test_inspect_reports_memory_and_outliers(quantized, tmp_path, capsys):
    png, stats = tmp_path / "hist.png", tmp_path / "stats.json"
    code, out, err = _run(["inspect", str(quantized), "--png", str(png), "--json", str(stats)], capsys)
    assert code == 0, err
    assert "int8 weights" in out and "fp32 scales" in out and "12 int8 layers" in out
    assert "outlier statistics on" in out and "model.layers.0.self_attn.q_proj" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(stats.read_text())
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert len(layers) == 12 and data["memory"]["total"] > 0
    # The three scaled embedding columns cross the threshold in every layer that reads the embeddings.
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q["outlier_columns"] >= 3 and q["max_abs"] >= 6.0 and q["tokens"] == data["tokens"]
    model = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32)
    assert data["memory"]["total"] == model.get_memory_footprint()


def test_inspect_text_file_and_float_checkpoint(fp_path, tmp_path, capsys):
    text = tmp_path / "sample.txt"
    text.write_text("the members agreed to delay two building projects . " * 20)
    code, out, _ = _run(
        ["inspect", str(fp_path), "--text", str(text), "--max-tokens", "64", "--threshold", "0"], capsys
    )
    assert code == 0
    assert "quantized on load (threshold 0.0)" in out and "outlier statistics on 64 tokens (--text" in out
    assert "0 of 14 int8 layers had outlier columns" in out  # threshold 0: no outlier path at all


def test_inspect_errors(quantized, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((quantized / name).read_bytes())
    code, out, err = _run(["inspect", str(bare)], capsys)
    assert code == 3 and "int8 weights" in out and "no tokenizer" in err and "--tokenizer" in err
    code, out, _ = _run(["inspect", str(bare), "--tokenizer", str(quantized)], capsys)
    assert code == 0 and "outlier statistics" in out
    code, _, err = _run(["inspect", str(quantized), "--text", str(tmp_path / "nope.txt")], capsys)
    assert code == 3 and "nope.txt" in err
    code, _, err = _run(["inspect", str(quantized), "--max-tokens", "0"], capsys)
    assert code == 2 and "--max-tokens must be >= 1, got 0" in err


def test_convert_both_directions_and_errors(quantized, fp_path, tmp_path, capsys):
    code, out, err = _run(["convert", "--to", "bnb", str(quantized), str(tmp_path / "bnb")], capsys)
    assert code == 0, err
    assert "int8 layers: 12" in out and "model.layers.0.mlp.down_proj" in out
    with safe_open(tmp_path / "bnb" / "model.safetensors", "pt") as handle:
        assert "model.layers.0.mlp.up_proj.SCB" in handle.keys()
    code, out, _ = _run(["convert", "--to", "llmint8", str(tmp_path / "bnb"), str(tmp_path / "back")], capsys)
    assert code == 0
    for name in ("model.safetensors",):
        with safe_open(quantized / name, "pt") as a, safe_open(tmp_path / "back" / name, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())

    code, _, err = _run(["convert", "--to", "bnb", str(fp_path), str(tmp_path / "x")], capsys)
    assert code == 3 and "'float' checkpoint, not an llmint8 one" in err
    code, _, err = _run(["convert", "--to", "bnb", str(tmp_path / "none"), str(tmp_path / "y")], capsys)
    assert code == 3 and "is not a folder" in err
    code, _, err = _run(["convert", "--to", "bnb", str(quantized), str(quantized)], capsys)
    assert code == 2 and "must differ" in err
    code, _, err = _run(["convert", "--to", "llmint8", str(tmp_path / "bnb"), str(tmp_path / "back")], capsys)
    assert code == 4 and "--overwrite" in err


def test_console_script_is_declared_and_runs():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("hf-int8") == "hf_int8.cli:main"
    executable = Path(sys.executable).with_name("hf-int8")  # installed by `pip install -e .` (make test does it)
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "hf_int8.cli"]
    proc = subprocess.run([*command, "convert", "--to", "gguf", "a", "b"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'gguf'" in proc.stderr and "usage: hf-int8" in proc.stderr
