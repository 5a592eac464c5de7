"""scripts/demo.py end to end on a tiny random Llama that uses SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


@pytest.fixture(autouse=True)
def _restore_transformers_logging():
    """The demo quiets transformers' logging and progress bars; give other tests theirs back."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    yield
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


def _demo_module():
    spec = importlib.util.spec_from_file_location("hf_int8_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


def test_demo_runs_and_confirms_the_round_trip(tiny_model_dir, capsys):
    status = _demo_module().main(["--model", str(tiny_model_dir), "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert status == 0, out
    for line in (
        "memory footprint",
        "generation speed",
        "(chat template)",
        "int8_linear[cpu]",
        "[ok] weights are int8: torch.int8",
        "[ok] int8 weights bit-identical: 14 layers",
        "[ok] logits bit-identical",
        "round trip ok",
    ):
        assert line in out, f"{line!r} missing from the demo's output:\n{out}"
    assert "FAIL" not in out


def test_demo_rejects_bad_arguments(tiny_model_dir):
    with pytest.raises(SystemExit):
        _demo_module().main(["--model", str(tiny_model_dir), "--max-new-tokens", "0"])
