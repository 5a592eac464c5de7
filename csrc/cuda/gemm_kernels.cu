// int8 x int8 -> int32 GEMM on tensor cores with the LLM.int8() epilogue, and the small-M (decode) kernel.
//
// Why our own mma.sync kernel rather than cuBLASLt:
//  * the epilogue LLM.int8() needs (row scale x column scale, plus the fp32 product of the outlier columns, plus
//    bias, one rounding to fp16/bf16/fp32) is not expressible in cuBLASLt's epilogues: cuBLASLt would write the
//    int32 matrix to memory and a second kernel would read it back (8 bytes per output element of extra traffic),
//    and the outlier product would be a third launch on gathered columns plus a host sync to size it;
//  * cuBLASLt's IMMA kernels constrain shapes and alignment (k and n multiples of 4 to 16, fixed layouts), whereas
//    this kernel takes any m, n, k (predicated, zero-filled tiles);
//  * the kernels are in our objects, so CI proves from the SASS that the GEMM really runs on integer tensor cores
//    (IMMA) and that nothing spills, without a GPU (scripts/check_cuda.py); a library call can't be checked so.
// The price: on Hopper, mma.sync reaches a fraction of what wgmma-based library kernels reach for large prefill
// GEMMs. Decoding (m <= 8) is bound by reading the weights, where the dp4a kernel below streams them once.
//
// Tensor-core kernel: block tile BM x BN, K staged 64 bytes at a time through a 3-stage cp.async pipeline (sm_80+;
// sm_75 has no cp.async and copies through registers), ldmatrix from XOR-swizzled shared memory (tile_layout.h),
// mma.sync m16n8k32 s8 (sm_80+) or 4 x m8n8k16 (sm_75) on the same fragments. Epilogue in registers.
//
// Decode kernel (m <= 8): every weight row is read once with 16-byte streaming loads, four in flight per lane,
// against the m activation rows (L1-resident) with dp4a. When n is small, K is split over 2..8 warps of a block
// and the partial sums are added in a fixed order (deterministic), to keep enough loads in flight to saturate
// DRAM bandwidth.
//
// Split-K: when the tiles cannot fill the GPU (9-64 tokens, narrow layers), blockIdx.z splits K; partial int32 sums
// meet in a zeroed workspace (red.add: any order gives the same sum) and the block that arrives last at its tile
// runs the epilogue.
//
// Outlier product (no host sync, fixed fp32 sum order): for fp16/bf16 activations on sm_80+ on tensor cores
// (mma.m16n8k16, x and the weight codes as 16-bit floats, fp32 accumulation, the weight scale applied once in the
// epilogue), else as fp32 FMAs. The 64x64 tiles take each K-tile's outlier columns inside the main loop, the codes
// from the B tile in shared memory; the 128x128 tiles compact the mask after the main loop and stage x[:, c] and
// B[:, c] in shared memory 16 columns at a time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_utils.cuh"
#include "hf_int8/quant_math.h"
#include "hf_int8/tile_layout.h"
#include "launch.h"
#include "ptx.cuh"

