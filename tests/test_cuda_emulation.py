"""The CUDA kernels of csrc/cuda, executed on the CPU by hf_int8's CUDA emulator, against the reference kernels.

What this proves: the kernels' logic (indexing, tile and fragment layouts per the PTX ISA, predication of partial
tiles, unaligned and odd shapes, the outlier epilogue, split-K reductions, the quantization math) and their
synchronisation within a block (barriers, cp.async groups, warp collectives reached by every lane), on the sm_80+
path and the sm_75 path, under AddressSanitizer and UndefinedBehaviorSanitizer, and under several thread schedules.
What it does not: the hardware's encodings of the PTX (a wrong asm constraint), races between blocks (blocks run one
after another), or speed. See csrc/cuda_emu/include/hf_int8_emu/runtime.h.

Comparisons: int8 codes, scales, masks and int32 products are exact; outputs without outlier columns are bitwise
equal to the reference (the same fp32 operations in the same order); with outlier columns the fp32 sum over them
runs in another order than the reference's matmul, so the bound is derived from that sum (see outlier_tolerance).
"""

from __future__ import annotations

import itertools

import cuda_emu
import pytest
import torch
from _tolerance import int8_linear_tolerance

from hf_int8.ops import reference as ref

SUPPORTED, WHY_NOT = cuda_emu.supported()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason=f"CUDA emulator unavailable: {WHY_NOT}")

MS = (1, 7, 9, 16, 17, 83, 130)
KS = (1, 7, 83, 4096, 4097, 5137)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
N_ODD = 37
THRESHOLD = 6.0
U32 = 2.0**-24  # unit roundoff of fp32
DECODE_MAX_M = 8  # launch.h kDecodeMaxM: more rows run on the tensor-core GEMM


def _gen(*seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(seed) % (2**31))


