"""Speed of one LLM.int8() linear layer against what users would run instead, measured side by side in one run.

For each layer shape (in_features x out_features) and token count it times, on the same activations:

* ``fp32 Linear`` / ``bf16 Linear`` (CPU) or ``fp16 Linear`` (CUDA): ``torch.nn.functional.linear``;
* ``_int_mm``: ``torch._int_mm`` alone on already-quantized int8 inputs (the GEMM bitsandbytes runs, without the
  quantization, outlier and dequantization work around it);
* ``bnb 8-bit``: bitsandbytes ``Linear8bitLt`` (``has_fp16_weights=False``, same threshold), when installed;
* ``hf_int8 ref``: :func:`hf_int8.ops.reference.int8_linear`, the pure-PyTorch path;
* ``hf_int8 native``: :func:`hf_int8.ops.int8_linear`, dispatched to the native kernels.

Ratios are ``time(peer) / time(native)``: above 1 means the native path is faster. For few tokens the table also gives
the fraction of the memory-bandwidth bound reached: ``int8 weight bytes / bandwidth`` over the native time, with the
bandwidth measured in the same run by reading a buffer larger than the last-level cache. Weights are cycled through
enough copies to exceed that buffer, so every call reads them from memory, as decoding a real model does.

The activations are normal with a few outlier columns (0.1% of the columns scaled by 20), so the outlier path of the
int8 methods does real work at threshold 6. Timings are medians over interleaved rounds (machines are shared).

With ``--breakdown`` the native path is also timed stage by stage (same run, same weights): ``quantize x``
(:func:`hf_int8.ops.quantize_activation`), ``GEMM int32`` (:func:`hf_int8.ops.int8_matmul` on codes quantized
beforehand: activation packing plus the int8 GEMM, int32 written out) and ``GEMM + dequant``
(:func:`hf_int8.ops.int8_scaled_matmul`: the same with the fused dequantizing epilogue), plus a second table that
splits the native time into those parts and gives the GEMM's int8 TOPS next to bf16 ``nn.Linear``'s TFLOPS: the
profile behind the speed-ups.

Examples::

    python scripts/bench_linear.py                       # every shape and token count (several minutes)
    python scripts/bench_linear.py --quick               # one shape, 1 and 128 tokens
    python scripts/bench_linear.py --shapes 4096x4096 --tokens 1,128 --json out.json
    python scripts/bench_linear.py --shapes 4096x4096 --tokens 512,2048 --breakdown
    python scripts/bench_linear.py --device cuda         # on a GPU: fp16 nn.Linear, bnb, _int_mm, ref, native
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_int8  # noqa: E402
from hf_int8._extension import cpu_module  # noqa: E402
from hf_int8.ops import reference  # noqa: E402

DEFAULT_SHAPES = "4096x4096,4096x11008,11008x4096,1536x8960"
DEFAULT_TOKENS = "1,4,16,128,512,2048"
QUICK_SHAPES = "4096x4096"
QUICK_TOKENS = "1,128"
FEW_TOKENS = 16  # token counts up to this report the fraction of the bandwidth bound
OUTLIER_FRACTION = 0.001  # default share of activation columns holding outliers (--outlier-fraction)
OUTLIER_SCALE = 20.0
MAX_COLD_BYTES = 1 << 30  # cap of the cold-weights footprint per method (memory is shared)
TARGET_CALL_SECONDS = 0.25  # per round, a method repeats until about this much time (within --repeats)
BNB_SPEC = "bitsandbytes==0.50.2"
STAGE_PREFIX = "stage: "  # --breakdown methods: parts of the native path, reported in their own table
# A plain read of the native path's own weight copies (the stream_read probe), timed interleaved with the methods for
# few tokens: the native time against it separates the kernel's efficiency from how much bandwidth the (shared)
# machine gives at that moment, which moves the fixed bound measured once per run.
WEIGHT_READ = STAGE_PREFIX + "weight read"
# The read-bandwidth probe: a development tool, built by this script on first use (not part of the hf_int8 package).
PROBE_SOURCE = Path(__file__).resolve().parent / "csrc" / "bandwidth.cpp"
PROBE_MODULE = "hf_int8_stream_read"
PROBE_NAME = "stream_read of scripts/csrc/bandwidth.cpp"


# ---------------------------------------------------------------------------------------------------------------
# Machine facts.
# ---------------------------------------------------------------------------------------------------------------
def llc_bytes() -> int:
    """Size of the CPU's last-level cache from sysfs (64 MiB if unknown)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        best = max(best, value)
    return best or 64 << 20


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@functools.cache
def _probe_module():
    """The compiled probe (``PROBE_SOURCE``), or None after one line on stderr saying why it could not be built."""
    from torch.utils import cpp_extension

    try:
        # Cached in the torch extensions folder ($TORCH_EXTENSIONS_DIR): rebuilt only when the source changes.
        # -fopenmp: at::parallel_for is inlined into the probe and runs on OpenMP threads like the kernels.
        return cpp_extension.load(
            PROBE_MODULE, [str(PROBE_SOURCE)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"]
        )
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:
        # The probe is optional: without it the bandwidth is torch.sum's, which can only understate the bound.
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(
            f"bench_linear: cannot build the read-bandwidth probe {PROBE_SOURCE} ({reason}); "
            "measuring the bandwidth with torch.sum only",
            file=sys.stderr,
            flush=True,
        )
        return None


def stream_read_probe() -> Callable[[torch.Tensor], int] | None:
    """The multi-stream read of a contiguous CPU tensor (returns a checksum), or None when the probe cannot be built.

    AVX2 loads are used where the CPU has them, unless ``HF_INT8_CPU_ISA`` caps the kernels below AVX2: the probe
    then reads the way the capped kernels do.
    """
    module = _probe_module()
    if module is None:
        return None
    native = cpu_module()
    return functools.partial(module.stream_read, avx2=native is None or native.cpu_isa() != "none")


def measure_bandwidth(device: str, nbytes: int, sync: Callable[[], None], repeats: int = 7) -> tuple[float, str]:
    """Read bandwidth in bytes/s over a buffer of ``nbytes`` (larger than the LLC / L2), and how it was read.

    The best of ``torch.sum`` and, on CPU, the ``stream_read`` probe (several streams per thread with prefetch, the
    access pattern of the decode kernel): a single-stream reduction under-reads a core's bandwidth, which would
    understate the bound. Each probe's fastest repeat counts: on a shared machine interference only slows a read
    down, and the bound is what the memory can deliver.
    """
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    probes: dict[str, Callable[[], object]] = {"torch.sum": buf.sum}
    stream_read = stream_read_probe() if device == "cpu" else None
    if stream_read is not None:
        probes[PROBE_NAME] = lambda: stream_read(buf)
    best, how = 0.0, ""
    for name, probe in probes.items():
        probe()
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            probe()
            sync()
            times.append(time.perf_counter() - t0)
        rate = nbytes / min(times)
        if rate > best:
            best, how = rate, name
    return best, how


# ---------------------------------------------------------------------------------------------------------------
# Methods.
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Method:
    name: str
    calls: list[Callable[[], torch.Tensor]]  # one per weight copy, cycled
    note: str = ""
    samples: list[float] = field(default_factory=list)
    # Methods that read the same weight copies share one cursor, so that every call, whichever method makes it, takes
    # the next copy: with a cursor each, the methods timed one after the other read the copies the previous one had
    # just pulled into the last-level cache, and ran partly from it.
    cursor: list[int] = field(default_factory=lambda: [0])

    def call(self) -> torch.Tensor:
        fn = self.calls[self.cursor[0] % len(self.calls)]
        self.cursor[0] += 1
        return fn()


def copies_for(nbytes: int, cold_bytes: int) -> int:
    return max(1, math.ceil(cold_bytes / max(nbytes, 1)))


def activations(
    tokens: int, k: int, dtype: torch.dtype, device: str, outlier_fraction: float = OUTLIER_FRACTION
) -> torch.Tensor:
    g = torch.Generator().manual_seed(tokens * 7919 + k)
    x = torch.randn(tokens, k, generator=g)
    n_out = max(1, round(outlier_fraction * k))
    x[:, torch.randperm(k, generator=g)[:n_out]] *= OUTLIER_SCALE
    return x.to(device=device, dtype=dtype)


def load_bnb():
    """bitsandbytes, or the reason it cannot be used (it is a benchmark-only extra)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
    except ImportError as exc:
        return None, f"bitsandbytes not installed ({exc}); pip install {BNB_SPEC} to compare against it"
    return bnb, f"bitsandbytes {bnb.__version__}"


def build_methods(args, k: int, n: int, tokens_list: list[int], cold_bytes: int, bnb) -> tuple[list, dict]:
    """Weights for one layer shape (several copies each), and one Method per peer. Returns (methods, inputs)."""
    device, dtype = args.device, args.dtype
    g = torch.Generator().manual_seed(k * 31 + n)
    w32 = torch.randn(n, k, generator=g) * (1.0 / math.sqrt(k))
    b32 = torch.randn(n, generator=g) * 0.01
    codes, scale = reference.quantize_weight(w32)
    codes, scale = codes.to(device), scale.to(device)
    bias = b32.to(device=device, dtype=dtype)

    inputs = {}
    for t in tokens_list:
        x = activations(t, k, dtype, device, args.outlier_fraction)
        xq, xs, _ = reference.quantize_activation(x.float().cpu(), 0.0)
        inputs[t] = {"x": x, "x32": x.float(), "xq": xq.to(device), "xs": xs.to(device)}
    cur: dict = {}  # the token count being timed: calls read cur["x"] etc.

    methods: list[Method] = []
    float_peers = [torch.float32, torch.bfloat16] if device == "cpu" else [torch.float16]
    for peer_dtype in float_peers:
        size = n * k * torch.finfo(peer_dtype).bits // 8
        ws = [
            (w32.to(device=device, dtype=peer_dtype), b32.to(device=device, dtype=peer_dtype))
            for _ in range(copies_for(size, cold_bytes))
        ]
        key = "x32" if peer_dtype == torch.float32 else f"x_{peer_dtype}"
        for t in tokens_list:
            inputs[t][key] = inputs[t]["x"].to(peer_dtype)
        label = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[peer_dtype]
        methods.append(Method(f"{label} Linear", [lambda w=w, b=b, key=key: F.linear(cur[key], w, b) for w, b in ws]))

    int8_copies = [(codes.clone(), scale.clone()) for _ in range(copies_for(n * k, cold_bytes))]
    int8_copies[0] = (codes, scale)

    def int_mm(w):
        a = cur["xq"]
        if device == "cuda" and (a.shape[0] <= 16 or k % 8 or n % 8):
            return None  # cuBLASLt int8 needs M > 16 and multiples of 8
        return torch._int_mm(a, w.t())

    mm_note = "n/a on CUDA for <= 16 tokens (cuBLASLt needs M > 16)" if device == "cuda" else ""
    int8_cursor = [0]  # shared by every method that reads int8_copies
    methods.append(
        Method("_int_mm", [lambda w=w: int_mm(w) for w, _ in int8_copies], note=mm_note, cursor=int8_cursor)
    )

    if bnb is not None:
        mods = []
        for _ in range(copies_for(n * k, cold_bytes)):
            lin = torch.nn.Linear(k, n)
            lin.weight.data, lin.bias.data = w32.clone(), b32.clone()
            m = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=args.threshold)
            m.load_state_dict(lin.state_dict())
            m = m.to(device).eval()
            mods.append(m)
        methods.append(Method("bnb 8-bit", [lambda m=m: m(cur["x"]) for m in mods]))

    thr = args.threshold
    methods.append(
        Method(
            "hf_int8 ref",
            [lambda w=w, s=s: reference.int8_linear(cur["x"], w, s, bias, thr) for w, s in int8_copies],
            cursor=int8_cursor,
        )
    )
    methods.append(
        Method(
            "hf_int8 native",
            [lambda w=w, s=s: hf_int8.ops.int8_linear(cur["x"], w, s, bias, thr) for w, s in int8_copies],
            cursor=int8_cursor,
        )
    )
    stream_read = stream_read_probe() if device == "cpu" else None
    if stream_read is not None:

        def read(w):
            return stream_read(w) if cur["xq"].shape[0] <= FEW_TOKENS else None

        methods.append(Method(WEIGHT_READ, [lambda w=w: read(w) for w, _ in int8_copies], cursor=int8_cursor))
    if args.breakdown:
        methods.append(Method(STAGE_PREFIX + "quantize x", [lambda: hf_int8.ops.quantize_activation(cur["x"], thr)]))
        methods.append(
            Method(
                STAGE_PREFIX + "GEMM int32",
                [lambda w=w: hf_int8.ops.int8_matmul(cur["xq"], w) for w, _ in int8_copies],
                cursor=int8_cursor,
            )
        )
        methods.append(
            Method(
                STAGE_PREFIX + "GEMM + dequant",
                [
                    lambda w=w, s=s: hf_int8.ops.int8_scaled_matmul(cur["xq"], w, cur["xs"], s, bias, dtype)
                    for w, s in int8_copies
                ],
                cursor=int8_cursor,
            )
        )
    return methods, {"inputs": inputs, "cur": cur}


def run_shape(args, k: int, n: int, cold_bytes: int, bnb, sync, bandwidth: float) -> list[dict]:
    methods, state = build_methods(args, k, n, args.tokens, cold_bytes, bnb)
    rows = []
    for t in args.tokens:
        state["cur"].clear()
        state["cur"].update(state["inputs"][t])
        for m in methods:
            m.samples = []
        with torch.inference_mode():
            for m in methods:  # warm-up (first calls allocate, JIT, fault pages in)
                for _ in range(2):
                    m.call()
            sync()
            for _ in range(args.rounds):
                for m in methods:
                    start = time.perf_counter()
                    while True:
                        sync()
                        t0 = time.perf_counter()
                        out = m.call()
                        sync()
                        if out is None:
                            break
                        m.samples.append(time.perf_counter() - t0)
                        done = len(m.samples) % args.repeats == 0
                        if done or time.perf_counter() - start > TARGET_CALL_SECONDS:
                            break
        row = {"k": k, "n": n, "tokens": t, "ms": {}, "notes": {}}
        for m in methods:
            row["ms"][m.name] = statistics.median(m.samples) * 1e3 if m.samples else None
            row["notes"][m.name] = m.note
            row.setdefault("samples", {})[m.name] = len(m.samples)
        native = row["ms"]["hf_int8 native"]
        row["bw_fraction"] = (n * k / bandwidth) / (native / 1e3) if t <= FEW_TOKENS and native else None
        read = row["ms"].get(WEIGHT_READ)
        row["read_fraction"] = read / native if t <= FEW_TOKENS and native and read else None
        rows.append(row)
        print_progress(row)
    del methods, state
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_progress(row: dict) -> None:
    parts = [f"{name} {ms:.3f}" for name, ms in row["ms"].items() if ms is not None]
    print(f"  {row['k']}x{row['n']} tokens {row['tokens']}: " + ", ".join(parts) + " ms", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------------
def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def fmt_ratio(peer: float | None, native: float | None) -> str:
    return "n/a" if peer is None or not native else f"{peer / native:.2f}x"


def markdown(rows: list[dict], method_names: list[str]) -> str:
    method_names = [m for m in method_names if not m.startswith(STAGE_PREFIX)]
    peers = [m for m in method_names if m != "hf_int8 native"]
    head = ["layer (in x out)", "tokens"] + [f"{m} ms" for m in method_names]
    head += [f"native vs {m}" for m in peers] + ["% of BW bound", "% of weight read"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        native = r["ms"].get("hf_int8 native")
        cells = [f"{r['k']}x{r['n']}", str(r["tokens"])]
        cells += [fmt_ms(r["ms"].get(m)) for m in method_names]
        cells += [fmt_ratio(r["ms"].get(m), native) for m in peers]
        cells.append("" if r["bw_fraction"] is None else f"{100 * r['bw_fraction']:.0f}%")
        cells.append("" if r.get("read_fraction") is None else f"{100 * r['read_fraction']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The layer target: at any outlier fraction, an llmint8 layer is no slower than bf16 nn.Linear on the same input.
TARGET_PEER = "bf16 Linear"
TARGET_MIN_RATIO = 1.0


def layer_targets(rows: list[dict]) -> list[dict]:
    """``native no slower than bf16 Linear`` for every row where both were timed: ratio = bf16 time / native time."""
    out = []
    for r in rows:
        peer, native = r["ms"].get(TARGET_PEER), r["ms"].get("hf_int8 native")
        if peer and native:
            ratio = peer / native
            out.append(
                {"k": r["k"], "n": r["n"], "tokens": r["tokens"], "ratio": ratio, "pass": ratio >= TARGET_MIN_RATIO}
            )
    return out


def targets_markdown(targets: list[dict]) -> str:
    lines = [
        f"Target: hf_int8 native no slower than {TARGET_PEER} on the same input (ratio = {TARGET_PEER} time / native "
        f"time >= {TARGET_MIN_RATIO:g}); {sum(t['pass'] for t in targets)} of {len(targets)} rows pass.",
        "",
        "| layer (in x out) | tokens | ratio | result |",
        "|---|---|---|---|",
    ]
    for t in targets:
        lines.append(f"| {t['k']}x{t['n']} | {t['tokens']} | {t['ratio']:.2f} | {'PASS' if t['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def breakdown_markdown(rows: list[dict]) -> str:
    """The native path split into its stages, and the GEMM's throughput next to bf16 nn.Linear's (--breakdown)."""
    head = [
        "layer (in x out)",
        "tokens",
        "native ms",
        "quantize x",
        "GEMM int32",
        "dequant epilogue",
        "outliers + rest",
        "GEMM int8 TOPS",
        "bf16 Linear TFLOPS",
        "_int_mm TOPS",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms = r["ms"]
        native, quant = ms.get("hf_int8 native"), ms.get(STAGE_PREFIX + "quantize x")
        gemm, scaled = ms.get(STAGE_PREFIX + "GEMM int32"), ms.get(STAGE_PREFIX + "GEMM + dequant")
        if None in (native, quant, gemm, scaled):
            continue
        ops = 2.0 * r["k"] * r["n"] * r["tokens"]

        def share(part: float, native: float = native) -> str:
            return f"{part:.3f} ms ({100 * part / native:.0f}%)"

        def rate(t_ms: float | None, ops: float = ops) -> str:
            return "n/a" if not t_ms else f"{ops / (t_ms * 1e-3) / 1e12:.2f}"

        cells = [
            f"{r['k']}x{r['n']}",
            str(r["tokens"]),
            fmt_ms(native),
            share(quant),
            share(gemm),
            share(scaled - gemm),
            share(native - quant - scaled),
            rate(gemm),
            rate(ms.get("bf16 Linear")),
            rate(ms.get("_int_mm")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"comma-separated in x out (default {DEFAULT_SHAPES})")
    p.add_argument("--tokens", default=None, help=f"comma-separated token counts (default {DEFAULT_TOKENS})")
    p.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, tokens {QUICK_TOKENS}, 2 rounds")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="activation dtype of the int8 methods (default bfloat16 on CPU, float16 on CUDA)",
    )
    p.add_argument("--threshold", type=float, default=6.0, help="outlier threshold of the int8 methods")
    p.add_argument(
        "--outlier-fraction",
        type=float,
        default=OUTLIER_FRACTION,
        help="share of activation columns scaled into outliers (Qwen2.5's down_proj reaches 0.7)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds over the methods (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method and round, at most")
    p.add_argument(
        "--cold-mb",
        type=int,
        default=None,
        help="weights are cycled through copies totalling this much per method (default 2x LLC / L2, "
        f"at most {MAX_COLD_BYTES >> 20})",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the native path's stages (quantize, GEMM, epilogue) and print where time goes",
    )
    args = p.parse_args(argv)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    args.tokens = [int(t) for t in (args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)).split(",")]
    args.rounds = args.rounds or (2 if args.quick else 3)
    try:
        args.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    except ValueError:
        p.error(f"--shapes must look like 4096x11008,1536x8960, got {args.shapes!r}")
    if any(len(s) != 2 or min(s) <= 0 for s in args.shape_list):
        p.error(f"--shapes must look like 4096x11008,1536x8960, got {args.shapes!r}")
    if any(t <= 0 for t in args.tokens):
        p.error(f"--tokens must be positive integers, got {args.tokens!r}")
    if not 0.0 <= args.outlier_fraction <= 1.0:
        p.error(f"--outlier-fraction must be in [0, 1], got {args.outlier_fraction!r}")
    default_dtype = "bfloat16" if args.device == "cpu" else "float16"
    args.dtype = getattr(torch, args.dtype or default_dtype)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # per-call "inputs will be cast to float16" notices
    bnb, bnb_status = load_bnb()
    if bnb is None:
        print(f"NOTE: {bnb_status}; continuing without it", file=sys.stderr)

    if args.device == "cuda":
        sync = torch.cuda.synchronize
        cache = torch.cuda.get_device_properties(0).L2_cache_size
        machine = torch.cuda.get_device_name(0)
    else:

        def sync() -> None:
            return None

        cache = llc_bytes()
        machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
    cold = (args.cold_mb << 20) if args.cold_mb else min(2 * cache, MAX_COLD_BYTES)
    bandwidth, probe = measure_bandwidth(args.device, max(cold, 2 * cache), sync)

    impl = hf_int8.implementations()
    int8_impl = impl.get(f"int8_linear[{args.device}]", "?")
    header = [
        f"# hf_int8 linear-layer benchmark ({args.device})",
        "",
        f"- command: `python scripts/bench_linear.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip(),
        f"- machine: {machine}; torch {torch.__version__}; {bnb_status}",
        f"- hf_int8 int8_linear[{args.device}]: {int8_impl}; threshold {args.threshold}; activations "
        f"{str(args.dtype).replace('torch.', '')} with {args.outlier_fraction:.1%} outlier columns "
        f"(x{OUTLIER_SCALE:g})",
        f"- read bandwidth {bandwidth / 1e9:.1f} GB/s (fastest of 7 reads, {probe}, {max(cold, 2 * cache) >> 20} MiB; "
        f"cache {cache >> 20} MiB); weights cycled through {cold >> 20} MiB of copies per method",
        f"- median of up to {args.rounds} x {args.repeats} interleaved calls; ratio = peer time / native time",
        f"- % of BW bound = (weight bytes / read bandwidth) / native time; % of weight read = time of a plain read of "
        f"the same int8 weight copies ({PROBE_NAME}, interleaved with the methods) / native time; both for "
        f"<= {FEW_TOKENS} tokens",
    ]
    print("\n".join(header[:2]), file=sys.stderr)
    rows = []
    for k, n in args.shape_list:
        rows += run_shape(args, k, n, cold, bnb, sync, bandwidth)
    names = list(rows[0]["ms"]) if rows else []
    table = markdown(rows, names)
    notes = sorted({note for r in rows for note in r["notes"].values() if note})
    print("\n".join(header) + "\n\n" + table + ("\n\n" + "\n".join(f"- {x}" for x in notes) if notes else ""))
    targets = layer_targets(rows)
    if targets:
        print("\n" + targets_markdown(targets))
    if args.breakdown:
        print(
            '\nWhere the native time goes (stages timed separately in the same run; "outliers + rest" = '
            "native - quantize - GEMM + dequant: gathering outlier columns, their fp32 product, allocation and "
            "dispatch):\n"
        )
        print(breakdown_markdown(rows))
    if args.json:
        payload = {
            "device": args.device,
            "machine": machine,
            "torch": torch.__version__,
            "bnb": bnb_status,
            "implementation": int8_impl,
            "threshold": args.threshold,
            "dtype": str(args.dtype),
            "outlier_fraction": args.outlier_fraction,
            "bandwidth_bytes_per_s": bandwidth,
            "bandwidth_probe": probe,
            "cold_bytes": cold,
            "rows": rows,
            "targets": targets,
            "env": {k: v for k, v in os.environ.items() if k.startswith("HF_INT8")},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