namespace hf_int8 {
namespace cuda {
namespace {

using tile::kTileK;

constexpr int kStages = 3;
constexpr int kOutlierChunk = 16;                  // outlier columns staged per round
constexpr int kOutlierStride = kOutlierChunk + 1;  // padded row of the staging tiles (no bank conflicts)
// Tensor-core outlier staging (fp16/bf16 activations, sm_80+): a row of kOutlierChunk 16-bit values (8 words) is
// padded to 12 words so that the 8 rows x 4 words of a fragment load fall in 32 different banks.
constexpr int kOutlierPairs = kOutlierChunk / 2;
constexpr int kOutlierRowWords = kOutlierPairs + 4;
constexpr int kOutlierRowHalves = 2 * kOutlierRowWords;

struct Params {
  const int8_t* a;
  const int8_t* b;
  int64_t m, n, k;
  void* out;
  DType out_dtype;
  const float* row_scale;
  const float* col_scale;
  const void* bias;
  DType bias_dtype;
  const bool* mask;
  const void* x;
  DType x_dtype;
  bool vec16;  // A and B rows are 16-byte aligned (k % 16 == 0, aligned bases): cp.async 16-byte copies
  int ksplit;  // decode kernel: warps sharing one output row
  // Tensor-core kernel, split-K (gridDim.z > 1 blocks per tile of C): K-tiles per split, the int32 sums [m, n]
  // and one arrival counter per tile, both zeroed before the launch (workspace, see launch_int8_gemm).
  int ktiles_per_split;
  int* split_sums;
  unsigned* split_counters;
  float* split_outliers;  // [gridDim.z, m, n]: each split's outlier product when it is fused into the main loop
};

// ------------------------------------------------------------------------------------------------------------
// Building blocks on top of the PTX primitives (ptx.cuh)
// ------------------------------------------------------------------------------------------------------------
// 16 bytes global -> shared, zero-filled when !valid (then `src` is not read): cp.async on sm_80+, registers before.
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
#if HF_INT8_SM >= 800
  ptx::cp_async16(dst, src, valid ? 16 : 0);
#else
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (valid) v = *reinterpret_cast<const uint4*>(src);
  *reinterpret_cast<uint4*>(dst) = v;
#endif
}

// 16 bytes of a row that is not 16-byte aligned (k % 16 != 0): byte loads, zero past the end, one 16-byte store.
__device__ __forceinline__ void copy16_bytes(void* dst, const int8_t* row, int64_t col, int64_t k, bool row_valid) {
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const uint32_t byte = (row_valid && col + i < k) ? uint32_t(uint8_t(row[col + i])) : 0u;
    w[i / 4] |= byte << (8 * (i % 4));
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

// c[16x8] += a[16x32] . b[32x8] on s8 inputs (fragments: see tile_layout.h).
__device__ __forceinline__ void mma_s8_16832(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if HF_INT8_SM >= 800
  ptx::mma_m16n8k32_s8(c, a, b);
#else
  // Rows g (c0, c1) and g + 8 (c2, c3); k 0..15 from a0/a1 with b0, k 16..31 from a2/a3 with b1.
  ptx::mma_m8n8k16_s8(c[0], c[1], a[0], b[0]);
  ptx::mma_m8n8k16_s8(c[0], c[1], a[2], b[1]);
  ptx::mma_m8n8k16_s8(c[2], c[3], a[1], b[0]);
  ptx::mma_m8n8k16_s8(c[2], c[3], a[3], b[1]);
#endif
}

__device__ __forceinline__ int dp4a_16(const uint4& x, const uint4& w, int acc) {
  acc = ptx::dp4a(static_cast<int>(x.x), static_cast<int>(w.x), acc);
  acc = ptx::dp4a(static_cast<int>(x.y), static_cast<int>(w.y), acc);
  acc = ptx::dp4a(static_cast<int>(x.z), static_cast<int>(w.z), acc);
  acc = ptx::dp4a(static_cast<int>(x.w), static_cast<int>(w.w), acc);
  return acc;
}

// Bit b set where byte b of 16 outlier-mask bytes is set (the mask's bool bytes are 0 or 1): per 32-bit word, the
// multiply moves bytes 0..3's low bits to bits 24..27 without carries into them.
__device__ __forceinline__ unsigned outlier_bits16(const uint4& mask16) {
  const uint32_t words[4] = {mask16.x, mask16.y, mask16.z, mask16.w};
  unsigned bits = 0u;
#pragma unroll
  for (int i = 0; i < 4; ++i) bits |= (((words[i] & 0x01010101u) * 0x01020408u) >> 24) << (4 * i);
  return bits;
}

// Signed byte b (0..15) of 16 loaded weight bytes, by selects (a dynamic index into the registers would spill them).
__device__ __forceinline__ int code_at16(const uint4& v, int b) {
  const uint32_t word = b < 8 ? (b < 4 ? v.x : v.y) : (b < 12 ? v.z : v.w);
  return static_cast<int8_t>(static_cast<uint8_t>(word >> (8 * (b & 3))));
}

// ------------------------------------------------------------------------------------------------------------
// Outlier product and epilogue, shared by both kernels
// ------------------------------------------------------------------------------------------------------------
// Activation x[row, col] of an outlier column, as fp32.
__device__ __forceinline__ float outlier_activation(const Params& p, int64_t row, int64_t col) {
  return load_float(p.x, p.x_dtype, row * p.k + col);
}

// Dequantized weight of an outlier column, code * col_scale, rounded on its own (never contracted into the FMA that
// multiplies it with the activation), as the reference computes it.
__device__ __forceinline__ float dequantized_weight(int code, float col_scale) {
  return __fmul_rn(static_cast<float>(code), col_scale);
}

// bias[c] as fp32, 0 without bias (c must be a column of C).
__device__ __forceinline__ float bias_at(const Params& p, int64_t c) {
  return p.bias != nullptr ? load_float(p.bias, p.bias_dtype, c) : 0.0f;
}

// out[r, c] of int8_matmul: the raw accumulator.
__device__ __forceinline__ void store_int32(const Params& p, int64_t r, int64_t c, int acc) {
  static_cast<int32_t*>(p.out)[r * p.n + c] = acc;
}

// out[r, c] of the other ops: dequantize (acc * (row_scale * col_scale)), add the outlier product (when some column
// is an outlier, as in the reference) and the bias, in this order and with round-to-nearest fp32 operations (no FMA
// contraction), then round once to the output dtype.
__device__ __forceinline__ void store_dequantized(const Params& p, int64_t r, int64_t c, int acc, float rs, float cs,
                                                  bool add_outlier, float outlier, float bias) {
  float v = __fmul_rn(static_cast<float>(acc), __fmul_rn(rs, cs));
  if (add_outlier) v = __fadd_rn(v, outlier);
  if (p.bias != nullptr) v = __fadd_rn(v, bias);
  store_float(p.out, p.out_dtype, r * p.n + c, v);
}

// ------------------------------------------------------------------------------------------------------------
// Tensor-core GEMM
// ------------------------------------------------------------------------------------------------------------
template <int BM, int BN, int WM, int WN>
struct TileConfig {
  static constexpr int kBM = BM;  // block tile: BM rows of A x BN rows of B
  static constexpr int kBN = BN;
  static constexpr int kWM = WM;  // warp tile: WM x WN
  static constexpr int kWN = WN;
  static constexpr int kWarpsM = BM / WM;
  static constexpr int kWarpsN = BN / WN;
  static constexpr int kWarps = kWarpsM * kWarpsN;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMi = WM / 16;
  static constexpr int kNi = WN / 8;
  static constexpr int kStageBytes = (BM + BN) * kTileK;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kNi % 2 == 0, "B fragments are loaded in pairs");
  static_assert((BM * tile::kChunksPerRow) % kThreads == 0 && (BN * tile::kChunksPerRow) % kThreads == 0,
                "tile copy divides evenly among threads");
  // Outlier staging in the drained pipeline's memory: the column list (a window of the mask plus the columns
  // carried over from the previous window), the warps' counts, then the staged x and weight columns.
  // The 64x64 tiles (9-64 tokens) take the outlier columns of fp16/bf16 activations inside the main loop: the
  // weight codes from the B tile already in shared memory (no second, scattered read of the weight), one thread per
  // weight row and one per activation row.
  static constexpr bool kFuseOutliers = BM == 64 && BN == 64;
  static_assert(!kFuseOutliers || kThreads >= BM + BN, "one thread per staged row");
  static constexpr int kMaskWindow16 = 16 * kThreads;  // mask columns per compaction round (16-byte loads)
  static constexpr int kColListInts = kMaskWindow16 + kOutlierChunk;
  static constexpr int kOutlierStagingBytes = (kColListInts + 32) * 4 + (BM + BN) * kOutlierStride * 4;
  static_assert(kOutlierStagingBytes <= kSmemBytes, "outlier staging fits");
  static_assert(kOutlierRowWords >= kOutlierPairs && (BM + BN) * kOutlierRowWords <= (BM + BN) * kOutlierStride,
                "the 16-bit outlier staging fits where the fp32 staging does");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
  // Split-K's last-block flag: the last word of the drained pipeline's memory, past what the outlier staging uses
  // (the 128x128 tiles already take the whole 48 KiB of static shared memory).
  static constexpr int kLastBlockFlag = kSmemBytes - 4;
  static_assert(kOutlierStagingBytes <= kLastBlockFlag, "flag clear of the outlier staging");
};

// Per-thread accumulators of a warp tile: fragment (mi, ni), element e (tile_layout.h).
template <class Cfg, typename T>
using Fragments = T[Cfg::kMi][Cfg::kNi][4];

template <class Cfg, typename T>
__device__ __forceinline__ void fill(Fragments<Cfg, T>& f, T v) {
#pragma unroll
  for (int mi = 0; mi < Cfg::kMi; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::kNi; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) f[mi][ni][e] = v;
}

// Where a thread of the tensor-core kernel works: its block's BM x BN tile of C, its warp's WM x WN part of it.
template <class Cfg>
struct BlockThread {
  int64_t m0, n0;  // first row and column of the block's tile
  int tid, lane, warp, warp_m, warp_n;

