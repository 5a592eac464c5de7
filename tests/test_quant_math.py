"""Host-side tests of the math shared by the CPU and CUDA kernels (``csrc/include/hf_int8``).

``quant_math.h`` (scales, multipliers, int8 codes, dequantization) and ``tile_layout.h`` (the CUDA GEMM's shared
memory swizzle, ldmatrix addresses and mma fragment coordinates) are ``__host__ __device__`` functions. Here they are
compiled for the host, by the C++ compiler and, where nvcc exists, by nvcc in CUDA mode (so the very
``__host__ __device__`` definitions the kernels use), and checked:

* against the pure-PyTorch reference, bit for bit (codes, scales, multipliers, dequantized values);
* against the PTX ISA's definition of the ``mma.m16n8k32`` / ``mma.m8n8k16`` s8 fragments and of ``ldmatrix``,
  written out independently below: a simulated warp loads a random tile through the kernel's addresses and the
  simulated MMA must equal an exact integer matmul; every ldmatrix phase and every tile-copy store is checked to be
  free of shared-memory bank conflicts.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_int8.ops import reference
from hf_int8.ops.constants import INT8_MAX

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "csrc" / "include"

SHIM = r"""
#include <cstdint>
#include "hf_int8/quant_math.h"
#include "hf_int8/tile_layout.h"

