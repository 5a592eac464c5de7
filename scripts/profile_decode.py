#!/usr/bin/env python
"""Where one decode step of an llmint8 model (batch 1, or --batch N) spends its time, and how far it is from the
weight-read bound; with --prefill, where one prefill forward of the prompt spends it.

A decode step runs the model on one new token against a KV cache. This script loads the model with ``Int8Config``
(bf16 by default, like ``bench_e2e``), prefills a ``--prompt-tokens`` prompt (``--batch`` of them, consecutive pieces
of the text), then times ``--steps`` decode forwards:

1. without instrumentation: the step time (median) -- the figure the breakdown is compared against;
2. alternating with those plain steps (so both see the same load on a shared machine), steps with forward
   pre/post hooks on every module of interest, summing wall time per category; the breakdown shown is that of the
   hooked step of median length, so its parts add up to that step:
   ``linear layers`` (every ``Int8Linear``; ``nn.Linear`` in a bf16 run), ``output head`` (``lm_head``),
   ``attention + KV cache`` (the attention modules minus their projections: rotary embedding, cache update,
   scaled-dot-product attention), ``norms`` (RMSNorm/LayerNorm), ``MLP activation`` (the MLP modules minus their
   projections: SiLU and the gate product),
   ``embedding``; ``other (Python, dispatch, residuals, mask)`` is the rest of that step (hooks' cost included);
3. the weight-read bound: bytes of every weight a step reads (int8 codes, scales, the floating-point head and
   embedding row) over the read bandwidth measured in the same run (``bench_linear.measure_bandwidth``).

``--prefill`` times the prompt's forward instead (``logits_to_keep=1``, as ``generate``'s prefill and ``bench_e2e``'s
prefill figure), the same way, and adds the linear layers' time by projection (``q_proj``, ``down_proj``, ...); no
weight-read bound there (a prefill is bound by arithmetic, not by reading the weights).

Hooks cost a few microseconds each (printed: the instrumented step minus the plain one); nested timings are taken
by module, so a category never counts a child twice.

    python scripts/profile_decode.py                       # Qwen2.5-Coder-1.5B (prepared by scripts/assets.py)
    python scripts/profile_decode.py --model smollm2 --steps 20
    python scripts/profile_decode.py --quantize-lm-head    # the opt-in int8 output head
    python scripts/profile_decode.py --prefill --prompt-tokens 512 --method bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

CATEGORIES = (
    "linear layers",
    "output head",
    "attention + KV cache",
    "norms",
    "MLP activation",
    "embedding",
)
OTHER = "other (Python, dispatch, residuals, mask)"


def categorize(model) -> dict[str, tuple[str, list[str]]]:
    """``{module name: (category, [names of its children timed separately])}`` for the modules that get hooks."""
    from torch import nn

    from hf_int8.nn import Int8Linear

    head = model.get_output_embeddings()
    out: dict[str, tuple[str, list[str]]] = {}
    for name, module in model.named_modules():
        cls = type(module).__name__
        if module is head:
            out[name] = ("output head", [])
        elif isinstance(module, (Int8Linear, nn.Linear)):
            out[name] = ("linear layers", [])
        elif isinstance(module, nn.Embedding):
            out[name] = ("embedding", [])
        elif "Norm" in cls:
            out[name] = ("norms", [])
        elif cls.endswith("Attention") or cls.endswith("MLP"):
            category = "attention + KV cache" if cls.endswith("Attention") else "MLP activation"
            # Its projections are timed as linear layers.
            children = [f"{name}.{c}" for c, m in module.named_children() if isinstance(m, (Int8Linear, nn.Linear))]
            out[name] = (category, children)
    return out


class StepTimer:
    """Forward hooks that sum wall time per category; ``children`` of a module are subtracted from it."""

    def __init__(self, model, plan: dict[str, tuple[str, list[str]]]) -> None:
        self.plan = plan
        self.module_time: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self.handles = []
        self.enabled = True
        for name, module in model.named_modules():
            if name in plan:
                self.handles.append(module.register_forward_pre_hook(self._pre(name)))
                self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(module, args):
            if self.enabled:
                self._start[name] = time.perf_counter()

        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            if self.enabled:
                self.module_time[name] += time.perf_counter() - self._start.pop(name)

        return hook

    def reset(self) -> None:
        self.module_time.clear()

    def by_projection(self) -> dict[str, float]:
        """Time of the linear layers (not the head) summed by their name in the parent module (q_proj, ...)."""
        sums: dict[str, float] = defaultdict(float)
        for name, (category, _) in self.plan.items():
            if category == "linear layers":
                sums[name.rsplit(".", 1)[-1]] += self.module_time.get(name, 0.0)
        return dict(sums)

    def categories(self) -> dict[str, float]:
        sums = dict.fromkeys(CATEGORIES, 0.0)
        for name, (category, children) in self.plan.items():
            own = self.module_time.get(name, 0.0) - sum(self.module_time.get(c, 0.0) for c in children)
            sums[category] += own
        return sums

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def weight_bytes_per_step(model) -> dict[str, int]:
    """Bytes one decode step reads: linear layers (int8 codes + scales + bias), other weights, the output head."""
    import torch

    from hf_int8.nn import Int8Linear

    head = model.get_output_embeddings()
    inputs = model.get_input_embeddings()
    tied = inputs is not None and head.weight is inputs.weight
    sizes = {"linear layers": 0, "output head": 0, "other weights": 0}
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module is not head:
            sizes["other weights"] += module.weight.shape[1] * module.weight.element_size()  # one row per token
            seen.add(id(module.weight))
            continue
        linear = isinstance(module, (Int8Linear, torch.nn.Linear))
        key = "output head" if module is head else "linear layers" if linear else "other weights"
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            sizes[key] += tensor.numel() * tensor.element_size()
    if tied:  # the embedding's tensor, counted above as one row: the head reads all of it
        sizes["output head"] += head.weight.numel() * head.weight.element_size()
    return sizes


def profile(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    spec, method = C.start_single_model_run(args)
    if method.family != "llmint8" and args.quantize_lm_head:
        raise ValueError(f"--quantize-lm-head applies to llmint8 methods, got {args.method!r}")
    start = time.perf_counter()
    if args.quantize_lm_head:
        from transformers import AutoModelForCausalLM

        from hf_int8 import Int8Config

        model = AutoModelForCausalLM.from_pretrained(
            spec.path(), dtype=C.DTYPES[method.dtype], device_map="cpu",
            quantization_config=Int8Config(threshold=method.threshold, quantize_lm_head=True),
        ).eval()  # fmt: skip
    else:
        model = C.load_model(spec, method)
    load_s = time.perf_counter() - start
    tokenizer = C.load_tokenizer(spec)
    from eval_quality import read_text

    text, _ = read_text(args.text)
    all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = args.prompt_tokens
    if len(all_ids) < args.batch * n:
        raise ValueError(
            f"the text has {len(all_ids)} tokens, fewer than --batch x --prompt-tokens = {args.batch * n}"
        )
    ids = all_ids[:n]
    prompt = torch.tensor([all_ids[b * n : (b + 1) * n] for b in range(args.batch)])

    timer = StepTimer(model, categorize(model))

    def decode(n: int) -> tuple[list[float], list[float], list[dict[str, float]], list[dict[str, float]]]:
        """``n`` plain and ``n`` timed steps, alternating, so that both see the same machine load."""
        timer.enabled = False
        if not args.prefill:
            out = model(input_ids=prompt, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        plain, hooked, cats, projs = [], [], [], []
        for step in range(2 * n):
            timer.enabled = step % 2 == 1
            timer.reset()
            t0 = time.perf_counter()
            if args.prefill:
                model(input_ids=prompt, use_cache=False, logits_to_keep=1)
            else:
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            (hooked if timer.enabled else plain).append(time.perf_counter() - t0)
            if timer.enabled:
                cats.append(timer.categories())
                projs.append(timer.by_projection())
        return plain, hooked, cats, projs

    with torch.inference_mode():
        decode(max(1, args.warmup // 2))
        plain, hooked, per_step, per_step_projections = decode(args.steps)
        timer.remove()
    step = statistics.median(plain)
    order = sorted(range(len(hooked)), key=hooked.__getitem__)
    middle = order[len(order) // 2]  # the hooked step of median length: its parts add up to it
    breakdown = dict(per_step[middle])
    breakdown[OTHER] = hooked[middle] - sum(breakdown.values())
    tokens_per_step = args.batch * (n if args.prefill else 1)

    import bench_linear

    nbytes = weight_bytes_per_step(model)
    bandwidth: float | None = None
    probe, bound_s = "", None
    if not args.prefill:
        bandwidth, probe = bench_linear.measure_bandwidth("cpu", args.probe_mib << 20, lambda: None)
        bound_s = sum(nbytes.values()) / bandwidth
    return {
        "meta": C.run_metadata(["scripts/profile_decode.py", *sys.argv[1:]]),
        "model": spec.label, "method": method.key, "quantize_lm_head": args.quantize_lm_head,
        "mode": "prefill" if args.prefill else "decode",
        "threads": torch.get_num_threads(), "load_s": load_s, "prompt_tokens": len(ids), "steps": args.steps,
        "batch": args.batch, "step_s": step, "step_hooked_s": hooked[middle],
        "tokens_per_s": tokens_per_step / step, "breakdown_s": breakdown,
        "linear_by_projection_s": per_step_projections[middle], "weight_bytes": nbytes,
        "bandwidth_bytes_per_s": bandwidth, "bandwidth_probe": probe, "weight_read_bound_s": bound_s,
        "kernels": C.kernels_in_use(),
    }  # fmt: skip


def render(r: dict[str, Any]) -> str:
    step = r["step_s"]
    prefill = r.get("mode") == "prefill"
    what = "One prefill forward" if prefill else "One decode step"
    lines = [
        f"# {what}: {r['model']}, {r['method']}" + (", int8 output head" if r["quantize_lm_head"] else ""),
        "",
        C.machine_markdown(r["meta"]),
        "",
        f"Batch {r.get('batch', 1)}, {r['prompt_tokens']}-token prompt, median of {r['steps']} "
        f"{'forwards' if prefill else 'steps'}, {r['threads']} threads: "
        f"**{step * 1e3:.1f} ms/{'forward' if prefill else 'step'} = {r['tokens_per_s']:.2f} tok/s**. Breakdown of "
        f"the median hooked one ({r['step_hooked_s'] * 1e3:.1f} ms; hooks cost the difference, in 'other'):",
        "",
    ]
    hooked = r["step_hooked_s"]
    rows = [[name, f"{sec * 1e3:.2f}", f"{100 * sec / hooked:.1f}%"] for name, sec in r["breakdown_s"].items()]
    lines += [C.markdown_table(["part", "ms", "share"], rows), ""]
    projections = r.get("linear_by_projection_s", {})
    if projections:
        rows = [[name, f"{sec * 1e3:.2f}"] for name, sec in projections.items()]
        lines += ["Linear layers by projection (all layers summed):", "", C.markdown_table(["projection", "ms"], rows)]
    if prefill:
        return "\n".join(lines)
    lines.append("")
    nb = r["weight_bytes"]
    bw = r["bandwidth_bytes_per_s"]
    rows = [[k, f"{v / 1e6:.1f}", f"{v / bw * 1e3:.2f}"] for k, v in nb.items()]
    rows.append(["total", f"{sum(nb.values()) / 1e6:.1f}", f"{r['weight_read_bound_s'] * 1e3:.2f}"])
    lines += [
        f"Weight bytes one step reads, and their read time at {bw / 1e9:.1f} GB/s ({r['bandwidth_probe']}, same run):",
        "",
        C.markdown_table(["weights", "MB", "ms at read bandwidth"], rows),
        "",
        f"Bound: {r.get('batch', 1) / r['weight_read_bound_s']:.1f} tok/s; this step reaches "
        f"{100 * r['weight_read_bound_s'] / step:.0f}% of it.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen", help="smollm2, qwen or NAME=FOLDER (a causal LM)")
    parser.add_argument("--method", default="llmint8-t6", help="an llmint8 method key, or bf16 (as in bench_e2e)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES))
    parser.add_argument("--quantize-lm-head", action="store_true", help="Int8Config(quantize_lm_head=True)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--probe-mib", type=int, default=512, help="bandwidth probe buffer (MiB)")
    parser.add_argument("--text", default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    parser.add_argument(
        "--prefill",
        action="store_true",
        help="profile the prompt's forward (logits_to_keep=1) instead of decode steps",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.prompt_tokens < 1 or args.batch < 1:
        raise ValueError(
            f"need --steps >= 1, --warmup >= 0, --prompt-tokens >= 1, --batch >= 1, got {args.steps!r}, "
            f"{args.warmup!r}, {args.prompt_tokens!r}, {args.batch!r}"
        )
    result = profile(args)
    if args.out:
        C.write_json(args.out, result)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
