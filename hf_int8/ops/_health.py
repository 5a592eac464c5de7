"""Whether the native kernels serve a device, decided once per device ("cpu", "cuda:0", ...) at its first op.

Two things can make a native kernel unusable where it is registered:

* **No device code for the GPU.** The CUDA extension holds machine code (SASS) for the archs it was built for and,
  optionally, PTX that the driver JIT-compiles for newer GPUs. A GPU outside that set fails every launch with "no
  kernel image is available for execution on the device". :func:`arch_problem` compares the device's compute
  capability with the built list (:func:`kernel_image_for`) and asks the driver as ground truth (a probe kernel
  compiled with the same targets: ``csrc/cuda/arch_probe.cu``).
* **Wrong results.** :func:`self_check` runs a few small problems (outliers, K = 1 and odd K, every input dtype,
  bias and none) through the native kernels and the reference on that device: int8 codes, scales, masks and int32
  products must be identical, dequantized outputs within the kernels' stated tolerance (tests/test_kernels.py).
  It costs a few milliseconds once per device and process; ``HF_INT8_SKIP_SELF_CHECK=1`` skips it.

A device that fails either check runs the reference kernels (the ``reference_*`` twins of the ops, see
``hf_int8/ops/__init__.py``) with one :class:`NativeKernelFallbackWarning`, and :func:`hf_int8.implementations` says
``"reference (fallback: <reason>)"`` for it. Devices without native kernels (or of other types, e.g. ``meta``) are
served by the dispatcher as before, unchecked.
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from dataclasses import dataclass

import torch

from . import reference
from .constants import DEFAULT_THRESHOLD

SKIP_SELF_CHECK_ENV = "HF_INT8_SKIP_SELF_CHECK"
# Device types with native kernels, and the dispatch key those register for.
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
NO_IMAGE_ERRORS = ("cudaErrorNoKernelImageForDevice", "cudaErrorInvalidDeviceFunction")


class NativeKernelFallbackWarning(RuntimeWarning):
    """The native kernels cannot serve a device; the reference kernels run there instead (correct, slower)."""


@dataclass(frozen=True)
class Verdict:
    """How one device is served. ``reason`` says why the reference serves it (empty when the native kernels do)."""

    native: bool
    reason: str = ""
    self_checked: bool = False
    self_check_s: float = 0.0  # seconds the self-check took (0 when it did not run)


# Hot path: ops/__init__.py looks the tensor's device up here on every call (one dict lookup once decided).
_native: dict[torch.device, bool] = {}
_verdicts: dict[str, Verdict] = {}
_judging: set[str] = set()  # devices whose self-check is running (in the thread holding _lock)
_lock = threading.RLock()


# ---------------------------------------------------------------------------------------------------------------
# Arch coverage.
# ---------------------------------------------------------------------------------------------------------------
_ARCH_ENTRY = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?")


def parse_arch_list(arch_list: str) -> list[tuple[int, int, str, bool]]:
    """``"8.0;9.0a;12.0+PTX"`` -> ``[(8, 0, "", False), (9, 0, "a", False), (12, 0, "", True)]``.

    Entries are TORCH_CUDA_ARCH_LIST's (``;`` or space separated); the last field says PTX is embedded too.
    """
    entries = []
    for entry in re.split(r"[;\s,]+", arch_list.strip()):
        if not entry:
            continue
        match = _ARCH_ENTRY.fullmatch(entry)
        if match is None:
            raise ValueError(f"CUDA arch entries look like '8.6', '9.0a' or '12.0+PTX', got {entry!r} ({arch_list!r})")
        major, minor, suffix, ptx = match.groups()
        entries.append((int(major), int(minor), suffix, ptx is not None))
    return entries


def kernel_image_for(capability: tuple[int, int], arch_list: str) -> str | None:
    """The image of an extension built for ``arch_list`` that a GPU of ``capability`` runs, or ``None``.

    A cubin ``sm_XY`` runs on capability ``X.Z`` with ``Z >= Y`` (``sm_XYa``: on ``X.Y`` only); PTX ``compute_XY``
    is JIT-compiled by the driver for any capability ``>= X.Y``. Machine code is preferred: ``"sm_86"``, else
    ``"compute_90 (PTX)"``.
    """
    major, minor = capability
    entries = parse_arch_list(arch_list)
    for a_major, a_minor, suffix, _ in sorted(entries, key=lambda e: (e[0], e[1]), reverse=True):
        if a_major == major and (minor == a_minor if suffix == "a" else minor >= a_minor):
            return f"sm_{a_major}{a_minor}{suffix}"
    for a_major, a_minor, suffix, ptx in sorted(entries, key=lambda e: (e[0], e[1]), reverse=True):
        if ptx and (major, minor) >= (a_major, a_minor):
            return f"compute_{a_major}{a_minor}{suffix} (PTX)"
    return None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; ``None`` for other devices (nothing to compare)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def _cuda_extension():
    from .._extension import cuda_module

    return cuda_module()


def built_arch_list(device: torch.device) -> str | None:
    """Archs the native kernels of ``device``'s type were built for (``"8.0;9.0+PTX"``); ``None`` when unknown."""
    module = _cuda_extension() if device.type == "cuda" else None
    if module is None:
        return None
    if hasattr(module, "built_arch_list") and module.built_arch_list():
        return module.built_arch_list()
    # An older build: __CUDA_ARCH_LIST__ ("800,900") names the archs but not which carry PTX.
    archs = [a for a in module.compiled_archs().split(",") if a.isdigit()]
    return ";".join(f"{int(a) // 100}.{int(a) // 10 % 10}" for a in archs) or None


