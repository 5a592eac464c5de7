"""Speed of the layers an llmint8 model keeps in floating point (``FloatLinear``: the output head, ``skip_modules``)
against torch's bf16 ``nn.Linear``, measured side by side in one run on the CPU.

For each layer shape (in_features x out_features) and token count it times, on the same bf16 activations and weight
copies (cycled through more bytes than the last-level cache, so every call reads its weight from memory, as a decode
step does):

* ``bf16 Linear``: ``torch.nn.functional.linear``, what an ``nn.Linear`` head runs;
* ``hf_int8 float_linear``: :func:`hf_int8.ops.float_linear`, what :class:`hf_int8.nn.FloatLinear` runs (its native
  kernel streams the weight up to 16 tokens; above, it calls torch's linear itself);
* ``weight read``: a plain multi-stream read of the same bf16 weight copies (the ``stream_read`` probe of
  ``bench_linear.py``), the floor for a layer that must read its weight once.

Ratios are ``time(bf16 Linear) / time(float_linear)``; "% of weight read" is the read's time over float_linear's.
Timings are medians over interleaved rounds (machines are shared).

With ``--decode MODEL`` it times whole decode steps of that model loaded as llmint8 (bf16) instead: one process,
steps alternating between the output head on hf_int8's kernel (``FloatLinear``, the default) and on torch's linear
(``native_forward = False``), so that both see the same machine load; the head's own time is taken the same way.

Examples::

    python scripts/bench_float_linear.py                                   # the heads of Qwen2.5-1.5B and SmolLM2
    python scripts/bench_float_linear.py --shapes 1536x151936 --tokens 1,8 --json out.json
    python scripts/bench_float_linear.py --decode qwen --batches 1,8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402  (scripts/ is on sys.path when this script runs)
import bench_linear as BL  # noqa: E402

import hf_int8  # noqa: E402

BF16 = "bf16 Linear"
OURS = "hf_int8 float_linear"
READ = "weight read"
DEFAULT_SHAPES = "1536x151936,576x49152,1536x8960,4096x4096"
DEFAULT_TOKENS = "1,2,4,8,12,16,17,32"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="in_features x out_features, comma separated")
    p.add_argument("--tokens", default=DEFAULT_TOKENS, help="token counts, comma separated")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per cell (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="calls per method and round (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, help="write the rows and the run's metadata here")
    p.add_argument("--decode", metavar="MODEL", help="time decode steps of this model (smollm2, qwen) instead")
    p.add_argument("--batches", default="1,8", help="--decode: sequences decoded together, comma separated")
    p.add_argument("--steps", type=int, default=40, help="--decode: decode steps per batch size (default 40)")
    args = p.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        args.tokens = [int(t) for t in args.tokens.split(",")]
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError as exc:
        p.error(f"--shapes must look like 1536x151936 and --tokens like 1,8: {exc}")
    for k, n in args.shapes:
        if k <= 0 or n <= 0:
            p.error(f"shape dimensions must be positive, got {k}x{n}")
    if any(b <= 0 for b in args.batches) or args.steps < 4:
        p.error(f"--batches must be positive and --steps >= 4, got {args.batches} and {args.steps}")
    if any(t <= 0 for t in args.tokens) or args.rounds <= 0 or args.repeats <= 0:
        p.error(f"tokens, --rounds and --repeats must be positive, got {args.tokens}, {args.rounds}, {args.repeats}")
    return args


def run_shape(args, k: int, n: int, cold_bytes: int, stream_read) -> list[dict]:
    g = torch.Generator().manual_seed(k * 31 + n)
    weight = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    copies = [weight] + [weight.clone() for _ in range(BL.copies_for(weight.nbytes, cold_bytes) - 1)]
    cursor = [0]

    def next_weight() -> torch.Tensor:
        w = copies[cursor[0] % len(copies)]
        cursor[0] += 1
        return w

    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, k, generator=g).to(torch.bfloat16)
        methods = {
            BF16: lambda x=x: torch.nn.functional.linear(x, next_weight()),
            OURS: lambda x=x: hf_int8.ops.float_linear(x, next_weight()),
        }
        if stream_read is not None:
            methods[READ] = lambda: stream_read(next_weight())
        samples: dict[str, list[float]] = {name: [] for name in methods}
        with torch.inference_mode():
            for fn in methods.values():
                fn()
                fn()
            for _ in range(args.rounds):
                for name, fn in methods.items():
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        fn()
                        samples[name].append(time.perf_counter() - t0)
        ms = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
        row = {"k": k, "n": n, "tokens": tokens, "ms": ms, "samples": {n_: len(s) for n_, s in samples.items()}}
        rows.append(row)
        print(
            f"  {k}x{n} tokens {tokens}: " + ", ".join(f"{a} {b:.3f}" for a, b in ms.items()) + " ms", file=sys.stderr
        )
    return rows


def run_decode(args) -> list[dict]:
    """Decode steps of ``args.decode`` loaded as llmint8 in bf16, the output head alternating between hf_int8's kernel
    and torch's linear step by step (the first two steps of each kind are warm-up)."""
    from hf_int8.nn import FloatLinear

    spec = C.parse_models(args.decode)[0]
    model = C.load_model(spec, C.parse_methods("llmint8-t6", "bf16")[0])
    head = model.get_output_embeddings()
    if type(head) is not FloatLinear:
        raise SystemExit(
            f"bench_float_linear: {spec.name}'s output head is a {type(head).__name__}, not a FloatLinear"
        )
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        steps: dict[bool, list[float]] = {True: [], False: []}
        heads: dict[bool, list[float]] = {True: [], False: []}
        hidden = torch.randn(batch, 1, head.in_features, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            out = model(torch.randint(0, vocab, (batch, 32), generator=g), use_cache=True)  # 32-token prompts
            for step in range(args.steps):
                native = step % 2 == 0
                head.native_forward = native
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                out = model(token, past_key_values=past, use_cache=True)
                steps[native].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                head(hidden)
                heads[native].append(time.perf_counter() - t0)
        head.native_forward = True
        row = {"model": spec.name, "batch": batch}
        for native, key in ((False, "torch"), (True, "float_linear")):
            row[f"step_ms_{key}"] = statistics.median(steps[native][2:]) * 1e3
            row[f"head_ms_{key}"] = statistics.median(heads[native][2:]) * 1e3
        rows.append(row)
        print(
            f"  batch {batch}: "
            + ", ".join(
                f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_ms_torch") or k.endswith("_ms_float_linear")
            ),
            file=sys.stderr,
        )
    return rows


def decode_markdown(rows: list[dict]) -> str:
    table = [
        [
            r["model"],
            r["batch"],
            f"{r['head_ms_torch']:.2f}",
            f"{r['head_ms_float_linear']:.2f}",
            f"{r['step_ms_torch']:.1f}",
            f"{r['step_ms_float_linear']:.1f}",
            f"{r['step_ms_torch'] / r['step_ms_float_linear']:.2f}x",
        ]
        for r in rows
    ]
    headers = ["model", "batch", "head ms, torch", "head ms, float_linear", "step ms, torch head",
               "step ms, float_linear head", "step speed-up"]  # fmt: skip
    return C.markdown_table(headers, table)


def markdown(rows: list[dict]) -> str:
    table = []
    for r in rows:
        ms = r["ms"]
        read = ms.get(READ)
        table.append(
            [
                f"{r['k']}x{r['n']}",
                r["tokens"],
                f"{ms[BF16]:.3f}",
                f"{ms[OURS]:.3f}",
                f"{ms[BF16] / ms[OURS]:.2f}x",
                "—" if read is None else f"{read:.3f}",
                "—" if read is None else f"{100 * read / ms[OURS]:.0f}%",
            ]
        )
    headers = ["layer (in x out)", "tokens", f"{BF16} ms", f"{OURS} ms", "x bf16 Linear", f"{READ} ms", "% of read"]
    return C.markdown_table(headers, table)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not hf_int8.ops.float_linear_is_native():
        print(
            f"bench_float_linear: the native float_linear kernel does not serve this machine "
            f"({hf_int8.implementations().get('float_linear[cpu]')}); the figures would time the fp32 reference",
            file=sys.stderr,
        )
        return 2
    meta = C.run_metadata(sys.argv)
    if args.decode:
        rows = run_decode(args)
        print(f"\n{C.machine_markdown(meta)}\n")
        print(f"- torch threads {torch.get_num_threads()}; {args.steps} decode steps per batch size, alternating\n")
        print(decode_markdown(rows))
    else:
        cold = 2 * BL.llc_bytes()
        stream_read = BL.stream_read_probe()
        rows = []
        for k, n in args.shapes:
            rows += run_shape(args, k, n, cold, stream_read)
        print(f"\n{C.machine_markdown(meta)}\n")
        print(
            f"- torch threads {torch.get_num_threads()}; weights cycled through {cold >> 20} MiB of copies per "
            "method\n"
        )
        print(markdown(rows))
    if args.json:
        C.write_json(args.json, {"meta": meta, "args": {"threads": torch.get_num_threads()}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