  __device__ __forceinline__ static BlockThread here() {
    const int64_t m0 = int64_t(blockIdx.y) * Cfg::kBM;
    const int64_t n0 = int64_t(blockIdx.x) * Cfg::kBN;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    return {m0, n0, tid, tid & 31, warp, warp / Cfg::kWarpsN, warp % Cfg::kWarpsN};
  }
  // First row / column of the warp tile inside the block's tile.
  __device__ __forceinline__ int warp_row() const { return warp_m * Cfg::kWM; }
  __device__ __forceinline__ int warp_col() const { return warp_n * Cfg::kWN; }
  // Row and column in C of accumulator element e of fragment (mi, ni).
  __device__ __forceinline__ int64_t row(int mi, int e) const {
    return m0 + warp_row() + mi * 16 + tile::acc_row(lane, e);
  }
  __device__ __forceinline__ int64_t col(int ni, int e) const {
    return n0 + warp_col() + ni * 8 + tile::acc_col(lane, e);
  }
};

// Copies rows [row0, row0 + ROWS) x bytes [k0, k0 + kTileK) of a row-major int8 operand (`rows` rows of k bytes)
// into a swizzled shared tile (tile_layout.h), zero-filled past the last row and past k; each thread of the block
// copies its share of the 16-byte chunks.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_operand_tile(int8_t* tile, const int8_t* src, int64_t rows, int64_t row0,
                                                  int64_t k, int64_t k0, bool vec16, int tid) {
#pragma unroll
  for (int it = 0; it < ROWS * tile::kChunksPerRow / THREADS; ++it) {
    const int i = tid + it * THREADS;
    const int r = tile::copy_row(i);
    const int c = tile::copy_chunk(i);
    const int64_t gr = row0 + r;
    const int64_t gk = k0 + c * tile::kChunkBytes;
    int8_t* dst = tile + tile::smem_offset(r, c);
    if (vec16) {
      const bool valid = gr < rows && gk < k;
      copy16(dst, valid ? src + gr * k + gk : src, valid);
    } else {
      copy16_bytes(dst, src + (gr < rows ? gr : 0) * k, gk, k, gr < rows);
    }
  }
}

// Stages K-tile kt of the block's A rows and B rows into pipeline stage `stage` (A tile first, then B tile).
template <class Cfg>
__device__ __forceinline__ void load_stage(const Params& p, int8_t* smem, int stage, int kt,
                                           const BlockThread<Cfg>& t) {
  int8_t* sa = smem + stage * Cfg::kStageBytes;
  const int64_t k0 = int64_t(kt) * kTileK;
  load_operand_tile<Cfg::kBM, Cfg::kThreads>(sa, p.a, p.m, t.m0, p.k, k0, p.vec16, t.tid);
  load_operand_tile<Cfg::kBN, Cfg::kThreads>(sa + Cfg::kBM * kTileK, p.b, p.n, t.n0, p.k, k0, p.vec16, t.tid);
}

// acc += the staged A tile x B tile of one stage (kTileK bytes of K: two k32 steps), on this warp's tile.
template <class Cfg>
__device__ __forceinline__ void mma_stage(const int8_t* stage, const BlockThread<Cfg>& t, Fragments<Cfg, int>& acc) {
  constexpr int MI = Cfg::kMi;
  constexpr int NI = Cfg::kNi;
  const int8_t* sa = stage;
  const int8_t* sb = sa + Cfg::kBM * kTileK;
#pragma unroll
  for (int ks = 0; ks < kTileK / 32; ++ks) {
    uint32_t af[MI][4];
    uint32_t bf[NI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int row = t.warp_row() + mi * 16 + tile::ldsm_a_row(t.lane);
      ptx::ldmatrix_x4(af[mi], sa + tile::smem_offset(row, tile::ldsm_a_chunk(t.lane, ks)));
    }
#pragma unroll
    for (int nj = 0; nj < NI / 2; ++nj) {
      const int row = t.warp_col() + nj * 16 + tile::ldsm_b_row(t.lane);
      uint32_t r[4];
      ptx::ldmatrix_x4(r, sb + tile::smem_offset(row, tile::ldsm_b_chunk(t.lane, ks)));
      bf[2 * nj][0] = r[0];
      bf[2 * nj][1] = r[1];
      bf[2 * nj + 1][0] = r[2];
      bf[2 * nj + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) mma_s8_16832(acc[mi][ni], af[mi], bf[ni]);
  }
}

// Calls f(mi, ni, e, r, c) for every accumulator element (mi, ni, e) of the warp tile that lies inside C, at row r
// and column c.
template <class Cfg, typename F>
__device__ __forceinline__ void for_each_output(const Params& p, const BlockThread<Cfg>& t, F&& f) {
#pragma unroll
  for (int mi = 0; mi < Cfg::kMi; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::kNi; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t r = t.row(mi, e);
        const int64_t c = t.col(ni, e);
        if (r < p.m && c < p.n) f(mi, ni, e, r, c);
      }
}

// Writes the warp tile's raw int32 accumulators (int8_matmul).
template <class Cfg>
__device__ __forceinline__ void store_tile_int32(const Params& p, const BlockThread<Cfg>& t,
                                                 const Fragments<Cfg, int>& acc) {
  for_each_output(p, t, [&](int mi, int ni, int e, int64_t r, int64_t c) { store_int32(p, r, c, acc[mi][ni][e]); });
}

// Where this warp's columns start in the block's list, given each warp's count (the same in all its lanes), and the
// block's total; warp_counts is shared scratch of kWarps ints. Every thread of the block must call it (a barrier).
template <class Cfg>
__device__ __forceinline__ int warp_offset(const BlockThread<Cfg>& t, int warp_count, int* warp_counts, int& total) {
  if (t.lane == 0) warp_counts[t.warp] = warp_count;
  __syncthreads();
  int offset = 0;
  total = 0;
  for (int w = 0; w < Cfg::kWarps; ++w) {
    const int cnt = warp_counts[w];
    offset += w < t.warp ? cnt : 0;
    total += cnt;
  }
  return offset;
}

// The outlier columns among [kb, kb + kThreads) of the mask, compacted into col_list in ascending order (so the fp32
// sum order is fixed): a ballot per warp, the warps' counts through shared memory. Returns how many there are.
// Every thread of the block must call it.
template <class Cfg>
__device__ __forceinline__ int compact_outlier_columns(const Params& p, int64_t kb, const BlockThread<Cfg>& t,
                                                       int* col_list, int* warp_counts) {
  const int64_t kc = kb + t.tid;
  const bool flag = kc < p.k && p.mask[kc];
  const unsigned ballot = ptx::ballot(flag);
  int total = 0;
  const int offset = warp_offset(t, __popc(ballot), warp_counts, total);
  if (flag) col_list[offset + __popc(ballot & ((1u << t.lane) - 1u))] = static_cast<int>(kc);
  __syncthreads();
  return total;
}

// The same for the window [kb, kb + 16 * kThreads) when the mask is 16-byte aligned (vec16): one 16-byte load per
// thread, its outlier columns as a bit mask, each lane's offset in the warp from five ballots of the bits of its
// count (0..16). 16 times fewer windows, each ending in the same two barriers, than one column per thread.
template <class Cfg>
__device__ __forceinline__ int compact_outlier_columns16(const Params& p, int64_t kb, const BlockThread<Cfg>& t,
                                                         int* col_list, int* warp_counts) {
  const int64_t kc = kb + int64_t(t.tid) * 16;
  unsigned bits = 0u;
  if (kc < p.k) bits = outlier_bits16(ptx::load_cached16(reinterpret_cast<const int8_t*>(p.mask) + kc));
  const int count = __popc(bits);
  const unsigned lanes_below = (1u << t.lane) - 1u;
  int before = 0;
  int warp_total = 0;
#pragma unroll
  for (int b = 0; b < 5; ++b) {
    const unsigned ballot = ptx::ballot(((count >> b) & 1) != 0);
    before += __popc(ballot & lanes_below) << b;
    warp_total += __popc(ballot) << b;
  }
  int total = 0;
  int pos = warp_offset(t, warp_total, warp_counts, total) + before;
  for (; bits != 0u; bits &= bits - 1u) col_list[pos++] = static_cast<int>(kc) + __ffs(static_cast<int>(bits)) - 1;
  __syncthreads();
  return total;
}

// Stages outlier columns cols[0 .. jn) for the block: xs[r][j] = x[m0 + r, cols[j]] and ws[r][j] = the dequantized
// weight B[n0 + r, cols[j]] * col_scale[n0 + r]; zero for j >= jn and past the last row of A or B.
template <class Cfg>
__device__ __forceinline__ void stage_outlier_columns(const Params& p, const BlockThread<Cfg>& t, const int* cols,
                                                      int jn, float* xs, float* ws) {
  for (int i = t.tid; i < Cfg::kBM * kOutlierChunk; i += Cfg::kThreads) {
    const int r = i / kOutlierChunk;
    const int j = i % kOutlierChunk;
    float v = 0.0f;
    if (j < jn && t.m0 + r < p.m) v = outlier_activation(p, t.m0 + r, cols[j]);
    xs[r * kOutlierStride + j] = v;
  }
  for (int i = t.tid; i < Cfg::kBN * kOutlierChunk; i += Cfg::kThreads) {
    const int r = i / kOutlierChunk;
    const int j = i % kOutlierChunk;
    float v = 0.0f;
    if (j < jn && t.n0 + r < p.n) v = dequantized_weight(p.b[(t.n0 + r) * p.k + cols[j]], p.col_scale[t.n0 + r]);
    ws[r * kOutlierStride + j] = v;
  }
}

// o += the product of the staged columns (xs . ws^T) at this thread's accumulator positions, in column order.
template <class Cfg>
__device__ __forceinline__ void accumulate_outlier_columns(const BlockThread<Cfg>& t, const float* xs, const float* ws,
                                                           Fragments<Cfg, float>& o) {
  constexpr int MI = Cfg::kMi;
  constexpr int NI = Cfg::kNi;
#pragma unroll 1
  for (int j = 0; j < kOutlierChunk; ++j) {
    float xv[MI][2];
    float wv[NI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        xv[mi][h] = xs[(t.warp_row() + mi * 16 + tile::acc_row(t.lane, 2 * h)) * kOutlierStride + j];
      }
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wv[ni][h] = ws[(t.warp_col() + ni * 8 + tile::acc_col(t.lane, h)) * kOutlierStride + j];
      }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mi][ni][e] = fmaf(xv[mi][e >> 1], wv[ni][e & 1], o[mi][ni][e]);
  }
}

