"""Shared plumbing of ``scripts/eval_quality.py`` and ``scripts/bench_e2e.py``.

* the models (``smollm2``, ``qwen``, ``minilm`` from ``scripts/assets.py``, or ``NAME=PATH[:causal|encoder]``),
* the methods compared (fp32, bf16, llmint8 at two thresholds, naive per-tensor int8, bitsandbytes 8-bit,
  torchao int8) and how each one is loaded,
* the real storage of a model (``get_memory_footprint()`` counts a tensor subclass at its outer dtype),
* one worker subprocess per (model, method), so a crash, a leak or a peak of one method never touches another,
* machine/kernel metadata and JSON/markdown writing.

Every run is offline: ``HF_HUB_OFFLINE=1`` is set before transformers is imported.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "docs" / "results"
SEED = 0
MB = 1e6

INT8_MAX = 127
"""Largest magnitude of a symmetric int8 code (the naive baseline uses the same code range as llmint8)."""

NATIVE_OFF_VARIABLE = "HF_INT8_DISABLE_NATIVE"
"""hf_int8._extension.DISABLE_ENV (spelled out: importing hf_int8 here would load the extension in every parent)."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a short ``name``, its ``kind`` (``causal`` LM or ``encoder``) and where it comes from."""

    name: str
    kind: str
    locate: Callable[[], Path]
    label: str

    def path(self) -> Path:
        return Path(self.locate())


def _asset(fn_name: str) -> Callable[[], Path]:
    def locate() -> Path:
        import assets

        return getattr(assets, fn_name)()

    return locate


KNOWN_MODELS = {
    "smollm2": ModelSpec("smollm2", "causal", _asset("smollm2_path"), "SmolLM2-135M-Instruct"),
    "qwen": ModelSpec("qwen", "causal", _asset("qwen_path"), "Qwen2.5-Coder-1.5B-Instruct"),
    "minilm": ModelSpec("minilm", "encoder", _asset("minilm_path"), "all-MiniLM-L6-v2"),
}
MODEL_KINDS = ("causal", "encoder")


def model_arg(spec: ModelSpec) -> str:
    """How a worker subprocess is told about ``spec``: its known name, or ``NAME=FOLDER:KIND``."""
    return spec.name if spec is KNOWN_MODELS.get(spec.name) else f"{spec.name}={spec.path()}:{spec.kind}"


def parse_models(text: str) -> list[ModelSpec]:
    """``smollm2,qwen,minilm`` and/or ``NAME=PATH[:causal|encoder]`` entries (a local folder; default ``causal``)."""
    specs = []
    for item in [part.strip() for part in text.split(",") if part.strip()]:
        if "=" in item:
            name, _, rest = item.partition("=")
            path, kind = rest, "causal"
            if ":" in rest and rest.rsplit(":", 1)[1] in MODEL_KINDS:
                path, kind = rest.rsplit(":", 1)
            folder = Path(path).expanduser().resolve()
            if not name or not folder.is_dir():
                raise ValueError(
                    f"model entry must be NAME=FOLDER[:causal|encoder] with an existing folder, got {item!r}"
                )
            specs.append(ModelSpec(name, kind, lambda folder=folder: folder, name))
        elif item in KNOWN_MODELS:
            specs.append(KNOWN_MODELS[item])
        else:
            raise ValueError(f"unknown model {item!r}; known: {sorted(KNOWN_MODELS)} or NAME=FOLDER[:causal|encoder]")
    if not specs:
        raise ValueError(f"no model selected in {text!r}")
    return specs


# ---------------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One way of loading a model: ``family`` (how), ``threshold`` (LLM.int8() methods) and compute ``dtype``."""

    key: str
    family: str
    dtype: str
    threshold: float | None = None
    description: str = ""
    reference_kernels: bool = False

    @property
    def is_int8(self) -> bool:
        return self.family not in ("float",)

    @property
    def quantize_lm_head(self) -> bool:
        """Whether the method quantizes the output head as well (``Int8Config(quantize_lm_head=True)``)."""
        return self.family == "llmint8" and "-int8head" in self.key.partition("@")[0]

    @property
    def compiled_decode(self) -> bool:
        """Whether decoding runs with a static KV cache under ``torch.compile`` (the fast way to generate on CPU)."""
        return self.key.partition("@")[0].endswith("-compiled")

    @property
    def worker_env(self) -> dict[str, str]:
        """Environment the method's worker process needs (the reference-kernel control turns the extension off)."""
        return {NATIVE_OFF_VARIABLE: "1"} if self.reference_kernels else {}


