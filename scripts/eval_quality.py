#!/usr/bin/env python
"""Fidelity of llmint8 next to the alternatives, on real models and real text.

For each model and method (each in a fresh subprocess):

* causal LMs (SmolLM2-135M, Qwen2.5-Coder-1.5B): perplexity on a text file (default ``lee_background.cor``) with
  :func:`hf_int8.metrics.perplexity_details` (first ``--max-tokens`` tokens, non-overlapping ``--window`` windows,
  batch 1);
* encoders (all-MiniLM-L6-v2): cosine similarity of mean-pooled sentence embeddings to the fp32 model's, on fixed
  sentences taken from the same text;
* for llmint8 with a threshold > 0: the fraction of activation values and of activation columns that took the
  outlier path, per ``Int8Linear`` (forward pre-hooks applying the layer's own threshold).

Writes ``<out-dir>/<prefix>.json``, ``<prefix>.md`` and PNG charts, and prints the markdown. A method that fails
to load or run gets its error string in the table instead of stopping the run.

    python scripts/eval_quality.py                                   # all models, all methods
    python scripts/eval_quality.py --models smollm2 --methods fp32,llmint8-t6,bnb-t6
    python scripts/eval_quality.py --models qwen --max-tokens 2048   # trimmed text (said so in the output)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SCRIPT = Path(__file__).resolve()
DEFAULT_METHODS = "fp32,bf16,llmint8-t6,llmint8-t0,naive-int8,bnb-t6,bnb-t0,torchao-int8wo,torchao-int8dyn"
NUM_SENTENCES = 64
ENCODER_BATCH = 16
ENCODER_MAX_LENGTH = 128


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
def read_text(path: str | None) -> tuple[str, str]:
    """The evaluation text and its name: ``path``'s contents, or ``lee_background.cor`` from scripts/assets.py."""
    if path is None:
        import assets

        return assets.lee_background_text(), "lee_background.cor"
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--text must be an existing text file, got {path!r}")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--text file {path!r} is empty")
    return text, file.name


def fixed_sentences(text: str, count: int = NUM_SENTENCES, min_words: int = 6) -> list[str]:
    """The first ``count`` sentences of ``text`` with at least ``min_words`` words (deterministic)."""
    sentences = []
    for line in text.splitlines():
        for sentence in re.split(r"(?<=[.!?])\s+", line.strip()):
            if len(sentence.split()) >= min_words:
                sentences.append(sentence)
                if len(sentences) == count:
                    return sentences
    if not sentences:
        raise ValueError(f"the text holds no sentence of {min_words}+ words")
    return sentences