#if HF_INT8_SM >= 800
// 16-bit bits of an int8 weight code as fp16 or bf16 (exact: |code| <= 128 has at most 8 significant bits).
__device__ __forceinline__ uint16_t code_as_16bit(int code, bool bf16) {
  const float v = static_cast<float>(code);
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
}

// Tensor-core staging of outlier columns cols[0 .. jn) (fp16/bf16 activations): xs[r][j] holds x[m0 + r, cols[j]] as
// its own 16 bits and ws[r][j] the weight code B[n0 + r, cols[j]] in the same format (not yet scaled); zero for
// j >= jn and past the last row of A or B. Rows are kOutlierRowHalves apart.
template <class Cfg>
__device__ __forceinline__ void stage_outlier_halves(const Params& p, const BlockThread<Cfg>& t, const int* cols,
                                                     int jn, bool bf16, uint16_t* xs, uint16_t* ws) {
  const auto* x = static_cast<const uint16_t*>(p.x);
  for (int i = t.tid; i < Cfg::kBM * kOutlierChunk; i += Cfg::kThreads) {
    const int r = i / kOutlierChunk;
    const int j = i % kOutlierChunk;
    const int64_t row = t.m0 + r;
    xs[r * kOutlierRowHalves + j] = row < p.m && j < jn ? x[row * p.k + cols[j]] : uint16_t(0);
  }
  for (int i = t.tid; i < Cfg::kBN * kOutlierChunk; i += Cfg::kThreads) {
    const int r = i / kOutlierChunk;
    const int j = i % kOutlierChunk;
    const int64_t row = t.n0 + r;
    ws[r * kOutlierRowHalves + j] = row < p.n && j < jn ? code_as_16bit(p.b[row * p.k + cols[j]], bf16) : uint16_t(0);
  }
}

// Elements 2 * pair and 2 * pair + 1 of a staged row as one mma operand register (lower column in the low half).
__device__ __forceinline__ uint32_t staged_pair(const uint16_t* row, int pair) {
  return uint32_t(row[2 * pair]) | (uint32_t(row[2 * pair + 1]) << 16);
}

// o += xs . ws^T over the kOutlierChunk staged columns, one mma.m16n8k16 (fp32 accumulation) per fragment pair. The
// fragments are read straight from the padded staging rows (layout in ptx::mma_m16n8k16_f32); o's elements sit where
// the int32 accumulators do (tile::acc_row / acc_col: the same C layout as mma.m16n8k32).
template <class Cfg>
__device__ __forceinline__ void mma_outlier_columns(const BlockThread<Cfg>& t, const uint16_t* xs, const uint16_t* ws,
                                                    bool bf16, Fragments<Cfg, float>& o) {
  constexpr int MI = Cfg::kMi;
  constexpr int NI = Cfg::kNi;
  const int group = t.lane >> 2;
  const int pair = t.lane & 3;
  uint32_t af[MI][4];
  uint32_t bf[NI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    const uint16_t* row = xs + (t.warp_row() + mi * 16 + group) * kOutlierRowHalves;
    af[mi][0] = staged_pair(row, pair);
    af[mi][1] = staged_pair(row + 8 * kOutlierRowHalves, pair);
    af[mi][2] = staged_pair(row, pair + 4);
    af[mi][3] = staged_pair(row + 8 * kOutlierRowHalves, pair + 4);
  }
#pragma unroll
  for (int ni = 0; ni < NI; ++ni) {
    const uint16_t* row = ws + (t.warp_col() + ni * 8 + group) * kOutlierRowHalves;
    bf[ni][0] = staged_pair(row, pair);
    bf[ni][1] = staged_pair(row, pair + 4);
  }
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      ptx::mma_m16n8k16_f32(o[mi][ni], af[mi], bf[ni], bf16);
    }
}
#endif

// What outlier_product left in o.
enum class OutlierSum {
  kNone,      // no column is an outlier (o is zero and is not added, as in the reference)
  kScaled,    // sum over the outlier columns c of x[i, c] * (B[j, c] * col_scale[j])
  kUnscaled,  // sum of x[i, c] * B[j, c]: the epilogue multiplies it by col_scale[j]
};

