"""Native kernels against the pure-PyTorch reference (the oracle), on CPU and, where a GPU exists, on CUDA.

Every comparison runs on each CPU instruction-set path this machine can take (HF_INT8_CPU_ISA caps the choice at
run time: ``amx``, ``avx512-bf16``, ``avx512-vnni``, ``avx2``, ``none``), so the fallbacks are tested here too, not
only the path the machine picks; on CUDA it runs whatever the CUDA extension registered. The oracle always runs on
the CPU, from :mod:`hf_int8.ops.reference` directly.

What must hold (README, "Native CPU kernels"):
* int8 codes, row scales, outlier masks and int32 accumulators: identical to the reference;
* dequantized outputs: within the fp32 summation bound of tests/_tolerance.py (``int8_linear_tolerance``:
  ``2 * gamma_n * (|acc * scale| + |x_outlier| @ |w_outlier|.T + |bias|)`` with ``n = 3 * outlier_columns + 3``,
  plus one rounding to the output dtype on each side). The only freedom is the summation order of the fp32 outlier
  product and where the final rounding lands; the codes, scales and int8 part are fixed by quant_math.h, so on CPU
  the result is bit-identical whenever no column is an outlier (checked too: no sum in another order is involved).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
from _tolerance import assert_within, fp32_sum_tolerance, int8_linear_tolerance

import hf_int8
from hf_int8 import ops
from hf_int8._extension import cpu_module
from hf_int8.ops import _health
from hf_int8.ops import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISA_ENV = "HF_INT8_CPU_ISA"
CPU_ISAS = ["amx", "avx512-bf16", "avx512-vnni", "avx2", "none"]
NO_CUDA = "no CUDA device present (torch.cuda.is_available() is False)"

# (tokens, in_features K, out_features N): feature sizes that are not multiples of 16 or 64, plus one K long enough
# for several full 64-byte steps and a tail. 4096 tokens stay cheap with small K and N.
SHAPES = [(1, 200, 75), (1, 1000, 130), (7, 200, 75), (7, 1000, 130), (83, 200, 75), (83, 1000, 130), (4096, 72, 40)]
# K multiple of 16: the CUDA kernels' 16-byte vector paths (decode with K split over warps, M = 8 decode, 128x128
# tensor-core tiles with partial edge tiles); the shapes above take their byte-wise paths.
SHAPES += [(1, 4096, 75), (8, 512, 130), (130, 1024, 136)]
# K > 4096 with more than 8 tokens: the AMX path's full-K variant (K-blocked below that).
SHAPES += [(24, 4500, 70)]
# 9-16 tokens: the CPU streaming kernel's two passes per weight tile (8 rows, then the rest from cache).
SHAPES += [(13, 1000, 130), (16, 200, 75)]
# 12 tokens x 3000 bytes of activations: past the 32 KiB up to which the streaming kernel keeps each activation vector
# in a register (kActivationsInL1Bytes); its tiles then read them from memory operands.
SHAPES += [(12, 3000, 70)]
# 33 tokens, K a multiple of 16: on CUDA the 64x64 tensor-core tiles with K split across blocks and the outlier
# product taken inside the main loop from 16-byte mask loads ((24, 4500, 70) takes the byte-wise variant).
SHAPES += [(33, 2048, 96)]
SHAPE_IDS = [f"M{m}-K{k}-N{n}" for m, k, n in SHAPES]


def _native_key(device: str) -> str:
    return "CPU" if device == "cpu" else "CUDA"


def _has_native(device: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("hf_int8::int8_linear", _native_key(device))


@contextmanager
def _isa(value: str | None):
    """Caps the CPU kernels' ISA for the duration (the C++ side reads the variable on every call)."""
    old = os.environ.get(ISA_ENV)
    if value is None:
        os.environ.pop(ISA_ENV, None)
    else:
        os.environ[ISA_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = old


CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


@pytest.fixture(
    params=[pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in CPU_ISAS]
    + [pytest.param(("cuda", None), id="cuda", marks=CUDA_MARKS)]
)
def target(request):
    """(device, isa): skips when the native kernels are not built, or this CPU cannot run the requested ISA."""
    device, isa = request.param
    if not _has_native(device):
        pytest.skip(f"no native {device} kernels registered (extension not built): {hf_int8.extension_status()}")
    if device == "cpu":
        with _isa(isa):
            got = cpu_module().cpu_isa()
            if got != isa:
                pytest.skip(f"this CPU cannot run the {isa} kernels (best available: {got})")
            _require_native(device)
            yield device, isa
    else:
        _require_native(device)
        yield device, isa


def _require_native(device: str) -> None:
    """Fails when the first-use self-check sent ``device`` to the reference kernels: every comparison here would then
    compare the reference with itself and pass."""
    dev = torch.device(device)
    if not _health.decide(dev):
        verdict = _health.verdicts().get(str(dev if dev.type == "cpu" else torch.device("cuda", 0)))
        pytest.fail(f"the reference kernels serve {device} instead of the native ones: {verdict}")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def device(request):
    """Device for the checks that do not depend on the CPU ISA (opcheck)."""
    if not _has_native(request.param):
        reason = f"no native {request.param} kernels registered (extension not built): {hf_int8.extension_status()}"
        pytest.skip(reason)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=_gen(seed), dtype=torch.int8)


