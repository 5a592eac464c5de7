"""Tiny random-weight models, their configs and a tiny real tokenizer: the one place the tests build them from."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

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


# The one tiny decoder shape the tests build from: 2 layers of width 64, 4 attention heads (2 for keys and values) and
# an MLP of width 96. Each builder below names only what it changes; keyword overrides win over everything.
TINY_DECODER = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def tiny_decoder_config(config_cls: type[PretrainedConfig], vocab_size: int = 128, **overrides) -> PretrainedConfig:
    """The tiny decoder as ``config_cls`` (Llama, Qwen2, Gemma...), all other fields the class's defaults."""
    return config_cls(**{**TINY_DECODER, "vocab_size": vocab_size, **overrides})


def tiny_llama_config(vocab_size: int = 128, **overrides) -> LlamaConfig:
    """The tiny decoder as a Llama with an untied ``lm_head``; positions and token ids are Transformers' defaults."""
    return tiny_decoder_config(LlamaConfig, vocab_size, **{"tie_word_embeddings": False, **overrides})


def llama_config(vocab_size: int = 128, **overrides) -> LlamaConfig:
    """The tiny Llama with ``tiny_tokenizer``'s special-token ids and 128 positions (what ``save_fp_model`` saves)."""
    kwargs = {"max_position_embeddings": 128, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1, **overrides}
    return tiny_llama_config(vocab_size, **kwargs)


def small_llama_config(**overrides) -> LlamaConfig:
    """Half the tiny Llama's width (32, 2 heads, 1 for keys and values, MLP 48), a vocabulary of 64, 32 positions."""
    half = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}
    return tiny_llama_config(64, **{**half, "max_position_embeddings": 32, **overrides})


def sized_llama_config(hidden: int = 64, layers: int = 2) -> LlamaConfig:
    """The tiny Llama at a chosen width and depth (its MLP 32 wider than ``hidden``), vocabulary 96, 64 positions."""
    return tiny_llama_config(
        96, hidden_size=hidden, intermediate_size=hidden + 32, num_hidden_layers=layers, max_position_embeddings=64
    )


def tiny_gpt2_config(vocab_size: int = 128, **overrides) -> GPT2Config:
    """GPT-2 of the tiny width and depth (64, 2 layers, 4 heads), 64 positions, Transformers' default token ids."""
    return GPT2Config(
        **{"vocab_size": vocab_size, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, **overrides}
    )


def gpt2_config(vocab_size: int = 128, **overrides) -> GPT2Config:
    """The tiny GPT-2 with ``tiny_tokenizer``'s special-token ids."""
    return tiny_gpt2_config(vocab_size, **{"bos_token_id": 2, "eos_token_id": 3, **overrides})


def tiny_bert_config(vocab_size: int = 128, **overrides) -> BertConfig:
    """BERT of the tiny shape (width 64, MLP 96, 2 layers, 4 heads); other fields are Transformers' defaults."""
    kwargs = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    return BertConfig(**{**kwargs, "vocab_size": vocab_size, **overrides})


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
