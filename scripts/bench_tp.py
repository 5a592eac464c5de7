#!/usr/bin/env python
"""llmint8 with tensor parallelism on the CPU: 2 processes x 1 thread (``torchrun``, gloo) against 1 process x 2
threads, in the same run, on the same checkpoint.

For each configuration, in a fresh worker (``torchrun --standalone --nproc-per-node 2`` for the tensor-parallel one):

* loading: seconds until every weight is resident, peak anonymous memory while loading and anonymous memory after
  it, per rank, and the bytes of int8 codes each rank holds;
* the demo prompt (scripts/demo.py's, chat template) decoded greedily: the text, and whether the token ids equal the
  single-process ones;
* speed (unless ``--no-speed``): prefill tok/s (one forward of ``--prompt-tokens`` tokens of lee_background, last
  position's logits only, median of ``--repeats``) and decode tok/s at batch 1 (greedy ``generate`` of
  ``--new-tokens`` tokens minus a 1-token ``generate``, as scripts/bench_e2e.py measures it);
* quality (``--quality``; an fp32 single-process row is added as the reference): perplexity on the first
  ``--max-tokens`` tokens of lee_background in ``--window``-token windows (hf_int8.metrics' protocol), and the logits
  of the first window, compared between configurations (relative Frobenius error, largest difference, top-1 agreement).

Writes ``<out-dir>/<prefix>.json`` and ``.md`` and prints the markdown.

    python scripts/bench_tp.py --model qwen                               # speed + memory + demo text
    python scripts/bench_tp.py --model smollm2 --quality --no-speed       # numerics: TP vs 1 process vs fp32
    python scripts/bench_tp.py --model qwen --source int8                 # load a saved llmint8 checkpoint instead
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SCRIPT = Path(__file__).resolve()
THREADS = 2  # threads of the single process (this machine's cores); each tensor-parallel rank runs 1 thread
SINGLE = "llmint8 1x2"
MB = 1e6


# ---------------------------------------------------------------------------------------------------------------
# Worker (one process, or every rank under torchrun)
# ---------------------------------------------------------------------------------------------------------------
def _local_tensor_bytes(model) -> int:
    """Bytes of this process's parameters and buffers (a DTensor counts its local shard)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        local = getattr(t, "_local_tensor", t)
        total += local.numel() * local.element_size()
    return total