# ---------------------------------------------------------------------------------------------------------------
# Outlier statistics
# ---------------------------------------------------------------------------------------------------------------
class OutlierStats:
    """Counts, per ``Int8Linear``, the activation values and columns at or above the layer's threshold."""

    def __init__(self, model) -> None:
        from hf_int8 import Int8Linear

        self.layers: dict[str, dict[str, float]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, Int8Linear) and module.threshold > 0:
                self.layers[name] = {
                    "values": 0,
                    "outlier_values": 0,
                    "columns": 0,
                    "outlier_columns": 0,
                    "forwards": 0,
                    "max_abs": 0.0,
                    "threshold": module.threshold,
                }
                self.handles.append(module.register_forward_pre_hook(self._hook(name, module.threshold)))

    def _hook(self, name: str, threshold: float):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            big = x.abs() >= threshold
            row = self.layers[name]
            row["values"] += x.numel()
            row["outlier_values"] += int(big.sum())
            row["columns"] += x.shape[1]
            row["outlier_columns"] += int(big.any(dim=0).sum())
            row["forwards"] += 1
            if x.numel():
                row["max_abs"] = max(row["max_abs"], float(x.abs().max()))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def summary(self) -> dict[str, Any]:
        per_layer = []
        for name, row in self.layers.items():
            per_layer.append(
                {
                    "layer": name,
                    "value_fraction": row["outlier_values"] / row["values"] if row["values"] else 0.0,
                    "column_fraction": row["outlier_columns"] / row["columns"] if row["columns"] else 0.0,
                    "max_abs": row["max_abs"],
                    "forwards": row["forwards"],
                }
            )
        values = sum(r["values"] for r in self.layers.values())
        outlier_values = sum(r["outlier_values"] for r in self.layers.values())
        with_outliers = [r for r in per_layer if r["column_fraction"] > 0]
        worst = max(per_layer, key=lambda r: r["column_fraction"], default=None)
        col_fracs = sorted(r["column_fraction"] for r in per_layer)
        return {
            "threshold": next(iter(self.layers.values()))["threshold"] if self.layers else None,
            "int8_layers": len(per_layer),
            "layers_with_outliers": len(with_outliers),
            "value_fraction": outlier_values / values if values else 0.0,
            "mean_column_fraction": sum(col_fracs) / len(col_fracs) if col_fracs else 0.0,
            "median_column_fraction": col_fracs[len(col_fracs) // 2] if col_fracs else 0.0,
            "max_column_fraction": worst["column_fraction"] if worst else 0.0,
            "max_column_fraction_layer": worst["layer"] if worst else None,
            "max_abs": max((r["max_abs"] for r in per_layer), default=0.0),
            "per_layer": per_layer,
        }


# ---------------------------------------------------------------------------------------------------------------
# Worker: one (model, method) in a fresh process
# ---------------------------------------------------------------------------------------------------------------
def _mean_pooled_embeddings(model, tokenizer, sentences: list[str]):
    import torch

    chunks = []
    with torch.inference_mode():
        for start in range(0, len(sentences), ENCODER_BATCH):
            batch = tokenizer(
                sentences[start : start + ENCODER_BATCH],
                padding=True,
                truncation=True,
                max_length=ENCODER_MAX_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            chunks.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(chunks)


def _outlier_stats(model, method, job: dict[str, Any]) -> OutlierStats | None:
    """Hooks for llmint8 with an outlier path (threshold > 0); ``None`` otherwise or with --no-outlier-stats."""
    if method.family != "llmint8" or not method.threshold or job["no_outlier_stats"]:
        return None
    return OutlierStats(model)


def worker(job: dict[str, Any]) -> dict[str, Any]:
    C.quiet_library_warnings()
    C.seed_everything()
    spec = C.parse_models(job["model_arg"])[0]
    method = C.parse_methods(job["method"], "fp32")[0]
    result: dict[str, Any] = {"model": spec.name, "method": method.key, "dtype": method.dtype, "status": "ok"}
    try:
        start = time.perf_counter()
        model = C.load_model(spec, method)
        result["load_s"] = round(time.perf_counter() - start, 2)
        result["footprint_bytes"] = int(model.get_memory_footprint())
        result["storage_bytes"] = C.storage_bytes(model)
        tokenizer = C.load_tokenizer(spec)
        text, _ = read_text(job["text"])
        start = time.perf_counter()
        if spec.kind == "causal":
            from hf_int8.metrics import perplexity_details

            stats = _outlier_stats(model, method, job)
            details = perplexity_details(
                model, tokenizer, text, max_tokens=job["max_tokens"], window=job["window"], progress=True
            )
            if stats is not None:
                stats.remove()
                result["outliers"] = stats.summary()
            result.update(
                perplexity=details.perplexity,
                nll_sum=details.nll_sum,
                num_predicted=details.num_predicted,
                num_tokens=details.num_tokens,
                num_windows=details.num_windows,
                window_nll_sums=list(details.window_nll_sums),
                window_num_predicted=list(details.window_num_predicted),
            )
        else:
            stats = _outlier_stats(model, method, job)
            embeddings = _mean_pooled_embeddings(model, tokenizer, fixed_sentences(text, job["sentences"]))
            if stats is not None:
                stats.remove()
                result["outliers"] = stats.summary()
            result["embeddings"] = embeddings.tolist()
        result["eval_s"] = round(time.perf_counter() - start, 2)
        result["kernels"] = C.kernels_in_use()
    except Exception as exc:  # recorded in the table, per the issue: a method that cannot run is reported, not fatal
        result.update(status="error", error=C.error_string(exc))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Parent: schedule jobs, aggregate, write outputs
# ---------------------------------------------------------------------------------------------------------------
def _cosines(embeddings: list[list[float]], reference: list[list[float]]) -> dict[str, float]:
    import torch

    a, b = torch.tensor(embeddings, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "num_sentences": int(cos.numel())}


def finalize(rows: list[dict[str, Any]]) -> None:
    """Add deltas against fp32 (perplexity, storage) and cosines (encoders) to ``rows`` in place."""
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["method"]] = row
    for methods in by_model.values():
        ref = methods.get("fp32")
        for row in methods.values():
            if row.get("status") != "ok" or ref is None or ref.get("status") != "ok":
                continue
            if "perplexity" in row:
                row["ppl_delta_pct"] = 100.0 * (row["perplexity"] / ref["perplexity"] - 1.0)
            if "embeddings" in row:
                row.update(_cosines(row["embeddings"], ref["embeddings"]))
            row["storage_vs_fp32"] = row["storage_bytes"] / ref["storage_bytes"]


def fidelity_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's fidelity targets, evaluated on whatever was measured: llmint8 t=6 vs bnb t=6, naive, t=0."""
    checks = []
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            by_model.setdefault(row["model"], {})[row["method"].split("@")[0]] = row
    for model, methods in by_model.items():
        ours = methods.get("llmint8-t6")
        if ours is None:
            continue
        metric = "perplexity" if "perplexity" in ours else "mean_cosine"
        if metric not in ours:
            continue
        better = (lambda a, b: a <= b) if metric == "perplexity" else (lambda a, b: a >= b)
        for other, label in (
            ("bnb-t6", "no worse than bitsandbytes t=6"),
            ("naive-int8", "better than naive int8"),
            ("llmint8-t0", "better than llmint8 t=0"),
        ):
            if other in methods and metric in methods[other]:
                a, b = ours[metric], methods[other][metric]
                check = {
                    "model": model,
                    "target": f"llmint8 t=6 {label}",
                    "metric": metric,
                    "llmint8_t6": a,
                    "other": b,
                    "pass": bool(better(a, b)),
                }
                check.update(paired_window_difference(ours, methods[other]))
                checks.append(check)
    return checks


def paired_window_difference(ours: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """How far apart two perplexity rows are next to the spread of their per-window differences.

    ``delta_log_ppl`` is ``log(ppl_ours / ppl_other)`` (the mean per-token NLL difference); ``delta_se`` the standard
    error of the per-window, per-token NLL differences (same windows, same tokens for both methods), so a gap of one
    or two SE is what re-drawing the text would move. Empty when the rows carry no per-window sums (older results,
    encoders) or were measured on different windows.
    """
    wa, wb = ours.get("window_nll_sums"), other.get("window_nll_sums")
    na, nb = ours.get("window_num_predicted"), other.get("window_num_predicted")
    if not wa or not wb or na != nb or len(wa) != len(wb) or len(wa) < 2:
        return {}
    per_token = [(x - y) / n for x, y, n in zip(wa, wb, na, strict=True)]
    mean = sum(per_token) / len(per_token)
    variance = sum((d - mean) ** 2 for d in per_token) / (len(per_token) - 1)
    delta = (math.fsum(wa) - math.fsum(wb)) / sum(na)
    return {
        "delta_log_ppl": delta,
        "delta_se": math.sqrt(variance / len(per_token)),
        "windows_worse": sum(d > 0 for d in per_token),
        "num_windows": len(per_token),
    }


def _failure(row: dict[str, Any]) -> str:
    return "not run" if row.get("status") == "not run" else f"error: {row.get('error')}"


def render_markdown(data: dict[str, Any]) -> str:
    meta, rows = data["meta"], data["results"]
    settings = data["settings"]
    out = [
        "# Quality: llmint8 vs the alternatives\n",
        f"Command: `{meta['command']}`\n",
        C.machine_markdown(meta),
        "",
        C.kernels_markdown(meta["kernels"]),
        "",
    ]
    models = []
    for row in rows:
        if row["model"] not in models:
            models.append(row["model"])
    for model in models:
        mrows = [r for r in rows if r["model"] == model]
        label = data["model_labels"].get(model, model)
        causal = any("perplexity" in r or r.get("kind") == "causal" for r in mrows)
        if causal:
            mt = settings["max_tokens"].get(model)
            first = next((r for r in mrows if "num_tokens" in r), {})
            trimmed = "" if mt == 8192 else f" (trimmed with --max-tokens: {mt}, not the default 8192)"
            out.append(
                f"## {label}: perplexity on {settings['text_name']}, first {first.get('num_tokens', mt)} tokens"
                f"{trimmed}, {settings['window']}-token windows, batch 1\n"
            )
            headers = [
                "method",
                "dtype",
                "perplexity",
                "vs fp32",
                "footprint MB",
                "storage MB",
                "storage vs fp32",
                "eval s",
                "llmint8 kernel",
            ]
            table = []
            for r in mrows:
                if r.get("status") != "ok":
                    table.append([r["method"], r.get("dtype", ""), _failure(r), "", "", "", "", "", ""])
                    continue
                table.append(
                    [
                        r["method"] + ("*" if r.get("measured_in") else ""),
                        r["dtype"],
                        C.fmt(r.get("perplexity"), ".3f"),
                        C.fmt(r.get("ppl_delta_pct"), "+.2f") + ("%" if "ppl_delta_pct" in r else ""),
                        C.fmt(r["footprint_bytes"] / C.MB, ".1f"),
                        C.fmt(r["storage_bytes"] / C.MB, ".1f"),
                        C.fmt(r.get("storage_vs_fp32"), ".3f"),
                        C.fmt(r.get("eval_s"), ".1f"),
                        C.row_kernel(r),
                    ]
                )
        else:
            out.append(
                f"## {label}: cosine similarity to fp32 of mean-pooled embeddings of "
                f"{settings['sentences']} fixed sentences of {settings['text_name']}\n"
            )
            headers = [
                "method",
                "dtype",
                "mean cosine",
                "min cosine",
                "footprint MB",
                "storage MB",
                "storage vs fp32",
                "eval s",
                "llmint8 kernel",
            ]
            table = []
            for r in mrows:
                if r.get("status") != "ok":
                    table.append([r["method"], r.get("dtype", ""), _failure(r), "", "", "", "", "", ""])
                    continue
                table.append(
                    [
                        r["method"] + ("*" if r.get("measured_in") else ""),
                        r["dtype"],
                        C.fmt(r.get("mean_cosine"), ".6f"),
                        C.fmt(r.get("min_cosine"), ".6f"),
                        C.fmt(r["footprint_bytes"] / C.MB, ".1f"),
                        C.fmt(r["storage_bytes"] / C.MB, ".1f"),
                        C.fmt(r.get("storage_vs_fp32"), ".3f"),
                        C.fmt(r.get("eval_s"), ".1f"),
                        C.row_kernel(r),
                    ]
                )
        out += [C.markdown_table(headers, table), ""]
    sources = []
    for r in rows:
        if r.get("measured_in") and r["measured_in"] not in sources:
            sources.append(r["measured_in"])
    for source in sources:
        out.append(
            f"\\* measured in an earlier run on the same text slice: `{source['command']}` "
            f"({source['date_utc']} UTC)\n"
        )
    out.append(
        "footprint = `model.get_memory_footprint()` (counts torchao's tensor subclasses at their outer dtype); "
        "storage = bytes actually held by parameters and buffers (inner tensors of subclasses, bitsandbytes' "
        "SCB included).\n"
    )
    outlier_rows = [r for r in rows if r.get("status") == "ok" and r.get("outliers")]
    if outlier_rows:
        out.append("## Outlier path (llmint8, per Int8Linear, the layer's own threshold)\n")
        headers = [
            "model",
            "method",
            "int8 layers",
            "layers with outliers",
            "outlier values",
            "mean column fraction",
            "max column fraction (layer)",
            "max abs activation",
        ]
        table = []
        for r in outlier_rows:
            o = r["outliers"]
            worst = f" ({o['max_column_fraction_layer']})" if o["max_column_fraction"] > 0 else ""
            table.append(
                [
                    r["model"],
                    r["method"],
                    o["int8_layers"],
                    o["layers_with_outliers"],
                    f"{100 * o['value_fraction']:.4f}%",
                    f"{100 * o['mean_column_fraction']:.3f}%",
                    f"{100 * o['max_column_fraction']:.2f}%{worst}",
                    f"{o['max_abs']:.1f}",
                ]
            )
        out += [
            C.markdown_table(headers, table),
            "",
            "Column fraction: share of a layer's input columns holding any |x| >= threshold in a forward pass "
            "(one window / batch), averaged over passes; these columns go through the floating-point matmul.",
            "",
        ]
    if data["checks"]:
        out.append("## Fidelity targets\n")
        digits = {"perplexity": ".3f", "mean_cosine": ".6f"}
        table = [
            [
                c["model"],
                c["target"],
                c["metric"],
                format(c["llmint8_t6"], digits[c["metric"]]),
                format(c["other"], digits[c["metric"]]),
                _paired_cell(c),
                "PASS" if c["pass"] else "FAIL",
            ]
            for c in data["checks"]
        ]
        out += [
            C.markdown_table(
                ["model", "target", "metric", "llmint8 t=6", "other", "Δ log-ppl ± SE (windows worse)", "result"],
                table,
            ),
            "",
        ]
        if any("delta_se" in c for c in data["checks"]):
            out += [
                "Δ log-ppl = log(ppl llmint8 t=6 / ppl other); SE = standard error of the per-window, per-token "
                "NLL differences (same windows for both); windows worse = windows where llmint8 t=6 had the "
                "higher NLL. PASS/FAIL compares the perplexities as measured, whatever the SE.",
                "",
            ]
    if data.get("charts"):
        out.append("Charts: " + ", ".join(f"`{p}`" for p in data["charts"]) + "\n")
    return "\n".join(out)


def _paired_cell(check: dict[str, Any]) -> str:
    if "delta_se" not in check:
        return ""
    return f"{check['delta_log_ppl']:+.5f} ± {check['delta_se']:.5f} ({check['windows_worse']}/{check['num_windows']})"


def load_previous(files: list[Path], settings: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Successful rows of earlier runs measured on the same text slice, to reuse instead of re-running.

    Encoder rows are reused only when every selected method of that model is (their cosines were computed against
    the fp32 embeddings of the run they came from; a new row would need this run's).
    """
    previous: dict[tuple[str, str], dict[str, Any]] = {}
    for file in files:
        if not Path(file).is_file():
            raise ValueError(f"--resume-from must name an existing results JSON, got {str(file)!r}")
        old = json.loads(Path(file).read_text())
        same_text = (
            old["settings"]["text_sha256"] == settings["text_sha256"]
            and old["settings"]["window"] == settings["window"]
        )
        for row in old.get("results", []):
            if "perplexity" in row:
                same = same_text and old["settings"]["max_tokens"].get(row["model"]) == settings["max_tokens"].get(
                    row["model"]
                )
            else:
                same = same_text and old["settings"]["sentences"] == settings["sentences"]
            if same and row.get("status") == "ok" and ("perplexity" in row or "mean_cosine" in row):
                source = row.get("measured_in") or {
                    "command": old["meta"]["command"],
                    "date_utc": old["meta"]["date_utc"],
                }
                previous[(row["model"], row["method"])] = {**row, "measured_in": source}
    return previous


def parse_max_tokens(default: int, overrides: list[str]) -> dict[str, int]:
    per_model: dict[str, int] = {"*": default}
    for item in overrides:
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 2:
            raise ValueError(f"--max-tokens-for takes MODEL=N with N >= 2, got {item!r}")
        per_model[name] = int(value)
    return per_model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        job = json.loads(Path(argv[1]).read_text())
        C.write_json(Path(job["result_file"]), worker(job))
        return 0
    if argv[:1] == ["--render"]:  # redraw markdown and charts of a saved run, measuring nothing
        path = Path(argv[1])
        data = json.loads(path.read_text())
        _write_outputs(data, argparse.Namespace(out_dir=path.parent, prefix=path.stem, no_plots=False), final=True)
        print(render_markdown(data))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--models",
        default="smollm2,qwen,minilm",
        help="comma list of smollm2, qwen, minilm or NAME=FOLDER[:causal|encoder]",
    )
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma list of {', '.join(C.BASE_METHODS)}; KEY@bf16 picks a dtype (default: --dtype)",
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(C.DTYPES),
        help="dtype the quantized methods load and compute in (fp32: the bitsandbytes anchor's)",
    )
    parser.add_argument("--text", default=None, help="text file (default: lee_background.cor from scripts/assets.py)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="perplexity on the first N tokens")
    parser.add_argument(
        "--max-tokens-for",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="per-model override of --max-tokens, e.g. qwen=2048 (repeatable)",
    )
    parser.add_argument("--window", type=int, default=512, help="perplexity window (tokens, non-overlapping)")
    parser.add_argument("--sentences", type=int, default=NUM_SENTENCES, help="sentences embedded for encoders")
    parser.add_argument("--no-outlier-stats", action="store_true", help="skip the outlier-path hooks")
    parser.add_argument("--out-dir", type=Path, default=C.RESULTS_DIR)
    parser.add_argument("--prefix", default="quality", help="output file names: PREFIX.json, PREFIX.md, PREFIX_*.png")
    parser.add_argument(
        "--resume", action="store_true", help="keep successful rows of an existing PREFIX.json (same text slice)"
    )
    parser.add_argument(
        "--resume-from",
        action="append",
        default=[],
        type=Path,
        metavar="JSON",
        help="also keep successful rows of this earlier results file (repeatable)",
    )
    parser.add_argument(
        "--only-resumed",
        action="store_true",
        help="measure nothing new: combine the --resume-from rows, listing the rest as not run",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per (model, method) job")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every job in this process (smoke tests; no isolation, memory figures shared)",
    )
    args = parser.parse_args(argv)

    models = C.parse_models(args.models)
    methods = C.parse_methods(args.methods, args.dtype)
    if "fp32" not in [m.key for m in methods]:  # every delta and cosine is against fp32
        methods = C.parse_methods("fp32", args.dtype) + methods
    max_tokens = parse_max_tokens(args.max_tokens, args.max_tokens_for)
    text, text_name = read_text(args.text)
    C.seed_everything()
    settings = {
        "text_name": text_name,
        "text_sha256": C.sha256_text(text),
        "window": args.window,
        "sentences": args.sentences,
        "max_tokens": {m.name: max_tokens.get(m.name, max_tokens["*"]) for m in models},
        "dtype": args.dtype,
    }
    resume_files = list(args.resume_from)
    if args.resume and (args.out_dir / f"{args.prefix}.json").is_file():
        resume_files.append(args.out_dir / f"{args.prefix}.json")
    previous = load_previous(resume_files, settings)

    data: dict[str, Any] = {
        "meta": C.run_metadata(["scripts/eval_quality.py", *argv]),
        "settings": settings,
        "model_labels": {m.name: m.label for m in models},
        "results": [],
        "checks": [],
        "charts": [],
    }
    from tqdm.auto import tqdm

    jobs = [(m, meth) for m in models for meth in methods]
    bar = tqdm(jobs, desc="quality jobs", unit="job")
    for spec, method in bar:
        bar.set_postfix_str(f"{spec.name} {method.key}")
        key = (spec.name, method.key)
        if key in previous and (spec.kind == "causal" or all((spec.name, m.key) in previous for m in methods)):
            row = dict(previous[key])
        elif args.only_resumed:
            row = {
                "model": spec.name,
                "method": method.key,
                "dtype": method.dtype,
                "status": "not run",
                "error": "not measured in this evaluation (--only-resumed: no earlier result)",
            }
        else:
            model_arg = C.model_arg(spec)
            job = {
                "model_arg": model_arg,
                "method": method.key,
                "text": args.text,
                "max_tokens": settings["max_tokens"][spec.name],
                "window": args.window,
                "sentences": args.sentences,
                "no_outlier_stats": args.no_outlier_stats,
                "env": method.worker_env,
            }
            row = C.run_worker(SCRIPT, job, args.timeout, worker if args.in_process else None)
            row.setdefault("model", spec.name)
            row.setdefault("method", method.key)
            row.setdefault("dtype", method.dtype)
        row["kind"] = spec.kind
        data["results"].append(row)
        summary = row.get("perplexity", row.get("error", "embeddings" if "embeddings" in row else "?"))
        tqdm.write(f"[eval_quality] {spec.name} {method.key}: {summary}")
        _write_outputs(data, args, final=False)
    _write_outputs(data, args, final=True)
    print(render_markdown(data))
    return 0


def _write_outputs(data: dict[str, Any], args, final: bool) -> None:
    """Write JSON (without the raw embeddings) and markdown; charts at the end."""
    rows = data["results"]
    for row in rows:
        row.pop("ppl_delta_pct", None)
    finalize(rows)
    data["checks"] = fidelity_checks(rows)
    if final and not args.no_plots:
        import plots

        data["charts"] = [
            str(p.relative_to(C.REPO) if p.is_relative_to(C.REPO) else p)
            for p in plots.plot_quality(data, args.out_dir, args.prefix)
        ]
    public = {**data, "results": [{k: v for k, v in r.items() if k != "embeddings"} for r in rows]}
    C.write_json(args.out_dir / f"{args.prefix}.json", public)
    (args.out_dir / f"{args.prefix}.md").write_text(render_markdown(public) + "\n")


if __name__ == "__main__":
    sys.exit(main())
