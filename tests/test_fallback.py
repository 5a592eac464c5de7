"""Per-device fallback to the reference kernels (hf_int8/ops/_health.py).

* the arch table: which image of an extension built for a TORCH_CUDA_ARCH_LIST runs on a GPU of a given capability;
* arch mismatch end to end: the "cpu" device is made to look like a T4 facing an sm_80/sm_90 build (capability,
  built list and driver probe patched), so every entry point must serve it from the reference kernels, bit for bit,
  with exactly one warning naming the device, its capability and the archs built;
* self-check: in a fresh process a deliberately wrong CPU kernel is registered over a native one; the first call
  must notice, warn once and give the reference's results; with HF_INT8_SKIP_SELF_CHECK=1 no check runs (the wrong
  kernel's results come through, which is what proves it);
* the self-check accepts the real native kernels on every CPU ISA path this machine has (no false alarm);
* the reference twins the fallback calls pass torch.library.opcheck, and torch.compile traces them without a break.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hf_int8
from hf_int8 import Int8Linear, ops
from hf_int8._extension import cpu_module
from hf_int8.ops import _health
from hf_int8.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device present (torch.cuda.is_available() is False)"
CPU = torch.device("cpu")


def _has_native_cpu() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("hf_int8::int8_linear", "CPU")


needs_native_cpu = pytest.mark.skipif(
    not _has_native_cpu(), reason=f"no native CPU kernels registered: {hf_int8.extension_status()}"
)


# ---------------------------------------------------------------------------------------------------------------
# (a) capability vs. built archs
# ---------------------------------------------------------------------------------------------------------------
DEFAULT = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


@pytest.mark.parametrize(
    "capability, arch_list, image",
    [
        ((7, 5), "8.0;9.0", None),  # T4 against the old CI build: no image
        ((8, 6), "8.0", "sm_80"),  # same major, higher minor: the sm_80 cubin runs
        ((12, 0), "9.0+PTX", "compute_90 (PTX)"),  # newer GPU: the driver JIT-compiles the PTX
        ((12, 0), "8.0;9.0", None),  # Blackwell against SASS only: fallback
        ((7, 5), "8.0+PTX", None),  # PTX never runs on an older GPU
        ((9, 0), "8.0;9.0+PTX", "sm_90"),  # a cubin is preferred over PTX
        ((8, 9), "8.0;9.0+PTX", "sm_80"),
        ((7, 5), DEFAULT, "sm_75"),
        ((10, 3), DEFAULT, "sm_100"),  # B300: the sm_100 cubin (same major)
        ((12, 1), DEFAULT, "sm_120"),  # DGX Spark
        ((11, 0), DEFAULT, None),  # Thor: not in the list, and 11.0 < 12.0 so the PTX cannot serve it
        ((13, 0), DEFAULT, "compute_120 (PTX)"),  # a future GPU
        ((9, 0), "9.0a", "sm_90a"),
        ((9, 1), "9.0a", None),  # arch-specific cubins run on exactly their capability
        ((8, 6), "8.0 8.6", "sm_86"),  # space-separated lists are TORCH_CUDA_ARCH_LIST's too
    ],
)
def test_kernel_image_decision_table(capability, arch_list, image):
    assert _health.kernel_image_for(capability, arch_list) == image


def test_bad_arch_entry_is_named():
    with pytest.raises(ValueError, match=r"got 'sm_80'"):
        _health.kernel_image_for((8, 0), "7.5;sm_80")


def _patch_arch(monkeypatch, capability, archs, probe):
    monkeypatch.setattr(_health, "device_capability", lambda d: capability if d.type == "cpu" else None)
    monkeypatch.setattr(_health, "built_arch_list", lambda d: archs)
    monkeypatch.setattr(_health, "probe_kernel_image", lambda d: probe)


@pytest.mark.parametrize(
    "capability, archs, probe, fails",
    [
        ((7, 5), "8.0;9.0", "cudaErrorNoKernelImageForDevice", True),
        ((7, 5), "8.0;9.0", "cudaSuccess", False),  # the driver is ground truth over the table
        ((9, 0), "8.0;9.0+PTX", "cudaErrorInvalidDeviceFunction", True),
        ((7, 5), "8.0;9.0", None, True),  # no probe in the build: the table decides
        ((12, 0), "9.0+PTX", None, False),
        ((8, 0), "8.0", "cudaErrorInsufficientDriver", True),  # any failure to load the image is a failure
    ],
)
def test_arch_problem_trusts_the_driver(monkeypatch, capability, archs, probe, fails):
    _patch_arch(monkeypatch, capability, archs, probe)
    problem = _health.arch_problem(CPU)
    assert (problem is not None) == fails, problem
    if fails:
        cap = f"{capability[0]}.{capability[1]}"
        assert f"cpu has compute capability {cap}" in problem and archs in problem, problem
        if probe:
            assert probe in problem


# ---------------------------------------------------------------------------------------------------------------
# (b) arch mismatch, end to end (on CPU tensors)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def cpu_looks_like_a_t4(monkeypatch):
    """The CPU judged as a 7.5 GPU facing an sm_80/sm_90 extension; judged afresh before and after."""
    _health.forget(CPU)
    _patch_arch(monkeypatch, (7, 5), "8.0;9.0", "cudaErrorNoKernelImageForDevice")
    yield
    _health.forget(CPU)


def _fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, _health.NativeKernelFallbackWarning)]


@needs_native_cpu
def test_arch_mismatch_serves_the_device_from_the_reference_with_one_warning(cpu_looks_like_a_t4):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(2, 6, 40, generator=g)
    x[..., 7] *= 40  # an outlier column
    bias = torch.randn(24, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        codes, scale = ops.quantize_weight(w)
        layer = Int8Linear.from_float(torch.nn.Linear(40, 24))
        got = {
            "quantize_weight": (codes, scale),
            "quantize_activation": ops.quantize_activation(x[0], 6.0),
            "int8_matmul": ops.int8_matmul(codes, codes),
            "int8_scaled_matmul": ops.int8_scaled_matmul(codes, codes, scale, scale, None, torch.bfloat16),
            "int8_linear": ops.int8_linear(x, codes, scale, bias, 6.0),
            "Int8Linear": layer(x),
        }
        for _ in range(3):
            ops.int8_linear(x, codes, scale, bias, 6.0)
        impl = hf_int8.implementations()
    messages = _fallback_warnings(caught)
    assert len(messages) == 1, messages
    assert "cpu" in messages[0] and "compute capability 7.5" in messages[0] and "8.0;9.0" in messages[0], messages
    w_codes, w_scale = ref.quantize_weight(w)
    want = {
        "quantize_weight": (w_codes, w_scale),
        "quantize_activation": ref.quantize_activation(x[0], 6.0),
        "int8_matmul": ref.int8_matmul(w_codes, w_codes),
        "int8_scaled_matmul": ref.int8_scaled_matmul(w_codes, w_codes, w_scale, w_scale, None, torch.bfloat16),
        "int8_linear": ref.int8_linear(x, w_codes, w_scale, bias, 6.0),
        "Int8Linear": ref.int8_linear(x, layer.weight, layer.weight_scale, layer.bias, layer.threshold),
    }
    for name, value in want.items():
        for g_part, w_part in zip(
            got[name] if isinstance(got[name], tuple) else (got[name],),
            value if isinstance(value, tuple) else (value,),
            strict=True,
        ):
            assert torch.equal(g_part, w_part), name
    for op in ops.OP_NAMES:
        assert impl[f"{op}[cpu]"].startswith("reference (fallback: cpu has compute capability 7.5"), impl[f"{op}[cpu]"]
    verdict = _health.verdicts()["cpu"]
    assert not verdict.native and not verdict.self_checked  # the arch check decided; no self-check was needed


@needs_native_cpu
def test_quantize_on_load_and_forward_take_the_fallback_route(cpu_looks_like_a_t4, monkeypatch, tmp_path):
    """from_pretrained's quantize-on-load and Int8Linear.forward both go through ops.op_for (the routing)."""
    from tiny_models import save_fp_model
    from transformers import AutoModelForCausalLM

    routed = []
    real_op_for = ops.op_for

    def spy(name, device):
        op = real_op_for(name, device)
        routed.append(op.__name__)
        return op

    monkeypatch.setattr(ops, "op_for", spy)
    fp = save_fp_model(tmp_path / "fp")
    with pytest.warns(_health.NativeKernelFallbackWarning):
        model = AutoModelForCausalLM.from_pretrained(fp, quantization_config=hf_int8.Int8Config(), dtype=torch.float32)
    reference_model = AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert layers and {name.partition(".")[0] for name in routed} == {"reference_quantize_weight"}, set(routed)
    for name, layer in layers.items():
        codes, scale = ref.quantize_weight(reference_model.get_submodule(name).weight.detach())
        assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scale, scale), name
    routed.clear()
    with torch.no_grad():
        model(torch.tensor([[5, 9, 17, 2]]))
    assert routed and {name.partition(".")[0] for name in routed} == {"reference_int8_linear"}, set(routed)


