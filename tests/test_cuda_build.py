"""The CUDA extension, checked where no GPU exists (CI): it is built, it loads, every hf_int8 op has a CUDA kernel,
each kernel validates its arguments with messages naming the offending value, and the machine code is what
csrc/cuda claims (IMMA tensor-core instructions in the GEMM, no register spills: scripts/check_cuda.py).

Skipped only when the CUDA extension cannot or must not exist: torch is a CPU-only build, nvcc is missing, or the
build was switched off on purpose (HF_INT8_BUILD_CUDA=0 / HF_INT8_BUILD_NATIVE=0 / HF_INT8_DISABLE_NATIVE=1). With a
CUDA torch and nvcc present, an extension that did not build or does not load is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_int8
from hf_int8 import _extension
from hf_int8.ops import CUDA_OP_NAMES

ROOT = Path(__file__).resolve().parents[1]
FALSY = ("0", "false", "False", "no", "")


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _skip_reason() -> str | None:
    if torch.version.cuda is None:
        return "torch is a CPU-only build: no CUDA extension is built"
    for var in ("HF_INT8_BUILD_CUDA", "HF_INT8_BUILD_NATIVE"):
        if os.environ.get(var, "1") in FALSY:
            return f"{var}={os.environ[var]!r}: the CUDA extension was deliberately not built"
    if os.environ.get(_extension.DISABLE_ENV, "0") not in ("", "0"):
        return f"{_extension.DISABLE_ENV}={os.environ[_extension.DISABLE_ENV]!r}: native kernels deliberately disabled"
    if _nvcc() is None:
        return "nvcc not found (CUDA_HOME unset and none on PATH): the CUDA extension cannot be built here"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _cuda_kernel(op: str):
    """Call the kernel registered for the CUDA key directly (here with CPU tensors: only its checks can run)."""
    overload = getattr(torch.ops.hf_int8, op).default
    return lambda *args: overload.redispatch(CUDA_KEYS, *args)


def test_cuda_extension_is_built_and_loads():
    status = hf_int8.extension_status()["hf_int8._C_cuda"]
    assert status == "loaded", f"hf_int8._C_cuda: {status} (torch {torch.__version__}, nvcc {_nvcc()})"
    assert list(ROOT.glob("hf_int8/_C_cuda*.so")), "no built hf_int8/_C_cuda*.so in the source tree"


@pytest.mark.parametrize("op", CUDA_OP_NAMES)
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hf_int8::{op}", "CUDA"), (
        f"hf_int8::{op} has no CUDA kernel"
    )
    assert hf_int8.implementations()[f"{op}[cuda]"] == "native"


def test_compiled_architectures_follow_torch_cuda_arch_list():
    module = _extension.cuda_module()
    assert module is not None, hf_int8.extension_status()
    built = sorted(int(a) for a in module.compiled_archs().split(","))
    assert built and min(built) >= 750, f"kernels need sm_75+, built for {built}"
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if wanted:  # make exports the list it builds with (CI: 8.0;9.0, plus the local GPUs' archs): all must be there
        entries = re.findall(r"(\d+)\.(\d+)", wanted)
        expected = {int(major) * 100 + int(minor) * 10 for major, minor in entries}
        assert expected <= set(built), f"built for {built}, TORCH_CUDA_ARCH_LIST={wanted!r}"


def test_built_arch_list_is_known_at_run_time_and_embeds_ptx():
    """The module says which targets it holds (the run-time arch check reads this), PTX included."""
    module = _extension.cuda_module()
    built = module.built_arch_list()
    assert built.endswith("+PTX"), f"built for {built!r} ({module.built_targets()}): no PTX for newer GPUs"
    sass = {int(a) for a in module.compiled_archs().split(",")}
    listed = {int(major) * 100 + int(minor) * 10 for major, minor in re.findall(r"(\d+)\.(\d+)", built)}
    assert listed == sass, f"built_arch_list {built!r} vs __CUDA_ARCH_LIST__ {sorted(sass)}"
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if wanted:  # make's list is written the way built_arch_list spells it (sorted, "+PTX" on the highest)
        assert built == wanted.replace(" ", ";"), f"built {built!r}, TORCH_CUDA_ARCH_LIST={wanted!r}"


def test_arch_probe_answers_with_a_cuda_error_name():
    """csrc/cuda/arch_probe.cu: the driver's answer by name; without a GPU it can only be an error."""
    answer = _extension.cuda_module().probe_kernel_image(0)
    assert re.fullmatch(r"cuda[A-Za-z]+", answer), answer
    if not torch.cuda.is_available():
        assert answer != "cudaSuccess", answer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")
