"""Edge-case inputs give defined results or clear errors, the same on every implementation.

Implementations compared (each against the pure-PyTorch reference run on the CPU, ``hf_int8.ops.reference``):

* ``dispatch-cpu``: ``torch.ops.hf_int8.*`` on CPU tensors, i.e. the native CPU kernels when the extension is built
  (``hf_int8.implementations()`` says which), the reference otherwise;
* ``native-cpu-<isa>``: the same with the native kernels capped to a lower instruction set (``HF_INT8_CPU_ISA``), so
  the fallback paths see the same edge cases as the one this machine picks;
* ``reference-cuda`` and ``dispatch-cuda`` (native CUDA kernels): the same checks on a CUDA device, skipped only when
  no CUDA device is present.

Defined behaviour (README "Guarantees"):

* weights: NaN/Inf are refused by every user-facing path (``ops.quantize_weight``, ``Int8Linear.from_float``,
  quantize-on-load). Underneath, the op gives such a row zero codes and a non-finite scale, so only that output
  feature is non-finite. A zero row gets scale 0 and zero codes: its output is exactly the bias. Magnitudes up to
  the fp32 maximum quantize within half a step; weights beyond the fp16 range loaded with ``dtype=torch.float16``
  are quantized from the checkpoint's own precision.
* activations: a token (row) holding NaN/Inf gets non-finite values in every output feature; other tokens stay
  finite and correct. Everything is summed in fp32 and cast once, so fp16 inputs whose partial products overflow
  fp16 still give the right (finite) result; an output beyond the output dtype's range is +-inf (IEEE overflow).
* shapes: any number of leading dimensions (including 0 tokens and a single 1-D token), any strides.
* dtype/device: fp32/bf16/fp16 inputs only; everything on the weight's device; otherwise ``ValueError`` naming it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from _tolerance import assert_within, fp32_sum_tolerance, int8_linear_terms, int8_linear_tolerance
from safetensors.torch import save_file
from tiny_models import save_fp_model, small_llama_config
from transformers import AutoModelForCausalLM

import hf_int8
from hf_int8 import Int8Config, Int8Linear, ops
from hf_int8.ops import reference as ref
from hf_int8.ops.constants import INT8_MAX

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HAS_CUDA = torch.cuda.is_available()
# Float outputs against the CPU reference: an implementation may sum the fp32 outlier product in another order, then
# rounds once to the output dtype, so they are compared within the bound derived in tests/_tolerance.py, not bitwise.


class Impl:
    """One implementation of the ops: ``reference`` functions or the dispatched ``torch.ops``, on one device.

    ``isa`` caps the native CPU kernels' instruction set (``HF_INT8_CPU_ISA``, read on every call) so that the
    fallback paths get the same edge cases as the one this machine picks.
    """

    def __init__(self, name: str, device: str, dispatch: bool, isa: str | None = None) -> None:
        self.name, self.device, self.dispatch, self.isa = name, device, dispatch, isa

    def _op(self, name: str):
        op = getattr(torch.ops.hf_int8, name) if self.dispatch else getattr(ref, name)
        if self.isa is None:
            return op

        def capped(*args):
            previous = os.environ.get(ISA_ENV)
            os.environ[ISA_ENV] = self.isa
            try:
                return op(*args)
            finally:
                if previous is None:
                    del os.environ[ISA_ENV]
                else:
                    os.environ[ISA_ENV] = previous

        return capped

    def _to(self, *tensors):
        return [t.to(self.device) if isinstance(t, torch.Tensor) else t for t in tensors]

    def quantize_weight(self, w):
        return [t.cpu() for t in self._op("quantize_weight")(*self._to(w))]

    def quantize_activation(self, x, threshold):
        return [t.cpu() for t in self._op("quantize_activation")(*self._to(x), threshold)]

    def int8_linear(self, x, w, s, bias=None, threshold=6.0):
        return self._op("int8_linear")(*self._to(x, w, s, bias), threshold).cpu()

    def int8_matmul(self, a, b):
        return self._op("int8_matmul")(*self._to(a, b)).cpu()

    def int8_scaled_matmul(self, a, b, rs, cs, bias, out_dtype):
        return self._op("int8_scaled_matmul")(*self._to(a, b, rs, cs, bias), out_dtype).cpu()


_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device present")
ISA_ENV = "HF_INT8_CPU_ISA"
_native_cpu = pytest.mark.skipif(
    not hf_int8.implementations()["int8_linear[cpu]"].startswith("native"),
    reason="the native CPU extension is not built: dispatch-cpu already is the reference",
)
IMPLS = [
    pytest.param(Impl("dispatch-cpu", "cpu", True), id="dispatch-cpu"),
    *[
        pytest.param(Impl(f"native-cpu-{isa}", "cpu", True, isa=isa), id=f"native-cpu-{isa}", marks=_native_cpu)
        for isa in ("avx512-bf16", "avx512-vnni", "avx2", "none")
    ],
    pytest.param(Impl("reference-cuda", "cuda", False), id="reference-cuda", marks=[_cuda, pytest.mark.gpu]),
    pytest.param(Impl("dispatch-cuda", "cuda", True), id="dispatch-cuda", marks=[_cuda, pytest.mark.gpu]),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(n: int = 24, k: int = 40, seed: int = 0):
    return ref.quantize_weight(torch.randn(n, k, generator=_gen(seed)))


def test_implementations_under_test_are_reported():
    impl = hf_int8.implementations()
    assert impl["int8_linear[cpu]"].startswith(("native", "reference"))


# ---------------------------------------------------------------------------------------------------------------
# Quantization input: NaN/Inf, zero rows, huge and tiny magnitudes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_weight_rows_are_confined_to_their_output_feature(impl, dtype):
    w = torch.randn(8, 40, generator=_gen(1))
    w[2, 5], w[4, 0], w[5, 39] = math.nan, math.inf, -math.inf
    w = w.to(dtype)
    codes, scale = impl.quantize_weight(w)
    r_codes, r_scale = ref.quantize_weight(w)
    bad = [2, 4, 5]
    good = [i for i in range(8) if i not in bad]
    assert (codes[bad] == 0).all() and not torch.isfinite(scale[bad]).any()
    assert torch.isnan(scale[2]) and torch.isinf(scale[4]) and torch.isinf(scale[5])
    assert torch.equal(codes[good], r_codes[good]) and torch.equal(scale[good], r_scale[good])
    # Healthy rows quantize exactly as they would without their poisoned neighbours.
    alone_codes, alone_scale = ref.quantize_weight(w[good])
    assert torch.equal(codes[good], alone_codes) and torch.equal(scale[good], alone_scale)
    x = torch.randn(5, 40, generator=_gen(2)).to(dtype)
    x[1, 7] = 20.0  # an outlier column: the fp path must not spread NaN either
    out = impl.int8_linear(x, codes, scale, None, 6.0)
    assert not torch.isfinite(out[:, bad]).any()
    assert torch.isfinite(out[:, good]).all()
    tol = int8_linear_tolerance(x, alone_codes, alone_scale, None, 6.0)
    assert_within(out[:, good], ref.int8_linear(x, alone_codes, alone_scale, None, 6.0), tol, str(dtype))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_user_facing_quantization_refuses_non_finite_weights(value):
    w = torch.randn(6, 10, generator=_gen())
    w[3, 7] = value
    with pytest.raises(ValueError, match=r"row 3, column 7"):
        ops.quantize_weight(w)
    linear = torch.nn.Linear(10, 6)
    with torch.no_grad():
        linear.weight.copy_(w)
    with pytest.raises(ValueError, match="NaN/Inf"):
        Int8Linear.from_float(linear)


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    return save_fp_model(tmp_path_factory.mktemp("fp"), small_llama_config(num_hidden_layers=1), with_tokenizer=False)


def _edit_fp_checkpoint(src, dst, name, edit):
    import shutil

    from safetensors.torch import load

    shutil.copytree(src, dst)
    tensors = load((dst / "model.safetensors").read_bytes())
    edit(tensors[name])
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_quantize_on_load_refuses_nan_weights_naming_tensor_and_file(fp_checkpoint, tmp_path):
    name = "model.layers.0.mlp.gate_proj.weight"
    _edit_fp_checkpoint(fp_checkpoint, tmp_path / "nan", name, lambda t: t.__setitem__((3, 4), math.nan))
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path / "nan", quantization_config=Int8Config(), dtype=torch.float32)
    assert name in str(info.value) and "model.safetensors" in str(info.value)


@pytest.mark.parametrize("load_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_weights_beyond_fp16_range_quantize_from_the_checkpoint_precision(fp_checkpoint, tmp_path, load_dtype):
    """|w| = 1e5 is Inf in fp16; the int8 codes and fp32 scale do not care what dtype the model is loaded in."""
    name = "model.layers.0.mlp.up_proj"
    big = {}

    def edit(t):
        t[5, 3], t[6, :] = 1e5, -2e6
        big["w"] = t.clone()

    _edit_fp_checkpoint(fp_checkpoint, tmp_path / "big", f"{name}.weight", edit)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "big", quantization_config=Int8Config(), dtype=load_dtype)
    layer = model.get_submodule(name)
    source = big["w"] if load_dtype != torch.bfloat16 else big["w"].to(torch.bfloat16)
    codes, scale = ref.quantize_weight(source)
    assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scale, scale)
    assert layer.weight_scale[6].item() == pytest.approx(2e6 / INT8_MAX, rel=1e-2)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == load_dtype


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_give_exactly_the_bias(impl, dtype):
    w = torch.randn(6, 33, generator=_gen(3))
    w[1] = 0
    codes, scale = impl.quantize_weight(w.to(dtype))
    assert scale[1] == 0 and (codes[1] == 0).all() and torch.isfinite(scale).all()
    x = torch.randn(4, 33, generator=_gen(4)).to(dtype)
    x[2] = 0
    x[0, 5] = 30.0  # outlier column, so both paths run
    bias = torch.arange(6.0).to(dtype)
    out = impl.int8_linear(x, codes, scale, bias, 6.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 1], bias[1].expand(4))
    assert torch.equal(out[2], bias)
    codes_x, row_scale, _ = impl.quantize_activation(x, 6.0)
    assert row_scale[2] == 0 and (codes_x[2] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("magnitude", [1e6, 1e30, 3.0e38])
def test_huge_fp32_weights_quantize_within_half_a_step(impl, magnitude):
    w = torch.randn(5, 64, generator=_gen(5)) * (magnitude / 4)
    w[:, 0] = magnitude
    codes, scale = impl.quantize_weight(w)
    assert torch.isfinite(scale).all() and (codes.abs().amax(dim=1) == INT8_MAX).all()
    r_codes, r_scale = ref.quantize_weight(w)
    assert torch.equal(codes, r_codes) and torch.equal(scale, r_scale)
    err = (ref.dequantize_weight(codes, scale).double() - w.double()).abs()
    assert (err <= scale.double().unsqueeze(1) / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_subnormal_weight_rows_stay_finite_and_tiny(impl):
    """Documented limit: a row whose largest value is below ~3.7e-37 (127 / FLT_MAX) has an fp32 multiplier that
    overflows, so its non-zero values saturate to +-127; the error stays below the row's own largest value."""
    w = torch.tensor([[1e-40, 0.5e-40, 0.0, -1e-40], [1.0, 0.5, 0.0, -0.25]])
    codes, scale = impl.quantize_weight(w)
    r_codes, r_scale = ref.quantize_weight(w)
    assert torch.equal(codes, r_codes) and torch.equal(scale, r_scale)
    assert torch.isfinite(scale).all() and codes[0, 2] == 0
    err = (ref.dequantize_weight(codes, scale) - w).abs()
    assert (err[0] <= 1e-40).all()