extern "C" {
void hq_scales(const float* absmax, float* scale, float* mult, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    scale[i] = hf_int8::scale_from_absmax(absmax[i]);
    mult[i] = hf_int8::multiplier_from_absmax(absmax[i]);
  }
}
void hq_encode(const float* x, const float* mult, int8_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = hf_int8::encode(x[i], mult[i]);
}
void hq_is_outlier(const float* x, float threshold, uint8_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = hf_int8::is_outlier(x[i], threshold) ? 1 : 0;
}
void hq_dequantize(const int32_t* acc, const float* rs, const float* cs, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = hf_int8::dequantize(acc[i], rs[i], cs[i]);
}
int hq_tile_k() { return hf_int8::tile::kTileK; }
int hq_smem_offset(int row, int chunk) { return hf_int8::tile::smem_offset(row, chunk); }
int hq_ldsm_a_row(int lane) { return hf_int8::tile::ldsm_a_row(lane); }
int hq_ldsm_a_chunk(int lane, int ks) { return hf_int8::tile::ldsm_a_chunk(lane, ks); }
int hq_ldsm_b_row(int lane) { return hf_int8::tile::ldsm_b_row(lane); }
int hq_ldsm_b_chunk(int lane, int ks) { return hf_int8::tile::ldsm_b_chunk(lane, ks); }
int hq_acc_row(int lane, int e) { return hf_int8::tile::acc_row(lane, e); }
int hq_acc_col(int lane, int e) { return hf_int8::tile::acc_col(lane, e); }
int hq_copy_row(int i) { return hf_int8::tile::copy_row(i); }
int hq_copy_chunk(int i) { return hf_int8::tile::copy_chunk(i); }
}
"""


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _compile(compiler: str, out_dir: Path) -> ctypes.CDLL:
    src = out_dir / ("shim.cu" if compiler == "nvcc" else "shim.cpp")
    src.write_text(SHIM)
    lib = out_dir / f"libquant_math_{compiler}.so"
    if compiler == "nvcc":
        # CUDA mode: HF_INT8_HD expands to __host__ __device__, as in csrc/cuda. Same -O3 and no fast math as setup.py.
        cmd = [_nvcc(), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-I{INCLUDE}", str(src)]
        cmd += ["-o", str(lib)]
    else:
        cxx = os.environ.get("CXX", "c++")
        cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", f"-I{INCLUDE}", str(src), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module", params=["c++", "nvcc"])
def lib(request, tmp_path_factory) -> ctypes.CDLL:
    if request.param == "nvcc" and _nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME unset and no nvcc on PATH): CUDA-mode compile of the header not run")
    return _compile(request.param, tmp_path_factory.mktemp(f"quant_math_{request.param.replace('+', 'x')}"))


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def _special_floats(rng: np.random.Generator, n: int) -> np.ndarray:
    """Ordinary, tiny (denormal), huge, tie-producing and non-finite float32 values."""
    parts = [
        rng.standard_normal(n).astype(np.float32) * 10,
        (rng.standard_normal(n) * 1e-40).astype(np.float32),  # denormals
        (rng.standard_normal(n) * 1e30).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 3.4e38, 1e-45], dtype=np.float32),
    ]
    return np.concatenate(parts)


def test_scales_and_multipliers_match_reference_bitwise(lib):
    rng = np.random.default_rng(0)
    absmax = np.abs(_special_floats(rng, 4000))
    scale = np.empty_like(absmax)
    mult = np.empty_like(absmax)
    lib.hq_scales(_ptr(absmax), _ptr(scale), _ptr(mult), ctypes.c_int64(absmax.size))
    # IEEE fp32 quotients (numpy divides float32 by float32 with one rounding) ...
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        ieee_scale = absmax / np.float32(INT8_MAX)
        ieee_mult = np.where(absmax > 0, np.float32(INT8_MAX) / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)
    np.testing.assert_array_equal(scale.view(np.int32), ieee_scale.view(np.int32))
    np.testing.assert_array_equal(mult.view(np.int32), ieee_mult.view(np.int32))
    # ... and the reference, which must compute the same ones (not reciprocal-then-multiply).
    t = torch.from_numpy(absmax)
    np.testing.assert_array_equal(scale.view(np.int32), reference._row_scale(t).numpy().view(np.int32))
    np.testing.assert_array_equal(mult.view(np.int32), reference._row_multiplier(t).numpy().view(np.int32))
    assert mult[absmax == 0].tolist() == [0.0] * int((absmax == 0).sum()), "a zero row must get multiplier 0"


def test_codes_match_reference_bitwise(lib):
    rng = np.random.default_rng(1)
    x = _special_floats(rng, 20000)
    mult = np.abs(_special_floats(rng, 20000))[: x.size]
    rng.shuffle(mult)
    # Exact ties k + 0.5 (multiplier 1) must round half to even, like torch.round.
    ties = np.arange(-130, 130, dtype=np.float32) + np.float32(0.5)
    x = np.concatenate([x, ties])
    mult = np.concatenate([mult, np.ones_like(ties)])
    out = np.empty(x.size, dtype=np.int8)
    lib.hq_encode(_ptr(x), _ptr(mult), _ptr(out), ctypes.c_int64(x.size))
    want = reference._encode(torch.from_numpy(x)[:, None], torch.from_numpy(mult)).squeeze(1).numpy()
    np.testing.assert_array_equal(out, want)
    assert out.min() >= -INT8_MAX and out.max() <= INT8_MAX
    tie_codes = dict(zip(ties.tolist(), out[-ties.size :].tolist(), strict=True))
    assert [tie_codes[v] for v in (0.5, 1.5, 2.5, -2.5, 126.5, 127.5, -127.5)] == [0, 2, 2, -2, 126, 127, -127]


def test_outlier_predicate_matches_reference(lib):
    rng = np.random.default_rng(2)
    x = _special_floats(rng, 5000)
    # The kernels get the threshold as a double and convert it with static_cast<float> (ctypes.c_float is that C
    # conversion); the reference gets the same double. Subnormal thresholds, values that round differently in fp32
    # and fp64, and positive values that round to 0 in fp32 (no outliers) must all agree.
    for threshold in (6.0, 0.5, 1e-40, 1.4e-45, 6.0000000001, 5.9999999999, 1e-50, 7e-46, 0.0):
        out = np.empty(x.size, dtype=np.uint8)
        lib.hq_is_outlier(_ptr(x), ctypes.c_float(threshold), _ptr(out), ctypes.c_int64(x.size))
        want = reference.outlier_columns(torch.from_numpy(x)[None, :], threshold).numpy()
        np.testing.assert_array_equal(out.astype(bool), want, err_msg=f"threshold {threshold!r}")
        if threshold in (1e-40, 1.4e-45):  # the denormal activations straddle these: both answers occur
            assert out.any() and not out.all(), threshold
    assert threshold == 0.0 and not out.any(), "threshold 0 means no outliers"


def test_dequantize_matches_reference_bitwise(lib):
    rng = np.random.default_rng(3)
    n = 10000
    acc = rng.integers(-(2**31), 2**31 - 1, size=n, dtype=np.int64).astype(np.int32)
    rs = (np.abs(rng.standard_normal(n)) / INT8_MAX).astype(np.float32)
    cs = (np.abs(rng.standard_normal(n)) / INT8_MAX).astype(np.float32)
    out = np.empty(n, dtype=np.float32)
    lib.hq_dequantize(_ptr(acc), _ptr(rs), _ptr(cs), _ptr(out), ctypes.c_int64(n))
    want = (torch.from_numpy(acc).float() * (torch.from_numpy(rs) * torch.from_numpy(cs))).numpy()
    np.testing.assert_array_equal(out.view(np.int32), want.view(np.int32))


# ----------------------------------------------------------------------------------------------------------------
# tile_layout.h against the PTX ISA definitions (written out here independently of the header)
# ----------------------------------------------------------------------------------------------------------------
CHUNK = 16
ROWS = 128  # the largest block tile (BM = BN = 128)


def _ptx_m16n8k32_a(lane: int, reg: int, byte: int) -> tuple[int, int]:
    """PTX ISA, mma.m16n8k32 .s8 A fragment: element a_i (i = 4 * reg + byte) of lane -> (row, col)."""
    group, tid = lane >> 2, lane % 4
    i = 4 * reg + byte
    row = group if i < 4 or 8 <= i < 12 else group + 8
    col = tid * 4 + (i & 3) + (16 if i >= 8 else 0)
    return row, col


def _ptx_m16n8k32_b(lane: int, reg: int, byte: int) -> tuple[int, int]:
    """PTX ISA, mma.m16n8k32 .s8 B fragment: element b_i (i = 4 * reg + byte) -> (k row, n col)."""
    group, tid = lane >> 2, lane % 4
    i = 4 * reg + byte
    return tid * 4 + (i & 3) + (16 if i >= 4 else 0), group


def _ptx_m16n8_c(lane: int, e: int) -> tuple[int, int]:
    """PTX ISA, mma.m16n8k* .s32 C/D fragment: c_e -> (row, col)."""
    group, tid = lane >> 2, lane % 4
    return group + (8 if e >= 2 else 0), tid * 2 + (e & 1)


def _ptx_m8n8k16(lane: int, byte: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PTX ISA, mma.m8n8k16 .s8: A element a_byte -> (row, col); B element b_byte -> (k row, n col)."""
    group, tid = lane >> 2, lane % 4
    return (group, tid * 4 + byte), (tid * 4 + byte, group)


