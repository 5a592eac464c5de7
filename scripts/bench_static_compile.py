#!/usr/bin/env python
"""Decode batch 1 of an llmint8 model: eager ``generate`` vs a static KV cache, eager and under ``torch.compile``.

Three ways to run greedy ``generate`` on the same model in one process (same prompt, same threads):

* ``eager``: transformers' default (a dynamic cache that grows each step);
* ``static``: ``cache_implementation="static"`` (the cache is allocated once for ``max_cache_len`` positions);
* ``static+compile``: the same with ``model.forward`` wrapped in ``torch.compile`` (inductor, ``dynamic=False``):
  the first ``generate`` pays the compile (reported as ``compile_s``: its time minus a steady-state run), later
  calls reuse the graph.

After one warm-up call per mode, the modes take turns for each of ``--repeats`` rounds (same load for all).

Decode tok/s is ``(new - 1) / (t(new) - t(1))`` (prefill subtracted), median of ``--repeats``; the generated tokens of
every mode are compared with eager's (greedy: they should match; a mismatch is reported, not hidden).

    python scripts/bench_static_compile.py --model smollm2
    python scripts/bench_static_compile.py --model qwen --new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MODES = ("eager", "static", "static+compile")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    spec, method = C.start_single_model_run(args)
    model = C.load_model(spec, method)
    tokenizer = C.load_tokenizer(spec)
    from eval_quality import read_text

    text, _ = read_text(args.text)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][: args.prompt_tokens]])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eager_forward = model.forward
    forwards = {m: torch.compile(eager_forward, dynamic=False) if m == "static+compile" else eager_forward
                for m in args.modes}  # fmt: skip

    def generate(mode: str, n: int) -> torch.Tensor:
        model.forward = forwards[mode]
        extra = {} if mode == "eager" else {"cache_implementation": "static"}
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=pad, **extra)  # fmt: skip

    results: dict[str, Any] = {}
    reference = None
    for mode in args.modes:  # first call of each mode: warm-up (and the compile)
        start = time.perf_counter()
        out = generate(mode, args.new_tokens)
        tokens = out[0, ids.shape[1] :].tolist()
        reference = reference if reference is not None else tokens
        results[mode] = {"first_generate_s": time.perf_counter() - start, "same_tokens_as_eager": tokens == reference}
    # Then the modes take turns, so a change of load on a shared machine hits them alike.
    one: dict[str, list[float]] = {m: [] for m in args.modes}
    full: dict[str, list[float]] = {m: [] for m in args.modes}
    for _ in range(args.repeats):
        for mode in args.modes:
            one[mode].append(_timed(lambda mode=mode: generate(mode, 1)))
            full[mode].append(_timed(lambda mode=mode: generate(mode, args.new_tokens)))
    for mode, row in results.items():
        t1, tn = statistics.median(one[mode]), statistics.median(full[mode])
        row["decode_tps"] = (args.new_tokens - 1) / (tn - t1) if tn > t1 else None
        row["generate_s"] = tn
        row["compile_s"] = row["first_generate_s"] - tn if mode == "static+compile" else None
        print(f"[bench_static_compile] {mode}: {row}", file=sys.stderr, flush=True)
    model.forward = eager_forward
    return {
        "meta": C.run_metadata(["scripts/bench_static_compile.py", *sys.argv[1:]]),
        "model": spec.label, "method": method.key, "threads": torch.get_num_threads(),
        "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "repeats": args.repeats, "modes": results,
    }  # fmt: skip


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def render(r: dict[str, Any]) -> str:
    eager = r["modes"].get("eager", {}).get("decode_tps")
    rows = []
    for mode, m in r["modes"].items():
        tps = m["decode_tps"]
        rows.append([mode, C.fmt(tps, ".2f"), C.fmt(tps / eager if tps and eager else None, ".2f"),
                     C.fmt(m["compile_s"], ".1f"), "yes" if m["same_tokens_as_eager"] else "NO"])  # fmt: skip
    return "\n".join([
        f"# Decode batch 1: eager vs static cache vs static cache + torch.compile ({r['model']}, {r['method']})",
        "",
        C.machine_markdown(r["meta"]),
        "",
        f"{r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, median of {r['repeats']}, "
        f"{r['threads']} threads.",
        "",
        C.markdown_table(["mode", "decode tok/s", "x eager", "compile s", "same tokens as eager"], rows),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, qwen or NAME=FOLDER (a causal LM)")
    parser.add_argument("--method", default="llmint8-t6", help="a method key of bench_e2e (default llmint8-t6)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES} (eager first: the reference)")
    parser.add_argument("--text", default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.prompt_tokens < 1:
        raise ValueError(
            f"need --new-tokens >= 2, --repeats >= 1, --prompt-tokens >= 1, got {args.new_tokens!r}, "
            f"{args.repeats!r}, {args.prompt_tokens!r}"
        )
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes) or args.modes[0] != "eager":
        raise ValueError(f"--modes must be a comma list of {MODES!r} starting with eager, got {args.modes!r}")
    result = run(args)
    if args.out:
        C.write_json(args.out, result)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