# ---------------------------------------------------------------------------------------------------------------
# Forward input: shapes, strides, overflow, NaN/Inf, dtype and device
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 40), (2, 0, 40), (0, 3, 40), (1, 0, 2, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_tokens(impl, shape, dtype):
    codes, scale = _weights()
    x = torch.randn(shape).to(dtype)
    out = impl.int8_linear(x, codes, scale, torch.ones(24, dtype=dtype), 6.0)
    assert out.shape == (*shape[:-1], 24) and out.dtype == dtype
    q, row_scale, mask = impl.quantize_activation(torch.randn(0, 40).to(dtype), 6.0)
    assert q.shape == (0, 40) and row_scale.shape == (0,) and mask.shape == (40,) and not mask.any()


def test_zero_tokens_through_the_module_with_autograd():
    layer = Int8Linear.from_float(torch.nn.Linear(40, 24))
    x = torch.randn(0, 40, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == (0, 24) and x.grad.shape == (0, 40)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_one_token_in_every_shape(impl, dtype, threshold):
    codes, scale = _weights()
    x = torch.randn(40, generator=_gen(6)).to(dtype)
    x[3] = 12.0
    bias = torch.randn(24, generator=_gen(7)).to(dtype)
    expected = ref.int8_linear(x.unsqueeze(0), codes, scale, bias, threshold)
    tol = int8_linear_tolerance(x.unsqueeze(0), codes, scale, bias, threshold)
    for view in (x, x.view(1, 40), x.view(1, 1, 40), x.view(1, 1, 1, 40)):
        out = impl.int8_linear(view, codes, scale, bias, threshold)
        assert out.shape == (*view.shape[:-1], 24)
        assert_within(out.reshape(1, 24), expected, tol, f"view {tuple(view.shape)}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_and_4d_inputs_equal_the_flattened_2d_call(impl, dtype):
    codes, scale = _weights()
    x = torch.randn(2, 3, 5, 40, generator=_gen(8)).to(dtype)
    x[1, 2, 4, 11] = -15.0
    flat = impl.int8_linear(x.reshape(-1, 40), codes, scale, None, 6.0)
    # Bitwise: each implementation flattens the leading dimensions itself, so these are the very same [30, 40] call.
    assert torch.equal(impl.int8_linear(x, codes, scale, None, 6.0), flat.reshape(2, 3, 5, 24))
    assert torch.equal(impl.int8_linear(x.reshape(6, 5, 40), codes, scale, None, 6.0), flat.reshape(6, 5, 24))
    x2d = x.reshape(-1, 40)
    tol = int8_linear_tolerance(x2d, codes, scale, None, 6.0)
    assert_within(flat, ref.int8_linear(x2d, codes, scale, None, 6.0), tol, str(dtype))


def _strided_views(dtype):
    base = torch.randn(6, 2, 80, generator=_gen(9)).to(dtype)
    base[0, 0, 10] = 25.0
    return {
        "every other column": base[:, 0, ::2],
        "transposed": base[:, 0, :40].t().contiguous().t(),
        "storage offset": base.reshape(-1, 40)[3:9],
        "broadcast row (stride 0)": base[0, 0, :40].expand(7, 40),
        "permuted 3-D": base[:, :, :40].permute(1, 0, 2),
        "column window with offset": base[:, 1, 20:60],
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_strided_views(impl, dtype):
    codes, scale = _weights()
    # Bitwise: the ops make x contiguous before any arithmetic, so a view and its dense copy are the same call.
    for name, view in _strided_views(dtype).items():
        dense = view.contiguous()
        expected = impl.int8_linear(dense, codes, scale, None, 6.0)
        assert torch.equal(impl.int8_linear(view, codes, scale, None, 6.0), expected), name
        assert torch.equal(
            ops.int8_linear(view.to(impl.device), codes.to(impl.device), scale.to(impl.device)).cpu(), expected
        ), name
    # Non-contiguous weight, scale and bias views too.
    w_view = codes.t().contiguous().t()
    s_view = torch.stack([scale, scale], 1)[:, 0]
    b_full = torch.randn(48, generator=_gen(10)).to(dtype)
    x = torch.randn(5, 40, generator=_gen(11)).to(dtype)
    expected = impl.int8_linear(x, codes, scale, b_full[::2].contiguous(), 6.0)
    assert torch.equal(impl.int8_linear(x, w_view, s_view, b_full[::2], 6.0), expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_fp16_partial_products_that_overflow_fp16_still_give_the_right_answer(impl, threshold):
    """60000 * 1 + 60000 * (-1): each partial product is fine, their running sum in fp16 would not be if it went
    60000 + 60000 first. Outliers (threshold 6) or int8 (threshold 0): the sum is kept in fp32 and cast once."""
    w = torch.zeros(3, 40)
    w[:, 0], w[:, 1], w[:, 2] = 1.0, -1.0, 0.5
    codes, scale = ref.quantize_weight(w)
    x = torch.zeros(4, 40, dtype=torch.float16)
    x[:, 0] = x[:, 1] = 60000.0
    x[:, 2] = torch.tensor([2.0, 4.0, 8.0, 16.0], dtype=torch.float16)
    out = impl.int8_linear(x, codes, scale, None, threshold)
    assert torch.isfinite(out).all()
    assert_within(
        out,
        ref.int8_linear(x, codes, scale, None, threshold),
        int8_linear_tolerance(x, codes, scale, None, threshold),
        f"threshold {threshold}",
    )
    if threshold:  # every non-zero column is an outlier column: the result is the exact product, rounded once
        exact, magnitude, n_terms = int8_linear_terms(x, codes, scale, None, threshold)
        tol = fp32_sum_tolerance(magnitude, n_terms, torch.float16, exact=exact, evaluations=1)
        assert_within(out.double(), exact, tol, "vs the exact product")
    # Activations whose true result overflows fp16 give +-inf, as an fp16 matmul would: never NaN.
    x[:, 1] = -60000.0
    out = impl.int8_linear(x, codes, scale, None, threshold)
    assert torch.isinf(out).all() and (out > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("value, column", [(math.nan, 7), (math.inf, 7), (-math.inf, 7), (math.nan, 3)])
def test_non_finite_activations_stay_in_their_token(impl, dtype, threshold, value, column):
    codes, scale = _weights()
    x = torch.randn(6, 40, generator=_gen(12)).to(dtype)
    x[4, 3] = 9.0  # column 3 is an outlier column at threshold 6
    x[2, column] = value
    out = impl.int8_linear(x, codes, scale, torch.randn(24, generator=_gen(13)).to(dtype), threshold)
    healthy = [0, 1, 3, 4, 5]
    assert not torch.isfinite(out[2]).any(), "the poisoned token must not look valid"
    assert torch.isfinite(out[healthy]).all()
    # Healthy tokens are exactly what the reference computes for this batch, and close to the exact product.
    expected = ref.int8_linear(x, codes, scale, None, threshold)
    out_nobias = impl.int8_linear(x, codes, scale, None, threshold)
    tol = int8_linear_tolerance(x, codes, scale, None, threshold)
    assert_within(out_nobias[healthy], expected[healthy], tol[healthy], str(dtype))
    exact = x[healthy].double() @ ref.dequantize_weight(codes, scale).double().t()
    rel = ((out_nobias[healthy].double() - exact).norm() / exact.norm()).item()
    assert rel < 0.03


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_row_scales_in_the_scaled_matmul_stay_in_their_row(impl):
    a = torch.randint(-127, 128, (5, 40), dtype=torch.int8, generator=_gen(14))
    codes, scale = _weights()
    row_scale = torch.rand(5, generator=_gen(15))
    row_scale[1], row_scale[3] = math.nan, math.inf
    # float(acc) * (row_scale * col_scale): two fp32 roundings (in any association); NaN/Inf rows compare by position.
    magnitude = (a.double() @ codes.double().t()).abs() * (row_scale.double().unsqueeze(1) * scale.double())
    for dtype in DTYPES:
        out = impl.int8_scaled_matmul(a, codes, row_scale, scale, None, dtype)
        assert not torch.isfinite(out[[1, 3]]).any() and torch.isfinite(out[[0, 2, 4]]).all()
        want = ref.int8_scaled_matmul(a, codes, row_scale, scale, None, dtype)
        assert_within(out, want, fp32_sum_tolerance(magnitude, 2, dtype), str(dtype))


@pytest.mark.parametrize(
    "make_x, fragment",
    [
        (lambda: torch.randn(3, 40, dtype=torch.float64), "float64"),
        (lambda: torch.randint(0, 5, (3, 40)), "int64"),
        (lambda: torch.randint(0, 5, (3, 40), dtype=torch.int8), "int8"),
        (lambda: torch.ones(3, 40, dtype=torch.bool), "bool"),
        (lambda: torch.randn(3, 40, dtype=torch.complex64), "complex64"),
        (lambda: torch.randn(3, 41), "41"),
        (lambda: torch.tensor(1.0), "()"),
    ],
)
def test_wrong_input_dtype_or_shape_is_a_clear_error(make_x, fragment):
    layer = Int8Linear.from_float(torch.nn.Linear(40, 24))
    codes, scale = _weights()
    for call in (lambda x: layer(x), lambda x: ops.int8_linear(x, codes, scale)):
        with pytest.raises(ValueError) as info:
            call(make_x())
        assert fragment in str(info.value)


def test_wrong_device_is_a_clear_error():
    codes, scale = _weights()
    x = torch.randn(3, 40)
    cases = [
        (lambda: ops.int8_linear(x.to("meta"), codes, scale), "meta"),
        (lambda: ops.int8_linear(x, codes, scale.to("meta")), "weight_scale is on meta"),
        (lambda: ops.int8_linear(x, codes, scale, torch.zeros(24, device="meta")), "bias is on meta"),
        (lambda: ops.int8_linear(x, codes, scale, torch.zeros(24, dtype=torch.int32)), "int32"),
    ]
    if HAS_CUDA:
        cases.append((lambda: ops.int8_linear(x.cuda(), codes, scale), "cuda"))
    for call, fragment in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert fragment in str(info.value)


def test_module_casts_bias_to_the_input_dtype():
    layer = Int8Linear.from_float(torch.nn.Linear(40, 24))
    x = torch.randn(3, 40)
    for dtype in DTYPES:
        out = layer(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_layers_with_very_few_input_features(impl, k):
    """in_features == 1 made the reference return garbage: torch._int_mm misreads the K == 1 operand b.t() (a [1, N]
    view with strides (1, 1)) and returns uninitialised int32 values. Fixed in the reference and in the native CPU
    paths that call at::_int_mm (csrc/cpu/gemm.cpp run_onednn: the "generic" and "avx2 onednn" kernels), which both
    take an exact int32 outer product when K == 1; every implementation is checked here."""
    w = torch.randn(7, k, generator=_gen(16))
    codes, scale = impl.quantize_weight(w)
    a = torch.randint(-127, 128, (5, k), dtype=torch.int8, generator=_gen(17))
    exact_int = (a.long() @ codes.long().t()).int()
    assert torch.equal(ref.int8_matmul(a, codes), exact_int)
    assert torch.equal(impl.int8_matmul(a, codes), exact_int)
    x = torch.randn(5, k, generator=_gen(18))
    x_codes, row_scale, _ = ref.quantize_activation(x, 0.0)
    expected = (x_codes.double() @ codes.double().t()) * row_scale.double().unsqueeze(1) * scale.double()
    out = impl.int8_linear(x, codes, scale, None, 0.0)
    # The int32 product is exact; float(acc) * (row_scale * col_scale) rounds twice in fp32.
    tol = fp32_sum_tolerance(expected.abs(), 2, evaluations=1)
    assert_within(out.double(), expected, tol, f"K={k}")
    layer = Int8Linear.from_float(torch.nn.Linear(k, 7))
    assert torch.isfinite(layer(torch.randn(3, k))).all()