// The product of the outlier columns for the block's tile. The mask is compacted 16 * kThreads columns at a time
// (kThreads when it is not 16-byte aligned) and the columns staged kOutlierChunk at a time in shared memory (which
// the drained pipeline no longer needs); a window's last few columns are carried over to the next, so every round
// but the last stages a full chunk (at a few percent of outlier columns a window holds only a handful):
//  * fp16/bf16 activations on sm_80+: on tensor cores, x and the weight codes as 16-bit floats (both exact), fp32
//    accumulation, the weight scale applied once in the epilogue (OutlierSum::kUnscaled);
//  * fp32 activations, or sm_75: fp32 FMAs of x and the dequantized weights (OutlierSum::kScaled).
template <class Cfg>
__device__ __forceinline__ OutlierSum outlier_product(const Params& p, int8_t* smem, const BlockThread<Cfg>& t,
                                                      Fragments<Cfg, float>& o) {
  int* col_list = reinterpret_cast<int*>(smem);
  int* warp_counts = col_list + Cfg::kColListInts;
  float* xs = reinterpret_cast<float*>(warp_counts + 32);
  float* ws = xs + Cfg::kBM * kOutlierStride;
#if HF_INT8_SM >= 800
  const bool tensor_cores = p.x_dtype != DType::kFloat32;
  const bool bf16 = p.x_dtype == DType::kBFloat16;
  uint16_t* xh = reinterpret_cast<uint16_t*>(xs);
  uint16_t* wh = xh + Cfg::kBM * kOutlierRowHalves;
#else
  constexpr bool tensor_cores = false;
#endif
  bool any_outlier = false;
  int pending = 0;  // columns listed but not yet staged, at the front of col_list (fewer than kOutlierChunk)
  const int window = p.vec16 ? Cfg::kMaskWindow16 : Cfg::kThreads;
  for (int64_t kb = 0; kb < p.k; kb += window) {
    const int found = p.vec16 ? compact_outlier_columns16(p, kb, t, col_list + pending, warp_counts)
                              : compact_outlier_columns(p, kb, t, col_list + pending, warp_counts);
    any_outlier = any_outlier || found > 0;
    pending += found;
    const bool last_window = kb + window >= p.k;
    int j0 = 0;
    while (pending - j0 >= kOutlierChunk || (last_window && j0 < pending)) {
      const int jn = pending - j0 < kOutlierChunk ? pending - j0 : kOutlierChunk;
      if (tensor_cores) {
#if HF_INT8_SM >= 800
        stage_outlier_halves(p, t, col_list + j0, jn, bf16, xh, wh);
        __syncthreads();
        mma_outlier_columns(t, xh, wh, bf16, o);
#endif
      } else {
        stage_outlier_columns(p, t, col_list + j0, jn, xs, ws);
        __syncthreads();
        accumulate_outlier_columns(t, xs, ws, o);
      }
      __syncthreads();
      j0 += jn;
    }
    if (j0 > 0 && j0 < pending) {  // carry the unstaged tail (< kOutlierChunk columns) to the front of the list
      const int left = pending - j0;
      const int col = t.tid < left ? col_list[j0 + t.tid] : 0;
      __syncthreads();
      if (t.tid < left) col_list[t.tid] = col;
      __syncthreads();
    }
    pending -= j0;
  }
  if (!any_outlier) return OutlierSum::kNone;
  return tensor_cores ? OutlierSum::kUnscaled : OutlierSum::kScaled;
}

// Finishes the warp tile: dequantize, add the outlier product and the bias, one rounding to the output dtype.
template <class Cfg>
__device__ __forceinline__ void store_tile(const Params& p, const BlockThread<Cfg>& t, const Fragments<Cfg, int>& acc,
                                           const Fragments<Cfg, float>& o, OutlierSum outliers) {
  constexpr int MI = Cfg::kMi;
  constexpr int NI = Cfg::kNi;
  float rs[MI][2];
  float cs[NI][2];
  float bias[NI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = t.row(mi, 2 * h);
      rs[mi][h] = r < p.m ? p.row_scale[r] : 0.0f;
    }
#pragma unroll
  for (int ni = 0; ni < NI; ++ni)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = t.col(ni, h);
      cs[ni][h] = c < p.n ? p.col_scale[c] : 0.0f;
      bias[ni][h] = c < p.n ? bias_at(p, c) : 0.0f;
    }
  const bool any_outlier = outliers != OutlierSum::kNone;
  const bool unscaled = outliers == OutlierSum::kUnscaled;
  for_each_output(p, t, [&](int mi, int ni, int e, int64_t r, int64_t c) {
    const float outlier = unscaled ? __fmul_rn(o[mi][ni][e], cs[ni][e & 1]) : o[mi][ni][e];
    store_dequantized(p, r, c, acc[mi][ni][e], rs[mi][e >> 1], cs[ni][e & 1], any_outlier, outlier, bias[ni][e & 1]);
  });
}

// Block tile BM x BN of C: a kStages-deep pipeline of K-tiles (load_stage) feeding the warps' MMAs (mma_stage), then
// the epilogue in registers, with the outlier product staged through the freed shared memory.
// Split-K: adds the block's partial int32 sums into the workspace and counts the block in at its tile. Returns true
// in the block that arrives last, whose acc then holds the full sums (integer addition: the same result whatever the
// order of arrival), false in the others, which are done. With a fused outlier product (fused_o) each split also
// stores its fp32 partial, the last block adds them in split order (the same sum on every run), and `saw` tells
// whether any split met an outlier column (counted in the upper half of the tile's counter). The pattern of
// threadFenceReduction: each thread's writes are fenced before the block's arrival is counted, and the last block
// reads the sums from L2 after its own fence.
template <class Cfg>
__device__ __forceinline__ bool gather_split_sums(const Params& p, const BlockThread<Cfg>& t, Fragments<Cfg, int>& acc,
                                                  Fragments<Cfg, float>& o, bool fused_o, bool& saw, int* arrivals) {
  constexpr unsigned kSawOutlier = 1u << 16;
  const int64_t mn = p.m * p.n;
  for_each_output(p, t, [&](int mi, int ni, int e, int64_t r, int64_t c) {
    ptx::red_add(p.split_sums + r * p.n + c, acc[mi][ni][e]);
    if (fused_o) p.split_outliers[blockIdx.z * mn + r * p.n + c] = o[mi][ni][e];
  });
  ptx::fence_device();
  __syncthreads();  // every thread's writes are fenced before the arrival below
  if (t.tid == 0) {
    const unsigned tile = blockIdx.y * gridDim.x + blockIdx.x;
    const unsigned mine = 1u + (saw ? kSawOutlier : 0u);
    *arrivals = static_cast<int>(ptx::atomic_add(p.split_counters + tile, mine) + mine);
  }
  __syncthreads();
  const auto arrived = static_cast<unsigned>(*arrivals);
  if ((arrived & (kSawOutlier - 1u)) != gridDim.z) return false;
  ptx::fence_device();
  saw = arrived >= kSawOutlier;
  for_each_output(p, t, [&](int mi, int ni, int e, int64_t r, int64_t c) {
    acc[mi][ni][e] = ptx::load_l2(p.split_sums + r * p.n + c);
    if (fused_o) {
      float sum = ptx::load_l2(p.split_outliers + r * p.n + c);
      for (unsigned z = 1; z < gridDim.z; ++z)
        sum = __fadd_rn(sum, ptx::load_l2(p.split_outliers + z * mn + r * p.n + c));
      o[mi][ni][e] = sum;
    }
  });
  return true;
}

#if HF_INT8_SM >= 800
// Shared staging of the fused outlier product: 16-bit activations [kBM rows] then weight codes [kBN rows], rows
// kOutlierRowHalves apart (a separate allocation: the pipeline's stages are in use while it fills).
template <class Cfg>
__device__ __forceinline__ uint16_t* fused_outlier_staging() {
  __shared__ __align__(16) uint16_t staging[(Cfg::kBM + Cfg::kBN) * kOutlierRowHalves];
  return staging;
}

// Outlier columns of K-tile [k0, k0 + kTileK) as a bit mask (bit c: column k0 + c), the same in every thread.
__device__ __forceinline__ uint64_t tile_outlier_bits(const Params& p, int64_t k0) {
  uint64_t bits = 0;
  if (p.vec16) {
#pragma unroll
    for (int q = 0; q < kTileK / 16; ++q) {
      const int64_t kc = k0 + 16 * q;
      if (kc < p.k)
        bits |= uint64_t(outlier_bits16(ptx::load_cached16(reinterpret_cast<const int8_t*>(p.mask) + kc))) << (16 * q);
    }
  } else {
    for (int c = 0; c < kTileK && k0 + c < p.k; ++c) bits |= uint64_t(p.mask[k0 + c] ? 1 : 0) << c;
  }
  return bits;
}

