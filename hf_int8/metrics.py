"""Quality metrics on real text, shared by the tests, the demo and the evaluation scripts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and the counts it was computed from (``perplexity == exp(nll_sum / num_predicted)``)."""

    perplexity: float
    nll_sum: float
    num_predicted: int
    num_tokens: int
    num_windows: int
    window_nll_sums: tuple[float, ...] = ()
    """Negative log-likelihood summed over each window, in order (for paired, per-window comparisons of methods)."""
    window_num_predicted: tuple[int, ...] = ()
    """Tokens predicted in each window (``window`` - 1, except perhaps the last)."""

    def __float__(self) -> float:
        return self.perplexity


def tokenize_for_perplexity(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[n]`` of ``text`` as :func:`perplexity` uses them: no special tokens added, first ``max_tokens``."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string, got {text!r:.80}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"max_tokens must be an integer >= 2 or None, got {max_tokens!r}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


@torch.inference_mode()
def perplexity_details(
    model: nn.Module,
    tokenizer,
    text: str,
    max_tokens: int | None = 8192,
    window: int = 512,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``text``; see :func:`perplexity` for the exact protocol."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")
    ids = tokenize_for_perplexity(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise ValueError(f"text has {ids.numel()} token(s); perplexity needs at least 2")
    windows = [ids[start : start + window] for start in range(0, ids.numel(), window)]
    windows = [w for w in windows if w.numel() >= 2]  # a 1-token tail predicts nothing
    device = next(model.parameters()).device
    iterator = windows
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(windows, desc=f"perplexity ({window}-token windows)", unit="window")
    window_nll: list[float] = []
    window_predicted: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for chunk in iterator:
            input_ids = chunk.unsqueeze(0).to(device)
            logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1]
            targets = input_ids[0, 1:]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            window_nll.append(float(-log_probs.gather(1, targets.unsqueeze(1)).sum()))
            window_predicted.append(targets.numel())
    finally:
        model.train(was_training)
    nll_sum, predicted = math.fsum(window_nll), sum(window_predicted)
    return PerplexityResult(
        math.exp(nll_sum / predicted),
        nll_sum,
        predicted,
        int(ids.numel()),
        len(windows),
        tuple(window_nll),
        tuple(window_predicted),
    )


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    max_tokens: int | None = 8192,
    window: int = 512,
    progress: bool = False,
) -> float:
    """Perplexity of a causal LM on the first ``max_tokens`` tokens of ``text``, in non-overlapping windows.

    Protocol (deterministic; the one behind "fp32 SmolLM2: 29.1 on the first 8k tokens of lee_background.cor"):

    1. tokenize the whole ``text`` once, without special tokens (no BOS/EOS), and keep the first ``max_tokens`` ids
       (all of them if ``None``);
    2. cut them into consecutive, non-overlapping windows of ``window`` tokens (the last one may be shorter; a
       1-token tail is dropped);
    3. run each window on its own, batch size 1, no cache and no context carried over from the previous window; every
       token but the window's first is predicted from the tokens before it *in that window*;
    4. perplexity = ``exp(sum of the negative log-likelihoods / number of predicted tokens)``, the log-softmax taken in
       float64 over the model's logits.

    With 8192 tokens and 512-token windows that is 16 windows and 16 * 511 = 8176 predicted tokens. Batch size 1 is
    part of the protocol for LLM.int8(): outlier columns are detected over all tokens of a forward pass.
    """
    return perplexity_details(model, tokenizer, text, max_tokens, window, progress).perplexity
