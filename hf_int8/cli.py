"""``hf-int8``: quantize, inspect and convert llmint8 checkpoints from the command line.

    hf-int8 quantize SRC OUT [--threshold 6.0] [--skip NAME ...] [--dtype auto] [--push-to-hub REPO]
    hf-int8 inspect PATH [--text FILE] [--png FILE] [--json FILE]
    hf-int8 convert --to {bnb,llmint8} SRC OUT

Exit codes: 0 success; 1 the operation failed while running; 2 bad arguments (or an option needs a missing optional
package); 3 the input is missing or not the kind of checkpoint the command needs; 4 the output exists or cannot be
written; 5 the Hub upload failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint.format import CONFIG_NAME, README, SAFE_INDEX, is_weight_file

if TYPE_CHECKING:  # type-only: this module imports transformers inside the functions that use it
    from transformers import AutoModel, PreTrainedModel

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_HUB = 5

SAMPLE_TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion about rising "
    "costs, the members agreed to delay two building projects and to spend more on maintenance of the existing "
    "roads and bridges. Several residents spoke during the public session; most of them asked for better bus "
    "connections between the villages and the regional hospital, which is forty kilometres away. The chairwoman "
    "promised a written answer before the end of the month."
)
_SAVED_BY_MODEL = {CONFIG_NAME, "generation_config.json", README, SAFE_INDEX}


class CliError(Exception):
    """A failure with a message for the user and the exit code that goes with it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------
def _model_class(config) -> type[PreTrainedModel] | type[AutoModel]:
    """The transformers class named by ``config.architectures`` (keeps task heads), else ``AutoModel``."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _load_config(src: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise CliError(EXIT_INPUT, f"cannot read a transformers config from {src!r}: {exc}") from exc


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CliError(EXIT_OUTPUT, f"output {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(EXIT_OUTPUT, f"output folder {str(out)!r} is not empty; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(EXIT_OUTPUT, f"cannot create {str(out.parent)!r}: {exc}") from exc
    if not os.access(out.parent, os.W_OK):
        raise CliError(EXIT_OUTPUT, f"cannot write into {str(out.parent)!r} (permission denied)")


def _source_bytes(src: str) -> int | None:
    """Total tensor bytes of a local safetensors checkpoint (from the headers only), else ``None``."""
    from .checkpoint.integrity import read_header

    folder = Path(src)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    return sum(entry.end - entry.begin for path in files for entry in read_header(path).tensors.values())


def _copy_tokenizer(src: str, out: Path) -> list[str]:
    """Copy tokenizer/processor files next to the weights; returns what was copied."""
    folder = Path(src)
    copied = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if (
                entry.is_file()
                and entry.name not in _SAVED_BY_MODEL
                and not entry.name.startswith(".")
                and not is_weight_file(entry.name, any_framework=True)
                and entry.name != "hf_int8_asset.json"
            ):
                shutil.copy2(entry, out / entry.name)
                copied.append(entry.name)
        return copied
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError):
        return []
    return [Path(p).name for p in tokenizer.save_pretrained(out)]


def _push(out: Path, repo: str, private: bool) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    from .integration.hub import push_folder

    try:
        info = push_folder(out, repo, private=private or None)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CliError(EXIT_HUB, f"upload of {str(out)!r} to {repo!r} failed: {exc}") from exc
    return str(getattr(info, "commit_url", "") or info)


# ---------------------------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------------------------
def cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from . import Int8Config, memory_report
    from .checkpoint.staging import write_folder
    from .integration.hooks import save_unstaged

    try:
        qconfig = Int8Config(threshold=args.threshold, skip_modules=args.skip or None)
    except ValueError as exc:
        raise CliError(EXIT_USAGE, str(exc)) from exc
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    out = Path(args.out)
    _check_output(out, args.overwrite)
    config = _load_config(args.src)
    if getattr(config, "quantization_config", None):
        method = config.quantization_config
        method = method.get("quant_method") if isinstance(method, dict) else getattr(method, "quant_method", method)
        raise CliError(
            EXIT_INPUT,
            f"{args.src!r} is already quantized (quant_method {method!r}); "
            "use `hf-int8 convert` for bitsandbytes 8-bit checkpoints",
        )
    cls = _model_class(config)
    steps = ["load + quantize", "save", "tokenizer"] + (["push"] if args.push_to_hub else [])
    start = time.perf_counter()
    bar = tqdm(total=len(steps), desc="hf-int8 quantize", unit="step", disable=args.quiet)
    bar.set_postfix_str(steps[0])
    try:
        model = cls.from_pretrained(args.src, quantization_config=qconfig, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CliError(EXIT_INPUT, f"cannot load {args.src!r} as {cls.__name__} with llmint8: {exc}") from exc
    bar.update()
    bar.set_postfix_str(steps[1])

    def write(folder: str) -> list[str]:
        save_unstaged(model, folder, repo_id=args.push_to_hub)
        bar.update()
        bar.set_postfix_str(steps[2])
        return _copy_tokenizer(args.src, Path(folder))

    # One staged write (save, card, tokenizer, seal): OUT is the old folder or the complete new one, never a mix
    tokenizer_files = write_folder(out, write, keep_files=False, seal=True)
    bar.update()
    report = memory_report(model)
    url = None
    if args.push_to_hub:
        bar.set_postfix_str(steps[3])
        url = _push(out, args.push_to_hub, args.private)
        bar.update()
    bar.close()
    source = _source_bytes(args.src)
    mib = 1024**2
    print(
        f"quantized {args.src} -> {out} with llmint8 (threshold {qconfig.threshold}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"  {report.num_int8_layers} int8 layers; floating-point linear layers: "
        f"{', '.join(report.float_linear_layers) or 'none'}"
    )
    ratio = f" ({report.total / source:.3f}x of the source checkpoint's {source / mib:.2f} MiB)" if source else ""
    print(f"  memory footprint {report.total / mib:.2f} MiB{ratio}")
    print(f"  tokenizer files copied: {', '.join(tokenizer_files) or 'none found'}")
    if url:
        print(f"  pushed to {args.push_to_hub}: {url}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------------
def _sample_text(args: argparse.Namespace) -> str:
    """The text ``inspect`` runs: ``--text FILE`` or the built-in paragraph."""
    if not args.text:
        return SAMPLE_TEXT
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(EXIT_INPUT, f"cannot read --text {args.text!r}: {exc}") from exc
    if not text.strip():
        raise CliError(EXIT_INPUT, f"--text {args.text!r} is empty")
    return text


def _load_int8_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, quantization_config in the checkpoint)``: PATH loaded as llmint8, quantized on load if floating."""
    import torch

    from . import Int8Config
    from .nn import Int8Linear

    config = _load_config(args.path)
    cls = _model_class(config)
    quantized = getattr(config, "quantization_config", None)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if not quantized:
        kwargs["quantization_config"] = Int8Config(threshold=args.threshold)
    try:
        model = cls.from_pretrained(args.path, **kwargs).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CliError(EXIT_INPUT, f"cannot load {args.path!r} as an llmint8 model: {exc}") from exc
    if not any(isinstance(m, Int8Linear) for m in model.modules()):
        raise CliError(
            EXIT_INPUT,
            f"{args.path!r} loaded without any int8 layer (quantization_config "
            f"{quantized!r}): not an llmint8 checkpoint",
        )
    return model, quantized


