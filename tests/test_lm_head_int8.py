"""``Int8Config(quantize_lm_head=True)``: the opt-in int8 output head, on untied and tied (SmolLM2-style) models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import llama_config, save_fp_model, tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

import hf_int8  # noqa: F401  (registers llmint8)
from hf_int8 import Int8Config
from hf_int8.nn import FloatLinear, Int8Linear


def _load(path: Path, **config) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", quantization_config=Int8Config(**config)
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm_head")
    vocab = len(tiny_tokenizer())
    return {
        "untied": save_fp_model(root / "untied", llama_config(vocab_size=vocab)),
        "tied": save_fp_model(root / "tied", llama_config(vocab_size=vocab, tie_word_embeddings=True), seed=1),
    }


def _ids() -> torch.Tensor:
    return torch.tensor([[2, 5, 9, 14, 20, 7, 30, 11]])


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_head_is_int8_only_when_asked_and_logits_stay_close(models, kind):
    reference = AutoModelForCausalLM.from_pretrained(models[kind], dtype=torch.float32).eval()
    default = _load(models[kind])
    int8_head = _load(models[kind], quantize_lm_head=True)
    assert type(default.lm_head) is FloatLinear  # floating point, with the CPU decode kernel
    assert isinstance(int8_head.lm_head, Int8Linear)
    # The head's codes are those of the floating-point head weight (for a tied model: the embedding matrix).
    expected = Int8Linear.from_float(reference.lm_head)
    assert torch.equal(int8_head.lm_head.weight, expected.weight)
    assert torch.equal(int8_head.lm_head.weight_scale, expected.weight_scale)
    with torch.inference_mode():
        ref, base, ours = (m(_ids()).logits for m in (reference, default, int8_head))
    assert not torch.equal(ours, base)  # the head really runs in int8
    # int8 rounding of the head adds at most a few percent of the logits' scale to the default's error.
    scale = ref.abs().max()
    assert (ours - ref).abs().max() / scale < 0.05, (ours - ref).abs().max() / scale


def test_tied_head_leaves_the_embedding_unchanged_and_saves_untied(models, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(models["tied"], dtype=torch.float32)
    model = _load(models["tied"], quantize_lm_head=True)
    embedding = model.get_input_embeddings().weight
    assert embedding.dtype == torch.float32
    assert torch.equal(embedding, reference.get_input_embeddings().weight)
    assert model.config.tie_word_embeddings is False
    assert "lm_head.weight" not in (getattr(model, "all_tied_weights_keys", None) or {})
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu").eval()
    assert isinstance(reloaded.lm_head, Int8Linear)
    assert reloaded.config.quantization_config.quantize_lm_head is True
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.get_input_embeddings().weight, embedding)
    with torch.inference_mode():
        assert torch.equal(reloaded(_ids()).logits, model.eval()(_ids()).logits)
        out = reloaded.generate(_ids(), max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert out.shape == (1, _ids().shape[1] + 4)


def test_untied_head_saves_and_reloads(models, tmp_path):
    model = _load(models["untied"], quantize_lm_head=True)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu").eval()
    assert isinstance(reloaded.lm_head, Int8Linear)
    with torch.inference_mode():
        assert torch.equal(reloaded(_ids()).logits, model(_ids()).logits)


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_skip_modules_naming_the_head_wins(models, kind):
    model = _load(models[kind], quantize_lm_head=True, skip_modules=["lm_head"])
    assert type(model.lm_head) is FloatLinear


def test_config_field():
    assert "quantize_lm_head" not in Int8Config().to_dict()  # older releases keep reading default checkpoints
    cfg = Int8Config(quantize_lm_head=True)
    assert cfg.to_dict()["quantize_lm_head"] is True
    assert Int8Config.from_dict(cfg.to_dict()) == cfg
    for bad in ("true", 1, None):
        with pytest.raises(ValueError, match=repr(bad)):
            Int8Config(quantize_lm_head=bad)
