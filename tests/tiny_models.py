"""Tiny random-weight models and a tiny real tokenizer for the ecosystem tests (hub, CLI, interop, pipeline)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

TEXT = (
    "the committee met on tuesday to review the budget for the coming year . after a long discussion about rising "
    "costs , the members agreed to delay two building projects and to spend more on the roads and bridges . "
    "several residents asked for better bus connections between the villages and the hospital ."
)
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>"]


def tiny_tokenizer(text: str = TEXT) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``text`` (a real ``tokenizers`` tokenizer, built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(re.findall(r"\S+", text)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def llama_config(vocab_size: int = 128, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def gpt2_config(vocab_size: int = 128) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=3
    )


def save_fp_model(
    path: Path,
    config=None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_tokenizer: bool = True,
    outlier_scale: float = 0.0,
) -> Path:
    """Save a random-weight causal LM (and the tiny tokenizer, whose vocabulary it matches) into ``path``.

    ``outlier_scale > 0`` multiplies a few embedding columns so that activations cross the LLM.int8() threshold
    (random models are otherwise too well behaved to exercise the outlier path).
    """
    tokenizer = tiny_tokenizer()
    if config is None:
        config = llama_config(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if outlier_scale:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[:, :3] *= outlier_scale
    model = model.to(dtype)
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return path