def test_arch_probe_finds_an_image_for_every_gpu_the_list_covers():
    from hf_int8.ops import _health

    module = _extension.cuda_module()
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        covered = _health.kernel_image_for(capability, module.built_arch_list()) is not None
        assert (module.probe_kernel_image(index) == "cudaSuccess") == covered, (index, capability)


def test_gemm_kernel_choice_by_rows():
    module = _extension.cuda_module()
    assert [module.gemm_kernel_for(m) for m in (1, 8, 9, 64, 65, 4096)] == [
        "gemv_dp4a",
        "gemv_dp4a",
        "imma_64x64",
        "imma_64x64",
        "imma_128x128",
        "imma_128x128",
    ]


i8 = torch.int8


@pytest.mark.parametrize(
    "op, args, message",
    [
        (
            "quantize_weight",
            (torch.zeros(4, 8, dtype=torch.float64),),
            "weight must be float32, bfloat16 or float16, got torch.float64",
        ),
        ("quantize_weight", (torch.zeros(4),), r"weight must be 2-D, got shape \[4\]"),
        ("quantize_weight", (torch.zeros(4, 8),), "weight must be a CUDA tensor, got one on cpu"),
        (
            "quantize_activation",
            (torch.zeros(2, 8, dtype=i8), 6.0),
            "x must be float32, bfloat16 or float16, got torch.int8",
        ),
        ("quantize_activation", (torch.zeros(2, 3, 8), 6.0), r"x must be 2-D, got shape \[2, 3, 8\]"),
        ("quantize_activation", (torch.zeros(2, 8), 6.0), "x must be a CUDA tensor, got one on cpu"),
        (
            "int8_matmul",
            (torch.zeros(2, 8), torch.zeros(3, 8, dtype=i8)),
            "a must have dtype torch.int8, got torch.float32",
        ),
        (
            "int8_matmul",
            (torch.zeros(2, 8, dtype=i8), torch.zeros(3, 7, dtype=i8)),
            r"must share K, got a \[2, 8\] and b \[3, 7\]",
        ),
        (
            "int8_matmul",
            (torch.zeros(2, 8, dtype=i8), torch.zeros(3, 8, dtype=i8)),
            "a must be a CUDA tensor, got one on cpu",
        ),
        (
            "int8_scaled_matmul",
            (
                torch.zeros(2, 8, dtype=i8),
                torch.zeros(3, 8, dtype=i8),
                torch.ones(2),
                torch.ones(3),
                None,
                torch.int32,
            ),
            "out_dtype must be float32, bfloat16 or float16, got torch.int32",
        ),
        (
            "int8_scaled_matmul",
            (torch.zeros(2, 8, dtype=i8), torch.zeros(3, 8, dtype=i8), torch.ones(5), torch.ones(3), None, torch.half),
            r"row_scale must have shape \(2,\), got \[5\]",
        ),
        (
            "int8_scaled_matmul",
            (torch.zeros(2, 8, dtype=i8), torch.zeros(3, 8, dtype=i8), torch.ones(2), torch.ones(2), None, torch.half),
            r"col_scale must have shape \(3,\), got \[2\]",
        ),
        (
            "int8_scaled_matmul",
            (
                torch.zeros(2, 8, dtype=i8),
                torch.zeros(3, 8, dtype=i8),
                torch.ones(2),
                torch.ones(3),
                torch.ones(4),
                torch.half,
            ),
            r"bias must have shape \(3,\), got \[4\]",
        ),
        (
            "int8_linear",
            (torch.zeros(2, 5, 8), torch.zeros(3, 7, dtype=i8), torch.ones(3), None, 6.0),
            r"x must have 7 features in its last dimension, got shape \[2, 5, 8\]",
        ),
        (
            "int8_linear",
            (torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(3), None, 6.0),
            "weight must have dtype torch.int8, got torch.float32",
        ),
        (
            "int8_linear",
            (torch.zeros(2, 8), torch.zeros(3, 8, dtype=i8), torch.ones(4), None, 6.0),
            r"weight_scale must have shape \(3,\), got \[4\]",
        ),
        (
            "int8_linear",
            (torch.zeros(2, 8), torch.zeros(3, 8, dtype=i8), torch.ones(3), torch.ones(3, dtype=torch.int64), 6.0),
            "bias must be float32, bfloat16 or float16, got torch.int64",
        ),
        (
            "int8_linear",
            (torch.zeros(2, 8), torch.zeros(3, 8, dtype=i8), torch.ones(3), None, 6.0),
            "x must be a CUDA tensor, got one on cpu",
        ),
    ],
)
def test_cuda_kernels_name_the_offending_value(op, args, message):
    with pytest.raises(ValueError, match=message):
        _cuda_kernel(op)(*args)