def _token_ids(args: argparse.Namespace, text: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer_src = args.tokenizer or args.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(
            EXIT_INPUT,
            f"no tokenizer in {tokenizer_src!r} for the outlier statistics (pass --tokenizer NAME_OR_PATH): {exc}",
        ) from exc
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.max_tokens]
    if ids.numel() == 0:
        raise CliError(EXIT_INPUT, "the sample text gave no tokens")
    return ids


def _print_outlier_table(stats: list, tokens: int, source: str) -> None:
    with_outliers = [s for s in stats if s.outlier_columns]
    print(f"\noutlier statistics on {tokens} tokens ({source}):")
    width = max(len(s.name) for s in stats)
    print(f"{'layer':<{width}}  {'in':>6}  {'outlier cols':>12}  {'% cols':>7}  {'% values':>9}  {'max |x|':>9}")
    for s in stats:
        print(
            f"{s.name:<{width}}  {s.in_features:>6}  {s.outlier_columns:>12}  {100 * s.column_fraction:>6.2f}%  "
            f"{100 * s.value_fraction:>8.4f}%  {s.max_abs:>9.3g}"
        )
    largest = max(stats, key=lambda s: s.max_abs)
    print(
        f"{len(with_outliers)} of {len(stats)} int8 layers had outlier columns; largest |x| {largest.max_abs:.4g} "
        f"in {largest.name}"
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import memory_report
    from .analysis import collect_outlier_stats, write_histogram

    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise CliError(EXIT_USAGE, "--png needs matplotlib: pip install matplotlib") from exc
    if args.max_tokens < 1:
        raise CliError(EXIT_USAGE, f"--max-tokens must be >= 1, got {args.max_tokens!r}")
    text = _sample_text(args)
    model, quantized = _load_int8_model(args)
    report = memory_report(model)
    origin = (
        "llmint8 checkpoint"
        if quantized
        else f"floating-point checkpoint, quantized on load (threshold {args.threshold})"
    )
    print(f"{args.path} ({origin})")
    print(report)
    ids = _token_ids(args, text)
    stats, column_max = collect_outlier_stats(model, ids)
    _print_outlier_table(stats, int(ids.shape[1]), f"--text {args.text}" if args.text else "built-in sample")
    result: dict[str, Any] = {"path": str(args.path), "memory": report.as_dict(), "tokens": int(ids.shape[1])}
    result["layers"] = [
        {**asdict(s), "column_fraction": s.column_fraction, "value_fraction": s.value_fraction} for s in stats
    ]
    if args.png:
        write_histogram(Path(args.png), stats, column_max, f"{Path(args.path).name}: input columns of int8 layers")
        print(f"histogram written to {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"statistics written to {args.json}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from .integration.interop import ConversionError, convert

    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise CliError(EXIT_INPUT, f"source {args.src!r} is not a folder")
    if src.resolve() == out.resolve():
        raise CliError(EXIT_USAGE, f"SRC and OUT must differ, got {args.src!r} for both")
    _check_output(out, args.overwrite)
    try:
        report = convert(src, out, args.to, overwrite=args.overwrite, progress=not args.quiet)
    except FileExistsError as exc:
        raise CliError(EXIT_OUTPUT, str(exc)) from exc
    except ConversionError as exc:
        raise CliError(EXIT_INPUT, str(exc)) from exc
    print(report)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-int8",
        description="LLM.int8() (quant_method 'llmint8') checkpoints for Hugging Face Transformers.",
        epilog="exit codes: 0 ok, 1 failed while running, 2 bad arguments, 3 bad or missing input, "
        "4 output exists or is not writable, 5 Hub upload failed",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,inspect,convert}")

    q = sub.add_parser("quantize", help="quantize a floating-point checkpoint to llmint8 and save it")
    q.add_argument("src", metavar="SRC", help="local folder or Hub model id of a floating-point checkpoint")
    q.add_argument("out", metavar="OUT", help="output folder (created; must be empty unless --overwrite)")
    q.add_argument("--threshold", type=float, default=6.0, help="outlier threshold (0 disables the fp path)")
    q.add_argument(
        "--skip",
        nargs="+",
        metavar="NAME",
        default=[],
        help="extra modules to keep in floating point (added to lm_head and the model's defaults)",
    )
    q.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype of the layers that stay floating point (default: the checkpoint's)",
    )
    q.add_argument("--push-to-hub", metavar="REPO", help="also upload OUT to this Hub repo")
    q.add_argument("--private", action="store_true", help="create the Hub repo private")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="memory report and per-layer outlier statistics of an llmint8 model")
    i.add_argument("path", metavar="PATH", help="llmint8 checkpoint (a floating-point one is quantized on load)")
    i.add_argument("--text", metavar="FILE", help="UTF-8 text to run (default: a built-in English paragraph)")
    i.add_argument("--max-tokens", type=int, default=512, help="tokens of the text to use (default 512)")
    i.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="tokenizer to use when PATH has none")
    i.add_argument("--threshold", type=float, default=6.0, help="threshold when PATH is floating point")
    i.add_argument("--png", metavar="FILE", help="write a histogram of column magnitudes (needs matplotlib)")
    i.add_argument("--json", metavar="FILE", help="write the statistics as JSON")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="convert between llmint8 and bitsandbytes 8-bit checkpoints")
    c.add_argument("--to", required=True, choices=["bnb", "llmint8"], help="target format")
    c.add_argument("src", metavar="SRC", help="source checkpoint folder")
    c.add_argument("out", metavar="OUT", help="output folder (created; must be empty unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    c.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-int8`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 and a usage message on bad arguments
    import hf_int8  # noqa: F401  (registers llmint8 with transformers)

    try:
        return args.func(args)
    except CliError as exc:
        _log(f"hf-int8 {args.command}: error: {exc}")
        return exc.code
    except KeyboardInterrupt:
        _log(f"hf-int8 {args.command}: interrupted; no partial output was left")
        return 130


if __name__ == "__main__":
    sys.exit(main())
