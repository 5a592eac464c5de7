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

Examples::

    python scripts/bench_float_linear.py                                   # the heads of Qwen2.5-1.5B and SmolLM2
    python scripts/bench_float_linear.py --shapes 1536x151936 --tokens 1,8 --json out.json
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
    args = p.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError as exc:
        p.error(f"--shapes must look like 1536x151936 and --tokens like 1,8: {exc}")
    for k, n in args.shapes:
        if k <= 0 or n <= 0:
            p.error(f"shape dimensions must be positive, got {k}x{n}")
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
    cold = 2 * BL.llc_bytes()
    stream_read = BL.stream_read_probe()
    rows = []
    for k, n in args.shapes:
        rows += run_shape(args, k, n, cold, stream_read)
    meta = C.run_metadata(sys.argv)
    print(f"\n{C.machine_markdown(meta)}\n")
    print(f"- torch threads {torch.get_num_threads()}; weights cycled through {cold >> 20} MiB of copies per method\n")
    print(markdown(rows))
    if args.json:
        C.write_json(args.json, {"meta": meta, "args": {"threads": torch.get_num_threads()}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