def _activations(m: int, k: int, dtype: torch.dtype, case: str, seed: int = 0) -> torch.Tensor:
    """x [m, k]: values below 6 in magnitude, row 5 all zeros (when m > 5), and for ``outliers`` three columns
    scaled by 20 (so some of their values cross the threshold and some stay below it). ``many-outliers`` scales 40%
    of the columns (as in Qwen2.5's down_proj): more than the CPU epilogue sums itself from a table, so with many
    tokens the outlier product is a GEMM of its own (gemm.cpp, kFusedOutliersMax: fused into the AMX kernel with
    AMX-BF16 or into the packed VNNI kernel on avx512-bf16, one to three bf16 pieces per value by dtype, else
    outlier_gemm.cpp's fp32 FMAs); with enough tokens and weight rows (M83-K1000-N130 here, not M24-K4500-N70)
    avx512-bf16's int8 GEMM then skips the outlier columns (gemm.cpp, kCompactMinWork). ``most-outliers`` scales
    60%."""
    x = torch.randn(m, k, generator=_gen(seed)).clamp_(-5.5, 5.5)
    if m > 5:
        x[5] = 0.0
    if case != "none":
        count = {"outliers": 3, "many-outliers": max(3, 2 * k // 5), "most-outliers": max(3, 3 * k // 5)}[case]
        cols = torch.randperm(k, generator=_gen(seed + 1))[:count]
        x[:, cols] *= 20.0
    return x.to(dtype)


def _weight(n: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=_gen(seed)) * 0.05
    w[n // 2] = 0.0  # a zero weight row
    return ref.quantize_weight(w)


# ---------------------------------------------------------------------------------------------------------------
# Exact parts: int32 accumulators, codes, scales, masks.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "m,k,n", SHAPES + [(9, 200, 75), (16, 64, 33)], ids=SHAPE_IDS + ["M9-K200-N75", "M16-K64-N33"]
)
def test_int8_matmul_exact(target, m, k, n):
    device, _ = target
    a, b = _int8((m, k), 0), _int8((n, k), 1)
    a[0, :] = -128  # extremes, -128 included: the u8-shift and s16 tricks must stay exact
    b[0, :] = -128
    b[1, :] = 127
    got = torch.ops.hf_int8.int8_matmul(a.to(device), b.to(device))
    assert got.dtype == torch.int32 and got.device.type == device
    assert torch.equal(got.cpu(), ref.int8_matmul(a, b))


# Every row count of the streaming (decode) kernels, M = 1..8 (one template each, with its own number of weight rows
# per tile), with K shorter than one 64-byte step (masked tail only), a whole number of steps (no tail), and steps
# plus a tail; N not a multiple of any tile width.
@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("k", [40, 128, 161])
def test_int8_matmul_exact_every_decode_row_count(target, m, k):
    device, _ = target
    n = 29
    a, b = _int8((m, k), 2), _int8((n, k), 3)
    a[-1, :] = -128
    b[0, :] = -128
    b[-1, :] = 127
    got = torch.ops.hf_int8.int8_matmul(a.to(device), b.to(device))
    assert torch.equal(got.cpu(), ref.int8_matmul(a, b))


CASES = [("outliers", 6.0), ("many-outliers", 6.0), ("none", 6.0), ("outliers", 0.0)]
CASE_IDS = ["outliers-t6", "many-outliers-t6", "no-outliers-t6", "t0"]


@pytest.mark.parametrize("m,k,n", SHAPES, ids=SHAPE_IDS)
def test_quantize_activation_exact(target, m, k, n):
    device, _ = target
    for dtype in DTYPES:
        for case, threshold in CASES:
            what = f"{dtype}, {case}, threshold {threshold}"
            x = _activations(m, k, dtype, case)
            codes, row_scale, mask = ops.quantize_activation(x.to(device), threshold)
            want_codes, want_scale, want_mask = ref.quantize_activation(x, threshold)
            assert bool(want_mask.any()) == (case != "none" and threshold > 0), what  # the case is what it says
            assert torch.equal(codes.cpu(), want_codes), what
            assert torch.equal(row_scale.cpu(), want_scale), what
            assert torch.equal(mask.cpu(), want_mask), what


@pytest.mark.parametrize("shape", [(1, 1), (75, 200), (130, 1000), (33, 4096)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_weight_exact(target, shape, dtype):
    device, _ = target
    w = (torch.randn(shape, generator=_gen(3)) * torch.logspace(-3, 2, shape[0]).unsqueeze(1)).to(dtype)
    w[shape[0] // 2] = 0.0
    codes, scale = ops.quantize_weight(w.to(device))
    want_codes, want_scale = ref.quantize_weight(w)
    assert torch.equal(codes.cpu(), want_codes)
    assert torch.equal(scale.cpu(), want_scale)


# ---------------------------------------------------------------------------------------------------------------
# Dequantized outputs.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n", SHAPES, ids=SHAPE_IDS)
def test_int8_scaled_matmul(target, m, k, n):
    device, _ = target
    a, b = _int8((m, k), 4), _int8((n, k), 5)
    row_scale = torch.rand(m, generator=_gen(6)) * 0.05
    col_scale = torch.rand(n, generator=_gen(7)) * 0.01
    acc = ref.int8_matmul(a, b).double().abs() * (row_scale.double()[:, None] * col_scale.double()[None, :])
    for out_dtype in DTYPES:
        for bias in (torch.randn(n, generator=_gen(8)), None):
            got = ops.int8_scaled_matmul(
                a.to(device),
                b.to(device),
                row_scale.to(device),
                col_scale.to(device),
                None if bias is None else bias.to(device),
                out_dtype,
            ).cpu()
            want = ref.int8_scaled_matmul(a, b, row_scale, col_scale, bias, out_dtype)
            mag = acc if bias is None else acc + bias.double().abs()
            # float(acc) * (row_scale * col_scale) + bias: three fp32 roundings (two with a fused multiply-add).
            tol = fp32_sum_tolerance(mag, 3, out_dtype)
            assert_within(got, want, tol, f"{out_dtype}, bias {bias is not None}")
            if device == "cpu":
                assert torch.equal(got, want), f"CPU computes the reference's fp32 operations ({out_dtype})"


@pytest.mark.parametrize("m,k,n", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("case,threshold", CASES, ids=CASE_IDS)
def test_int8_linear(target, m, k, n, case, threshold):
    device, _ = target
    weight, scale = _weight(n, k)
    for dtype in DTYPES:
        what = f"{dtype}, {case}, threshold {threshold}"
        x = _activations(m, k, dtype, case, seed=m)
        bias = torch.randn(n, generator=_gen(9)).to(dtype)
        got = ops.int8_linear(x.to(device), weight.to(device), scale.to(device), bias.to(device), threshold).cpu()
        want = ref.int8_linear(x, weight, scale, bias, threshold)
        assert_within(got, want, int8_linear_tolerance(x, weight, scale, bias, threshold), what)
        if device == "cpu" and not (case != "none" and threshold > 0):
            assert torch.equal(got, want), f"without outlier columns CPU is bit-identical to the reference ({what})"
        if m > 5:  # a zero input row gives exactly the bias (after the cast)
            assert torch.equal(got[5], bias), what


# Decode with many outlier columns: on the AVX-512 decode kernel (1-2 tokens, 9 to 1024 outlier columns) the outlier
# product rides the int8 GEMM as two exact int8 rows per token when every outlier value is a multiple of its token's
# unit (2^-14 of its largest one: bf16 values spanning a few powers of two), and falls back to floating point when one
# is not (one value 10^4 times the others, fp32 mantissas) or past 1024 columns.
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k,n_outliers", [(200, 9), (200, 120), (1200, 300), (1200, 1100)], ids=str)
@pytest.mark.parametrize("wide_range", [False, True], ids=["outliers-within-7-octaves", "one-huge-outlier"])
def test_int8_linear_decode_with_many_outlier_columns(target, m, k, n_outliers, wide_range):
    device, _ = target
    n = 75
    weight, scale = _weight(n, k)
    g = _gen(k + n_outliers)
    cols = torch.randperm(k, generator=g)[:n_outliers]
    for dtype in DTYPES:
        x = torch.randn(m, k, generator=g).clamp_(-5.5, 5.5)
        magnitude = 6.0 + torch.rand(m, n_outliers, generator=g) * 400.0  # 6 .. 406: within 7 powers of two
        x[:, cols] = magnitude * torch.where(torch.rand(m, n_outliers, generator=g) < 0.5, -1.0, 1.0)
        if wide_range:
            x[-1, cols[0]] = 6.0e4
        x = x.to(dtype)
        bias = torch.randn(n, generator=_gen(9)).to(dtype)
        got = ops.int8_linear(x.to(device), weight.to(device), scale.to(device), bias.to(device), 6.0).cpu()
        want = ref.int8_linear(x, weight, scale, bias, 6.0)
        assert int(ref.quantize_activation(x, 6.0)[2].sum()) == n_outliers, "the case is what it says"
        assert_within(got, want, int8_linear_tolerance(x, weight, scale, bias, 6.0), str(dtype))


# Enough tokens for avx512-bf16 to skip the outlier columns in the int8 GEMM (kCompactMinWork): K not a multiple of 64
# (the picked rows' tail), one K past 4096.
MOST_OUTLIER_SHAPES = [(128, 200, 75), (200, 1000, 130), (130, 4500, 70)]


@pytest.mark.parametrize("m,k,n", MOST_OUTLIER_SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in MOST_OUTLIER_SHAPES])
def test_int8_linear_with_most_columns_outliers(target, m, k, n):
    """60% outlier columns and >= 128 tokens: on avx512-bf16 the int8 GEMM runs over the other 40% only (the kept
    columns picked out of A and B): the same int32 sums, so the same bound; other paths take the usual route."""
    device, _ = target
    weight, scale = _weight(n, k)
    for dtype in DTYPES:
        x = _activations(m, k, dtype, "most-outliers", seed=m)
        bias = torch.randn(n, generator=_gen(9)).to(dtype)
        got = ops.int8_linear(x.to(device), weight.to(device), scale.to(device), bias.to(device), 6.0).cpu()
        want = ref.int8_linear(x, weight, scale, bias, 6.0)
        assert int(ref.quantize_activation(x, 6.0)[2].sum()) * 2 >= k, "the case is what it says"
        assert_within(got, want, int8_linear_tolerance(x, weight, scale, bias, 6.0), str(dtype))
        assert torch.equal(got[5], bias), f"a zero input row gives exactly the bias ({dtype})"


def test_int8_linear_leading_dims_and_no_bias(target):
    device, _ = target
    weight, scale = _weight(45, 100)
    for dtype in DTYPES:
        x = _activations(2 * 3 * 7, 100, dtype, "outliers").reshape(2, 3, 7, 100)
        got = ops.int8_linear(x.to(device), weight.to(device), scale.to(device), None, 6.0).cpu()
        want = ref.int8_linear(x, weight, scale, None, 6.0)
        assert got.shape == (2, 3, 7, 45)
        assert_within(got, want, int8_linear_tolerance(x, weight, scale, None, 6.0), str(dtype))


def test_non_finite_inputs_match_reference(target):
    device, _ = target
    x = _activations(9, 70, torch.float32, "none")
    x[1, 3] = float("nan")  # NaN in an inlier column: that row's scale is NaN, its codes 0
    x[2, 4] = float("inf")  # inf makes column 4 an outlier column
    weight, scale = _weight(20, 70)
    for threshold in (6.0, 0.0):
        codes, row_scale, mask = ops.quantize_activation(x.to(device), threshold)
        want = ref.quantize_activation(x, threshold)
        assert torch.equal(codes.cpu(), want[0]) and torch.equal(mask.cpu(), want[2])
        torch.testing.assert_close(row_scale.cpu(), want[1], rtol=0, atol=0, equal_nan=True)
        got = ops.int8_linear(x.to(device), weight.to(device), scale.to(device), None, threshold).cpu()
        tol = int8_linear_tolerance(x, weight, scale, None, threshold)
        assert_within(got, ref.int8_linear(x, weight, scale, None, threshold), tol, f"threshold {threshold}")


# 12 tokens: on avx512-bf16 CPUs the streaming kernel's two passes with its bf16 outlier product (or, for the values it
# declines, its gathered fp32 one) at 60 outlier columns.
@pytest.mark.parametrize("m", [1, 12, 40], ids=["decode", "12-tokens", "prefill"])
@pytest.mark.parametrize(
    "special",
    ["huge", "tiny", "inf", "nan", "fp32-bits", "huge-bf16", "tiny-bf16", "inf-bf16", "nan-bf16"],
)
def test_many_outlier_columns_with_extreme_values(target, m, special):
    """The many-outlier product on values it must not mishandle: beyond the range the bf16 paths (AMX-BF16,
    VDPBF16PS) take exactly (|x| > 1e30, or below 2^-100: the product falls back to fp32 FMAs), Inf and NaN (kept
    whole, not split into bf16 pieces whose remainder would be NaN), and fp32 values that need all three bf16 pieces.
    The ``-bf16`` cases round every activation to a bf16 number first, as a bf16 model's are: the VDPBF16PS path
    takes those (or declines them for the out-of-range values), and they run again as bf16 tensors, which the packed
    path on avx512-bf16 reads without an fp32 copy of the outlier columns."""
    device, _ = target
    k, n = 150, 70
    weight, scale = _weight(n, k)
    x = _activations(m, k, torch.float32, "many-outliers", seed=3)
    col = int((x.abs() >= 6.0).any(dim=0).nonzero()[0])  # an outlier column
    kind = special.removesuffix("-bf16")
    value = {"huge": 3e33, "tiny": 1e-33, "inf": float("inf"), "nan": float("nan"), "fp32-bits": 1.0 + 2.0**-20}
    x[0, col] = value[kind]
    if special == "fp32-bits":
        x[:, col] = 7.0 + 2.0**-18  # 22 significant bits: three bf16 pieces
    if special.endswith("-bf16"):
        x = x.bfloat16().float()  # fp32 holding bf16 numbers: fp32 output, so the product's rounding shows
    got = ops.int8_linear(x.to(device), weight.to(device), scale.to(device), None, 6.0).cpu()
    want = ref.int8_linear(x, weight, scale, None, 6.0)
    # NaN and Inf outputs must sit at the same places (assert_within checks that), the finite ones within the bound.
    assert_within(got, want, int8_linear_tolerance(x, weight, scale, None, 6.0), special)
    if special.endswith("-bf16"):
        xb = x.bfloat16()
        got = ops.int8_linear(xb.to(device), weight.to(device), scale.to(device), None, 6.0).cpu()
        want = ref.int8_linear(xb, weight, scale, None, 6.0)
        assert_within(got, want, int8_linear_tolerance(xb, weight, scale, None, 6.0), f"{special} as bf16")
    if kind == "huge":  # finite, and far above anything the inlier columns contribute
        assert torch.isfinite(want).all() and want.abs().max() > 1e30


# Thresholds whose float32 rounding matters: subnormals (1e-40, the smallest one 1.4e-45), values that are not float32
# numbers (6.0000000001 and 5.9999999999 both act as 6.0; 0.1), float32's largest value, and positive values that
# round to 0 (1e-50, 7e-46: no outlier columns). The raw ops take any double; every kernel rounds it with
# static_cast<float>, the reference with threshold_as_float32; the validated entry points refuse the last two.
RAW_THRESHOLDS = [1e-40, 1.4e-45, 6.0000000001, 5.9999999999, 0.1, 3.4028234663852886e38, 1e-50, 7e-46]


def _threshold_probe(t32: float, m: int, k: int) -> torch.Tensor:
    """fp32 x [m, k] straddling the float32 threshold ``t32``; row 0 starts with it, its float32 neighbours below and
    above (both signs), so each comparison shows in the mask."""
    t = torch.tensor(t32, dtype=torch.float32)
    below = torch.nextafter(t, torch.tensor(0.0))
    above = torch.nextafter(t, torch.tensor(float("inf")))
    x = torch.randn(m, k, generator=_gen(12)) * (t32 if 0 < t32 < 1e38 else 1.0)
    x[0, :6] = torch.stack([t, -t, below, -below, above, -above])
    return x


@pytest.mark.parametrize("m", [1, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("threshold", RAW_THRESHOLDS, ids=repr)
def test_threshold_is_rounded_to_float32_like_the_reference(target, m, threshold):
    device, _ = target
    t32 = ref.threshold_as_float32(threshold)
    weight, scale = _weight(20, 70)
    bias = torch.randn(20, generator=_gen(13))
    probe = _threshold_probe(t32, m, 70)
    # The reference's mask is the float32 comparison itself (test_reference_ops.py checks that against numpy).
    want_mask = (probe.abs() >= t32).any(dim=0) if t32 > 0 else torch.zeros(70, dtype=torch.bool)
    assert torch.equal(ref.outlier_columns(probe, threshold), want_mask)
    for dtype in DTYPES:
        what = f"{dtype}, threshold {threshold!r} (float32 {t32!r})"
        x = probe.to(dtype)
        codes, row_scale, mask = torch.ops.hf_int8.quantize_activation(x.to(device), threshold)
        want = ref.quantize_activation(x, threshold)
        assert torch.equal(mask.cpu(), want[2]), what
        assert torch.equal(codes.cpu(), want[0]), what
        assert torch.equal(row_scale.cpu(), want[1]), what
        got = torch.ops.hf_int8.int8_linear(
            x.to(device), weight.to(device), scale.to(device), bias.to(dtype).to(device), threshold
        ).cpu()
        expected = ref.int8_linear(x, weight, scale, bias.to(dtype), threshold)
        assert_within(got, expected, int8_linear_tolerance(x, weight, scale, bias.to(dtype), threshold), what)


def test_zero_tokens_and_empty_dims(target):
    device, _ = target
    weight, scale = _weight(30, 50)
    for dtype in DTYPES:
        for shape in [(0, 50), (2, 0, 50)]:
            x = torch.zeros(shape, dtype=dtype, device=device)
            out = ops.int8_linear(x, weight.to(device), scale.to(device), None, 6.0)
            assert out.shape == (*shape[:-1], 30) and out.dtype == dtype and out.device.type == device
    codes, row_scale, mask = torch.ops.hf_int8.quantize_activation(torch.zeros(0, 50, device=device), 6.0)
    assert codes.shape == (0, 50) and row_scale.shape == (0,) and mask.shape == (50,) and not mask.cpu().any()
    a, b = torch.zeros(0, 50, dtype=torch.int8, device=device), weight.to(device)
    assert torch.ops.hf_int8.int8_matmul(a, b).shape == (0, 30)
    # K == 0: every accumulator is zero, the output is the bias.
    x = torch.zeros(4, 0, device=device)
    w0, s0 = torch.zeros(3, 0, dtype=torch.int8, device=device), torch.ones(3, device=device)
    bias = torch.tensor([1.0, 2.0, 3.0], device=device)
    out = torch.ops.hf_int8.int8_linear(x, w0, s0, bias, 6.0).cpu()
    assert torch.equal(out, bias.cpu().expand(4, 3))
    assert torch.equal(torch.ops.hf_int8.int8_matmul(w0, w0).cpu(), torch.zeros(3, 3, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch, on the native kernels.
# ---------------------------------------------------------------------------------------------------------------
def _opcheck_samples(device: str):
    weight, scale = _weight(33, 70)
    weight, scale = weight.to(device), scale.to(device)
    x = _activations(9, 70, torch.float32, "outliers").to(device)
    a = _int8((9, 70), 2).to(device)
    w_float = torch.randn(33, 70, generator=_gen(3)).to(device) * 0.05
    return {
        "quantize_weight": [(torch.randn(33, 70, device=device).to(torch.bfloat16),)],
        "quantize_activation": [(x, 6.0), (x.half(), 0.0)],
        "int8_matmul": [(a, weight)],
        "int8_scaled_matmul": [
            (a, weight, torch.rand(9, device=device), scale, torch.randn(33, device=device), torch.bfloat16),
            (a, weight, torch.rand(9, device=device), scale, None, torch.float32),
        ],
        "int8_linear": [
            (x.clone().requires_grad_(True), weight, scale, torch.randn(33, device=device), 6.0),
            (x.reshape(3, 3, 70).half(), weight, scale, None, 0.0),
        ],
        "float_linear": [
            (x[:3].bfloat16(), w_float.bfloat16(), torch.randn(33, device=device).bfloat16()),  # streamed (CPU)
            (x.reshape(3, 3, 70).bfloat16().requires_grad_(True), w_float.bfloat16().requires_grad_(True), None),
            (torch.randn(20, 70, device=device), w_float, torch.randn(33, device=device)),  # torch's linear
        ],
    }


@pytest.mark.parametrize("op_name", ops.OP_NAMES)
def test_opcheck(device, op_name):
    op = getattr(torch.ops.hf_int8, op_name)
    for args in _opcheck_samples(device)[op_name]:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------------------------
# CPU specifics: thread-count independence, ISA selection, argument errors.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def cpu_native():
    if not _has_native("cpu"):
        pytest.skip(f"native CPU kernels not built: {hf_int8.extension_status()}")
    return cpu_module()


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_results_do_not_depend_on_thread_count(cpu_native, isa):
    with _isa(isa):
        if cpu_native.cpu_isa() != isa:
            pytest.skip(f"this CPU cannot run the {isa} kernels (best available: {cpu_native.cpu_isa()})")
        weight, scale = _weight(300, 1000)
        bias = torch.randn(300, generator=_gen(2))
        _assert_same_for_1_2_3_threads(
            lambda: (
                [
                    ops.int8_linear(_activations(m, 1000, dtype, case), weight, scale, bias, 6.0)
                    for m in (1, 2, 7, 100, 2048)
                    for case in ("outliers", "many-outliers", "most-outliers")
                    for dtype in (torch.float32, torch.bfloat16)  # bf16: the VDPBF16PS outlier product on avx512-bf16
                ]
                + [ops.quantize_activation(_activations(300, 1000, torch.bfloat16, "outliers"), 6.0)[0]]
            )
        )


def _assert_same_for_1_2_3_threads(compute) -> None:
    """``compute()`` (a list of tensors) gives bit-identical results with 1, 2 and 3 torch threads."""
    results = {}
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = compute()
    finally:
        torch.set_num_threads(old)
    for threads in (2, 3):
        for got, want in zip(results[threads], results[1], strict=True):
            assert torch.equal(got, want), f"{threads} threads differ from 1 thread"


def test_isa_is_chosen_at_run_time_and_reported(cpu_native):
    outer = cpu_native.cpu_isa()  # what the environment the suite runs in selects (HF_INT8_CPU_ISA may cap it)
    with _isa(None):
        best = cpu_native.cpu_isa()  # the CPU's own best level: what oneDNN runs at whatever the cap
    assert best in CPU_ISAS and CPU_ISAS.index(outer) >= CPU_ISAS.index(best)
    assert all(v.startswith("native") for k, v in hf_int8.implementations().items() if k.endswith("[cpu]"))
    with _isa("avx2"):
        if best == "none":
            pytest.skip("this CPU has no AVX2")
        assert cpu_native.cpu_isa() == "avx2"
        assert hf_int8.implementations()["int8_linear[cpu]"] == "native (avx2)"
        assert cpu_native.gemm_path(1) == cpu_native.gemm_path(8) == "avx2"
        # Past 8 rows oneDNN (at::_int_mm) takes over only where it runs on VNNI/AMX: on a CPU without them its
        # AVX2 kernel is slower than ours (gemm.cpp, choose()).
        many_rows = "avx2 onednn" if best in ("amx", "avx512-bf16", "avx512-vnni") else "avx2"
        assert cpu_native.gemm_path(9) == cpu_native.gemm_path(4096) == many_rows
    with _isa("none"):
        assert cpu_native.gemm_path(83) == "generic"
    for capped in ("avx512-bf16", "avx512-vnni"):  # avx512-bf16 changes the outlier product, not the int8 GEMM
        if CPU_ISAS.index(best) <= CPU_ISAS.index(capped):
            with _isa(capped):
                assert cpu_native.cpu_isa() == capped
                assert cpu_native.gemm_path(1) == cpu_native.gemm_path(16) == "avx512-vnni small-M"
                assert cpu_native.gemm_path(17) == cpu_native.gemm_path(4096) == "avx512-vnni packed"
    if best == "amx":
        with _isa(None):
            # AMX takes over from 9 rows (the streaming kernel's 9-16 rows were measured without AMX only).
            assert cpu_native.gemm_path(8) == "avx512-vnni small-M"
            assert cpu_native.gemm_path(9) == cpu_native.gemm_path(4096) == "amx"
    assert cpu_native.cpu_isa() == outer  # the caller's setting is back
    with _isa("sse9"):
        with pytest.raises(ValueError, match="sse9"):
            cpu_native.cpu_isa()


def test_cpu_kernels_name_offending_arguments(cpu_native):
    w = torch.zeros(5, 8, dtype=torch.int8)
    s = torch.ones(5)
    with pytest.raises(ValueError, match="Float"):
        torch.ops.hf_int8.int8_matmul(torch.zeros(2, 8), w)
    with pytest.raises(ValueError, match=r"\[2, 7\].*\[5, 8\]"):
        torch.ops.hf_int8.int8_matmul(torch.zeros(2, 7, dtype=torch.int8), w)
    with pytest.raises(ValueError, match="Int"):
        torch.ops.hf_int8.int8_scaled_matmul(torch.zeros(2, 8, dtype=torch.int8), w, s[:2], s, None, torch.int32)
    with pytest.raises(ValueError, match=r"row_scale must have shape \(2,\), got \[3\]"):
        torch.ops.hf_int8.int8_scaled_matmul(torch.zeros(2, 8, dtype=torch.int8), w, s[:3], s, None, torch.float32)
    with pytest.raises(ValueError, match="8 features.*got shape \\[3, 9\\]"):
        torch.ops.hf_int8.int8_linear(torch.zeros(3, 9), w, s, None, 6.0)
    with pytest.raises(ValueError, match="Double"):
        torch.ops.hf_int8.int8_linear(torch.zeros(3, 8, dtype=torch.float64), w, s, None, 6.0)
    with pytest.raises(ValueError, match=r"weight_scale must be a float tensor of shape \(5,\)"):
        torch.ops.hf_int8.int8_linear(torch.zeros(3, 8), w, s[:4], None, 6.0)
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(5,\)"):
        torch.ops.hf_int8.int8_linear(torch.zeros(3, 8), w, s, torch.zeros(4), 6.0)
    with pytest.raises(ValueError, match="Long"):
        torch.ops.hf_int8.quantize_weight(torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"2-D.*\[3\]"):
        torch.ops.hf_int8.quantize_activation(torch.zeros(3), 6.0)


def test_non_contiguous_inputs(target):
    device, _ = target
    x = _activations(150, 40, torch.bfloat16, "outliers").to(device).t()  # [40, 150], column-major
    assert not x.is_contiguous()
    weight, scale = _weight(30, 150)
    got = torch.ops.hf_int8.int8_linear(x, weight.to(device), scale.to(device), None, 6.0).cpu()
    want = ref.int8_linear(x.cpu(), weight, scale, None, 6.0)
    assert_within(got, want, int8_linear_tolerance(x.cpu(), weight, scale, None, 6.0), "column-major x")
    codes = torch.ops.hf_int8.quantize_activation(x, 6.0)[0]
    assert torch.equal(codes.cpu(), ref.quantize_activation(x.cpu(), 6.0)[0])


# ---------------------------------------------------------------------------------------------------------------
# float_linear: the layers an llmint8 model keeps in floating point (csrc/cpu/float_linear.cpp). On CPUs with
# AVX512-BF16 bf16 inputs of up to 16 tokens stream the weight (tokens in passes of 4, weight rows in 4 streams per
# thread, the rows left over one by one, K in steps of 32 with a masked tail); on AVX2 up to 4 tokens (passes of 2, K
# in steps of 8, the tail one by one); everything else runs torch's linear. The target fixture runs both tiles.
# ---------------------------------------------------------------------------------------------------------------
FLOAT_SHAPES = [(1, 1, 1), (1, 31, 5), (2, 33, 7), (3, 200, 75), (4, 64, 130), (5, 1000, 9), (7, 83, 257)]
FLOAT_SHAPES += [(8, 1536, 66), (9, 130, 200), (16, 77, 129), (17, 200, 75), (83, 1000, 130)]


def _float_linear_inputs(m: int, k: int, n: int, dtype: torch.dtype, seed: int = 0):
    x = torch.randn(m, k, generator=_gen(seed)) * 3
    w = torch.randn(n, k, generator=_gen(seed + 1)) * 0.05
    w[n // 2] = 0.0
    bias = torch.randn(n, generator=_gen(seed + 2))
    return x.to(dtype), w.to(dtype), bias.to(dtype)


def float_linear_tolerance(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Two fp32 evaluations of ``x @ w.T + bias`` (K + 1 terms, exact bf16/fp16 products), each cast once."""
    magnitude = x.double().abs().reshape(-1, x.shape[-1]) @ w.double().abs().t()
    if bias is not None:
        magnitude += bias.double().abs()
    return fp32_sum_tolerance(magnitude, x.shape[-1] + 1, x.dtype).reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("m,k,n", FLOAT_SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in FLOAT_SHAPES])
def test_float_linear(target, m, k, n):
    device, _ = target
    if device != "cpu":
        pytest.skip("float_linear has no CUDA kernel (ops.CUDA_OP_NAMES): FloatLinear runs torch's linear there")
    for dtype in DTYPES:
        x, w, bias = _float_linear_inputs(m, k, n, dtype, seed=m + k)
        for b in (bias, None):
            got = ops.float_linear(x, w, b)
            want = ref.float_linear(x, w, b)
            assert_within(got, want, float_linear_tolerance(x, w, b), f"{dtype}, bias {b is not None}")
            if b is not None:  # a zero weight row gives exactly the bias
                assert torch.equal(got[:, n // 2], bias[n // 2].expand(m)), dtype


def test_float_linear_leading_dims_strides_and_empty(target):
    device, _ = target
    if device != "cpu":
        pytest.skip("float_linear has no CUDA kernel (ops.CUDA_OP_NAMES): FloatLinear runs torch's linear there")
    x, w, bias = _float_linear_inputs(6, 90, 40, torch.bfloat16)
    got = ops.float_linear(x.reshape(2, 3, 90), w, bias)
    assert got.shape == (2, 3, 40) and torch.equal(got.reshape(6, 40), ops.float_linear(x, w, bias))
    wide = torch.zeros(6, 180, dtype=torch.bfloat16)
    wide[:, ::2] = x
    assert torch.equal(ops.float_linear(wide[:, ::2], w, bias), ops.float_linear(x, w, bias))  # strided x
    for shape in [(0, 90), (2, 0, 90)]:
        out = ops.float_linear(torch.zeros(shape, dtype=torch.bfloat16), w, bias)
        assert out.shape == (*shape[:-1], 40) and out.dtype == torch.bfloat16
    no_features = ops.float_linear(
        torch.zeros(3, 0, dtype=torch.bfloat16), torch.zeros(4, 0, dtype=torch.bfloat16), bias[:4]
    )
    assert torch.equal(no_features, bias[:4].expand(3, 4))


def test_float_linear_non_finite_inputs(target):
    device, _ = target
    if device != "cpu":
        pytest.skip("float_linear has no CUDA kernel (ops.CUDA_OP_NAMES): FloatLinear runs torch's linear there")
    x, w, bias = _float_linear_inputs(5, 100, 70, torch.bfloat16)
    x[1, 3] = float("nan")
    x[2, 50] = float("inf")
    x[3, 7] = 1e-39  # subnormal in bf16 and fp32: may be flushed, within the tolerance's absolute term
    got, want = ops.float_linear(x, w, bias), ref.float_linear(x, w, bias)
    assert got[1].isnan().all() and (got[2, :].isinf() | got[2, :].isnan() | (w[:, 50] == 0)).all()
    assert_within(got, want, float_linear_tolerance(x.nan_to_num(posinf=0.0), w, bias), "non-finite inputs")


def test_float_linear_does_not_depend_on_thread_count(cpu_native):
    # Token counts the kernel serves (above them the op is torch's linear, which promises no thread independence):
    # up to 16 with AVX512-BF16, up to 4 on the AVX2 tile.
    tokens = {"amx": (1, 4, 7, 16), "avx512-bf16": (1, 4, 7, 16), "avx512-vnni": (1, 3, 4), "avx2": (1, 3, 4)}
    if cpu_native.cpu_isa() not in tokens:
        pytest.skip(f"the float_linear kernel needs AVX2; this CPU runs {cpu_native.cpu_isa()} kernels")
    x, w, bias = _float_linear_inputs(16, 300, 1000, torch.bfloat16)
    _assert_same_for_1_2_3_threads(lambda: [ops.float_linear(x[:m], w, bias) for m in tokens[cpu_native.cpu_isa()]])


def test_float_linear_names_offending_arguments(cpu_native):
    x, w, bias = _float_linear_inputs(2, 8, 5, torch.bfloat16)
    with pytest.raises(ValueError, match="x's dtype torch.bfloat16, got torch.float32"):
        ops.float_linear(x, w.float())
    with pytest.raises(ValueError, match=r"8 features in its last dimension, got shape \(2, 9\)"):
        ops.float_linear(torch.zeros(2, 9, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\).*torch.float32 of shape \(5,\)"):
        ops.float_linear(x, w, bias.float())
    with pytest.raises(ValueError, match="int64"):
        ops.float_linear(x.long(), w)
    with pytest.raises(ValueError, match="weight must be a 2-D tensor of x's dtype"):  # the op itself checks too
        torch.ops.hf_int8.float_linear(x, w.half(), None)
    with pytest.raises(ValueError, match="features in its last dimension"):
        torch.ops.hf_int8.float_linear(torch.zeros(2, 9, dtype=torch.bfloat16), w, None)
