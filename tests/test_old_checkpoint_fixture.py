"""A checkpoint written by an earlier hf_int8 (tests/fixtures/README.md) loads bit for bit and saves back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_int8

FIXTURES = Path(__file__).parent / "fixtures"
OLD = FIXTURES / "llmint8_tiny_llama"
EXPECTED = FIXTURES / "llmint8_tiny_llama_expected.safetensors"


def _int8_layers(model) -> dict[str, hf_int8.Int8Linear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, hf_int8.Int8Linear)}


@pytest.fixture(scope="module")
def loaded():
    return AutoModelForCausalLM.from_pretrained(OLD)


def test_old_checkpoint_loads_its_codes_and_scales_bit_for_bit(loaded):
    on_disk = load_file(str(OLD / "model.safetensors"))
    layers = _int8_layers(loaded)
    assert len(layers) == 14, sorted(layers)  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays float
    for name, layer in layers.items():
        codes = on_disk[f"{name}.weight"]
        assert codes.dtype == torch.int8
        assert torch.equal(layer.weight.reshape(-1), codes.reshape(-1)), name
        assert torch.equal(layer.weight_scale, on_disk[f"{name}.weight_scale"]), name
    config = json.loads((OLD / "config.json").read_text())["quantization_config"]
    assert loaded.config.quantization_config.threshold == config["threshold"] == 6.0


def test_old_checkpoint_computes_what_it_computed(loaded):
    expected = load_file(str(EXPECTED))
    with torch.no_grad():
        logits = loaded(expected["input_ids"]).logits
    # The fixture's logits came from the kernels of the machine that wrote it; native kernels and the reference sum
    # in different orders, so the comparison allows fp32 rounding of a few hundred-term sums (|logits| < 1).
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-5)


def test_resaving_the_old_checkpoint_writes_the_same_tensors(loaded, tmp_path):
    loaded.save_pretrained(tmp_path / "again")
    before = load_file(str(OLD / "model.safetensors"))
    after = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
