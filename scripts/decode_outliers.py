"""How many outlier columns llmint8 layers see in a prefill and in each decoded token, per projection.

The native CPU kernels pick how the outlier product runs from the number of outlier columns (csrc/cpu/gemm.cpp); a
benchmark with the outlier fraction of a long prefill overstates what decoding sees, since a prefill's column set is
the union over all its tokens. This runs a greedy ``generate`` on real text and counts, for every ``Int8Linear``
call: with several rows, the outlier columns of the call (|x| >= threshold in any row); with one row (a decoded
token, batch 1), that token's outlier columns.

    python scripts/decode_outliers.py    # Qwen2.5-Coder-1.5B (python scripts/assets.py prepare --qwen)
    python scripts/decode_outliers.py --models smollm2 --new-tokens 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def collect(model, input_ids: torch.Tensor, new_tokens: int) -> dict[str, dict]:
    """Outlier-column counts per projection name (the module name's last part), from prefill and decode calls."""
    from hf_int8.analysis import record_outlier_stats

    with record_outlier_stats(model) as (calls, _), torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    if not calls:
        raise ValueError("the model has no Int8Linear layer (was it loaded with Int8Config?)")
    stats: dict[str, dict] = defaultdict(lambda: {"in_features": 0, "prefill": [], "decode": []})
    for call in calls:
        entry = stats[call.name.split(".")[-1]]
        entry["in_features"] = call.in_features
        entry["decode" if call.tokens == 1 else "prefill"].append(call.outlier_columns)
    return dict(stats)


def summarize(stats: dict[str, dict]) -> list[dict]:
    rows = []
    for name, entry in stats.items():
        k, prefill, decode = entry["in_features"], entry["prefill"], entry["decode"]
        rows.append(
            {
                "projection": name,
                "in_features": k,
                "layers_x_calls_prefill": len(prefill),
                "prefill_mean": statistics.fmean(prefill) if prefill else None,
                "decode_calls": len(decode),
                "decode_median": statistics.median(decode) if decode else None,
                "decode_p90": percentile(decode, 0.9) if decode else None,
                "decode_max": max(decode) if decode else None,
                "decode_mean_fraction": statistics.fmean(decode) / k if decode and k else None,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    head = [
        "projection",
        "K",
        "prefill: outlier columns (mean over layers)",
        "decode: per token, median",
        "p90",
        "max",
        "mean % of K",
    ]
    body = [
        [
            r["projection"],
            r["in_features"],
            C.fmt(r["prefill_mean"], ".1f"),
            C.fmt(r["decode_median"], "g"),
            C.fmt(r["decode_p90"], "d"),
            C.fmt(r["decode_max"], "d"),
            C.fmt(None if r["decode_mean_fraction"] is None else 100 * r["decode_mean_fraction"], ".2f"),
        ]
        for r in rows
    ]
    return C.markdown_table(head, body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen", help="one model: a known name or NAME=FOLDER[:causal]")
    p.add_argument("--method", default="llmint8-t6", help="an llmint8 method (default llmint8-t6)")
    p.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES))
    p.add_argument("--text", default=None, help="text file for the prompt (default: lee_background.cor)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    for name in ("prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.quiet_library_warnings()
    specs = C.parse_models(args.models)
    if len(specs) != 1 or specs[0].kind != "causal":
        raise ValueError(f"--models must name one causal LM, got {args.models!r}")
    methods = C.parse_methods(args.method, args.dtype)
    if len(methods) != 1 or methods[0].family != "llmint8":
        raise ValueError(f"--method must be one llmint8 method, got {args.method!r}")
    from eval_quality import read_text

    text, text_name = read_text(args.text)
    spec, method = specs[0], methods[0]
    tokenizer = C.load_tokenizer(spec)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < args.prompt_tokens:
        raise ValueError(f"the text has {len(ids)} tokens; --prompt-tokens asks for {args.prompt_tokens}")
    input_ids = torch.tensor([ids[: args.prompt_tokens]])
    model = C.load_model(spec, method)
    rows = summarize(collect(model, input_ids, args.new_tokens))
    print(
        f"# Outlier columns per llmint8 layer call: {spec.name}, {method.key}\n\n"
        f"- command: `python scripts/decode_outliers.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n"
        f"- prompt: the first {args.prompt_tokens} tokens of {text_name}; greedy decode of {args.new_tokens} "
        f"tokens, batch 1\n\n" + markdown(rows)
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": spec.name,
                    "method": method.key,
                    "text": text_name,
                    "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