// The fused outlier product's state in each thread (uniform across the block).
struct FusedOutliers {
  bool on = false;  // fp16/bf16 activations with an outlier mask, on the 64x64 tiles
  bool bf16 = false;
  bool saw = false;  // some column of this block's K range is an outlier
  int pending = 0;   // columns staged, not yet multiplied (< kOutlierChunk)
};

// o += the staged columns (zero past `pending`), then the staging is free again.
template <class Cfg>
__device__ __forceinline__ void flush_fused_outliers(const BlockThread<Cfg>& t, FusedOutliers& f,
                                                     Fragments<Cfg, float>& o) {
  uint16_t* xs = fused_outlier_staging<Cfg>();
  uint16_t* ws = xs + Cfg::kBM * kOutlierRowHalves;
  if (f.pending < kOutlierChunk) {  // the last, partial chunk: clear this thread's row past the staged columns
    uint16_t* row = t.tid < Cfg::kBN              ? ws + t.tid * kOutlierRowHalves
                    : t.tid < Cfg::kBN + Cfg::kBM ? xs + (t.tid - Cfg::kBN) * kOutlierRowHalves
                                                  : nullptr;
    if (row != nullptr)
      for (int j = f.pending; j < kOutlierChunk; ++j) row[j] = 0;
  }
  __syncthreads();  // the chunk is staged
  mma_outlier_columns(t, xs, ws, f.bf16, o);
  __syncthreads();  // everyone has read it before the next column is staged
  f.pending = 0;
}

// Stages the outlier columns of the K-tile just multiplied (its B tile `sb` still in shared memory: the barrier at the
// top of the next iteration guards its refill): thread r < kBN copies weight row r's code, thread kBN + r fetches
// activation row r; every kOutlierChunk columns the chunk goes through the tensor cores.
template <class Cfg>
__device__ __forceinline__ void fuse_tile_outliers(const Params& p, const BlockThread<Cfg>& t, const int8_t* sb,
                                                   int kt, FusedOutliers& f, Fragments<Cfg, float>& o) {
  const int64_t k0 = int64_t(kt) * kTileK;
  uint64_t bits = tile_outlier_bits(p, k0);
  if (bits == 0) return;
  f.saw = true;
  uint16_t* xs = fused_outlier_staging<Cfg>();
  uint16_t* ws = xs + Cfg::kBM * kOutlierRowHalves;
  const auto* x = static_cast<const uint16_t*>(p.x);
  for (; bits != 0; bits &= bits - 1) {
    const int c = __ffsll(static_cast<long long>(bits)) - 1;
    if (t.tid < Cfg::kBN) {
      const int8_t code = sb[tile::smem_offset(t.tid, c / tile::kChunkBytes) + c % tile::kChunkBytes];
      ws[t.tid * kOutlierRowHalves + f.pending] = code_as_16bit(code, f.bf16);
    } else if (t.tid < Cfg::kBN + Cfg::kBM) {
      const int r = t.tid - Cfg::kBN;
      const int64_t row = t.m0 + r;
      xs[r * kOutlierRowHalves + f.pending] = row < p.m ? x[row * p.k + k0 + c] : uint16_t(0);
    }
    if (++f.pending == kOutlierChunk) flush_fused_outliers(t, f, o);
  }
}
#endif

// Block tile BM x BN of C (K-tiles [blockIdx.z * ktiles_per_split, +ktiles_per_split) of it under split-K): a
// kStages-deep pipeline of K-tiles (load_stage) feeding the warps' MMAs (mma_stage), then the epilogue in registers,
// with the outlier product staged through the freed shared memory (under split-K, by the last block of the tile).
template <int BM, int BN, int WM, int WN>
__global__ void __launch_bounds__(TileConfig<BM, BN, WM, WN>::kThreads, 1) hf_int8_gemm_imma_kernel(const Params p) {
  using Cfg = TileConfig<BM, BN, WM, WN>;
  __shared__ __align__(128) int8_t smem[Cfg::kSmemBytes];
  const BlockThread<Cfg> t = BlockThread<Cfg>::here();
  const int ktiles_total = static_cast<int>(ceil_div(p.k, kTileK));
  const int kt0 = static_cast<int>(blockIdx.z) * p.ktiles_per_split;
  const int ktiles = ktiles_total - kt0 < p.ktiles_per_split ? ktiles_total - kt0 : p.ktiles_per_split;

  Fragments<Cfg, int> acc;
  fill<Cfg>(acc, 0);
  Fragments<Cfg, float> o;
  fill<Cfg>(o, 0.0f);
#if HF_INT8_SM >= 800
  FusedOutliers fused;
  fused.on = Cfg::kFuseOutliers && p.mask != nullptr && p.out_dtype != DType::kInt32 && p.x_dtype != DType::kFloat32;
  fused.bf16 = p.x_dtype == DType::kBFloat16;
#endif
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(p, smem, s, kt0 + s, t);
    ptx::cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt visible to all; everyone is done with the stage refilled below
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(p, smem, next % kStages, kt0 + next, t);
    ptx::cp_async_commit();
    int8_t* stage = smem + (kt % kStages) * Cfg::kStageBytes;
    mma_stage(stage, t, acc);
#if HF_INT8_SM >= 800
    if constexpr (Cfg::kFuseOutliers) {
      if (fused.on) fuse_tile_outliers(p, t, stage + Cfg::kBM * kTileK, kt0 + kt, fused, o);
    }
#endif
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // shared memory is reused by the outlier staging below
#if HF_INT8_SM >= 800
  if constexpr (Cfg::kFuseOutliers) {
    if (fused.on && fused.pending > 0) flush_fused_outliers(t, fused, o);
  }
  const bool fused_on = fused.on;
  bool saw = fused.saw;
#else
  const bool fused_on = false;
  bool saw = false;
#endif
  if (gridDim.z > 1 &&
      !gather_split_sums(p, t, acc, o, fused_on, saw, reinterpret_cast<int*>(smem + Cfg::kLastBlockFlag)))
    return;

  if (p.out_dtype == DType::kInt32) {
    store_tile_int32(p, t, acc);
    return;
  }
  OutlierSum outliers = OutlierSum::kNone;
  if (fused_on) {
    outliers = saw ? OutlierSum::kUnscaled : OutlierSum::kNone;
  } else if (p.mask != nullptr) {
    outliers = outlier_product(p, smem, t, o);
  }
  store_tile(p, t, acc, o, outliers);
}

// ------------------------------------------------------------------------------------------------------------
// Decode GEMV (m <= kDecodeMaxM)
// ------------------------------------------------------------------------------------------------------------
constexpr int kGemvWarps = 8;
constexpr int kGemvUnroll = 4;  // 16-byte weight loads in flight per lane
constexpr int kGemvMaxM = static_cast<int>(kDecodeMaxM);