def _touch(model) -> None:
    """Read one value per memory page of every local tensor (bench_e2e.touch_weights, for DTensor shards too)."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            local = getattr(t, "_local_tensor", t).detach()
            if local.numel():
                local.reshape(-1)[:: max(1, 4096 // local.element_size())].float().sum()


def worker(job: dict[str, Any]) -> dict[str, Any]:
    import bench_e2e as E
    import torch

    C.quiet_library_warnings()
    C.seed_everything()
    torch.set_num_threads(job["threads"])
    rank = int(os.environ.get("RANK", "0"))
    result: dict[str, Any] = {"config": job["config"], "status": "ok", "rank": rank, "threads": job["threads"]}
    try:
        from demo import DEFAULT_PROMPT, _prompt_inputs
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import hf_int8
        from hf_int8 import metrics
        from hf_int8.integration import tp

        path = job["path"]
        tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if job["quantize"]:
            kwargs["quantization_config"] = hf_int8.Int8Config()
        if job["tp"]:
            kwargs["tp_plan"] = "auto"
        result["anon_before_load_bytes"] = E._status_kb("RssAnon")
        sampler = E.RssSampler()
        sampler.start()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        _touch(model)
        result["load_s"] = time.perf_counter() - start
        sampler.stop()
        result["peak_anon_load_bytes"] = sampler.peak_anon
        result["anon_after_load_bytes"] = E._status_kb("RssAnon")
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["local_tensor_bytes"] = _local_tensor_bytes(model)
        result["int8_bytes"] = tp.int8_bytes(model)
        result["kernels"] = C.kernels_in_use()

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        greedy = dict(do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            inputs = _prompt_inputs(tokenizer, DEFAULT_PROMPT)
            out = model.generate(**inputs, max_new_tokens=job["demo_tokens"], **greedy)
        new_ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        result["demo_ids"] = new_ids
        result["demo_pieces"] = [tokenizer.decode([i]) for i in new_ids]
        result["demo_text"] = tokenizer.decode(new_ids, skip_special_tokens=True)
        ref = job.get("reference_ids") or new_ids  # the single-process continuation (its own, for that one)
        if ref:
            # Teacher-forced on the reference continuation: at each step, how far the reference token is ahead of
            # (>= 0) or behind (< 0) this configuration's best other token; explains where greedy texts part.
            full = torch.cat([inputs["input_ids"], torch.tensor([ref])], dim=1)
            with torch.inference_mode():
                step_logits = model(input_ids=full).logits[0, inputs["input_ids"].shape[1] - 1 : -1].float()
            ref_logit = step_logits.gather(1, torch.tensor(ref).unsqueeze(1)).squeeze(1)
            others = step_logits.clone()
            others[torch.arange(len(ref)), torch.tensor(ref)] = float("-inf")
            best_other, best_other_id = others.max(dim=1)
            result["reference_margins"] = (ref_logit - best_other).tolist()
            result["reference_rivals"] = [tokenizer.decode([i]) for i in best_other_id.tolist()]

        if job["quality"]:
            text = job["text"]
            details = metrics.perplexity_details(
                model, tokenizer, text, max_tokens=job["max_tokens"], window=job["window"]
            )
            result.update(
                perplexity=details.perplexity,
                num_predicted=details.num_predicted,
                num_windows=details.num_windows,
                window_nll_sums=list(details.window_nll_sums),
                window_num_predicted=list(details.window_num_predicted),
            )
            ids = metrics.tokenize_for_perplexity(tokenizer, text, job["window"])
            with torch.inference_mode():
                logits = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float()
            if rank == 0:
                torch.save(logits, job["logits_file"])

        if job["speed"]:
            ids = tokenizer(job["text"], add_special_tokens=False)["input_ids"]
            prompt = torch.tensor([ids[: job["prompt_tokens"]]])
            with torch.inference_mode():
                model(input_ids=prompt[:, :16], logits_to_keep=1)  # warm-up
                prefill = E._median_time(lambda: model(input_ids=prompt, logits_to_keep=1), job["repeats"])
                result["prefill_tps"] = prompt.shape[1] / prefill
                rows = torch.tensor([ids[job["prompt_tokens"] : job["prompt_tokens"] + E.DECODE_PROMPT_TOKENS]])
                mask = torch.ones_like(rows)

                def generate(n: int) -> None:
                    model.generate(input_ids=rows, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **greedy)

                generate(2)  # warm-up
                first = E._median_time(lambda: generate(1), job["repeats"])
                full = E._median_time(lambda: generate(job["new_tokens"]), 1)
                result["decode_b1_tps"] = (job["new_tokens"] - 1) / (full - first)
    except Exception as exc:
        result.update(status="error", error=C.error_string(exc))
        if job["tp"]:
            raise  # a rank that stops would leave the other in a collective: end the whole launch
    return result


def _worker_main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result = worker(job)
    rank = int(os.environ.get("RANK", "0"))
    C.write_json(Path(f"{job['result_file']}.rank{rank}"), result)
    if job["tp"]:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------
def run_config(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one configuration; rank 0's result with every rank's memory figures under ``ranks``."""
    with tempfile.TemporaryDirectory(prefix="hf_int8_tp_job_") as tmp:
        job = {**job, "result_file": str(Path(tmp) / "result.json")}
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        if job["tp"]:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={job['world']}",
                str(SCRIPT),
                "--worker",
                str(job_file),
            ]
        else:
            cmd = [sys.executable, str(SCRIPT), "--worker", str(job_file)]
        env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        print(f"[bench_tp] {job['config']}: {' '.join(cmd[1:4])} ...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(
                cmd, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        except subprocess.TimeoutExpired:
            return {"config": job["config"], "status": "error", "error": f"timed out after {timeout:.0f} s"}
        ranks = []
        for rank in range(job["world"] if job["tp"] else 1):
            file = Path(f"{job['result_file']}.rank{rank}")
            ranks.append(json.loads(file.read_text()) if file.is_file() else None)
        if ranks[0] is None or proc.returncode != 0:
            return {
                "config": job["config"],
                "status": "error",
                "error": f"exit code {proc.returncode}: {(proc.stdout or '')[-3000:]}",
            }
        result = dict(ranks[0])
        result["ranks"] = [
            {
                k: r.get(k)
                for k in (
                    "rank",
                    "load_s",
                    "peak_anon_load_bytes",
                    "anon_after_load_bytes",
                    "anon_before_load_bytes",
                    "local_tensor_bytes",
                    "int8_bytes",
                )
            }
            for r in ranks
            if r is not None
        ]
        result["wall_s"] = time.perf_counter() - start
        return result


def prepare_int8_checkpoint(spec: C.ModelSpec) -> Path:
    """A saved llmint8 checkpoint of ``spec`` (quantized by one process; cached next to bench_e2e's checkpoints)."""
    root = Path(os.environ.get("HF_INT8_CACHE") or C.REPO / ".cache") / "eval_work" / "checkpoints"
    out = root / f"{spec.name}-llmint8"
    if not (out / "config.json").is_file():
        code = (
            "import sys, torch, hf_int8; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "src, dst = sys.argv[1:3]\n"
            "m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, "
            "quantization_config=hf_int8.Int8Config())\n"
            "m.save_pretrained(dst); AutoTokenizer.from_pretrained(src).save_pretrained(dst)\n"
        )
        print(f"[bench_tp] saving an llmint8 checkpoint of {spec.name} in {out}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", code, str(spec.path()), str(out)], check=True)
    return out


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def compare_logits(files: dict[str, Path], tp_name: str) -> list[dict[str, Any]]:
    """Relative error, largest absolute difference and top-1 agreement between the saved first-window logits."""
    import torch

    logits = {name: torch.load(path) for name, path in files.items() if path.is_file()}
    fp_tp = tp_name.replace("llmint8", "fp32")
    pairs = [(tp_name, SINGLE), (SINGLE, "fp32 1x2"), (tp_name, "fp32 1x2"), (fp_tp, "fp32 1x2")]
    out = []
    for a, b in pairs:
        if a in logits and b in logits:
            la, lb = logits[a], logits[b]
            out.append(
                {
                    "a": a,
                    "b": b,
                    "rel_error": _rel(la, lb),
                    "max_abs_diff": float((la - lb).abs().max()),
                    "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).float().mean()),
                    "positions": int(la.shape[0]),
                }
            )
    return out