def _ldmatrix_x4(smem: np.ndarray, addresses: list[int]) -> np.ndarray:
    """PTX ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8q..8q+7 give the row addresses of matrix q; lane l receives,
    from each matrix q, the 32-bit word l % 4 of row l // 4. Returns [32 lanes, 4 regs, 4 bytes]."""
    out = np.zeros((32, 4, 4), dtype=np.int8)
    for lane in range(32):
        for q in range(4):
            base = addresses[8 * q + lane // 4]
            out[lane, q] = smem[base + 4 * (lane % 4) : base + 4 * (lane % 4) + 4]
    return out


def _stage(lib, tile: np.ndarray) -> np.ndarray:
    """Store a logical [rows, 64] int8 tile the way the kernel's copy does (through smem_offset)."""
    rows, width = tile.shape
    smem = np.zeros(rows * width, dtype=np.int8)
    for r in range(rows):
        for c in range(width // CHUNK):
            off = lib.hq_smem_offset(r, c)
            smem[off : off + CHUNK] = tile[r, c * CHUNK : (c + 1) * CHUNK]
    return smem


def test_swizzle_is_a_bijection_and_tile_copy_is_conflict_free(lib):
    assert lib.hq_tile_k() == 64
    offsets = [lib.hq_smem_offset(r, c) for r in range(ROWS) for c in range(4)]
    assert sorted(offsets) == list(range(0, ROWS * 64, CHUNK))
    # Copy: thread i stores chunk (copy_row(i), copy_chunk(i)); the 8 threads of one store phase must cover the 8
    # distinct 16-byte bank groups of a 128-byte line (no bank conflict), and all chunks are covered once.
    pairs = [(lib.hq_copy_row(i), lib.hq_copy_chunk(i)) for i in range(ROWS * 4)]
    assert sorted(pairs) == [(r, c) for r in range(ROWS) for c in range(4)]
    for start in range(0, ROWS * 4, 8):
        groups = {(lib.hq_smem_offset(*pairs[i]) // CHUNK) % 8 for i in range(start, start + 8)}
        assert len(groups) == 8, f"store phase at thread {start} has bank conflicts"


@pytest.mark.parametrize("ks", [0, 1])
def test_ldmatrix_addresses_are_bank_conflict_free(lib, ks):
    for base in range(0, ROWS, 16):
        for name, row_fn, chunk_fn in (
            ("A", lib.hq_ldsm_a_row, lib.hq_ldsm_a_chunk),
            ("B", lib.hq_ldsm_b_row, lib.hq_ldsm_b_chunk),
        ):
            addrs = [lib.hq_smem_offset(base + row_fn(lane), chunk_fn(lane, ks)) for lane in range(32)]
            for phase in range(4):
                groups = {(a // CHUNK) % 8 for a in addrs[8 * phase : 8 * phase + 8]}
                assert len(groups) == 8, f"{name} ldmatrix phase {phase} at row {base} k-step {ks} conflicts"


@pytest.mark.parametrize("ks", [0, 1])
def test_fragments_through_ldmatrix_match_ptx_and_give_exact_mma(lib, ks):
    rng = np.random.default_rng(10 + ks)
    a_tile = rng.integers(-127, 128, size=(ROWS, 64), dtype=np.int8)
    b_tile = rng.integers(-127, 128, size=(ROWS, 64), dtype=np.int8)
    a_smem, b_smem = _stage(lib, a_tile), _stage(lib, b_tile)
    for m_base in (0, 48, 112):
        for n_base in (0, 16, 96):
            lanes = range(32)
            a_addr = [lib.hq_smem_offset(m_base + lib.hq_ldsm_a_row(i), lib.hq_ldsm_a_chunk(i, ks)) for i in lanes]
            b_addr = [lib.hq_smem_offset(n_base + lib.hq_ldsm_b_row(i), lib.hq_ldsm_b_chunk(i, ks)) for i in lanes]
            a_regs = _ldmatrix_x4(a_smem, a_addr)
            b_raw = _ldmatrix_x4(b_smem, b_addr)
            # ldmatrix registers 0,1 -> B fragment of n rows n_base..+7; 2,3 -> n_base+8..+15 (as the kernel splits).
            b_frags = [b_raw[:, 0:2], b_raw[:, 2:4]]
            a_want = a_tile[m_base : m_base + 16, 32 * ks : 32 * ks + 32]
            for half, b_regs in enumerate(b_frags):
                w_rows = b_tile[n_base + 8 * half : n_base + 8 * half + 8, 32 * ks : 32 * ks + 32]
                b_want = w_rows.T  # [k 32, n 8]: the kernel's B is W[n, k], i.e. column-major K x N
                a_seen = np.zeros((16, 32), dtype=np.int64)
                b_seen = np.zeros((32, 8), dtype=np.int64)
                for lane in range(32):
                    for reg in range(4):
                        for byte in range(4):
                            a_seen[_ptx_m16n8k32_a(lane, reg, byte)] = a_regs[lane, reg, byte]
                    for reg in range(2):
                        for byte in range(4):
                            b_seen[_ptx_m16n8k32_b(lane, reg, byte)] = b_regs[lane, reg, byte]
                np.testing.assert_array_equal(a_seen, a_want)
                np.testing.assert_array_equal(b_seen, b_want)
                exact = a_want.astype(np.int64) @ b_want.astype(np.int64)
                # m16n8k32 result as the kernel reads it back through acc_row / acc_col.
                for lane in range(32):
                    for e in range(4):
                        r, c = _ptx_m16n8_c(lane, e)
                        assert (lib.hq_acc_row(lane, e), lib.hq_acc_col(lane, e)) == (r, c)
                # sm_75: the same registers fed to four m8n8k16 (a0/b0, a2/b1 -> rows g; a1/b0, a3/b1 -> rows g+8).
                c75 = np.zeros((16, 8), dtype=np.int64)
                for rows, pairs in ((0, ((0, 0), (2, 1))), (8, ((1, 0), (3, 1)))):
                    for a_reg, b_reg in pairs:
                        a8 = np.zeros((8, 16), dtype=np.int64)
                        b8 = np.zeros((16, 8), dtype=np.int64)
                        for lane in range(32):
                            for byte in range(4):
                                (ar, ac), (bk, bn) = _ptx_m8n8k16(lane, byte)
                                a8[ar, ac] = a_regs[lane, a_reg, byte]
                                b8[bk, bn] = b_regs[lane, b_reg, byte]
                        c75[rows : rows + 8] += a8 @ b8
                np.testing.assert_array_equal(c75, exact)