// o[i] += x[i, col] * w for the m activation rows, w the dequantized weight of outlier column col (fp32 FMA).
__device__ __forceinline__ void add_outlier_column(const Params& p, int m, int64_t col, float w,
                                                   float (&o)[kGemvMaxM]) {
#pragma unroll
  for (int i = 0; i < kGemvMaxM; ++i)
    if (i < m) o[i] = fmaf(outlier_activation(p, i, col), w, o[i]);
}

__global__ void __launch_bounds__(32 * kGemvWarps, 2) hf_int8_gemv_dp4a_kernel(const Params p) {
  constexpr int MAXM = kGemvMaxM;
  __shared__ int part_acc[kGemvWarps][MAXM];
  __shared__ float part_out[kGemvWarps][MAXM];
  __shared__ int part_saw[kGemvWarps];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int ksplit = p.ksplit;
  const int rows_per_block = kGemvWarps / ksplit;
  const int64_t n = int64_t(blockIdx.x) * rows_per_block + warp / ksplit;
  const int part = warp % ksplit;
  const int M = static_cast<int>(p.m);
  const int64_t K = p.k;
  const bool row_ok = n < p.n;
  const bool with_outliers = p.mask != nullptr && p.out_dtype != DType::kInt32;

  int acc[MAXM];
  float o[MAXM];
  bool saw_outlier = false;  // some column of this row's K range is an outlier
#pragma unroll
  for (int i = 0; i < MAXM; ++i) {
    acc[i] = 0;
    o[i] = 0.0f;
  }

  if (row_ok) {
    const int8_t* wrow = p.b + n * K;
    const float cs = p.out_dtype != DType::kInt32 ? p.col_scale[n] : 0.0f;
    if (p.vec16) {
      const int64_t step = int64_t(32) * 16 * ksplit;
      for (int64_t kb = (int64_t(part) * 32 + lane) * 16; kb < K; kb += step * kGemvUnroll) {
        uint4 wv[kGemvUnroll];
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
          const int64_t kk = kb + u * step;
          wv[u] = kk < K ? ptx::load_stream16(wrow + kk) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
          const int64_t kk = kb + u * step;
          if (kk < K) {
#pragma unroll
            for (int i = 0; i < MAXM; ++i)
              if (i < M) acc[i] = dp4a_16(ptx::load_cached16(p.a + i * K + kk), wv[u], acc[i]);
            if (with_outliers) {
              const uint4 mv = ptx::load_cached16(reinterpret_cast<const int8_t*>(p.mask) + kk);
              if ((mv.x | mv.y | mv.z | mv.w) != 0u) {
                saw_outlier = true;
                // Only the outlier columns of the 16, in ascending order (the fp32 sum order is fixed); the weight
                // codes come from the registers already loaded.
                for (unsigned bits = outlier_bits16(mv); bits != 0u; bits &= bits - 1u) {
                  const int b = __ffs(static_cast<int>(bits)) - 1;
                  add_outlier_column(p, M, kk + b, dequantized_weight(code_at16(wv[u], b), cs), o);
                }
              }
            }
          }
        }
      }
    } else {
      for (int64_t kk = int64_t(part) * 32 + lane; kk < K; kk += int64_t(32) * ksplit) {
        const int w = wrow[kk];
#pragma unroll
        for (int i = 0; i < MAXM; ++i)
          if (i < M) acc[i] += static_cast<int>(p.a[i * K + kk]) * w;
        if (with_outliers && p.mask[kk]) {
          saw_outlier = true;
          add_outlier_column(p, M, kk, dequantized_weight(w, cs), o);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < MAXM; ++i) {
    acc[i] = warp_sum(acc[i]);
    if (with_outliers) o[i] = warp_sum(o[i]);
  }
  saw_outlier = ptx::any(saw_outlier);
  if (ksplit > 1) {
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < MAXM; ++i) {
        part_acc[warp][i] = acc[i];
        part_out[warp][i] = o[i];
      }
      part_saw[warp] = saw_outlier ? 1 : 0;
    }
    __syncthreads();
    if (part != 0) return;
    // Parts are added in ascending order: the same sum on every run.
    for (int s = 1; s < ksplit; ++s) {
#pragma unroll
      for (int i = 0; i < MAXM; ++i) {
        acc[i] += part_acc[warp + s][i];
        o[i] = __fadd_rn(o[i], part_out[warp + s][i]);
      }
      saw_outlier = saw_outlier || part_saw[warp + s] != 0;
    }
  }
  if (!row_ok) return;

  // Lane i writes output row i (acc and o are identical in every lane after the butterfly reductions). The
  // outlier product is added only when some column is an outlier, as in the reference.
  const bool any_outlier = with_outliers && saw_outlier;
#pragma unroll
  for (int i = 0; i < MAXM; ++i) {
    if (i < M && lane == i) {
      if (p.out_dtype == DType::kInt32) {
        store_int32(p, i, n, acc[i]);
      } else {
        store_dequantized(p, i, n, acc[i], p.row_scale[i], p.col_scale[n], any_outlier, o[i], bias_at(p, n));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------------
// Split-K plan of the tensor-core GEMM: how many blocks share each tile of C, and how many K-tiles each takes.
struct SplitPlan {
  int64_t tiles_n = 0, tiles_m = 0;
  int splits = 1;
  int ktiles_per_split = 0;
  size_t workspace_bytes = 0;   // see split_workspace_layout (0 when splits == 1)
  bool fused_outliers = false;  // each split stores its fp32 outlier product (64x64 tiles, fp16/bf16 activations)
};

// Blocks of each tile size one multiprocessor is meant to hold at once (registers and shared memory allow this
// many; the 128x128 kernel is launch-bounded to one).
constexpr int kBlocksPerSm64 = 2;
constexpr int kBlocksPerSm128 = 1;
// Split-K bounds: each split streams at least kMinSplitKTiles K-tiles (256 bytes of K), at most kMaxSplits splits.
constexpr int kMinSplitKTiles = 4;
constexpr int kMaxSplits = 16;

// When a GEMM has fewer tiles than the device holds blocks (decode at 9-64 tokens, narrow layers, short prefills),
// most multiprocessors would idle and the weight stream would run at a fraction of the DRAM bandwidth; K is then
// split so the grid fills about one wave, each split at least kMinSplitKTiles long.
SplitPlan plan_splits(int64_t m, int64_t n, int64_t k, int sm_count, bool fp16_outliers) {
  const bool small_tiles = m <= kSmallTileMaxM;
  const int64_t bm = small_tiles ? 64 : 128, bn = bm;
  SplitPlan plan;
  plan.tiles_n = ceil_div(n, bn);
  plan.tiles_m = ceil_div(m, bm);
  const int64_t ktiles = ceil_div(k, kTileK);
  plan.ktiles_per_split = static_cast<int>(ktiles > 0 ? ktiles : 1);
  const int64_t tiles = plan.tiles_n * plan.tiles_m;
  const int64_t slots = int64_t(sm_count) * (small_tiles ? kBlocksPerSm64 : kBlocksPerSm128);
  int64_t splits = tiles > 0 ? slots / tiles : 1;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  const int64_t by_k = ktiles / kMinSplitKTiles;
  splits = splits < by_k ? splits : by_k;
  if (splits <= 1) return plan;
  plan.ktiles_per_split = static_cast<int>(ceil_div(ktiles, splits));
  plan.splits = static_cast<int>(ceil_div(ktiles, plan.ktiles_per_split));  // no empty split
  if (plan.splits <= 1) {
    plan.splits = 1;
    plan.ktiles_per_split = static_cast<int>(ktiles);
    return plan;
  }
  // Workspace: int32 sums [m, n], one arrival counter per tile, then (fused outlier product) fp32 [splits, m, n].
  plan.fused_outliers = small_tiles && fp16_outliers;
  plan.workspace_bytes = size_t(m * n) * sizeof(int32_t) + size_t(tiles) * sizeof(unsigned);
  if (plan.fused_outliers) plan.workspace_bytes += size_t(plan.splits) * size_t(m * n) * sizeof(float);
  return plan;
}

template <int BM, int BN, int WM, int WN>
void launch_imma(const Params& p, const SplitPlan& plan, cudaStream_t stream) {
  using Cfg = TileConfig<BM, BN, WM, WN>;
  const dim3 grid(static_cast<unsigned>(plan.tiles_n), static_cast<unsigned>(plan.tiles_m),
                  static_cast<unsigned>(plan.splits));
  launch_kernel(hf_int8_gemm_imma_kernel<BM, BN, WM, WN>, grid, dim3(Cfg::kThreads), stream, p);
}

int choose_ksplit(int64_t n, int64_t k, int sm_count) {
  // Aim for ~48 warps of weight streaming per SM; never split below 512 bytes of K per warp.
  const int64_t target_warps = int64_t(sm_count) * 48;
  int s = 1;
  while (s < kGemvWarps && n * s < target_warps && k >= int64_t(512) * (s * 2)) s *= 2;
  return s;
}

// An int8_linear GEMM whose outlier product can use 16-bit tensor cores (the kernel decides per architecture).
bool fp16_outliers(const GemmArgs& args) {
  return args.outlier_mask != nullptr && args.out_dtype != DType::kInt32 && args.x_dtype != DType::kFloat32;
}

}  // namespace

size_t int8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int sm_count, bool fp16_outliers) {
  if (m <= kDecodeMaxM || m == 0 || n == 0) return 0;
  return plan_splits(m, n, k, sm_count, fp16_outliers).workspace_bytes;
}

int int8_gemm_splits(int64_t m, int64_t n, int64_t k, int sm_count) {
  if (m <= kDecodeMaxM || m == 0 || n == 0) return 1;
  return plan_splits(m, n, k, sm_count, false).splits;
}

const char* gemm_kernel_for(int64_t m) {
  if (m <= kDecodeMaxM) return "gemv_dp4a";
  if (m <= kSmallTileMaxM) return "imma_64x64";
  return "imma_128x128";
}

cudaError_t launch_int8_gemm(const GemmArgs& args, cudaStream_t stream) {
  if (args.m == 0 || args.n == 0) return cudaSuccess;
  Params p{};
  p.a = args.a;
  p.b = args.b;
  p.m = args.m;
  p.n = args.n;
  p.k = args.k;
  p.out = args.out;
  p.out_dtype = args.out_dtype;
  p.row_scale = args.row_scale;
  p.col_scale = args.col_scale;
  p.bias = args.bias;
  p.bias_dtype = args.bias_dtype;
  p.mask = args.outlier_mask;
  p.x = args.x;
  p.x_dtype = args.x_dtype;
  p.vec16 = args.k % 16 == 0 && aligned16(args.a) && aligned16(args.b) && aligned16(args.outlier_mask);
  p.ksplit = 1;
  if (args.m <= kDecodeMaxM) {
    p.ksplit = choose_ksplit(args.n, args.k, args.sm_count);
    const int rows_per_block = kGemvWarps / p.ksplit;
    const unsigned grid = static_cast<unsigned>(ceil_div(args.n, rows_per_block));
    launch_kernel(hf_int8_gemv_dp4a_kernel, dim3(grid), dim3(32 * kGemvWarps), stream, p);
    return cudaGetLastError();
  }
  const SplitPlan plan = plan_splits(args.m, args.n, args.k, args.sm_count, fp16_outliers(args));
  p.ktiles_per_split = plan.ktiles_per_split;
  if (plan.splits > 1) {
    if (args.workspace == nullptr || args.workspace_bytes < plan.workspace_bytes) return cudaErrorInvalidValue;
    p.split_sums = static_cast<int*>(args.workspace);
    p.split_counters = reinterpret_cast<unsigned*>(p.split_sums + args.m * args.n);
    const size_t zeroed = size_t(args.m * args.n) * sizeof(int32_t) + size_t(plan.tiles_n * plan.tiles_m) * 4;
    // Only the sums and the counters need zeros (the fp32 partials are written before they are read).
    const cudaError_t err = cudaMemsetAsync(args.workspace, 0, zeroed, stream);
    if (err != cudaSuccess) return err;
    if (plan.fused_outliers)
      p.split_outliers = reinterpret_cast<float*>(p.split_counters + plan.tiles_n * plan.tiles_m);
  }
  if (args.m <= kSmallTileMaxM) {
    launch_imma<64, 64, 32, 32>(p, plan, stream);
  } else {
    launch_imma<128, 128, 64, 32>(p, plan, stream);
  }
  return cudaGetLastError();
}

namespace {

// The GEMM an int8_linear call runs after quantizing x.
GemmArgs linear_gemm_args(const LinearArgs& args) {
  GemmArgs gemm;
  gemm.a = args.codes;
  gemm.b = args.weight;
  gemm.m = args.m;
  gemm.n = args.n;
  gemm.k = args.k;
  gemm.out = args.out;
  gemm.out_dtype = args.x_dtype;
  gemm.row_scale = args.row_scale;
  gemm.col_scale = args.weight_scale;
  gemm.bias = args.bias;
  gemm.bias_dtype = args.bias_dtype;
  // The same float32 comparison as the kernels' is_outlier (quant_math.h): a threshold that rounds to 0 has no
  // outlier path at all.
  if (args.threshold > 0.0f) {
    gemm.outlier_mask = args.mask;
    gemm.x = args.x;
    gemm.x_dtype = args.x_dtype;
  }
  gemm.sm_count = args.sm_count;
  gemm.workspace = args.workspace;
  gemm.workspace_bytes = args.workspace_bytes;
  return gemm;
}

}  // namespace

size_t int8_gemm_workspace_bytes_for(const GemmArgs& args) {
  return int8_gemm_workspace_bytes(args.m, args.n, args.k, args.sm_count, fp16_outliers(args));
}

size_t int8_linear_workspace_bytes(const LinearArgs& args) {
  return int8_gemm_workspace_bytes_for(linear_gemm_args(args));
}

cudaError_t launch_int8_linear(const LinearArgs& args, cudaStream_t stream) {
  if (args.m == 0 || args.n == 0) return cudaSuccess;
  cudaError_t err = launch_quantize_activation(args.x, args.x_dtype, args.m, args.k, args.threshold, args.codes,
                                               args.row_scale, args.mask, stream);
  if (err != cudaSuccess) return err;
  return launch_int8_gemm(linear_gemm_args(args), stream);
}

const char* compiled_arch_list() {
#if defined(__CUDA_ARCH_LIST__)
#define HF_INT8_STR2(...) #__VA_ARGS__
#define HF_INT8_STR(...) HF_INT8_STR2(__VA_ARGS__)
  return HF_INT8_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace cuda
}  // namespace hf_int8