def _activations(m: int, k: int, dtype: torch.dtype, outliers: bool, seed: tuple) -> torch.Tensor:
    g = _gen(*seed)
    x = torch.randn(m, k, generator=g).clamp_(-5.5, 5.5)  # inliers stay below the threshold
    if outliers and k > 1:
        cols = torch.randperm(k, generator=g)[: max(1, k // 50)]
        x[:, cols] *= 8.0
        x[0, cols[0]] = 40.0  # at least one |x| >= threshold whatever the draw
    return x.to(dtype)


def _int8(rows: int, k: int, seed: tuple) -> torch.Tensor:
    return torch.randint(-127, 128, (rows, k), generator=_gen(*seed), dtype=torch.int8)


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitude of ``t`` (fp32), at least its smallest normal."""
    info = torch.finfo(dtype)
    mag = t.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def outlier_tolerance(
    x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, mask: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Bound on |kernel - reference| for int8_linear with outlier columns.

    Both sides compute the same int8 part bitwise and the same fp32 products x[i, c] * (code[j, c] * scale[j]); only
    the order of the n-term sum over outlier columns differs (the kernel's fmaf chain or split-K tree, the reference's
    BLAS matmul). Each order is within gamma_n * S of the exact sum (S = sum_c |x w|, gamma_n = n u / (1 - n u)), so
    the two differ by at most 2 gamma_n S; the later additions (int8 part, bias) and the final rounding to ``dtype``
    may turn that into a different rounding of the sum: 2 fp32 ulps of the result, plus one ulp of ``dtype``.
    """
    cols = mask.nonzero().squeeze(1)
    n = max(int(cols.numel()), 1) + 1  # +1: the fused multiply-add of the first term
    gamma = n * U32 / (1 - n * U32)
    w_deq = ref.dequantize_weight(w.index_select(1, cols), ws)
    s = x.float().index_select(1, cols).abs() @ w_deq.abs().t()
    exp32 = expected.float()
    return 2 * gamma * s + 2 * _ulp(exp32, torch.float32) + _ulp(exp32, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Problem builders: inputs, and the reference's answer for each output
# ----------------------------------------------------------------------------------------------------------------
def linear_problem(m, k, dtype, outliers, bias, offset, n=N_ODD, sm_count=132, threshold=THRESHOLD):
    seed = (m, k, n, DTYPES.index(dtype), outliers, bias, offset)
    x = _activations(m, k, dtype, outliers, seed)
    w = _int8(n, k, seed + (1,))
    ws = torch.rand(n, generator=_gen(*seed, 2)) * 0.02 + 1e-4
    b = (torch.randn(n, generator=_gen(*seed, 3)) * 2).to(dtype) if bias else None
    inputs = {"x": x, "w": w, "ws": ws}
    if b is not None:
        inputs["bias"] = b
    esize = x.element_size()
    params = {
        "m": m,
        "n": n,
        "k": k,
        "dtype": cuda_emu.DTYPE_TAGS[dtype],
        "threshold": threshold,
        "bias": int(bias),
        "offset_a": offset,
        "offset_x": offset * esize,
        "sm_count": sm_count,
    }
    p = cuda_emu.Problem(
        "int8_linear",
        inputs,
        {"out": (dtype, (m, n))},
        params,
        name=f"linear m={m} k={k} n={n} {dtype} outliers={outliers} bias={bias} offset={offset}",
    )
    return p


def check_linear(p: cuda_emu.Problem) -> None:
    x, w, ws = p.inputs["x"], p.inputs["w"], p.inputs["ws"]
    threshold = float(p.params["threshold"])
    expected = ref.int8_linear(x, w, ws, p.inputs.get("bias"), threshold)
    got = p.results["out"]
    mask = ref.quantize_activation(x, threshold)[2]
    if not bool(mask.any()):
        assert torch.equal(got, expected), f"{p.name}: differs from the reference (bitwise expected without outliers)"
        return
    if x.dtype != torch.float32 and p.params["m"] > DECODE_MAX_M:
        # The tensor-core outlier product (fp16/bf16 activations, sm_80+) sums x * code and scales the sum once, so
        # its products are not the reference's: the suite-wide bound for that structure (tests/_tolerance.py).
        tol = int8_linear_tolerance(x, w, ws, p.inputs.get("bias"), threshold)
    else:
        tol = outlier_tolerance(x, w, ws, mask, expected, x.dtype)
    err = (got.float() - expected.float()).abs()
    assert torch.isfinite(got).all(), f"{p.name}: non-finite outputs"
    assert (err <= tol).all(), f"{p.name}: max error {float(err.max())} over the bound ({float((err - tol).max())})"


def quantize_activation_problem(m, k, dtype, threshold, outliers, offset):
    seed = (m, k, DTYPES.index(dtype), threshold, outliers, offset, 7)
    x = _activations(m, k, dtype, outliers, seed)
    params = {
        "m": m,
        "k": k,
        "dtype": cuda_emu.DTYPE_TAGS[dtype],
        "threshold": threshold,
        "offset_x": offset * x.element_size(),
    }
    outputs = {"codes": (torch.int8, (m, k)), "row_scale": (torch.float32, (m,)), "mask": (torch.bool, (k,))}
    return cuda_emu.Problem(
        "quantize_activation",
        {"x": x},
        outputs,
        params,
        name=f"quantize_activation m={m} k={k} {dtype} threshold={threshold} offset={offset}",
    )


def check_quantize_activation(p):
    codes, scale, mask = ref.quantize_activation(p.inputs["x"], float(p.params["threshold"]))
    assert torch.equal(p.results["mask"], mask), f"{p.name}: outlier mask differs"
    assert torch.equal(p.results["codes"], codes), f"{p.name}: codes differ"
    assert torch.equal(p.results["row_scale"], scale), f"{p.name}: row scales differ"


def quantize_weight_problem(n, k, dtype, offset):
    seed = (n, k, DTYPES.index(dtype), offset, 11)
    w = (torch.randn(n, k, generator=_gen(*seed)) * torch.logspace(-3, 2, n).unsqueeze(1)).to(dtype)
    if n > 2:
        w[1] = 0  # a zero row: scale 0, codes 0
    params = {"n": n, "k": k, "dtype": cuda_emu.DTYPE_TAGS[dtype], "offset_x": offset * w.element_size()}
    outputs = {"codes": (torch.int8, (n, k)), "scale": (torch.float32, (n,))}
    return cuda_emu.Problem(
        "quantize_weight", {"w": w}, outputs, params, name=f"quantize_weight n={n} k={k} {dtype} offset={offset}"
    )


def check_quantize_weight(p):
    codes, scale = ref.quantize_weight(p.inputs["w"])
    assert torch.equal(p.results["codes"], codes), f"{p.name}: codes differ"
    assert torch.equal(p.results["scale"], scale), f"{p.name}: scales differ"


def matmul_problem(m, k, offset, n=N_ODD, sm_count=132):
    seed = (m, k, n, offset, 13)
    a, b = _int8(m, k, seed), _int8(n, k, seed + (1,))
    params = {"m": m, "n": n, "k": k, "offset_a": offset, "sm_count": sm_count}
    return cuda_emu.Problem(
        "int8_matmul",
        {"a": a, "b": b},
        {"out": (torch.int32, (m, n))},
        params,
        name=f"int8_matmul m={m} k={k} n={n} offset={offset} sm_count={sm_count}",
    )


def check_matmul(p):
    expected = ref.int8_matmul(p.inputs["a"], p.inputs["b"])
    assert torch.equal(p.results["out"], expected), f"{p.name}: int32 products differ"


def scaled_matmul_problem(m, k, out_dtype, bias_dtype, n=N_ODD):
    seed = (m, k, n, DTYPES.index(out_dtype), str(bias_dtype), 17)
    a, b = _int8(m, k, seed), _int8(n, k, seed + (1,))
    inputs = {
        "a": a,
        "b": b,
        "row_scale": torch.rand(m, generator=_gen(*seed, 2)) * 0.05,
        "col_scale": torch.rand(n, generator=_gen(*seed, 3)) * 0.01,
    }
    if bias_dtype is not None:
        inputs["bias"] = torch.randn(n, generator=_gen(*seed, 4)).to(bias_dtype)
    params = {
        "m": m,
        "n": n,
        "k": k,
        "out_dtype": cuda_emu.DTYPE_TAGS[out_dtype],
        "bias": cuda_emu.DTYPE_TAGS[bias_dtype] if bias_dtype is not None else "none",
    }
    return cuda_emu.Problem(
        "int8_scaled_matmul",
        inputs,
        {"out": (out_dtype, (m, n))},
        params,
        name=f"int8_scaled_matmul m={m} k={k} out={out_dtype} bias={bias_dtype}",
    )


def check_scaled_matmul(p):
    i = p.inputs
    out_dtype = p.outputs["out"][0]
    expected = ref.int8_scaled_matmul(i["a"], i["b"], i["row_scale"], i["col_scale"], i.get("bias"), out_dtype)
    assert torch.equal(p.results["out"], expected), f"{p.name}: differs from the reference (bitwise expected)"


CHECKS = {
    "int8_linear": check_linear,
    "quantize_activation": check_quantize_activation,
    "quantize_weight": check_quantize_weight,
    "int8_matmul": check_matmul,
    "int8_scaled_matmul": check_scaled_matmul,
}


def linear_matrix() -> list[cuda_emu.Problem]:
    """Every (M, K) of the awkward sizes, each dtype once per shape, outliers on two of the three, bias and unaligned
    views alternating; plus the full dtype x outliers x bias cross on a few shapes and an N spanning several tiles."""
    problems = []
    for i, (m, k) in enumerate(itertools.product(MS, KS)):
        for j, dtype in enumerate(DTYPES):
            problems.append(
                linear_problem(m, k, dtype, outliers=(i + j) % 3 != 0, bias=(i + j) % 2 == 0, offset=(i + j) % 2)
            )
    for m, k in ((1, 83), (17, 4097), (130, 83)):
        for dtype, outliers, bias in itertools.product(DTYPES, (False, True), (False, True)):
            problems.append(linear_problem(m, k, dtype, outliers, bias, offset=0, n=131))
    problems.append(linear_problem(7, 4096, torch.bfloat16, True, True, offset=0, n=37, sm_count=1))  # no split-K
    # Most columns outliers (threshold 0.5): full 16-column mask chunks, many staged chunks per window.
    for m, k, dtype in ((33, 4096, torch.bfloat16), (130, 4096, torch.float16), (9, 4097, torch.float32)):
        problems.append(linear_problem(m, k, dtype, True, False, offset=0, n=131, threshold=0.5))
    # The tensor-core GEMM with one block per tile (the default 132 SMs split K for these small grids).
    for m, k, dtype in ((17, 4097, torch.bfloat16), (64, 4096, torch.float16), (130, 5137, torch.float32)):
        problems.append(linear_problem(m, k, dtype, True, True, offset=0, n=131, sm_count=1))
    problems.append(linear_problem(9, 83, torch.float16, True, False, offset=0, threshold=0.0))
    return problems


def quantize_matrix() -> list[cuda_emu.Problem]:
    problems = []
    for i, (m, k) in enumerate(itertools.product(MS, KS)):
        for j, dtype in enumerate(DTYPES):
            threshold = 0.0 if (i + j) % 4 == 0 else THRESHOLD
            problems.append(
                quantize_activation_problem(m, k, dtype, threshold, outliers=(i + j) % 3 != 0, offset=(i + j) % 2)
            )
    for (n, k), dtype in itertools.product(itertools.product((1, 7, 83), KS), DTYPES):
        problems.append(quantize_weight_problem(n, k, dtype, offset=(n + k) % 2))
    return problems


def matmul_matrix() -> list[cuda_emu.Problem]:
    problems = [matmul_problem(m, k, offset=(m + k) % 2) for m, k in itertools.product(MS, KS)]
    problems += [matmul_problem(m, 4097, offset=3, n=131, sm_count=1) for m in (1, 8, 130)]
    problems += [
        scaled_matmul_problem(m, k, out, bias)
        for (m, k), (out, bias) in itertools.product(
            ((1, 83), (9, 4097), (130, 7)),
            ((torch.float32, None), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)),
        )
    ]
    return problems


def run_and_check(binary, problems, tmp_path, schedule="forward", seed=0):
    proc = cuda_emu.run(binary, problems, tmp_path, schedule=schedule, seed=seed)
    assert proc.returncode == 0, f"emulator failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    failures = []
    for p in problems:
        try:
            CHECKS[p.op](p)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(problems)} problems failed:\n" + "\n".join(failures[:20])
    return proc


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sanitized_sm80():
    return cuda_emu.build(cuda_emu.Variant(sm=800, sanitize=True))


@pytest.fixture(scope="module")
def sanitized_sm75():
    return cuda_emu.build(cuda_emu.Variant(sm=750, sanitize=True))


def test_quantize_kernels_match_the_reference(sanitized_sm80, tmp_path):
    run_and_check(sanitized_sm80, quantize_matrix(), tmp_path)


def test_gemm_kernels_match_the_reference(sanitized_sm80, tmp_path):
    run_and_check(sanitized_sm80, matmul_matrix(), tmp_path)


def _splits(proc) -> list[int]:
    """Blocks per tile of C of each GEMM the driver ran (its ``splits <dir> S`` lines), in problem order."""
    return [int(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("splits ")]


def test_int8_linear_matches_the_reference(sanitized_sm80, tmp_path):
    problems = linear_matrix()
    proc = run_and_check(sanitized_sm80, problems, tmp_path)
    assert "problems=" in proc.stdout
    splits = _splits(proc)
    assert len(splits) == len(problems)
    tensor_core = [s for p, s in zip(problems, splits, strict=True) if p.params["m"] > DECODE_MAX_M]
    # Both ways of running the tensor-core GEMM were checked: split-K (up to its 16 splits) and one block per tile.
    assert max(tensor_core) == 16 and tensor_core.count(1) >= 10, sorted(set(tensor_core))


@pytest.mark.parametrize("schedule,seed", [("reverse", 0), ("random", 1)])
def test_results_do_not_depend_on_the_thread_schedule(sanitized_sm80, tmp_path, schedule, seed):
    problems = [
        linear_problem(m, k, dtype, True, True, offset=0, n=131)
        for m, k, dtype in (
            (1, 4096, torch.float32),
            (9, 4097, torch.bfloat16),
            (130, 5137, torch.float16),
            (83, 83, torch.float32),
        )
    ]
    problems += [
        quantize_activation_problem(130, 4097, torch.float16, THRESHOLD, True, 1),
        matmul_problem(17, 4096, offset=0, n=131),
    ]
    # Blocks run in the schedule's order too: under split-K the block that finishes each tile is a different one.
    proc = run_and_check(sanitized_sm80, problems, tmp_path, schedule=schedule, seed=seed)
    assert max(_splits(proc)) > 1


def test_sm75_path_matches_the_reference(sanitized_sm75, tmp_path):
    """sm_75: tiles copied through registers (no cp.async), each k32 MMA split into four mma.m8n8k16."""
    problems = [matmul_problem(m, k, offset=(m + k) % 2) for m, k in itertools.product((9, 17, 130), (7, 83, 4097))]
    problems += [
        linear_problem(m, k, dtype, True, True, offset=0, n=131)
        for m, k, dtype in ((16, 4096, torch.bfloat16), (130, 83, torch.float32), (83, 5137, torch.float16))
    ]
    run_and_check(sanitized_sm75, problems, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Mutation tests: the harness must catch a broken kernel. Each mutation edits one line of the real sources in a copy,
# builds the emulator with ThreadSanitizer (the race detector: a removed barrier is a data race on shared memory even
# when the schedule happens to give right results) and runs a few problems that exercise the mutated code under two
# schedules; the mutant is caught when the emulator reports an error or a race, or a result differs from the
# reference.
# ----------------------------------------------------------------------------------------------------------------
MUTATIONS = {
    "main_loop_barrier_removed": (
        "cuda/gemm_kernels.cu",
        "    __syncthreads();  // tile kt visible to all; everyone is done with the stage refilled below\n",
        "",
    ),
    "barrier_before_outlier_staging_removed": (
        "cuda/gemm_kernels.cu",
        "  __syncthreads();  // shared memory is reused by the outlier staging below\n",
        "",
    ),
    "cp_async_wait_one_group_short": (
        "cuda/gemm_kernels.cu",
        "ptx::cp_async_wait<kStages - 2>();",
        "ptx::cp_async_wait<kStages - 1>();",
    ),
    "accumulator_column_index_wrong": (
        "include/hf_int8/tile_layout.h",
        "{ return 2 * (lane & 3) + (e & 1); }",
        "{ return 2 * (lane & 3) + (e >> 1); }",
    ),
    "ldmatrix_b_chunk_index_wrong": (
        "include/hf_int8/tile_layout.h",
        "{ return 2 * kstep + ((lane >> 3) & 1); }",
        "{ return 2 * kstep + ((lane >> 4) & 1); }",
    ),
    "split_k_wrong_block_finishes": (
        "cuda/gemm_kernels.cu",
        "if ((arrived & (kSawOutlier - 1u)) != gridDim.z) return false;",
        "if ((arrived & (kSawOutlier - 1u)) != 1u) return false;",
    ),
    "fused_outliers_code_from_the_wrong_column": (
        "cuda/gemm_kernels.cu",
        "c / tile::kChunkBytes) + c % tile::kChunkBytes];",
        "c / tile::kChunkBytes) + (c + 1) % tile::kChunkBytes];",
    ),
    "fused_outlier_partials_miss_the_first_split": (
        "cuda/gemm_kernels.cu",
        "float sum = ptx::load_l2(p.split_outliers + r * p.n + c);",
        "float sum = 0.0f;",
    ),
    "fused_last_chunk_not_cleared": (
        "cuda/gemm_kernels.cu",
        "for (int j = f.pending; j < kOutlierChunk; ++j) row[j] = 0;",
        "for (int j = f.pending; j < kOutlierChunk; ++j) (void)row;",
    ),
    "split_k_wrong_k_range": (
        "cuda/gemm_kernels.cu",
        "if (s < ktiles) load_stage(p, smem, s, kt0 + s, t);",
        "if (s < ktiles) load_stage(p, smem, s, s, t);",
    ),
    "outlier_mma_fragment_wrong": (
        "cuda/gemm_kernels.cu",
        "    af[mi][2] = staged_pair(row, pair + 4);\n",
        "    af[mi][2] = staged_pair(row, pair);\n",
    ),
    "outlier_codes_in_the_wrong_format": (
        "cuda/gemm_kernels.cu",
        "? code_as_16bit(p.b[row * p.k + cols[j]], bf16)",
        "? code_as_16bit(p.b[row * p.k + cols[j]], !bf16)",
    ),
    "outlier_columns_carried_over_lost": (
        "cuda/gemm_kernels.cu",
        "      if (t.tid < left) col_list[t.tid] = col;\n",
        "",
    ),
    "mask_window_column_off_by_one": (
        "cuda/gemm_kernels.cu",
        "col_list[pos++] = static_cast<int>(kc) + __ffs(static_cast<int>(bits)) - 1;",
        "col_list[pos++] = static_cast<int>(kc) + __ffs(static_cast<int>(bits));",
    ),
    "mask_window_lane_offsets_wrong": (
        "cuda/gemm_kernels.cu",
        "before += __popc(ballot & lanes_below) << b;",
        "before += __popc(ballot & lanes_below) << (b / 2);",
    ),
    "decode_outlier_bits_misplaced": (
        "cuda/gemm_kernels.cu",
        "* 0x01020408u) >> 24) << (4 * i);",
        "* 0x01020408u) >> 24) << (3 * i);",
    ),
    "warp_sum_skips_last_step": (
        "cuda/device_utils.cuh",
        "for (int offset = 16; offset > 0; offset >>= 1) v += ptx::shfl_xor(v, offset);",
        "for (int offset = 16; offset > 1; offset >>= 1) v += ptx::shfl_xor(v, offset);",
    ),
}


def mutation_problems() -> list[cuda_emu.Problem]:
    return [
        # 64x64 tiles, one block per tile, tensor-core outliers, last stage 0
        linear_problem(17, 4096, torch.bfloat16, True, True, offset=0, n=131, sm_count=1),
        # 128x128 tiles, one block per tile, fp32 outliers, unaligned rows
        linear_problem(130, 4097, torch.float32, True, False, offset=1, n=131, sm_count=1),
        linear_problem(33, 4096, torch.float16, True, True, offset=0, n=131),  # split-K (16 splits), fp16 outliers
        linear_problem(64, 4096, torch.bfloat16, True, False, offset=0, n=37, threshold=0.5),  # most columns outliers
        # 128x128 tiles, bf16: the outlier product after the main loop (mask windows, 16-bit staging), split-K
        linear_problem(130, 4096, torch.bfloat16, True, False, offset=0, n=131, threshold=0.5),
        linear_problem(1, 4096, torch.float16, True, True, offset=0, n=37),  # decode kernel, split K
        matmul_problem(9, 83, offset=0, n=37),
    ]


def caught(binary, tmp_path) -> str | None:
    """What detects a fault in ``binary`` on the mutation problems (None: nothing did)."""
    for schedule in ("forward", "reverse"):
        problems = mutation_problems()
        workdir = tmp_path / schedule
        proc = cuda_emu.run(binary, problems, workdir, schedule=schedule)
        if proc.returncode != 0:
            report = [line for line in proc.stderr.splitlines() if "WARNING" in line or "emulator" in line]
            return f"emulator error under the {schedule} schedule: {(report or proc.stderr.splitlines() or ['?'])[0]}"
        for p in problems:
            try:
                CHECKS[p.op](p)
            except AssertionError as exc:
                return f"wrong result under the {schedule} schedule: {exc}"
    return None


def test_unmutated_kernels_have_no_data_race_and_pass_the_mutation_problems(tmp_path):
    binary = cuda_emu.build(cuda_emu.Variant(sm=800, sanitize=False, race=True))
    assert caught(binary, tmp_path) is None


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutant_kernel_is_caught(name, tmp_path):
    binary = cuda_emu.build(cuda_emu.Variant(sm=800, sanitize=False, race=True, mutations=(MUTATIONS[name],)))
    assert caught(binary, tmp_path) is not None, f"mutation {name!r} went unnoticed"
