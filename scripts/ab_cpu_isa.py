"""Two CPU kernel levels side by side in one process: ``int8_linear`` timed under each ``HF_INT8_CPU_ISA`` cap.

The C++ side reads ``HF_INT8_CPU_ISA`` on every call, so the two levels take turns call by call (rounds alternate
their order) on the same tensors and the same machine load; a ratio > 1 means the first level is faster. This is how
the bounds of the ``avx512-bf16`` paths were chosen (``kBf16FromShare`` in csrc/cpu/outlier_gemm.cpp,
``kCompactMinRows``/``kCompactFromShare`` in csrc/cpu/gemm.cpp): a kernel path that pays only above some outlier
share is measured across that share.

    python scripts/ab_cpu_isa.py                                   # avx512-bf16 vs avx512-vnni, default grid
    python scripts/ab_cpu_isa.py --fractions 0.065,0.1 --tokens 16,512 --shapes 4096x11008
    python scripts/ab_cpu_isa.py --levels avx512-vnni,avx2 --json ab.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _common as C
import bench_linear
import torch

ISA_ENV = "HF_INT8_CPU_ISA"


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a shape is IN x OUT, e.g. 4096x11008, got {text!r}")
    return int(parts[0]), int(parts[1])


def _list(kind, text: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError(f"an empty list: {text!r}")
    return values


def run(args: argparse.Namespace) -> list[dict]:
    """Time every (shape, tokens, fraction) under both levels; the caller's HF_INT8_CPU_ISA is restored after."""
    previous = os.environ.get(ISA_ENV)
    try:
        return _run(args)
    finally:
        if previous is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = previous


def _run(args: argparse.Namespace) -> list[dict]:
    from hf_int8 import ops
    from hf_int8._extension import cpu_module

    module = cpu_module()
    if module is None:
        raise SystemExit("the native CPU kernels are not built (make build): nothing to compare")
    for level in args.levels:
        os.environ[ISA_ENV] = level
        if module.cpu_isa() != level:
            raise SystemExit(f"this CPU cannot run {level!r} (best available: {module.cpu_isa()})")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k, n in args.shapes:
        codes, scale = ops.quantize_weight(torch.randn(n, k, generator=gen))
        for tokens in args.tokens:
            for fraction in args.fractions:
                x = bench_linear.activations(tokens, k, args.dtype, "cpu", fraction)  # the layer benchmark's inputs

                def call(x=x, codes=codes, scale=scale) -> None:
                    ops.int8_linear(x, codes, scale, None, 6.0)

                times: dict[str, list[float]] = {level: [] for level in args.levels}
                for r in range(args.rounds):
                    for level in args.levels if r % 2 == 0 else args.levels[::-1]:
                        os.environ[ISA_ENV] = level
                        call()  # warm-up at this level (first use of a path)
                        times[level].append(C.median_time(call, args.calls))
                first, second = (min(times[level]) for level in args.levels)
                row = {"shape": f"{k}x{n}", "tokens": tokens, "outlier_fraction": fraction}
                row.update({f"{level}_ms": min(times[level]) * 1e3 for level in args.levels})
                row["ratio"] = second / first
                rows.append(row)
                print(
                    f"{k}x{n} tokens {tokens} outliers {fraction:.1%}: "
                    + ", ".join(f"{level} {row[f'{level}_ms']:.3f} ms" for level in args.levels)
                    + f", {args.levels[0]} {row['ratio']:.2f}x",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=lambda t: _list(str, t), default=["avx512-bf16", "avx512-vnni"])
    parser.add_argument(
        "--shapes", type=lambda t: _list(_shape, t), default=[(4096, 4096), (4096, 11008), (1536, 8960)]
    )
    parser.add_argument("--tokens", type=lambda t: _list(int, t), default=[16, 128, 512])
    parser.add_argument("--fractions", type=lambda t: _list(float, t), default=[0.01, 0.065, 0.1, 0.2, 0.7])
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the fastest median counts")
    parser.add_argument("--calls", type=int, default=9, help="timed calls per level and round (median)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if len(args.levels) != 2:
        parser.error(f"--levels takes exactly two levels, got {args.levels!r}")
    if any(not 0.0 <= f <= 1.0 for f in args.fractions):
        parser.error(f"--fractions must lie in [0, 1], got {args.fractions!r}")
    if args.rounds < 1 or args.calls < 1 or any(t < 1 for t in args.tokens):
        parser.error(f"--rounds, --calls and --tokens must be >= 1, got {args.rounds}, {args.calls}, {args.tokens}")
    args.dtype = getattr(torch, args.dtype)
    rows = run(args)
    if args.json:
        record = C.run_metadata(["scripts/ab_cpu_isa.py", *(sys.argv[1:] if argv is None else argv)])
        record.update(threads=torch.get_num_threads(), levels=args.levels, rows=rows)
        C.write_json(Path(args.json), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