BASE_METHODS: dict[str, tuple[str, float | None, str]] = {
    "fp32": ("float", None, "floating point, float32"),
    "bf16": ("float", None, "floating point, bfloat16"),
    "llmint8-t6": ("llmint8", 6.0, "hf_int8 LLM.int8(), threshold 6.0"),
    "llmint8-t0": ("llmint8", 0.0, "hf_int8 LLM.int8(), threshold 0 (no outlier path)"),
    # The opt-in int8 output head (Int8Config(quantize_lm_head=True)): a decode-speed lever.
    "llmint8-t6-int8head": ("llmint8", 6.0, "hf_int8 LLM.int8(), threshold 6.0, lm_head in int8 too"),
    # The same, decoding with a static KV cache and model.forward under torch.compile (prefill stays eager).
    "llmint8-t6-int8head-compiled": (
        "llmint8",
        6.0,
        "hf_int8 LLM.int8(), threshold 6.0, lm_head in int8 too, decode with a static KV cache under torch.compile",
    ),
    # A control, not a default: the same algorithm on the pure-PyTorch reference kernels. Per layer it matches the
    # native kernels to fp32 rounding; end to end the difference shows how much a model's perplexity moves when only
    # the fp32 summation order changes (int8 rounding and the outlier threshold amplify such differences).
    "llmint8-t6-ref": ("llmint8", 6.0, "hf_int8 LLM.int8(), threshold 6.0, reference (pure-PyTorch) kernels"),
    "naive-int8": ("naive", None, "naive int8: per-tensor absmax weights and activations"),
    "bnb-t6": ("bnb", 6.0, "bitsandbytes 0.50.2 8-bit, threshold 6.0"),
    "bnb-t0": ("bnb", 0.0, "bitsandbytes 0.50.2 8-bit, threshold 0"),
    "torchao-int8wo": ("torchao-wo", None, "torchao int8 weight-only"),
    "torchao-int8dyn": ("torchao-dyn", None, "torchao int8 dynamic activation + int8 weight"),
}


def parse_methods(text: str, default_dtype: str) -> list[MethodSpec]:
    """Comma-separated method keys, each optionally ``KEY@fp32|bf16|fp16`` (the compute/load dtype).

    ``fp32`` and ``bf16`` fix their own dtype; the quantized methods use ``default_dtype`` unless suffixed.
    """
    if default_dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {default_dtype!r}")
    specs = []
    for item in [part.strip() for part in text.split(",") if part.strip()]:
        base, _, dtype = item.partition("@")
        if base not in BASE_METHODS:
            raise ValueError(f"unknown method {base!r} in {item!r}; known: {sorted(BASE_METHODS)}")
        family, threshold, description = BASE_METHODS[base]
        if family == "float":
            if dtype and dtype != base:
                raise ValueError(f"method {base!r} fixes its dtype; got {item!r}")
            dtype = base
        dtype = dtype or default_dtype
        if dtype not in DTYPES:
            raise ValueError(f"dtype suffix must be one of {sorted(DTYPES)}, got {dtype!r} in {item!r}")
        key = base if family == "float" else f"{base}@{dtype}"
        specs.append(MethodSpec(key, family, dtype, threshold, description, reference_kernels=base.endswith("-ref")))
    if not specs:
        raise ValueError(f"no method selected in {text!r}")
    return specs


