// Index math of the CUDA int8 tensor-core GEMM (csrc/cuda/gemm_kernels.cu), kept host + device so that it is
// compiled and tested on the CPU (tests/test_quant_math.py) where no GPU exists.
//
// Tiles: the GEMM computes C[M, N] = A[M, K] . B[N, K]^T with both operands row-major int8 ("TN"). A block stages
// K-slices of kTileK = 64 bytes of A and B rows in shared memory, one row per 64 bytes, cut in four 16-byte chunks.
// Chunks are XOR-swizzled so that the eight 16-byte row reads of one ldmatrix phase hit eight distinct bank groups.
//
// Warp-level MMA: PTX mma.sync.m16n8k32.row.col.s32.s8.s8.s32 (sm_80+). Fragment ownership, with
// g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k32"):
//   A (16 x 32): register r holds the 4 bytes A[g + 8 * (r % 2)][16 * (r / 2) + 4 * t .. + 3]
//   B (32 x 8):  register r holds the 4 bytes B[k = 16 * r + 4 * t .. + 3][n = g]  (= W[g][16 r + 4 t ..])
//   C (16 x 8):  element e is C[g + 8 * (e / 2)][2 * t + e % 2]
// On sm_75 the same fragments feed four mma.m8n8k16 (A register r is an m8n8k16 A fragment of row block r % 2 and
// k block r / 2; B register r is the m8n8k16 B fragment of k block r), so one fragment layout serves sm_75..sm_90.
#pragma once

#include <cstdint>

#include "hf_int8/quant_math.h"

namespace hf_int8 {
namespace tile {

constexpr int kTileK = 64;                           // bytes of K staged per pipeline stage (two k32 MMA steps)
constexpr int kChunkBytes = 16;                      // one cp.async / one ldmatrix row
constexpr int kChunksPerRow = kTileK / kChunkBytes;  // 4

// Physical 16-byte chunk of logical chunk `chunk` (0..3) in tile row `row`.
HF_INT8_HD int swizzle_chunk(int row, int chunk) { return chunk ^ ((row >> 1) & (kChunksPerRow - 1)); }

// Byte offset of (row, logical chunk) inside one staged operand tile.
HF_INT8_HD int smem_offset(int row, int chunk) { return row * kTileK + swizzle_chunk(row, chunk) * kChunkBytes; }

// ldmatrix.x4 for an A fragment (16 rows x 32 bytes at k-step `kstep` of the tile): lane supplies the address of
// row (lane % 8) + 8 * ((lane / 8) % 2), logical chunk 2 * kstep + lane / 16. Matrix q = lane / 8 then lands in
// A register q (rows +0/+8 alternate, k halves in the upper two matrices), matching the A fragment above.
HF_INT8_HD int ldsm_a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
HF_INT8_HD int ldsm_a_chunk(int lane, int kstep) { return 2 * kstep + (lane >> 4); }

// ldmatrix.x4 for two B fragments (n rows 0..7 and 8..15 of a 16-row slab): lane supplies row
// (lane % 8) + 8 * (lane / 16), logical chunk 2 * kstep + (lane / 8) % 2: matrices land in b[0][0], b[0][1],
// b[1][0], b[1][1].
HF_INT8_HD int ldsm_b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
HF_INT8_HD int ldsm_b_chunk(int lane, int kstep) { return 2 * kstep + ((lane >> 3) & 1); }

// Accumulator element e (0..3) of an m16n8 C fragment: row and column inside the 16 x 8 tile.
HF_INT8_HD int acc_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
HF_INT8_HD int acc_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

// Cooperative global -> shared copy: chunk number `i` of a rows x 64-byte tile is row i / 4, logical chunk i % 4
// (consecutive threads cover consecutive 16-byte pieces of a row, so a warp reads 8 full 64-byte rows).
HF_INT8_HD int copy_row(int i) { return i / kChunksPerRow; }
HF_INT8_HD int copy_chunk(int i) { return i % kChunksPerRow; }

}  // namespace tile
}  // namespace hf_int8