def _decode_piece(row: dict[str, Any], k: int) -> str:
    """The reference token at step ``k`` as text (stored by the single-process worker)."""
    pieces = row.get("demo_pieces") or []
    return pieces[k] if k < len(pieces) else f"token {row['demo_ids'][k]}"


def render(data: dict[str, Any]) -> str:
    rows = data["rows"]
    single = next((r for r in rows if r["config"] == SINGLE and r.get("status") == "ok"), None)
    s = data["settings"]
    lines = [
        f"## llmint8 tensor parallel on CPU: {s['model']} ({s['source']})",
        "",
        C.machine_markdown(data["meta"]),
        "",
        f"Configurations run one after the other in this run; each in fresh processes. Prefill: "
        f"{s['prompt_tokens']} tokens, decode: {s['new_tokens']} tokens at batch 1 after a 32-token prompt.",
        "",
    ]
    table = []
    for r in rows:
        if r.get("status") != "ok":
            table.append([r["config"], f"error: {r.get('error', '')[:200]}"] + [""] * 8)
            continue
        per_rank_int8 = " / ".join(
            C.fmt((x["int8_bytes"]["sharded_codes"] + x["int8_bytes"]["unsharded_codes"]) / MB, ".0f")
            for x in r["ranks"]
        )
        per_rank_anon = " / ".join(C.fmt(x["anon_after_load_bytes"] / MB, ".0f") for x in r["ranks"])
        per_rank_peak = " / ".join(C.fmt(x["peak_anon_load_bytes"] / MB, ".0f") for x in r["ranks"])
        per_rank_tensors = " / ".join(C.fmt(x["local_tensor_bytes"] / MB, ".0f") for x in r["ranks"])
        same = (
            "—"
            if single is None or r is single or "demo_ids" not in r
            else ("same" if r["demo_ids"] == single["demo_ids"] else "differs")
        )
        ratio = ""
        if single is not None and r is not single and r.get("decode_b1_tps") and single.get("decode_b1_tps"):
            ratio = (
                f"prefill x{r['prefill_tps'] / single['prefill_tps']:.2f}, "
                f"decode x{r['decode_b1_tps'] / single['decode_b1_tps']:.2f}"
            )
        table.append(
            [
                r["config"],
                C.fmt(r.get("load_s"), ".1f"),
                C.fmt(r.get("prefill_tps"), ".1f"),
                C.fmt(r.get("decode_b1_tps"), ".2f"),
                ratio,
                per_rank_int8,
                per_rank_tensors,
                per_rank_anon,
                per_rank_peak,
                same,
            ]
        )
    lines += [
        C.markdown_table(
            [
                "config",
                "load s",
                "prefill tok/s",
                "decode tok/s (b1)",
                "vs 1x2",
                "int8 codes MB per rank",
                "tensors MB per rank",
                "anon MB after load per rank",
                "peak anon MB loading per rank",
                "demo greedy ids vs 1x2",
            ],
            table,
        ),
        "",
    ]
    lines += ["Demo prompt (greedy):", ""]
    for r in rows:
        if r.get("status") == "ok":
            lines.append(f"- {r['config']}: {json.dumps(r['demo_text'])}")
    if single is not None:
        lines += [
            "",
            "Where each greedy text leaves the single-process llmint8 one (teacher-forced on that text: the "
            "margin is the logit of its token minus the best other token's; greedy follows it while >= 0):",
            "",
        ]
        for r in rows:
            margins = r.get("reference_margins")
            if r is single or r.get("status") != "ok" or not margins:
                continue
            k = next((i for i, m in enumerate(margins) if m < 0), None)
            if k is None:
                lines.append(f"- {r['config']}: never (smallest margin {min(margins):.3f})")
                continue
            ref_tok = json.dumps(_decode_piece(single, k))
            lines.append(
                f"- {r['config']}: at new token {k}: one process picks {ref_tok} by a margin of "
                f"{single['reference_margins'][k]:.3f} over {json.dumps(single['reference_rivals'][k])}; this "
                f"configuration prefers {json.dumps(r['reference_rivals'][k])} by {-margins[k]:.3f}"
            )
    if any("perplexity" in r for r in rows):
        qrows = [
            [r["config"], C.fmt(r.get("perplexity"), ".4f"), r.get("num_predicted", "")]
            for r in rows
            if r.get("status") == "ok"
        ]
        lines += [
            "",
            f"Perplexity on the first {s['max_tokens']} tokens of lee_background.cor, {s['window']}-token windows:",
            "",
            C.markdown_table(["config", "perplexity", "predicted tokens"], qrows),
            "",
        ]
        lines += [
            "Logits of the first window:",
            "",
            C.markdown_table(
                ["a", "b", "relative error ‖a-b‖/‖b‖", "max |a-b|", "top-1 agreement"],
                [
                    [c["a"], c["b"], f"{c['rel_error']:.3e}", f"{c['max_abs_diff']:.4f}", f"{c['top1_agreement']:.4f}"]
                    for c in data.get("logits", [])
                ],
            ),
            "",
        ]
        paired = data.get("paired")
        if paired:
            lines += [
                f"Δ log-ppl TP vs 1 process: {paired.get('delta_log_ppl', float('nan')):+.5f} ± "
                f"{paired.get('delta_se', float('nan')):.5f} (SE of the per-window differences; TP worse in "
                f"{paired.get('windows_worse')}/{paired.get('num_windows')} windows)",
                "",
            ]
    lines += [f"Command: `{data['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="qwen", help="smollm2, qwen or NAME=PATH (a causal LM folder)")
    parser.add_argument(
        "--source",
        default="fp",
        choices=["fp", "int8"],
        help="fp: quantize the floating-point checkpoint on load; int8: load a saved llmint8 one",
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--demo-tokens", type=int, default=64, help="greedy tokens for the demo prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world", type=int, default=2, help="tensor-parallel processes (1 thread each)")
    parser.add_argument(
        "--also-1x1",
        action="store_true",
        help="add a 1 process x 1 thread row: the per-thread baseline, which core contention from "
        "other jobs does not slow down the way it slows a 2-thread process",
    )
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--quality", action="store_true", help="perplexity and logits, plus an fp32 reference row")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per configuration")
    parser.add_argument("--out-dir", type=Path, default=C.RESULTS_DIR)
    parser.add_argument("--prefix", default=None, help="output names PREFIX.json/.md (default bench_tp_<model>)")
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return 0

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        raise SystemExit("torch.distributed with the gloo backend is unavailable in this torch build")
    spec = C.parse_models(args.model)[0]
    import assets

    text = assets.lee_background_text()
    path = prepare_int8_checkpoint(spec) if args.source == "int8" else spec.path()
    prefix = args.prefix or f"bench_tp_{spec.name}"
    work = C.work_file(args.out_dir, f"{prefix}-logits")
    work.mkdir(parents=True, exist_ok=True)
    base = {
        "path": str(path),
        "text": text,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "demo_tokens": args.demo_tokens,
        "repeats": args.repeats,
        "speed": not args.no_speed,
        "quality": args.quality,
        "max_tokens": args.max_tokens,
        "window": args.window,
        "world": args.world,
    }
    tp_name = f"llmint8 {args.world}x1 TP"
    configs = [
        {"config": SINGLE, "tp": False, "threads": THREADS, "quantize": args.source == "fp"},
        {"config": tp_name, "tp": True, "threads": 1, "quantize": args.source == "fp"},
    ]
    if args.also_1x1:
        configs.append({"config": "llmint8 1x1", "tp": False, "threads": 1, "quantize": args.source == "fp"})
    if args.quality:
        configs.append(
            {
                "config": "fp32 1x2",
                "tp": False,
                "threads": THREADS,
                "quantize": False,
                "speed": False,
                "path": str(spec.path()),
            }
        )
        # the same sharding without int8: what tensor parallelism alone changes (sums in another order)
        configs.append(
            {
                "config": f"fp32 {args.world}x1 TP",
                "tp": True,
                "threads": 1,
                "quantize": False,
                "speed": False,
                "path": str(spec.path()),
            }
        )
    rows = []
    for config in configs:
        job = {**base, **config, "logits_file": str(work / f"{config['config'].replace(' ', '_')}.pt")}
        if rows and rows[0].get("status") == "ok":
            job["reference_ids"] = rows[0]["demo_ids"]  # the single-process llmint8 continuation
        rows.append(run_config(job, args.timeout))
    data = {
        "meta": {"machine": C.machine_info(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())},
        "settings": {
            "model": spec.label,
            "source": "quantized on load" if args.source == "fp" else "saved llmint8",
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "max_tokens": args.max_tokens,
            "window": args.window,
            "world": args.world,
        },
        "command": "python scripts/bench_tp.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    if args.quality:
        data["logits"] = compare_logits(
            {r["config"]: work / f"{r['config'].replace(' ', '_')}.pt" for r in rows}, tp_name
        )
        by = {r["config"]: r for r in rows if r.get("status") == "ok"}
        if tp_name in by and SINGLE in by:
            from eval_quality import paired_window_difference

            data["paired"] = paired_window_difference(by[tp_name], by[SINGLE])
    for r in rows:  # per-window sums are for the paired test only
        r.pop("window_nll_sums", None)
        r.pop("window_num_predicted", None)
    markdown = render(data)
    C.write_json(args.out_dir / f"{prefix}.json", data)
    (args.out_dir / f"{prefix}.md").write_text(markdown)
    print(markdown)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