def _run_check(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_cuda.py"), *extra], capture_output=True, text=True, timeout=300
    )


def test_check_cuda_proves_imma_and_no_spills():
    done = _run_check()
    assert done.returncode == 0, f"scripts/check_cuda.py failed:\n{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert re.search(r"sm_80 void hf_int8_gemm_imma_kernel<128, 128, 64, 32>: \d+ IMMA", out), out
    assert "IMMA.16832.S8.S8" in out and "0 spill bytes" in out, out
    assert "HMMA.16816.F32.BF16" in out, out  # the outlier product of bf16 activations runs on tensor cores
    sass = re.search(r"^SASS \(cubin\) archs: (.*)$", out, re.M).group(1).split(", ")
    ptx = re.search(r"^embedded PTX: (\S+)", out, re.M).group(1).split(",")
    assert "sm_80" in sass and ptx and all(p.startswith("compute_") for p in ptx), out
    module = _extension.cuda_module()
    assert sorted(int(a[3:]) * 10 for a in sass) == sorted(int(a) for a in module.compiled_archs().split(",")), out


def test_check_cuda_rejects_a_gemm_without_imma_and_with_spills(tmp_path):
    """The checker itself can fail: a fake 'GEMM' kernel using plain integer math and local memory."""
    src = tmp_path / "bad.cu"
    src.write_text(
        """
        __global__ void hf_int8_gemm_imma_kernel(const int* a, int* out, int n) {
          int scratch[64];  // written at data-dependent indices: a stack frame in local memory, like a spill
          for (int i = 0; i < 64; ++i) scratch[i] = a[i * n + threadIdx.x];
          for (int i = 0; i < n; ++i) scratch[a[i] & 63] += scratch[(a[i] >> 6) & 63];
          out[threadIdx.x] = scratch[a[threadIdx.x] & 63];
        }
        """
    )
    obj = tmp_path / "bad.o"
    cmd = [_nvcc(), "-O3", "-gencode", "arch=compute_80,code=sm_80", "-c", str(src), "-o", str(obj)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    done = _run_check("--so", str(obj))
    assert done.returncode == 1, done.stdout
    assert "no IMMA (integer tensor-core) instruction" in done.stdout
    assert "the outlier product has no fp16/bf16 tensor-core MMA (HMMA) on sm_80" in done.stdout, done.stdout
    assert "stack frame 256 bytes" in done.stdout, done.stdout
    assert "local-memory loads/stores (LDL/STL) in the SASS" in done.stdout, done.stdout
    assert "expected 1 hf_int8_gemv_dp4a_kernel instantiation(s), found 0" in done.stdout
    assert "no PTX embedded (SASS only for ['sm_80'])" in done.stdout, done.stdout


def test_check_cuda_accepts_embedded_ptx(tmp_path):
    """The PTX check itself: the same object built with PTX next to its cubin no longer fails it."""
    src = tmp_path / "ptx.cu"
    src.write_text("__global__ void hf_int8_arch_probe_kernel(int* f) { if (f) *f = 1; }\n")
    obj = tmp_path / "ptx.o"
    gencode = "arch=compute_80,code=[sm_80,compute_80]"
    cmd = [_nvcc(), "-gencode", gencode, "-c", str(src), "-o", str(obj)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    done = _run_check("--so", str(obj))
    assert "embedded PTX: compute_80" in done.stdout, done.stdout
    assert "no PTX embedded" not in done.stdout, done.stdout


def test_split_k_fills_the_device_only_when_the_grid_is_small():
    """The tensor-core GEMM splits K when its tiles cannot fill the device (9-64 tokens, narrow layers, short
    prefills), never for the decode kernel, never below 4 K-tiles (256 bytes of K) per split, and each split of a
    plan is non-empty; its workspace holds the int32 sums and one counter per tile."""
    module = _extension.cuda_module()
    sms = 132

    def ceil_div(a: int, b: int) -> int:
        return (a + b - 1) // b

    # Qwen2.5-1.5B's projections at 16 tokens: 4 to 24 tiles of 64x64, which would leave most of 132 SMs idle.
    for n, k in ((256, 1536), (1536, 1536), (1536, 8960)):
        splits = module.gemm_splits(16, n, k, sms)
        tiles = ceil_div(n, 64)
        assert 2 <= splits <= 16 and tiles * splits <= 2 * sms, (n, k, splits)
        ktiles = ceil_div(k, 64)
        per_split = ceil_div(ktiles, splits)
        assert per_split >= 4 and (splits - 1) * per_split < ktiles, (n, k, splits)  # no empty split
        assert module.gemm_workspace_bytes(16, n, k, sms) == 16 * n * 4 + tiles * 4
        # fp16/bf16 activations with outliers: each split's fp32 outlier product too (the 64x64 tiles fuse it)
        fused = module.gemm_workspace_bytes(16, n, k, sms, fp16_outliers=True)
        assert fused == 16 * n * 4 + tiles * 4 + splits * 16 * n * 4
    assert module.gemm_splits(16, 8960, 1536, sms) == 1  # 140 tiles already fill the device
    assert module.gemm_splits(4096, 4096, 4096, sms) == 1  # prefill: 1024 tiles of 128x128
    assert module.gemm_splits(512, 1536, 1536, sms) == 2  # 48 tiles of 128x128 on 132 SMs
    assert module.gemm_splits(8, 256, 1536, sms) == 1  # decode kernel (its own split of K across warps)
    assert module.gemm_splits(16, 256, 128, sms) == 1  # 2 K-tiles: too short to split
    assert module.gemm_workspace_bytes(16, 8960, 1536, sms) == 0
    assert module.gemm_workspace_bytes(512, 1536, 1536, sms, fp16_outliers=True) == 512 * 1536 * 4 + 48 * 4
    assert module.gemm_splits(16, 256, 1536, 1) == 1  # one SM: nothing to fill


def _load_script(name: str):
    """scripts/<name>.py imported as a module (registered first: dataclasses look their module up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_roofline_model_uses_the_kernels_split_plan():
    """scripts/roofline_cuda.py estimates the kernel that is built: its split-K plan is the extension's."""
    roofline = _load_script("roofline_cuda")
    module = _extension.cuda_module()
    for sms in (1, 108, 132):
        for m in (9, 16, 64, 65, 512, 4096):
            for n, k in roofline.SHAPES.values():
                assert roofline.splits_for(m, n, k, sms) == module.gemm_splits(m, n, k, sms), (m, n, k, sms)


def test_check_cuda_reads_three_digit_architectures():
    """sm_100 and sm_120 are newer than sm_80: the sm_80+ checks (cp.async, ldmatrix, HMMA outliers) apply to them."""
    check_cuda = _load_script("check_cuda")
    assert [check_cuda._arch_number(a) for a in ("sm_75", "sm_80", "sm_90", "sm_100", "sm_120")] == [
        75,
        80,
        90,
        100,
        120,
    ]


def test_cuda_self_check_reaches_split_k_on_both_tile_kernels():
    """The first-use self-check on a GPU includes problems that split K across blocks (global atomics and fences,
    which the emulator runs one block at a time) on both tensor-core tile sizes, with outliers, K a multiple of 16."""
    from hf_int8.ops import _health

    module = _extension.cuda_module()
    cases = _health.CUDA_SELF_CHECK_CASES
    assert {module.gemm_kernel_for(m) for m, _, _, _ in cases} == {"imma_64x64", "imma_128x128"}
    for m, k, outliers, _ in cases:
        assert outliers > 0 and k % 16 == 0, (m, k)
        for sms in (4, 46, 108, 132):  # from a small GPU to an H100
            assert module.gemm_splits(m, _health.SELF_CHECK_N, k, sms) > 1, (m, k, sms)
