#!/usr/bin/env python
"""End-to-end cost of llmint8 next to the alternatives: loading, memory, prefill and decode speed.

Each (model, method) runs in a fresh subprocess, so its peak resident memory while loading is its own:

* load time of ``from_pretrained`` (plus the module swap for naive int8), until every weight page is resident (a
  checkpoint in the loaded dtype is memory-mapped and would otherwise be read lazily at the first forward);
* peak resident memory while loading: ``ru_maxrss`` of the worker after loading (interpreter and imports included;
  file pages of the memory-mapped checkpoint count too), the resident memory just before loading, and the peak of
  anonymous memory sampled every few milliseconds by a thread (``RssAnon``: memory the process owns);
* ``model.get_memory_footprint()`` and the bytes actually stored;
* prefill tokens/s: one forward of a ``--prompt-tokens`` prompt (batch 1, median of ``--repeats``), as ``generate``
  runs it: a causal LM computes the logits of the last position only (``logits_to_keep=1``), not 512 x vocabulary
  logits that generation never reads (for Qwen2.5 those cost ~0.4 s in bf16 whatever the method);
* decode tokens/s at batch 1 and 8: greedy ``generate`` of ``--new-tokens`` tokens after a 32-token prompt, the time
  of a 1-token ``generate`` (prefill) subtracted: ``batch * (new - 1) / (t(new) - t(1))``;

each with its ratio to fp32 and bf16 measured in the same run. With llama.cpp built by
``scripts/build_llamacpp.py`` (found in its cache; ``--llamacpp on`` insists, ``off`` skips it), a ``llamacpp-q8_0``
row per model comes from ``llama-bench`` on the Q8_0 GGUF of the same weights, with the same threads: prefill is its
``pp<prompt-tokens>`` and decode batch 1 its ``tg<new-tokens>`` (one sequence from an empty context; llama-bench has
no batched decode, so batch 8 stays empty). Writes ``<out-dir>/<prefix>.json``, ``.md`` and PNG
charts and prints the markdown, including the issue's targets evaluated on the figures.

    python scripts/bench_e2e.py --models smollm2 --quick
    python scripts/bench_e2e.py --models qwen --methods fp32,bf16,llmint8-t6,bnb-t6
    python scripts/build_llamacpp.py --models smollm2,qwen && python scripts/bench_e2e.py --models smollm2,qwen \
        --methods bf16,llmint8-t6,bnb-t6 --batches 1,8 --llamacpp on
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SCRIPT = Path(__file__).resolve()
DEFAULT_METHODS = "fp32,bf16,llmint8-t6,llmint8-t0,naive-int8,bnb-t6,bnb-t0,torchao-int8wo,torchao-int8dyn"
DECODE_PROMPT_TOKENS = 32
SAMPLE_INTERVAL_S = 0.005
PAGE_BYTES = 4096
LLAMACPP_METHOD = "llamacpp-q8_0"
METRICS = (
    "load_s",
    "peak_rss_load_bytes",
    "peak_anon_load_bytes",
    "footprint_bytes",
    "storage_bytes",
    "prefill_tps",
    "decode_b1_tps",
    "decode_b8_tps",
)


# ---------------------------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler(threading.Thread):
    """Samples the process's resident (``VmRSS``) and anonymous (``RssAnon``) memory; keeps the peaks."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_rss = 0
        self.peak_anon = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_rss = max(self.peak_rss, _status_kb("VmRSS"))
            self.peak_anon = max(self.peak_anon, _status_kb("RssAnon"))
            self._stop_event.wait(SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def touch_weights(model) -> int:
    """Read one value per memory page of every parameter and buffer; return the number of tensors touched.

    A checkpoint stored in the loaded dtype comes back memory-mapped and is only read from disk at the first forward:
    without this, its "load" would look free and its memory would appear later. With it, every method's load time
    and peak memory include having all weights resident.
    """
    import torch

    def leaves(t):
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
            for name in t.__tensor_flatten__()[0]:
                yield from leaves(getattr(t, name))
        else:
            yield t

    count = 0
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            for leaf in leaves(tensor):
                if leaf.numel() and leaf.device.type == "cpu":
                    step = max(1, PAGE_BYTES // leaf.element_size())
                    leaf.detach().reshape(-1)[::step].float().sum()
                    count += 1
    return count


def worker(job: dict[str, Any]) -> dict[str, Any]:
    C.quiet_library_warnings()
    C.seed_everything()
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    spec = C.parse_models(job["model_arg"])[0]
    method = C.parse_methods(job["method"], "fp32")[0]
    result: dict[str, Any] = {
        "model": spec.name,
        "method": method.key,
        "dtype": method.dtype,
        "status": "ok",
        "threads": torch.get_num_threads(),
    }
    try:
        # Import what loading needs before measuring, so the peak is loading's, not the imports'.
        import transformers  # noqa: F401

        import hf_int8  # noqa: F401

        if method.family == "bnb":
            import bitsandbytes  # noqa: F401
        if method.family.startswith("torchao"):
            import torchao  # noqa: F401
        tokenizer = C.load_tokenizer(spec)
        text = job["text"]
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        result["rss_before_load_bytes"] = _status_kb("VmRSS")
        result["anon_before_load_bytes"] = _status_kb("RssAnon")
        sampler = RssSampler()
        sampler.start()
        start = time.perf_counter()
        model = C.load_model(spec, method, job.get("attn_implementation"))
        touch_weights(model)
        result["load_s"] = time.perf_counter() - start
        sampler.stop()
        result["peak_rss_load_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_anon_load_bytes"] = sampler.peak_anon
        result["load_anon_increase_bytes"] = sampler.peak_anon - result["anon_before_load_bytes"]
        result["rss_after_load_bytes"] = _status_kb("VmRSS")
        result["footprint_bytes"] = int(model.get_memory_footprint())
        result["storage_bytes"] = C.storage_bytes(model)
        result["kernels"] = C.kernels_in_use()
        result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        if job["no_speed"]:
            return result

        prompt_tokens = job["prompt_tokens"]
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos:
            prompt_tokens = min(prompt_tokens, max_pos)
        if len(ids) < prompt_tokens + 8 * DECODE_PROMPT_TOKENS:
            raise ValueError(
                f"the text has {len(ids)} tokens; the benchmark needs {prompt_tokens + 8 * DECODE_PROMPT_TOKENS}"
            )
        prompt = torch.tensor([ids[:prompt_tokens]])
        result["prompt_tokens"] = prompt_tokens
        # Causal LMs: only the last position's logits, like generate's prefill step.
        last_only = {"logits_to_keep": 1} if spec.kind == "causal" else {}
        result["prefill_logits"] = "last position" if last_only else "all positions"
        with torch.inference_mode():
            model(input_ids=prompt[:, :16], **last_only)  # warm-up (allocator, oneDNN primitives)
            prefill = C.median_time(lambda: model(input_ids=prompt, **last_only), job["repeats"])
        result["prefill_s"] = prefill
        result["prefill_tps"] = prompt_tokens / prefill
        if spec.kind != "causal":
            return result

        new_tokens = job["new_tokens"]
        result["new_tokens"] = new_tokens
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Compiled decode: the first generate of each shape and cache length compiles (dynamic=False); the time of the
        # warm-up calls beyond their steady-state time is reported as decode_b<N>_compile_s.
        extra = {"cache_implementation": "static"} if method.compiled_decode else {}
        if method.compiled_decode:
            model.forward = torch.compile(model.forward, dynamic=False)
        for batch in job["batches"]:
            # Fixed prompts: consecutive 32-token slices of the text after the prefill prompt, one per sequence.
            rows = [
                ids[prompt_tokens + i * DECODE_PROMPT_TOKENS : prompt_tokens + (i + 1) * DECODE_PROMPT_TOKENS]
                for i in range(batch)
            ]
            input_ids = torch.tensor(rows)
            mask = torch.ones_like(input_ids)

            def generate(n: int, input_ids=input_ids, mask=mask) -> None:
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=pad,
                    **extra,
                )
                if out.shape[1] != input_ids.shape[1] + n:
                    raise RuntimeError(f"generate returned {out.shape[1] - input_ids.shape[1]} tokens, not {n}")

            warm = time.perf_counter()
            for n in (1, new_tokens) if method.compiled_decode else (2,):  # warm-up (compiled: both cache lengths)
                generate(n)
            warm = time.perf_counter() - warm
            first = C.median_time(lambda: generate(1), job["repeats"])
            full = C.median_time(lambda: generate(new_tokens), job["decode_repeats"])
            if method.compiled_decode:
                result[f"decode_b{batch}_compile_s"] = warm - first - full
            if full <= first:
                raise RuntimeError(f"decode time not measurable: t({new_tokens})={full:.4f}s <= t(1)={first:.4f}s")
            result[f"decode_b{batch}_s"] = full - first
            result[f"decode_b{batch}_tps"] = batch * (new_tokens - 1) / (full - first)
    except Exception as exc:  # recorded in the table, per the issue: a method that cannot run is reported, not fatal
        result.update(status="error", error=C.error_string(exc))
    return result


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp (the 8-bit CPU peer), through llama-bench
# ---------------------------------------------------------------------------------------------------------------
def llamacpp_paths(model: str) -> tuple[Path | None, Path | None]:
    """``(llama-bench, Q8_0 GGUF)`` of ``model`` from build_llamacpp.py's cache (None where not built)."""
    import build_llamacpp as L

    gguf = L.q8_0_gguf(model) if model in L.MODELS else None
    return L.binary("llama-bench"), gguf


def parse_llama_bench(entries: list[dict[str, Any]], prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """``prefill_tps`` / ``decode_b1_tps`` (and their stddev) from ``llama-bench -o json`` entries."""
    out: dict[str, float] = {}
    for entry in entries:
        n_prompt, n_gen = int(entry.get("n_prompt", 0)), int(entry.get("n_gen", 0))
        if n_prompt == prompt_tokens and n_gen == 0:
            key = "prefill_tps"
        elif n_gen == new_tokens and n_prompt == 0:
            key = "decode_b1_tps"
        else:
            continue
        out[key] = float(entry["avg_ts"])
        out[key + "_stddev"] = float(entry.get("stddev_ts", 0.0))
    missing = {"prefill_tps", "decode_b1_tps"} - set(out)
    if missing:
        raise RuntimeError(
            f"llama-bench reported no {sorted(missing)} for pp{prompt_tokens}/tg{new_tokens} in "
            f"{[(e.get('n_prompt'), e.get('n_gen')) for e in entries]!r}"
        )
    return out


def llamacpp_row(
    spec: C.ModelSpec, threads: int, prompt_tokens: int, new_tokens: int, repeats: int, timeout: float
) -> dict[str, Any]:
    """One ``llamacpp-q8_0`` row: llama-bench's prefill and decode tok/s on the Q8_0 GGUF, ``threads`` threads."""
    row: dict[str, Any] = {
        "model": spec.name,
        "method": LLAMACPP_METHOD,
        "dtype": "q8_0",
        "status": "ok",
        "threads": threads,
    }
    bench, gguf = llamacpp_paths(spec.name)
    if bench is None or gguf is None:
        row.update(
            status="error",
            error=f"llama.cpp or the {spec.name} Q8_0 GGUF is not built: run "
            f"python scripts/build_llamacpp.py --models {spec.name}",
        )
        return row
    cmd = [
        str(bench),
        "-m",
        str(gguf),
        "-p",
        str(prompt_tokens),
        "-n",
        str(new_tokens),
        "-t",
        str(threads),
        "-r",
        str(max(1, repeats)),
        "-o",
        "json",
    ]
    row["command"] = " ".join(cmd)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"llama-bench exited with {result.returncode}: {result.stderr[-2000:]}")
        row.update(parse_llama_bench(json.loads(result.stdout), prompt_tokens, new_tokens))
        row["storage_bytes"] = gguf.stat().st_size
        row["prefill_logits"] = "llama-bench's own"  # llama.cpp's choice of outputs, not set from here
        row["prompt_tokens"], row["new_tokens"] = prompt_tokens, new_tokens
    except Exception as exc:  # reported in the table like any other method that cannot run
        row.update(status="error", error=C.error_string(exc))
    return row


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------
def convert_checkpoint(spec: C.ModelSpec, out: Path, dtype: str) -> None:
    """Save ``spec``'s weights as a ``dtype`` safetensors checkpoint (plus tokenizer) in ``out``, atomically."""
    import os
    import shutil
    import tempfile

    from transformers import AutoModel, AutoModelForCausalLM

    C.quiet_library_warnings()
    auto = AutoModelForCausalLM if spec.kind == "causal" else AutoModel
    model = auto.from_pretrained(spec.path(), dtype=C.DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        C.load_tokenizer(spec).save_pretrained(tmp)
        (tmp / "hf_int8_bench_source.json").write_text(json.dumps({"source": str(spec.path()), "dtype": dtype}))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_in_dtype(spec: C.ModelSpec, dtype: str) -> C.ModelSpec:
    """``spec`` re-saved with ``dtype`` weights (cached), converted in a subprocess to keep this process small."""
    import os
    import subprocess

    root = Path(os.environ.get("HF_INT8_CACHE") or C.REPO / ".cache") / "eval_work" / "checkpoints"
    out = root / f"{spec.name}-{dtype}"
    if not (out / "hf_int8_bench_source.json").is_file():
        model_arg = C.model_arg(spec)
        print(f"[bench_e2e] saving a {dtype} copy of {spec.name} in {out}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(SCRIPT), "--convert", model_arg, str(out), dtype], check=True)
    return C.ModelSpec(spec.name, spec.kind, lambda: out, spec.label)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio_fp32``/``ratio_bf16`` per metric, against the fp32/bf16 rows of the same model in this run."""
    for row in rows:
        if row.get("status") != "ok":
            continue
        refs = {
            name: next(
                (r for r in rows if r["model"] == row["model"] and r["method"] == name and r.get("status") == "ok"),
                None,
            )
            for name in ("fp32", "bf16")
        }
        for name, ref in refs.items():
            row[f"ratio_{name}"] = {m: row[m] / ref[m] for m in METRICS if ref and row.get(m) and ref.get(m)}


def _find(rows: list[dict[str, Any]], model: str, base: str, dtype: str | None = None) -> dict[str, Any] | None:
    for r in rows:
        if r["model"] == model and r["method"].split("@")[0] == base and r.get("status") == "ok":
            if dtype is None or r["dtype"] == dtype:
                return r
    return None


def targets(rows: list[dict[str, Any]], fp16_bytes: dict[str, int]) -> list[dict[str, Any]]:
    """The issue's speed and memory targets, evaluated on every model where the methods involved were measured."""
    checks = []
    models = []
    for r in rows:
        if r["model"] not in models:
            models.append(r["model"])

    def check(model: str, target: str, value: float | None, bound: float | None, ok) -> None:
        if value is not None and bound is not None:
            checks.append(
                {"model": model, "target": target, "value": value, "bound": bound, "pass": bool(ok(value, bound))}
            )

    for model in models:
        ours = _find(rows, model, "llmint8-t6")
        if ours is None:
            continue
        bf16, bnb = _find(rows, model, "bf16"), _find(rows, model, "bnb-t6", ours["dtype"])
        for batch in (1, 8):
            key = f"decode_b{batch}_tps"
            if bf16 and ours.get(key) and bf16.get(key):
                check(model, f"decode b{batch} >= 2x bf16 (ratio)", ours[key] / bf16[key], 2.0, lambda v, b: v >= b)
            if bnb and ours.get(key) and bnb.get(key):
                check(
                    model,
                    f"decode b{batch} >= 1.3x bitsandbytes t=6 (ratio)",
                    ours[key] / bnb[key],
                    1.3,
                    lambda v, b: v >= b,
                )
        if bf16 and ours.get("prefill_tps") and bf16.get("prefill_tps"):
            check(
                model,
                "prefill >= 1.5x bf16 (ratio)",
                ours["prefill_tps"] / bf16["prefill_tps"],
                1.5,
                lambda v, b: v >= b,
            )
        # Speed targets: decode at llama.cpp's Q8_0 speed, and further above bf16; also with the opt-in int8 head.
        llama = _find(rows, model, LLAMACPP_METHOD)
        for variant, suffix in (
            ("llmint8-t6", ""),
            ("llmint8-t6-int8head", ", int8 lm_head"),
            ("llmint8-t6-int8head-compiled", ", int8 lm_head, static cache + torch.compile"),
        ):
            row = _find(rows, model, variant)
            if row is None:
                continue
            if llama and row.get("decode_b1_tps") and llama.get("decode_b1_tps"):
                check(
                    model,
                    f"speed target: decode b1 >= 1.0x llama.cpp Q8_0 (ratio){suffix}",
                    row["decode_b1_tps"] / llama["decode_b1_tps"],
                    1.0,
                    lambda v, b: v >= b,
                )
            for batch, bound in ((1, 2.5), (8, 1.8)):
                key = f"decode_b{batch}_tps"
                if bf16 and row.get(key) and bf16.get(key):
                    check(
                        model,
                        f"speed target: decode b{batch} >= {bound}x bf16 (ratio){suffix}",
                        row[key] / bf16[key],
                        bound,
                        lambda v, b: v >= b,
                    )

        def mb(row: dict[str, Any], key: str) -> float | None:
            return row[key] / C.MB if row.get(key) is not None else None

        if model in fp16_bytes:
            fp16 = fp16_bytes[model] / C.MB
            check(
                model,
                "peak RSS while loading < fp16 checkpoint (MB)",
                mb(ours, "peak_rss_load_bytes"),
                fp16,
                lambda v, b: v < b,
            )
            check(
                model,
                "peak anonymous memory while loading < fp16 checkpoint (MB)",
                mb(ours, "peak_anon_load_bytes"),
                fp16,
                lambda v, b: v < b,
            )
            check(
                model,
                "loading's own anonymous memory (peak - before) < fp16 checkpoint (MB)",
                mb(ours, "load_anon_increase_bytes"),
                fp16,
                lambda v, b: v < b,
            )
        if bnb:
            check(
                model,
                f"footprint <= bitsandbytes t=6 at {ours['dtype']} (MB)",
                mb(ours, "footprint_bytes"),
                mb(bnb, "footprint_bytes"),
                lambda v, b: v <= b,
            )
    return checks


def _cell(row: dict[str, Any], key: str, scale: float = 1.0, spec: str = ".1f") -> str:
    if row.get(key) is None:
        return "—"
    value = format(row[key] / scale, spec)
    r32, r16 = row.get("ratio_fp32", {}).get(key), row.get("ratio_bf16", {}).get(key)
    if r32 is None and r16 is None:
        return value
    return f"{value} ({C.fmt(r32, '.2f')}x, {C.fmt(r16, '.2f')}x)"


def render_markdown(data: dict[str, Any]) -> str:
    meta, rows, s = data["meta"], data["results"], data["settings"]
    # Runs before prefill_logits was recorded computed the logits of every position.
    logits = sorted({r.get("prefill_logits", "all positions") for r in rows if r.get("prefill_tps")})
    logits_note = f" (logits: {' / '.join(logits)})" if logits else ""
    out = [
        "# End-to-end: loading, memory and speed\n",
        f"Command: `{meta['command']}`\n",
        C.machine_markdown(meta),
        "",
        C.kernels_markdown(meta["kernels"]),
        "",
        f"Prefill: one forward of a {s['prompt_tokens']}-token prompt{logits_note}, batch 1, median of "
        f"{s['repeats']}. Decode: "
        f"greedy generate of {s['new_tokens']} tokens after a {DECODE_PROMPT_TOKENS}-token prompt, batch "
        f"{' and '.join(map(str, s['batches']))}, prefill time subtracted"
        + (
            f", attention `{s['attn_implementation']}` in every Transformers model"
            if s.get("attn_implementation")
            else ""
        )
        + ". Every cell: value (x fp32, x bf16) "
        "from the same run. Peak RSS = ru_maxrss of a fresh process after loading (imports and mapped "
        "checkpoint pages included); anon = peak anonymous memory sampled while loading."
        + (" **--quick run: fewer tokens, noisier.**" if s.get("quick") else "")
        + (
            " **--in-process run: memory figures are not per method.**"
            if any(r.get("in_process") for r in rows)
            else ""
        ),
        "",
    ]
    models = []
    for r in rows:
        if r["model"] not in models:
            models.append(r["model"])
    headers = [
        "method",
        "load s",
        "peak RSS load MB",
        "peak anon load MB",
        "footprint MB",
        "storage MB",
        "prefill tok/s",
        "decode b1 tok/s",
        "decode b8 tok/s",
        "llmint8 kernel",
    ]
    for model in models:
        label = data["model_labels"].get(model, model)
        fp16 = data["fp16_checkpoint_bytes"].get(model)
        ckpt = s.get("checkpoint_dtype", "as-is")
        ckpt_note = "loaded from its checkpoint as stored" if ckpt == "as-is" else f"loaded from a {ckpt} checkpoint"
        out.append(
            f"## {label}, {ckpt_note}"
            + (f" (an fp16 checkpoint would be {fp16 / C.MB:.0f} MB)" if fp16 else "")
            + "\n"
        )
        table = []
        for r in [r for r in rows if r["model"] == model]:
            if r.get("status") != "ok":
                table.append([r["method"], f"error: {r.get('error')}"] + [""] * (len(headers) - 2))
                continue
            table.append(
                [
                    r["method"],
                    _cell(r, "load_s", spec=".2f"),
                    _cell(r, "peak_rss_load_bytes", C.MB, ".0f"),
                    _cell(r, "peak_anon_load_bytes", C.MB, ".0f"),
                    _cell(r, "footprint_bytes", C.MB, ".1f"),
                    _cell(r, "storage_bytes", C.MB, ".1f"),
                    _cell(r, "prefill_tps"),
                    _cell(r, "decode_b1_tps", spec=".2f"),
                    _cell(r, "decode_b8_tps", spec=".2f"),
                    C.row_kernel(r),
                ]
            )
        out += [C.markdown_table(headers, table), ""]
        compiles = [
            f"{r['method']} b{b} {r[f'decode_b{b}_compile_s']:.0f} s"
            for r in rows
            if r["model"] == model
            for b in s["batches"]
            if r.get(f"decode_b{b}_compile_s") is not None
        ]
        if compiles:
            out += ["torch.compile time of the compiled decode (first generates, not in the tok/s): "
                    + ", ".join(compiles) + ".", ""]  # fmt: skip
    if data["checks"]:
        out.append("## Targets, on these figures\n")
        table = [
            [c["model"], c["target"], f"{c['value']:.2f}", f"{c['bound']:.2f}", "PASS" if c["pass"] else "FAIL"]
            for c in data["checks"]
        ]
        out += [C.markdown_table(["model", "target", "llmint8 t=6", "bound", "result"], table), ""]
    if data.get("charts"):
        out.append("Charts: " + ", ".join(f"`{p}`" for p in data["charts"]) + "\n")
    return "\n".join(out)


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
    if argv[:1] == ["--convert"]:
        convert_checkpoint(C.parse_models(argv[1])[0], Path(argv[2]), argv[3])
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
        help=f"comma list of {', '.join(C.BASE_METHODS)}; KEY@fp32 picks a dtype (default: --dtype)",
    )
    parser.add_argument(
        "--dtype",
        default="bf16",
        choices=sorted(C.DTYPES),
        help="dtype the quantized methods load and compute in (default bf16, the usual deployment)",
    )
    parser.add_argument("--text", default=None, help="text file for the prompts (default: lee_background.cor)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="prefill and 1-token generate: median of N")
    parser.add_argument("--decode-repeats", type=int, default=1, help="full generate: median of N")
    parser.add_argument(
        "--quick", action="store_true", help="128-token prompt, 16 new tokens, 1 repeat: a fast, noisier look"
    )
    parser.add_argument("--no-speed", action="store_true", help="loading and memory only")
    parser.add_argument(
        "--checkpoint-dtype",
        default="as-is",
        choices=["as-is", "bf16", "fp16"],
        help="load from a copy of each checkpoint saved in this dtype (cached); the assets are fp32 "
        "checkpoints, the hub checkpoints of these models are bf16",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument(
        "--attn-implementation",
        default=None,
        choices=["sdpa", "eager"],
        help="attention of every Transformers method (default: the model's own, sdpa); on CPUs without AMX torch's "
        "bf16 sdpa is slower than eager at decode (docs/speed.md)",
    )
    parser.add_argument("--out-dir", type=Path, default=C.RESULTS_DIR)
    parser.add_argument("--prefix", default="bench", help="output file names: PREFIX.json, PREFIX.md, PREFIX_*.png")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per (model, method) job")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--llamacpp",
        default="auto",
        choices=["auto", "on", "off"],
        help="llama.cpp Q8_0 rows (scripts/build_llamacpp.py): auto = where built, on = required",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every job in this process (smoke tests; no isolation, memory figures shared)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats, args.decode_repeats = 128, 16, 1, 1
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or any(b < 1 or b > 8 for b in batches):
        raise ValueError(f"--batches must list sizes between 1 and 8, got {args.batches!r}")
    if args.new_tokens < 2 or args.prompt_tokens < 16:
        raise ValueError(
            f"need --new-tokens >= 2 and --prompt-tokens >= 16, got {args.new_tokens}, {args.prompt_tokens}"
        )

    models = C.parse_models(args.models)
    if args.checkpoint_dtype != "as-is":
        models = [checkpoint_in_dtype(spec, args.checkpoint_dtype) for spec in models]
    methods = C.parse_methods(args.methods, args.dtype)
    from eval_quality import read_text

    text, text_name = read_text(args.text)
    C.seed_everything()
    settings = {
        "text_name": text_name,
        "text_sha256": C.sha256_text(text),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batches": batches,
        "repeats": args.repeats,
        "decode_repeats": args.decode_repeats,
        "quick": args.quick,
        "dtype": args.dtype,
        "checkpoint_dtype": args.checkpoint_dtype,
        "llamacpp": args.llamacpp,
        "attn_implementation": args.attn_implementation,
    }
    data: dict[str, Any] = {
        "kind": "bench",
        "meta": C.run_metadata(["scripts/bench_e2e.py", *argv]),
        "settings": settings,
        "model_labels": {m.name: m.label for m in models},
        "fp16_checkpoint_bytes": {},
        "results": [],
        "checks": [],
        "charts": [],
    }
    for spec in models:
        data["fp16_checkpoint_bytes"][spec.name] = 2 * C.checkpoint_param_count(spec.path())
    import torch
    from tqdm.auto import tqdm

    threads = args.threads or torch.get_num_threads()  # llama.cpp needs a number: the workers' default
    jobs: list[tuple[C.ModelSpec, Any]] = []
    for spec in models:
        if (
            spec.kind == "causal"
            and not args.no_speed
            and (args.llamacpp == "on" or (args.llamacpp == "auto" and all(llamacpp_paths(spec.name))))
        ):
            jobs.append((spec, None))  # None: the llama.cpp row of this model
        jobs += [(spec, method) for method in methods]
    bar = tqdm(jobs, desc="bench jobs", unit="job")
    for spec, method in bar:
        if method is None:
            bar.set_postfix_str(f"{spec.name} {LLAMACPP_METHOD}")
            row = llamacpp_row(spec, threads, args.prompt_tokens, args.new_tokens, args.repeats, args.timeout)
            data["results"].append(row)
            shown = {k: round(row[k], 2) for k in ("prefill_tps", "decode_b1_tps") if k in row}
            tqdm.write(f"[bench_e2e] {spec.name} {LLAMACPP_METHOD}: {shown or row.get('error')}")
            _write_outputs(data, args, final=False)
            continue
        bar.set_postfix_str(f"{spec.name} {method.key}")
        model_arg = C.model_arg(spec)
        job = {
            "model_arg": model_arg,
            "method": method.key,
            "text": text,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "batches": batches if spec.kind == "causal" else [],
            "repeats": args.repeats,
            "decode_repeats": args.decode_repeats,
            "no_speed": args.no_speed,
            "threads": args.threads,
            "attn_implementation": args.attn_implementation,
            "env": method.worker_env,
        }
        row = C.run_worker(SCRIPT, job, args.timeout, worker if args.in_process else None)
        row.setdefault("model", spec.name)
        row.setdefault("method", method.key)
        row.setdefault("dtype", method.dtype)
        data["results"].append(row)
        shown = {k: round(row[k], 2) for k in ("load_s", "prefill_tps", "decode_b1_tps", "decode_b8_tps") if k in row}
        tqdm.write(f"[bench_e2e] {spec.name} {method.key}: {shown or row.get('error')}")
        _write_outputs(data, args, final=False)
    _write_outputs(data, args, final=True)
    print(render_markdown(data))
    return 0


def _write_outputs(data: dict[str, Any], args, final: bool) -> None:
    add_ratios(data["results"])
    data["checks"] = targets(data["results"], data["fp16_checkpoint_bytes"])
    if final and not args.no_plots:
        import plots

        data["charts"] = [
            str(p.relative_to(C.REPO) if p.is_relative_to(C.REPO) else p)
            for p in plots.plot_bench(data, args.out_dir, args.prefix)
        ]
    C.write_json(args.out_dir / f"{args.prefix}.json", data)
    (args.out_dir / f"{args.prefix}.md").write_text(render_markdown(data) + "\n")


if __name__ == "__main__":
    sys.exit(main())
