"""Outlier statistics of an llmint8 model's int8 layers: how often activations cross the outlier threshold.

Used by ``hf-int8 inspect`` and ``scripts/decode_outliers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .nn import Int8Linear


@dataclass
class LayerStats:
    """Activation statistics of one int8 layer's input on the sample text."""

    name: str
    in_features: int
    tokens: int
    threshold: float
    outlier_columns: int
    outlier_values: int
    max_abs: float

    @property
    def column_fraction(self) -> float:
        return self.outlier_columns / self.in_features

    @property
    def value_fraction(self) -> float:
        return self.outlier_values / max(1, self.tokens * self.in_features)


@contextmanager
def record_outlier_stats(model: nn.Module) -> Iterator[tuple[list[LayerStats], list[Any]]]:
    """While inside, every :class:`Int8Linear` call of ``model`` appends the :class:`LayerStats` of its input (one
    record per call: a prefill forward gives one per layer, each decoded token one more) and its column maxima."""
    stats: list[LayerStats] = []
    column_max: list[Any] = []
    hooks = []

    def hook_for(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, module.in_features).float().abs()
            col = x.amax(dim=0) if x.shape[0] else x.new_zeros(module.in_features)
            thr = module.threshold
            outlier_cols = int((col >= thr).sum()) if thr > 0 else 0
            outlier_vals = int((x >= thr).sum()) if thr > 0 else 0
            stats.append(
                LayerStats(
                    name,
                    module.in_features,
                    x.shape[0],
                    thr,
                    outlier_cols,
                    outlier_vals,
                    float(col.max()) if col.numel() else 0.0,
                )
            )
            column_max.append(col)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            hooks.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        yield stats, column_max
    finally:
        for handle in hooks:
            handle.remove()


def collect_outlier_stats(model: nn.Module, input_ids: Any) -> tuple[list[LayerStats], list[float]]:
    """Run ``model`` on ``input_ids`` and record each :class:`Int8Linear` input: per-layer stats, column maxima."""
    import torch

    inputs = {"input_ids": input_ids}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = input_ids  # run the decoder's int8 layers on the same text
    with record_outlier_stats(model) as (stats, column_max), torch.inference_mode():
        model(**inputs)
    values = torch.cat(column_max).tolist() if column_max else []
    return stats, values


def write_histogram(path: Path, stats: list[LayerStats], column_max: list[float], title: str) -> None:
    """PNG: histogram of per-column max |x| (log scale) with the threshold, and outlier columns per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray([v for v in column_max if v > 0], dtype=np.float64)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), constrained_layout=True)
    if values.size:
        bins = np.logspace(np.log10(values.min()), np.log10(values.max() * 1.001), 60)
        top.hist(values, bins=bins, color="#4C72B0")
    top.set_xscale("log")
    top.set_yscale("log")
    thresholds = sorted({s.threshold for s in stats if s.threshold > 0})
    for thr in thresholds:
        top.axvline(thr, color="#C44E52", linestyle="--", label=f"threshold {thr:g}")
    if thresholds:
        top.legend()
    top.set_xlabel("max |activation| of an input column over the sample text")
    top.set_ylabel("columns (all int8 layers)")
    top.set_title(title)
    bottom.bar(range(len(stats)), [100 * s.column_fraction for s in stats], color="#DD8452")
    bottom.set_xlabel("int8 layer (model order)")
    bottom.set_ylabel("outlier columns (%)")
    bottom.set_xlim(-0.5, max(len(stats), 1) - 0.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
