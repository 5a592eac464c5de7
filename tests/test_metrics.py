"""hf_int8.metrics.perplexity: the windowing protocol, checked against a direct computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_int8.metrics import perplexity, perplexity_details, tokenize_for_perplexity

VOCAB = 97


class WordTokenizer:
    """Maps each whitespace-separated word to a fixed id; records the keyword arguments it was called with."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, text: str, **kwargs):
        self.calls.append(kwargs)
        return {"input_ids": [sum(map(ord, word)) % VOCAB for word in text.split()]}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def text() -> str:
    rng = torch.Generator().manual_seed(1)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 500, (1300,), generator=rng))


def _direct_nll(model, ids: torch.Tensor) -> float:
    # The very forward call perplexity_details makes (use_cache=False included, so the same attention path): the
    # logits are then the same fp32 computation, and only the fp64 reductions below may differ (hence rel=1e-9).
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))


def test_windows_are_independent_and_non_overlapping(tiny_model, text):
    tok = WordTokenizer()
    ids = tokenize_for_perplexity(tok, text, None)
    assert ids.numel() == 1300
    result = perplexity_details(tiny_model, tok, text, max_tokens=None, window=512)
    assert result.num_windows == 3 and result.num_tokens == 1300
    assert result.num_predicted == 511 + 511 + 275
    per_window = [_direct_nll(tiny_model, ids[s : s + 512]) for s in (0, 512, 1024)]
    expected = sum(per_window)
    assert result.nll_sum == pytest.approx(expected, rel=1e-9)
    assert result.window_nll_sums == pytest.approx(per_window, rel=1e-9)
    assert result.window_num_predicted == (511, 511, 275)
    assert result.perplexity == pytest.approx(math.exp(expected / result.num_predicted), rel=1e-9)
    assert all(call.get("add_special_tokens") is False for call in tok.calls)


def test_max_tokens_truncates_and_drops_a_one_token_tail(tiny_model, text):
    result = perplexity_details(tiny_model, WordTokenizer(), text, max_tokens=1025, window=512)
    assert (result.num_tokens, result.num_windows, result.num_predicted) == (1025, 2, 1022)
    ids = tokenize_for_perplexity(WordTokenizer(), text, 1024)
    expected = _direct_nll(tiny_model, ids[:512]) + _direct_nll(tiny_model, ids[512:])
    assert result.nll_sum == pytest.approx(expected, rel=1e-9)


def test_deterministic_and_restores_training_mode(tiny_model, text):
    tiny_model.train()
    try:
        first = perplexity(tiny_model, WordTokenizer(), text, max_tokens=600, window=128)
        assert tiny_model.training
        second = perplexity(tiny_model, WordTokenizer(), text, max_tokens=600, window=128)
    finally:
        tiny_model.eval()
    assert first == second
    assert 1 < first < 10 * VOCAB  # a random model is near-uniform over the vocabulary (perplexity ~VOCAB)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 1}, "window must be an integer >= 2, got 1"),
        ({"window": 8.0}, "window must be an integer >= 2, got 8.0"),
        ({"max_tokens": 1}, "max_tokens must be an integer >= 2 or None, got 1"),
        ({"text": ""}, "text must be a non-empty string, got ''"),
        ({"text": "one"}, "text has 1 token"),
    ],
)
def test_bad_arguments_are_value_errors(tiny_model, text, kwargs, match):
    args = {"text": text, **kwargs}
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_model, WordTokenizer(), **args)