def probe_kernel_image(device: torch.device) -> str | None:
    """The CUDA runtime's answer to loading the extension's probe kernel on ``device`` (``"cudaSuccess"`` or the
    error name); ``None`` where there is nothing to probe (not CUDA, or a build without the probe)."""
    module = _cuda_extension() if device.type == "cuda" else None
    if module is None or not hasattr(module, "probe_kernel_image"):
        return None
    return module.probe_kernel_image(device.index if device.index is not None else torch.cuda.current_device())


def arch_problem(device: torch.device) -> str | None:
    """Why the extension has no device code that runs on ``device``, or ``None`` when it has (or the device has no
    compute capability). The driver's answer (:func:`probe_kernel_image`) wins over the table when both exist."""
    capability = device_capability(device)
    if capability is None:
        return None
    archs = built_arch_list(device)
    probe = probe_kernel_image(device)
    if probe == "cudaSuccess":
        return None
    if probe is None:
        if archs is None or kernel_image_for(capability, archs) is not None:
            return None
        detail = "no cubin or PTX in it runs there"
    elif probe in NO_IMAGE_ERRORS:
        detail = f"the CUDA runtime answers {probe}"
    else:
        detail = f"the CUDA runtime fails to load its kernels: {probe}"
    cap = f"{capability[0]}.{capability[1]}"
    return (
        f"{device} has compute capability {cap} but the CUDA extension was built for {archs or 'unknown archs'} "
        f"({detail}); rebuild with TORCH_CUDA_ARCH_LIST including {cap} (or a lower X.Y+PTX)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Self-check.
# ---------------------------------------------------------------------------------------------------------------
SELF_CHECK_N = 5
# (M tokens, K features, outlier columns, bias), each in every input dtype. K = 1 and the odd K = 83 take the
# kernels' scalar tails, M = 1 their decode path; M = 17 with K = 64 reaches the CUDA tensor-core GEMM (M > 8) and its
# 16-byte vector loads (K % 16 == 0). Outlier columns are spread over K (0 and K/2 for two), some of their values
# cross the threshold; 12 of them with M = 20 is more than the CPU epilogue sums itself, so the outlier product runs
# as a GEMM of its own (AMX-BF16, VDPBF16PS or fp32 FMAs, by CPU and input dtype: csrc/cpu/outlier_gemm.cpp); with
# M = 1 the CPU decode kernel carries them as exact int8 pieces through its int8 product (bf16: csrc/cpu/gemm.cpp).
# M = 4 with ~30 outlier columns takes the decode kernel's own bf16 outlier dots (AVX512-BF16), M = 12 its two passes
# per weight tile (CPUs without AMX). float_linear: M <= 16 streams the weight (bf16, AVX512-BF16; M <= 4 on
# AVX2), larger M run torch's linear.
SELF_CHECK_CASES = (
    (1, 1, 0, True),
    (1, 83, 0, False),
    (1, 83, 12, True),
    (4, 83, 30, False),
    (7, 83, 2, True),
    (12, 83, 2, True),
    (17, 64, 2, False),
    (20, 83, 12, True),
)
# CUDA devices only (the CPU kernels take paths the cases above cover, and their start-up cost stays as it was):
# K = 1024 (16 K-tiles) on a GPU of 4 or more SMs splits K across blocks (the tiles alone cannot fill it), M = 33 with
# the outlier product inside the 64x64 tiles' main loop, M = 80 with the 128x128 tiles' after it, both on tensor
# cores for fp16/bf16; the blocks meet through global atomics and fences, which the CUDA emulator cannot exercise.
CUDA_SELF_CHECK_CASES = (
    (33, 1024, 16, True),
    (80, 1024, 16, False),
)
_EPS_OUT = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _problem_inputs(m: int, k: int, outliers: int, bias: bool):
    """fp32 ``x [m, k]``, ``w [N, k]`` and ``bias [N]`` (or None), on the CPU, the same in every process."""
    g = torch.Generator().manual_seed(1000 * m + k)
    x = (torch.randn(m, k, generator=g) * 2).clamp_(-5.5, 5.5)  # below the threshold...
    if outliers:  # ...except `outliers` columns spread over K, whose values cross it in some rows
        x[:, [i * k // outliers for i in range(outliers)]] *= 20.0
    w = torch.randn(SELF_CHECK_N, k, generator=g) * 0.05
    return x, w, torch.randn(SELF_CHECK_N, generator=g) if bias else None


def _mismatch(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Exact comparison (codes, scales, masks, int32 products)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{name}: got {got.dtype} {tuple(got.shape)}, the reference gives {want.dtype} {tuple(want.shape)}"
    if not torch.equal(got, want):
        return f"{name}: {int((got != want).sum())} of {want.numel()} values differ from the reference"
    return None


def _outside_tolerance(name: str, got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> str | None:
    """``|got - want| <= (eps_out + 1e-6) * magnitude + smallest normal`` elementwise (tests/test_kernels.py)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{name}: got {got.dtype} {tuple(got.shape)}, the reference gives {want.dtype} {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    bound = magnitude * (_EPS_OUT[want.dtype] + 1e-6) + torch.finfo(want.dtype).smallest_normal
    if not bool((diff <= bound).all()):  # a NaN on either side fails too: no input here makes one
        bad = int((~(diff <= bound)).sum())
        return f"{name}: {bad} of {want.numel()} outputs differ from the reference beyond the tolerance"
    return None


def _check_problems(device: torch.device, native_ops: set[str]) -> str | None:
    ops = torch.ops.hf_int8
    threshold = DEFAULT_THRESHOLD
    cases = SELF_CHECK_CASES + (CUDA_SELF_CHECK_CASES if device.type == "cuda" else ())
    for m, k, outliers, bias in cases:
        x32, w32, b32 = _problem_inputs(m, k, outliers, bias)
        for dtype in reference.FLOAT_DTYPES:
            what = f"{str(dtype).replace('torch.', '')}, M={m}, K={k}, {outliers} outlier columns"
            x, w = x32.to(device=device, dtype=dtype), w32.to(device=device, dtype=dtype)
            b = None if b32 is None else b32.to(device=device, dtype=dtype)
            w_codes, w_scale = reference.quantize_weight(w)
            if "quantize_weight" in native_ops:
                codes, scale = ops.quantize_weight(w)
                if problem := _mismatch(f"quantize_weight ({what}) codes", codes, w_codes) or _mismatch(
                    f"quantize_weight ({what}) scale", scale, w_scale
                ):
                    return problem
            x_codes, row_scale, mask = reference.quantize_activation(x, threshold)
            if "quantize_activation" in native_ops:
                got = ops.quantize_activation(x, threshold)
                wants = (x_codes, row_scale, mask)
                for part, have, want in zip(("codes", "row_scale", "mask"), got, wants, strict=True):
                    if problem := _mismatch(f"quantize_activation ({what}) {part}", have, want):
                        return problem
            acc = reference.int8_matmul(x_codes, w_codes)
            if "int8_matmul" in native_ops:
                if problem := _mismatch(f"int8_matmul ({what})", ops.int8_matmul(x_codes, w_codes), acc):
                    return problem
            # Tolerance scale: the sum of the absolute values of the terms each output adds up, in fp64.
            magnitude = acc.double().abs_().mul_(row_scale.double().unsqueeze(1) * w_scale.double())
            if b is not None:
                magnitude += b.double().abs()
            if "int8_scaled_matmul" in native_ops:
                want = reference.int8_scaled_matmul(x_codes, w_codes, row_scale, w_scale, b, dtype)
                got = ops.int8_scaled_matmul(x_codes, w_codes, row_scale, w_scale, b, dtype)
                if problem := _outside_tolerance(f"int8_scaled_matmul ({what})", got, want, magnitude):
                    return problem
            if "int8_linear" in native_ops:
                if outliers:
                    w_out = reference.dequantize_weight(w_codes[:, mask], w_scale, torch.float64)
                    magnitude += x[:, mask].double().abs() @ w_out.abs().t()
                want = reference.int8_linear(x, w_codes, w_scale, b, threshold)
                got = ops.int8_linear(x, w_codes, w_scale, b, threshold)
                if problem := _outside_tolerance(f"int8_linear ({what})", got, want, magnitude):
                    return problem
            if "float_linear" in native_ops:
                float_magnitude = x.double().abs() @ w.double().abs().t()
                if b is not None:
                    float_magnitude += b.double().abs()
                want = reference.float_linear(x, w, b)
                got = ops.float_linear(x, w, b)
                if problem := _outside_tolerance(f"float_linear ({what})", got, want, float_magnitude):
                    return problem
    return None


def self_check(device: torch.device, native_ops: set[str]) -> str | None:
    """Run :data:`SELF_CHECK_CASES` (and on a CUDA device :data:`CUDA_SELF_CHECK_CASES`) in every input dtype through
    the native kernels of ``native_ops`` on ``device`` and through the reference; return the first disagreement (or
    exception), ``None`` when all agree."""
    from torch.utils._python_dispatch import _disable_current_modes

    # Real tensors whatever the caller is doing: no fake/proxy tracing mode, autocast, autograd or default device.
    # One CPU thread: these problems are tiny, and on busy cores a 2-thread parallel region waits for a time slice
    # (measured: 16 ms with 1 thread, ~290 ms with 2 on an oversubscribed 2-core VM). Other threads of the process
    # see the smaller pool for those few milliseconds, once.
    threads = torch.get_num_threads()
    with _disable_current_modes(), torch.no_grad(), torch.autocast(device.type, enabled=False):
        try:
            if device.type == "cpu":
                torch.set_num_threads(1)
            return _check_problems(device, native_ops)
        except Exception as exc:  # a kernel that crashes is as unusable as one that is wrong
            return f"the native kernels raised {type(exc).__name__}: {exc}"
        finally:
            if device.type == "cpu":
                torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Decision.
# ---------------------------------------------------------------------------------------------------------------
def _native_ops(device: torch.device) -> set[str]:
    from . import OP_NAMES

    key = DISPATCH_KEYS.get(device.type)
    if key is None:
        return set()
    return {op for op in OP_NAMES if torch._C._dispatch_has_kernel_for_dispatch_key(f"hf_int8::{op}", key)}


def _judge(device: torch.device) -> Verdict | None:
    native_ops = _native_ops(device)
    if not native_ops:  # nothing native registered: the dispatcher already runs the reference, nothing to check
        return Verdict(True)
    problem = arch_problem(device)
    if problem is not None:
        return Verdict(False, problem)
    if os.environ.get(SKIP_SELF_CHECK_ENV, "0") not in ("", "0"):
        return Verdict(True)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # no synchronizing comparisons inside a CUDA graph capture: decide at a later call
    start = time.perf_counter()
    problem = self_check(device, native_ops)
    elapsed = time.perf_counter() - start
    if problem is not None:
        return Verdict(False, f"self-check failed: {problem}", True, elapsed)
    return Verdict(True, "", True, elapsed)


def _canonical(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def decide(device: torch.device) -> bool:
    """Judge ``device`` (once: later calls return the recorded verdict) and return whether native kernels serve it."""
    with _lock:
        native = _native.get(device)
        if native is not None:
            return native
        name = str(_canonical(device))
        if name in _judging:  # a kernel under self-check called back into hf_int8: let the dispatcher serve it
            return True
        verdict = _verdicts.get(name)
        judged = verdict is None
        if verdict is None:
            _judging.add(name)
            try:
                verdict = _judge(_canonical(device))
            finally:
                _judging.discard(name)
            if verdict is None:
                return True
            _verdicts[name] = verdict
        _native[device] = verdict.native
    if judged and not verdict.native:  # outside the lock: a filter set to "error" raises in this thread only
        warnings.warn(
            f"hf_int8: the native kernels cannot serve {name}; the pure-PyTorch reference kernels run there "
            f"instead (correct results, slower). Reason: {verdict.reason}",
            NativeKernelFallbackWarning,
            stacklevel=5,  # decide, native_kernels_serve, op_for, the entry point: report its caller
        )
    return verdict.native


@torch.compiler.assume_constant_result  # torch.compile: judged while tracing, baked into the graph as a constant
def native_kernels_serve(device: torch.device) -> bool:
    """Whether the native kernels run the ops for tensors on ``device`` (hot path: a dict lookup once decided)."""
    native = _native.get(device)
    return decide(device) if native is None else native


def verdicts() -> dict[str, Verdict]:
    """The verdict of every device judged so far, by device name (``"cpu"``, ``"cuda:0"``)."""
    with _lock:
        return dict(_verdicts)


def forget(device: str | torch.device | None = None) -> None:
    """Drop the verdict of ``device`` (of every device when ``None``): its next op judges it again. For tests."""
    with _lock:
        if device is None:
            _native.clear()
            _verdicts.clear()
            return
        name = str(_canonical(torch.device(device)))
        _verdicts.pop(name, None)
        for known in [d for d in _native if str(_canonical(d)) == name]:
            del _native[known]