@needs_native_cpu
def test_fallback_keeps_autograd_and_compiles_without_graph_breaks(cpu_looks_like_a_t4):
    torch.manual_seed(0)
    with pytest.warns(ops.NativeKernelFallbackWarning, match="compute capability 7.5"):  # the public name
        layer = Int8Linear.from_float(torch.nn.Linear(32, 16))  # judges the CPU: fallback
    assert _health.verdicts()["cpu"].native is False
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    want = ref.dequantize_weight(layer.weight, layer.weight_scale).sum(0).expand(3, 32)
    torch.testing.assert_close(x.grad, want)  # the op's autograd formula, kept by the reference twin
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x.detach())
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    targets = [str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
    assert any("hf_int8.reference_int8_linear" in t for t in targets), targets
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
# (c) self-check, in fresh processes (a wrong kernel registered over a native one)
# ---------------------------------------------------------------------------------------------------------------
SELF_CHECK_SCRIPT = r"""
import json, sys, warnings
import torch
import hf_int8
from hf_int8 import Int8Linear, ops
from hf_int8.ops import _health, reference as ref

broken = sys.argv[1]
lib = torch.library.Library("hf_int8", "IMPL")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch warns that a kernel is overridden: that is the point here
    if broken == "int8_linear":  # off by one in every output
        lib.impl("int8_linear", lambda x, w, s, b, t: ref.int8_linear(x, w, s, b, t) + 1, "CPU")
    else:  # a crash
        def crash(x, threshold):
            raise RuntimeError("deliberately broken kernel")
        lib.impl("quantize_activation", crash, "CPU")

g = torch.Generator().manual_seed(5)
w_codes, w_scale = ref.quantize_weight(torch.randn(12, 30, generator=g))
x = torch.randn(4, 30, generator=g)
x[:, 3] *= 30
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [ops.int8_linear(x, w_codes, w_scale, None, 6.0) for _ in range(3)]
    layer = Int8Linear.from_float(torch.nn.Linear(30, 12))
    outs.append(layer(x))
want = [ref.int8_linear(x, w_codes, w_scale, None, 6.0)] * 3
want.append(ref.int8_linear(x, layer.weight, layer.weight_scale, layer.bias, 6.0))
verdict = _health.verdicts()["cpu"]
print(json.dumps({
    "warnings": [str(w.message) for w in caught if issubclass(w.category, _health.NativeKernelFallbackWarning)],
    "equal_reference": [bool(torch.equal(o, e)) for o, e in zip(outs, want)],
    "implementation": hf_int8.implementations()["int8_linear[cpu]"],
    "native": verdict.native,
    "self_checked": verdict.self_checked,
}))
"""


def _run_self_check_script(broken: str, skip: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != _health.SKIP_SELF_CHECK_ENV}
    if skip:
        env[_health.SKIP_SELF_CHECK_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SELF_CHECK_SCRIPT, broken],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_native_cpu
@pytest.mark.parametrize("broken, symptom", [("int8_linear", "int8_linear ("), ("quantize_activation", "raised")])
def test_self_check_catches_a_wrong_kernel_and_falls_back_once(broken, symptom):
    result = _run_self_check_script(broken, skip=False)
    assert len(result["warnings"]) == 1, result
    message = result["warnings"][0]
    assert "cannot serve cpu" in message and "self-check failed" in message and symptom in message, message
    assert all(result["equal_reference"]), result
    assert result["implementation"].startswith("reference (fallback: self-check failed"), result
    assert result["native"] is False and result["self_checked"] is True


@needs_native_cpu
def test_skip_env_var_runs_no_self_check():
    result = _run_self_check_script("int8_linear", skip=True)
    assert result["warnings"] == [] and result["self_checked"] is False and result["native"] is True, result
    # No check ran, so the wrong kernel served every int8_linear call: its off-by-one results come through.
    assert not any(result["equal_reference"]), result


# ---------------------------------------------------------------------------------------------------------------
# The self-check accepts the real kernels (no false alarm) on every CPU ISA path, and on every GPU present.
# ---------------------------------------------------------------------------------------------------------------
@needs_native_cpu
@pytest.mark.parametrize("isa", ["amx", "avx512-bf16", "avx512-vnni", "avx2", "none"])
def test_self_check_passes_on_the_native_cpu_kernels(isa, monkeypatch):
    monkeypatch.setenv("HF_INT8_CPU_ISA", isa)  # the C++ side reads it on every call
    if cpu_module().cpu_isa() != isa:
        pytest.skip(f"this CPU cannot run the {isa} kernels (best available: {cpu_module().cpu_isa()})")
    assert _health.self_check(CPU, set(ops.OP_NAMES)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_every_gpu_is_served_natively_after_its_checks():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("hf_int8::int8_linear", "CUDA"):
        pytest.skip(f"no native CUDA kernels registered: {hf_int8.extension_status()}")
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        assert _health.arch_problem(device) is None, torch.cuda.get_device_capability(index)
        assert _health.self_check(device, set(ops.OP_NAMES)) is None
        assert _health.native_kernels_serve(device)
        impl = hf_int8.implementations()
        assert impl[f"int8_linear[cuda:{index}]"] == "native", impl


# ---------------------------------------------------------------------------------------------------------------
# The reference twins (what a fallback device runs) are complete ops.
# ---------------------------------------------------------------------------------------------------------------
def _twin_cases():
    g = torch.Generator().manual_seed(11)
    w, s = ref.quantize_weight(torch.randn(12, 20, generator=g))
    x = torch.randn(5, 20, generator=g)
    x[1, 4] = 9.0
    a = torch.randint(-127, 128, (5, 20), dtype=torch.int8, generator=g)
    twins = torch.ops.hf_int8
    return [
        (twins.reference_quantize_weight.default, (torch.randn(12, 20, generator=g),)),
        (twins.reference_quantize_activation.default, (x, 6.0)),
        (twins.reference_int8_matmul.default, (a, w)),
        (twins.reference_int8_scaled_matmul.default, (a, w, torch.rand(5), s, torch.randn(12), torch.bfloat16)),
        (twins.reference_int8_linear.default, (x.clone().requires_grad_(), w, s, torch.randn(12), 6.0)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_reference_twins_pass_opcheck(case):
    op, args = _twin_cases()[case]
    torch.library.opcheck(op, args)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")  # nothing native can shadow them
