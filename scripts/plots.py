#!/usr/bin/env python
"""PNG charts for the evaluation results (matplotlib, Agg backend: no display needed).

Called by ``eval_quality.py`` and ``bench_e2e.py`` at the end of a run; also redraws from a saved JSON::

    python scripts/plots.py docs/results/quality.json docs/results/bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "fp32": "#7f7f7f",
    "bf16": "#bcbd22",
    "llmint8": "#d62728",
    "naive": "#9467bd",
    "bnb": "#1f77b4",
    "torchao": "#2ca02c",
}
DPI = 110


def _family(method: str) -> str:
    base = method.split("@")[0]
    for prefix in ("llmint8", "naive", "bnb", "torchao"):
        if base.startswith(prefix):
            return prefix
    return base


def _color(method: str) -> str:
    return COLORS.get(_family(method), "#333333")


def _marker(method: str) -> str:
    base = method.split("@")[0]
    for suffix, marker in (("-t0", "s"), ("wo", "D"), ("dyn", "^")):
        if base.endswith(suffix):
            return marker
    return "o"


def _models(rows: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["model"] not in seen:
            seen.append(row["model"])
    return seen


def _failed_note(rows: list[dict[str, Any]]) -> str:
    failed = [r["method"] for r in rows if r.get("status") == "error"]
    skipped = [r["method"] for r in rows if r.get("status") == "not run"]
    notes = []
    if failed:
        notes.append(f"failed (see table): {', '.join(failed)}")
    if skipped:
        notes.append(f"not run: {', '.join(skipped)}")
    return "\n".join(notes)


def plot_quality(data: dict[str, Any], out_dir: Path, prefix: str = "quality") -> list[Path]:
    """Quality vs memory scatter per model, and the per-layer outlier column fractions; returns the PNG paths."""
    rows = data["results"]
    labels = data.get("model_labels", {})
    models = _models(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, len(models), figsize=(6.8 * len(models), 5.0), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mrows = [r for r in rows if r["model"] == model]
        ok = [r for r in mrows if r.get("status") == "ok" and "storage_bytes" in r]
        causal = any("perplexity" in r for r in ok)
        for r in ok:
            if causal:
                y = r.get("perplexity")
            else:
                # 1 - cosine; fp32 is the reference itself (0), which a log axis cannot show
                y = 1.0 - r["mean_cosine"] if "mean_cosine" in r and r["method"] != "fp32" else None
            if y is None:
                continue
            x = r["storage_bytes"] / 1e6
            ax.scatter(
                x,
                max(y, 1e-9),
                s=80,
                color=_color(r["method"]),
                marker=_marker(r["method"]),
                edgecolor="black",
                linewidth=0.6,
                zorder=3,
                label=f"{r['method']} ({x:.0f} MB, {y:.4g})",
            )
        ax.set_xlabel("model storage (MB, bytes actually held)")
        if causal:
            ax.set_ylabel("perplexity (lower is better)")
            ref = next((r for r in ok if r["method"] == "fp32"), None)
            if ref is not None:
                ax.axhline(ref["perplexity"], color=COLORS["fp32"], linestyle=":", linewidth=1)
        else:
            ax.set_ylabel("1 - cosine to fp32 embeddings (lower is better)")
            ax.set_yscale("log")
        ax.set_title(labels.get(model, model), fontsize=11)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
        note = _failed_note(mrows)
        if note:
            ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, color="#aa0000", va="bottom")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Quality vs memory: lower-left is better", fontsize=12)
    fig.tight_layout()
    path = out_dir / f"{prefix}_vs_memory.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    paths.append(path)

    outlier_rows = [r for r in rows if r.get("status") == "ok" and r.get("outliers", {}).get("per_layer")]
    if outlier_rows:
        fig, axes = plt.subplots(len(outlier_rows), 1, figsize=(11, 2.8 * len(outlier_rows)), squeeze=False)
        for ax, r in zip(axes[:, 0], outlier_rows, strict=True):
            layers = r["outliers"]["per_layer"]
            fractions = [100 * layer["column_fraction"] for layer in layers]
            ax.bar(range(len(layers)), fractions, color=_color(r["method"]), width=1.0)
            ax.set_ylabel("outlier columns (%)")
            ax.set_xlabel("Int8Linear layer (model order)")
            o = r["outliers"]
            ax.set_title(
                f"{labels.get(r['model'], r['model'])} {r['method']}: {o['layers_with_outliers']} of "
                f"{o['int8_layers']} layers route columns to the fp path; values: {100 * o['value_fraction']:.4f}%",
                fontsize=10,
            )
            ax.set_xlim(-0.5, len(layers) - 0.5)
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{prefix}_outliers.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


SPEED_METRICS = (
    ("prefill_tps", "prefill tokens/s"),
    ("decode_b1_tps", "decode tokens/s, batch 1"),
    ("decode_b8_tps", "decode tokens/s, batch 8"),
)
MEMORY_METRICS = (
    ("peak_rss_load_bytes", "peak RSS while loading"),
    ("footprint_bytes", "get_memory_footprint()"),
    ("storage_bytes", "storage held"),
)


def _barh(
    ax,
    rows: list[dict[str, Any]],
    key: str,
    title: str,
    ratio_to: dict[str, Any] | None,
    scale: float = 1.0,
    unit: str = "",
) -> None:
    shown = [r for r in rows if r.get("status") == "ok" and r.get(key) is not None]
    names = [r["method"] for r in shown]
    values = [r[key] / scale for r in shown]
    ax.barh(range(len(shown)), values, color=[_color(n) for n in names], edgecolor="black", linewidth=0.4)
    ax.set_yticks(range(len(shown)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    top = max(values, default=1.0)
    for i, (r, v) in enumerate(zip(shown, values, strict=True)):
        label = f"{v:.1f}{unit}"
        if ratio_to is not None and ratio_to.get(key):
            label += f"  ({r[key] / ratio_to[key]:.2f}x bf16)"
        ax.text(v + top * 0.01, i, label, va="center", fontsize=7)
    ax.set_xlim(0, top * 1.45 if top > 0 else 1)
    ax.grid(True, axis="x", alpha=0.3)


def plot_bench(data: dict[str, Any], out_dir: Path, prefix: str = "bench") -> list[Path]:
    """Speed bars (prefill, decode batch 1 and 8) and memory bars per model and method; returns the PNG paths."""
    rows = data["results"]
    labels = data.get("model_labels", {})
    models = _models(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    speed_models = [m for m in models if any(r.get("prefill_tps") for r in rows if r["model"] == m)]
    if speed_models:
        fig, axes = plt.subplots(
            len(speed_models), len(SPEED_METRICS), figsize=(5.2 * len(SPEED_METRICS), 0.45 * 10 + 1.2), squeeze=False
        )
        fig.set_figheight(
            max(3.2, 0.35 * max(len([r for r in rows if r["model"] == m]) for m in speed_models) + 1.5)
            * len(speed_models)
        )
        for row_axes, model in zip(axes, speed_models, strict=True):
            mrows = [r for r in rows if r["model"] == model]
            bf16 = next((r for r in mrows if r["method"] == "bf16" and r.get("status") == "ok"), None)
            for ax, (key, title) in zip(row_axes, SPEED_METRICS, strict=True):
                _barh(ax, mrows, key, f"{labels.get(model, model)}: {title}", bf16)
        fig.suptitle("Speed per method (higher is better)", fontsize=12)
        fig.tight_layout()
        path = out_dir / f"{prefix}_speed.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(len(models), len(MEMORY_METRICS), figsize=(5.2 * len(MEMORY_METRICS), 3.5), squeeze=False)
    fig.set_figheight(
        max(3.2, 0.35 * max(len([r for r in rows if r["model"] == m]) for m in models) + 1.5) * len(models)
    )
    for row_axes, model in zip(axes, models, strict=True):
        mrows = [r for r in rows if r["model"] == model]
        for ax, (key, title) in zip(row_axes, MEMORY_METRICS, strict=True):
            _barh(ax, mrows, key, f"{labels.get(model, model)}: {title} (MB)", None, scale=1e6)
            fp16 = data.get("fp16_checkpoint_bytes", {}).get(model)
            if fp16 and key == "peak_rss_load_bytes":
                ax.axvline(fp16 / 1e6, color="black", linestyle="--", linewidth=1)
                ax.text(fp16 / 1e6, -0.6, " fp16 checkpoint", fontsize=7, va="bottom")
    fig.suptitle("Memory per method (lower is better)", fontsize=12)
    fig.tight_layout()
    path = out_dir / f"{prefix}_memory.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    for name in argv:
        path = Path(name)
        data = json.loads(path.read_text())
        prefix = path.stem
        kind = data.get("kind") or (
            "bench" if any("prefill_tps" in r or "peak_rss_load_bytes" in r for r in data["results"]) else "quality"
        )
        drawn = plot_bench(data, path.parent, prefix) if kind == "bench" else plot_quality(data, path.parent, prefix)
        for p in drawn:
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