class NaiveInt8Linear(nn.Module):
    """The naive int8 baseline: one absmax scale for the whole weight and one for the whole activation tensor.

    ``y = int_mm(round(x / s_x), round(W / s_w)) * s_x * s_w + b`` with ``s = absmax / INT8_MAX``, exact int32
    accumulation (``torch._int_mm``). A single large activation (an "outlier feature") sets ``s_x`` for every token
    and every feature of the batch: this is what LLM.int8() was designed to avoid.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_absmax = weight.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        self.register_buffer("weight_scale", (w_absmax / INT8_MAX).reshape(()))
        codes = torch.round(weight / self.weight_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        tiny = torch.finfo(torch.float32).tiny
        x_scale = (x2.abs().max().clamp_min(tiny) / INT8_MAX) if x2.numel() else x2.new_ones(())
        codes = torch.round(x2 / x_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        acc = torch._int_mm(codes, self.weight.t())
        out = acc.float() * (x_scale * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def swap_naive_int8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` of ``model`` but ``skip`` (lm_head, as every 8-bit method keeps it) in place."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rpartition(".")[2] not in skip:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], NaiveInt8Linear(module))
            count += 1
    return count


def _quantization_config(method: MethodSpec):
    if method.family == "llmint8":
        from hf_int8 import Int8Config

        return Int8Config(threshold=method.threshold, quantize_lm_head=method.quantize_lm_head)
    if method.family == "bnb":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=method.threshold)
    if method.family.startswith("torchao"):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        kind = Int8WeightOnlyConfig() if method.family == "torchao-wo" else Int8DynamicActivationInt8WeightConfig()
        return TorchAoConfig(kind)
    return None


def load_model(spec: ModelSpec, method: MethodSpec, attn_implementation: str | None = None) -> nn.Module:
    """Load ``spec`` with ``method`` on the CPU, in eval mode (``attn_implementation``: Transformers' choice when
    ``None``, else e.g. ``"eager"`` or ``"sdpa"``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    import hf_int8  # noqa: F401  (registers llmint8 before from_pretrained)

    auto = AutoModelForCausalLM if spec.kind == "causal" else AutoModel
    kwargs: dict[str, Any] = {"dtype": DTYPES[method.dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    qconfig = _quantization_config(method)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = "cpu"
    if method.reference_kernels and os.environ.get(NATIVE_OFF_VARIABLE) != "1":
        raise RuntimeError(f"{method.key} must run in a worker started with {NATIVE_OFF_VARIABLE}=1 (not in-process)")
    model = auto.from_pretrained(spec.path(), **kwargs)
    if method.family == "naive":
        swapped = swap_naive_int8(model)
        if swapped == 0:
            raise RuntimeError(f"naive int8 found no nn.Linear to quantize in {spec.name}")
    return model.eval()


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.path())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quiet_library_warnings() -> None:
    """Silence per-call warnings that would flood the progress bars (bitsandbytes' fp16 cast notice, etc.)."""
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "MatMul8bitLt: inputs will be cast" on every call
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------
def _tensor_storage_bytes(t: torch.Tensor) -> int:
    """Bytes actually held by ``t``: inner tensors of a wrapper subclass (torchao), plus bitsandbytes' ``SCB``."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        total = sum(_tensor_storage_bytes(getattr(t, name)) for name in names)
    else:
        total = t.nelement() * t.element_size()
    scb = getattr(t, "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += scb.nelement() * scb.element_size()
    return total


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer as stored (``get_memory_footprint`` may over-count subclasses)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += _tensor_storage_bytes(t)
    return total


def checkpoint_param_count(folder: Path) -> int:
    """Number of elements in the safetensors files of ``folder`` (sizes the fp16 checkpoint: 2 bytes each)."""
    from safetensors import safe_open

    count = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                count += n
    return count


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def kernels_in_use() -> dict[str, Any]:
    """What ``hf_int8`` dispatches to in this process: per-op implementations and extension status."""
    import hf_int8

    return {"implementations": hf_int8.implementations(), "extension_status": hf_int8.extension_status()}


def machine_info() -> dict[str, Any]:
    total_mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total_mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(total_mem / 1e9, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _package_version(name)
            for name in ("torch", "transformers", "accelerate", "bitsandbytes", "torchao", "hf_int8")
        },
    }


def run_metadata(argv: list[str]) -> dict[str, Any]:
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "kernels": kernels_in_use(),
        "seed": SEED,
    }


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seed_everything(seed: int = SEED) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Worker subprocesses
# ---------------------------------------------------------------------------------------------------------------
def run_worker(
    script: Path, job: dict[str, Any], timeout: float | None, in_process: Callable[[dict], dict] | None = None
) -> dict[str, Any]:
    """Run ``script --worker JOB.json`` in a fresh interpreter; return the result dict it wrote.

    A worker that crashes, times out or writes nothing yields ``{"status": "error", "error": ...}`` for that job
    only. The worker's stderr (progress bars) passes through to ours. With ``in_process`` (the worker function),
    the job runs in this process instead (fast, for smoke tests; memory figures are then not the job's own).
    """
    if in_process is not None:
        start = time.perf_counter()
        result = in_process(dict(job))
        result.setdefault("worker_wall_s", round(time.perf_counter() - start, 2))
        result["in_process"] = True
        return result
    with tempfile.TemporaryDirectory(prefix="hf_int8_job_") as tmp:
        job_file = Path(tmp) / "job.json"
        out_file = Path(tmp) / "result.json"
        job = {**job, "result_file": str(out_file)}
        job_file.write_text(json.dumps(job))
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(script), "--worker", str(job_file)],
                stdout=subprocess.PIPE,
                stderr=None,
                text=True,
                timeout=timeout,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **job.get("env", {})},
            )
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"worker timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - start
        if out_file.is_file():
            result = json.loads(out_file.read_text())
            result.setdefault("worker_wall_s", round(wall, 2))
            if proc.returncode != 0 and result.get("status") == "ok":
                result = {**result, "status": "error", "error": f"worker exited with code {proc.returncode}"}
            return result
        tail = (proc.stdout or "")[-2000:]
        return {"status": "error", "error": f"worker exited with code {proc.returncode} and wrote no result. {tail}"}


def start_single_model_run(args) -> tuple[ModelSpec, MethodSpec]:
    """Set-up shared by the one-model scripts: quiet warnings, fixed seeds, ``--threads``, and the parsed
    ``--model`` / ``--method`` (with ``--dtype`` as the method's default dtype)."""
    import torch

    quiet_library_warnings()
    seed_everything()
    if args.threads:
        torch.set_num_threads(args.threads)
    return parse_models(args.model)[0], parse_methods(args.method, args.dtype)[0]


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def error_string(exc: BaseException) -> str:
    """One line for a results table: exception type and first line of its message (trimmed)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def work_file(out_dir: Path, name: str) -> Path:
    """A scratch file for ``out_dir``'s run (kept out of the committed results): under the asset cache."""
    root = Path(os.environ.get("HF_INT8_CACHE") or REPO / ".cache")
    tag = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
    return root / "eval_work" / tag / name


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any, spec: str = ".2f", missing: str = "—") -> str:
    if value is None:
        return missing
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def row_kernel(row: dict[str, Any]) -> str:
    """The kernel an llmint8 row's ``int8_linear`` ran on (its worker's own report); empty for other methods."""
    if not row.get("method", "").startswith("llmint8"):
        return ""
    return row.get("kernels", {}).get("implementations", {}).get("int8_linear[cpu]", "?")


def kernels_markdown(kernels: dict[str, Any]) -> str:
    impl = kernels.get("implementations", {})
    cpu = {k: v for k, v in impl.items() if k.endswith("[cpu]")}
    ops_line = ", ".join(f"`{k}` {v}" for k, v in cpu.items()) or "unknown"
    ext = ", ".join(f"`{k}`: {v}" for k, v in kernels.get("extension_status", {}).items())
    return f"hf_int8 CPU kernels: {ops_line}. Extensions: {ext}."


def machine_markdown(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    v = m["versions"]
    return (
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['torch_threads']} torch threads), "
        f"{m['memory_gb']} GB RAM, load average at start {m['load_average_at_start']}; "
        f"torch {v['torch']}, transformers {v['transformers']}, bitsandbytes {v['bitsandbytes']}, "
        f"torchao {v['torchao']}. Run {meta['date_utc']} UTC."
    )
