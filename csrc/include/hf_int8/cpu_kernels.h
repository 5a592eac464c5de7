// Internal interface between the files of the CPU extension (csrc/cpu/*.cpp). Not a public API.
//
// Layout of the work:
//   quantize.cpp     activation / weight quantization (scalar + AVX-512), ops quantize_weight, quantize_activation
//   gemm.cpp         GEMM driver (path choice, threading, packing workspaces), ops int8_matmul, int8_scaled_matmul
//   gemm_avx512.cpp  AVX-512 VNNI kernels: small-M streaming kernel and packed large-M microkernel
//   gemm_amx.cpp     AMX-INT8 large-M microkernel (used when the CPU and the OS allow it)
//   gemm_avx2.cpp    AVX2 kernels (exact s16 products), the fallback for CPUs without VNNI
//   linear.cpp       op int8_linear: fused quantization -> GEMM -> epilogue
//
// Every ISA-specific function carries its own target attribute; nothing is compiled with -march, so one build runs
// on any x86-64 and the ISA is picked at run time (cpu_features.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "hf_int8/cpu_features.h"
#include "hf_int8/quant_math.h"

#if defined(__x86_64__) || defined(_M_X64)
#define HF_INT8_X86 1
#define HF_INT8_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define HF_INT8_TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define HF_INT8_TARGET_AVX512_BF16 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx512vbmi")))
#define HF_INT8_TARGET_AVX512_VBMI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#define HF_INT8_TARGET_AMX \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))
#define HF_INT8_TARGET_AMX_BF16 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8,amx-bf16")))
#else
#define HF_INT8_X86 0
#endif

namespace hf_int8::cpu {

// ------------------------------------------------------------------------------------------------------------------
// Output of a GEMM: int32 accumulators, or the dequantized value in one of the float dtypes.
// ------------------------------------------------------------------------------------------------------------------
enum class OutKind : int { kInt32 = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

// What happens to the exact int32 accumulator acc(m, n) = sum_k a[m, k] * b[n, k] (the same float operations, in
// the same order, as hf_int8/ops/reference.py, so that without outlier columns the result is bit-identical):
//   value = float(acc) * (row_scale[m] * col_scale[n])          (dequantize, quant_math.h)
//   value = value + sum_j x_outlier[m, j] * w_outlier(n, j)     (outlier product, fp32; only when n_outliers > 0)
//   value = value + bias[n]                                     (fp32; only when bias != nullptr)
//   out[m, n] = cast<out dtype>(value)                          (round to nearest even, once)
// with w_outlier(n, j) = float(b[n, outlier_cols[j]]) * col_scale[n], the dequantized weight of outlier column j.
struct AmxOutliers;
struct PackedOutliers;
struct SmallOutliers;

enum class InKind : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Scratch for vector kernels that load whole 64-byte lines: `v` resized to n elements plus the slack to start them on
// a cache line, and a pointer to that start (a load that straddles two lines costs two; std::vector's storage is only
// 16-byte aligned).
template <typename T>
T* line_aligned(std::vector<T>& v, size_t n) {
  constexpr size_t kLine = 64;
  v.assign(n + kLine / sizeof(T), T{});
  const auto at = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<T*>((at + kLine - 1) & ~uintptr_t{kLine - 1});
}

// Columns to pick out of rows of K elements of lane_bytes bytes (pick_columns for bytes, gather_columns16 for 16-bit
// values), from a bitset over K (64 per word): for each group of 64 / lane_bytes columns with any bit set, a VPERMB /
// VPERMW index that moves its set columns, in order, to the front of the group's 64 bytes. Built once per call
// (make_column_picker), used on every row. VPCOMPRESSB does the same from the bits alone but took ~10 cycles per 64
// bytes on an AMD EPYC Zen 5 (4-6% of a 512-token Qwen2.5 down_proj with 70% outlier columns, perf), VPERMB ~1.
struct ColumnPicker {
  int64_t K = 0;               // columns of a row
  int64_t count = 0;           // columns picked
  int lanes = 64;              // columns per group: 64 / lane_bytes
  std::vector<int64_t> words;  // groups with any bit set, ascending
  std::vector<uint8_t> taken;  // how many bits each of them has
  std::vector<uint8_t> index;  // [words.size()][lanes]: lane i takes element index[i] of the group
};
ColumnPicker make_column_picker(const std::vector<uint64_t>& bits, int64_t K, int lane_bytes = 1);

struct Epilogue {
  OutKind kind = OutKind::kInt32;
  void* out = nullptr;  // [M, N] row-major with leading dimension ldo (elements)
  int64_t ldo = 0;
  const float* row_scale = nullptr;  // [M]
  const float* col_scale = nullptr;  // [N]
  const float* bias = nullptr;       // [N] or nullptr
  int64_t n_outliers = 0;
  const int64_t* outlier_cols = nullptr;  // [n_outliers], indices into K
  const float* x_outlier = nullptr;       // [M, n_outliers] row-major: the activations of the outlier columns
  // Instead of x_outlier: the activations themselves, [M, x_ld] of x_kind (int8_linear). gemm() gathers x_outlier
  // from them when its path needs it; the packed path on AVX512-BF16 reads bf16 ones directly.
  const void* x = nullptr;
  InKind x_kind = InKind::kF32;
  int64_t x_ld = 0;
  const float* w_outlier_t = nullptr;  // [n_outliers, N] precomputed w_outlier, or nullptr (gathered from b)
  // [M, outlier_product_ld] row-major: the whole outlier product x_outlier @ w_outlier^T, computed beforehand by
  // outlier_gemm.cpp when there are many outlier columns (gemm.cpp, kFusedOutliersMax). When set, the epilogue adds
  // it instead of summing over the outlier columns itself.
  const float* outlier_product = nullptr;
  int64_t outlier_product_ld = 0;
  // AMX path only: the outlier activations split into bf16 pieces (outlier_gemm.cpp), from which the AMX GEMM
  // computes each 32 x 32 block of the outlier product right before it finishes that block (no [M, N] buffer).
  const AmxOutliers* amx_outliers = nullptr;
  // Packed VNNI path on AVX512-BF16 only: the outlier activations as bf16 pieces (outlier_gemm.cpp), from which each
  // register tile of the packed GEMM computes its part of the outlier product right after its int8 sums.
  const PackedOutliers* packed_outliers = nullptr;
  // Small-M path on AVX512-BF16 only: the outlier activations as bf16 pieces (outlier_gemm.cpp), from which the
  // streaming kernel computes each tile's outlier product on the outlier codes it picks from the rows it just read.
  const SmallOutliers* small_outliers = nullptr;
  // Small-M path only (gemm.cpp, OutlierPieces): A holds piece_tokens token rows followed by two rows per token, hi
  // and lo, with x_outlier[i, c] = piece_unit[i] * (256 * hi[c] + lo[c]) exactly at the outlier columns and 0
  // elsewhere. The int8 GEMM then sums the outlier product exactly along with the rest; only the token rows are
  // finished.
  const float* piece_unit = nullptr;  // [piece_tokens]
  int64_t piece_tokens = 0;
};

// One GEMM problem: C = A @ B^T with A [M, K] int8 (row stride lda) and B [N, K] int8 (row stride ldb).
struct GemmProblem {
  int64_t M = 0, N = 0, K = 0;
  const int8_t* a = nullptr;
  int64_t lda = 0;
  const int8_t* b = nullptr;
  int64_t ldb = 0;
  // sum_k a[m, k] per row; used by the VNNI kernels, which multiply (b + 128) as u8 by a as s8 and subtract
  // kU8Shift * a_rowsum[m] (quant_math.h, unshift_u8_accumulator).
  const int32_t* a_rowsum = nullptr;
  // When set (packed VNNI path, Isa::kAvx512Bf16 and up): b's rows hold b_keep->K columns, of which the GEMM uses the
  // K that b_keep picks, in order; a holds just those. The packing picks them out of each b row (pick_columns) on the
  // way. gemm() sets it when many columns are outliers: they are zero in a, so a GEMM over the other columns gives
  // the same int32 sums with less work.
  const ColumnPicker* b_keep = nullptr;
  Epilogue ep;
};

// ------------------------------------------------------------------------------------------------------------------
// Scalar epilogue (shared by every path for the elements it finishes one at a time).
// ------------------------------------------------------------------------------------------------------------------
inline void store_value(const Epilogue& ep, int64_t m, int64_t n, float v) {
  switch (ep.kind) {
    case OutKind::kF32: static_cast<float*>(ep.out)[m * ep.ldo + n] = v; break;
    case OutKind::kBF16: static_cast<c10::BFloat16*>(ep.out)[m * ep.ldo + n] = c10::BFloat16(v); break;
    case OutKind::kF16: static_cast<c10::Half*>(ep.out)[m * ep.ldo + n] = c10::Half(v); break;
    case OutKind::kInt32: break;
  }
}

// Weight of outlier column j for output n, dequantized (fp32), read from the GEMM's B operand or the precomputed
// table.
inline float outlier_weight(const GemmProblem& p, int64_t n, int64_t j) {
  const Epilogue& ep = p.ep;
  if (ep.w_outlier_t != nullptr) return ep.w_outlier_t[j * p.N + n];
  return static_cast<float>(p.b[n * p.ldb + ep.outlier_cols[j]]) * ep.col_scale[n];
}

// Keeps the compiler from contracting `a * b + c` into one FMA across this point (GCC contracts by default in C++,
// also through the vector intrinsics): the reference rounds the product before adding, and so must we.
inline float rounded(float v) {
#if HF_INT8_X86
  asm("" : "+x"(v));
#endif
  return v;
}

// Finishes element (m, n) from its exact int32 accumulator.
inline void finish_element(const GemmProblem& p, int64_t m, int64_t n, int32_t acc) {
  const Epilogue& ep = p.ep;
  if (ep.kind == OutKind::kInt32) {
    static_cast<int32_t*>(ep.out)[m * ep.ldo + n] = acc;
    return;
  }
  float v = rounded(dequantize(acc, ep.row_scale[m], ep.col_scale[n]));
  if (ep.outlier_product != nullptr) {
    v = v + ep.outlier_product[m * ep.outlier_product_ld + n];
  } else if (ep.n_outliers > 0) {
    float o = 0.0f;
    const float* xo = ep.x_outlier + m * ep.n_outliers;
    for (int64_t j = 0; j < ep.n_outliers; ++j) o = std::fma(xo[j], outlier_weight(p, n, j), o);
    v = v + o;
  }
  if (ep.bias != nullptr) v = v + ep.bias[n];
  store_value(ep, m, n, v);
}

// ------------------------------------------------------------------------------------------------------------------
// Quantization (quantize.cpp).
// ------------------------------------------------------------------------------------------------------------------
// Result buffers of the LLM.int8() activation quantization of x [M, K] (row stride ldx elements).
struct ActQuantOut {
  int8_t* codes = nullptr;      // [M, K] row-major
  float* row_scale = nullptr;   // [M]  absmax / INT8_MAX over the non-outlier columns
  int32_t* rowsum = nullptr;    // [M]  sum of the codes of each row, or nullptr when not needed
  uint8_t* col_mask = nullptr;  // [K]  1 where the column holds an outlier (|x| >= threshold in any row)
};

// Argument checks shared by the ops: the InKind of a float tensor (ValueError naming `name` and the dtype
// otherwise), and that a tensor lives on the CPU.
InKind in_kind(const at::Tensor& x, const char* name);
void check_cpu(const at::Tensor& t, const char* name);

// Quantizes x (fp32/bf16/fp16 per `in`) as hf_int8/ops/reference.py does: fills every ActQuantOut buffer and returns
// the number of outlier columns. Threaded with at::parallel_for; the result does not depend on the thread count.
int64_t quantize_activation_into(Isa isa, InKind in, const void* x, int64_t M, int64_t K, int64_t ldx, float threshold,
                                 const ActQuantOut& out);

// ------------------------------------------------------------------------------------------------------------------
// GEMM (gemm.cpp): runs the problem on the best path for `isa`, threaded, writing ep.out.
// ------------------------------------------------------------------------------------------------------------------
// Which kernel gemm() runs for this ISA and problem size ("avx512-vnni small-M", ...), for tests and benchmarks.
const char* gemm_path_name(Isa isa, int64_t M);

void gemm(Isa isa, const GemmProblem& p);

// The problem out = a @ b^T for contiguous int8 a [M, K], b [N, K] and out [M, N] (`kind` elements); the epilogue's
// scales, bias and outlier fields are left for the caller to set.
GemmProblem gemm_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, OutKind kind);

// ISA kernels. Each computes the rows/columns it is given and finishes them through the epilogue.
constexpr int64_t kPanelCols = 16;  // columns of B per packed panel: [ceil(Kp / 4)][16][4] bytes (VNNI / AMX layout)

namespace avx512 {
// The streaming kernel handles up to kSmallMaxM rows: kSmallTileM in registers at a time, so above that each tile of
// weight rows is dotted twice, the second time from L1.
constexpr int64_t kSmallTileM = 8;
constexpr int64_t kSmallMaxM = 16;
void small_m(const GemmProblem& p, int64_t n_begin, int64_t n_end);
// Packed path. pack_rows packs A's rows [m_begin, m_end) (m_begin a multiple of kPackedRows) into row panels
// [ceil(K/4)][rows][4] at x_panels + m * ceil(K/4) * 4. packed() then packs B rows [n_begin, n_end) into `panels`
// (u8 = b + 128, VNNI layout, ceil(K/4)*64 bytes per 16 columns) and computes all M rows of those columns.
constexpr int64_t kPackedRows = 12;
void pack_rows(const GemmProblem& p, int64_t m_begin, int64_t m_end, int8_t* x_panels);
// With ep.packed_outliers, `outlier_panels` (outlier_panel_words(pairs) per 16 columns) receives the outlier codes of
// the same rows as bf16 pairs, [pairs][16], and each tile adds its outlier product.
void packed(const GemmProblem& p, const int8_t* x_panels, int64_t n_begin, int64_t n_end, uint8_t* panels,
            uint32_t* outlier_panels);
constexpr int64_t outlier_panel_words(int64_t pairs) { return pairs * kPanelCols; }
// Packs rows [0, n_rows) (n_rows <= 16) of b into one panel of kq groups of 4 columns: panel[g][n][t] = b[n][4g + t]
// (+128 as u8 when flip), zero (128 when flip) past K and past n_rows.
void pack_panel(const int8_t* b, int64_t ldb, int64_t n_rows, int64_t K, int64_t kq, bool flip, uint8_t* panel);
// dst[0 .. c.count) = the columns c picks out of the row src[0 .. c.K), in order (VPERMB, AVX512-VBMI:
// Isa::kAvx512Bf16 and up). dst must hold c.count + 64 bytes; the bytes after the picked ones, up to the end of the
// last 64-byte store, are 0. With prefetch_l2 (another row), the same words of it are prefetched into L2 on the way.
void pick_columns(const int8_t* src, const ColumnPicker& c, int8_t* dst, const int8_t* prefetch_l2 = nullptr);
// out[m * c.count + j] = float(x[m * ldx + j-th picked column]) for rows [m_begin, m_end) of bf16 (else fp16) x, with
// a picker of 2-byte lanes (VPERMW, AVX512-BW).
void gather_columns16(const uint16_t* x, int64_t ldx, int64_t m_begin, int64_t m_end, const ColumnPicker& c, bool bf16,
                      float* out);
// dst[0 .. c.count) = the 16-bit values row[picked columns] (VPERMW), zero from there to round_up(c.count, 32); dst
// must hold c.count + 32 values.
void pick_columns16(const uint16_t* row, const ColumnPicker& c, uint16_t* dst);
}  // namespace avx512

namespace amx {
bool available();       // the CPU has AMX-INT8 and the OS granted this process the tile data state
bool bf16_available();  // available() and the CPU has AMX-BF16 too
// Loads the tile configuration every AMX kernel here uses (eight tiles of 16 rows x 64 bytes) on this thread.
void configure_tiles();
constexpr int64_t kKAlign = 64;  // the packed activations are zero-padded to a multiple of 64 bytes in K
// Packs A's rows [16 * panel_begin, 16 * panel_end) into B-tile panels: ceil(K / 64) * 1024 bytes per 16 rows.
void pack_activations(const GemmProblem& p, int64_t panel_begin, int64_t panel_end, uint8_t* panels);
// Computes every row of A against weight rows [n_begin, n_end), taken rows_per_block (a multiple of 32) at a time.
void gemm(const GemmProblem& p, const uint8_t* x_panels, int64_t n_begin, int64_t n_end, int64_t rows_per_block);
// Same contract, K-blocked for many tokens: kKBlockTokens tokens x kKBlockBytes of K x rows_per_block weight rows at
// a time, int32 partial sums kept in an L2-resident buffer between K blocks.
constexpr int64_t kKBlockTokens = 128;
constexpr int64_t kKBlockBytes = 1024;
void gemm_kblocked(const GemmProblem& p, const uint8_t* x_panels, int64_t n_begin, int64_t n_end,
                   int64_t rows_per_block);
}  // namespace amx

namespace avx2 {
constexpr int64_t kMaxRows = 8;  // more tokens than this on a CPU with VNNI: at::_int_mm (oneDNN) + finish_rows
void gemm(const GemmProblem& p, int64_t n_begin, int64_t n_end);
// Epilogue of rows [m_begin, m_end) from int32 accumulators acc[m * ld_acc + n].
void finish_rows(const GemmProblem& p, const int32_t* acc, int64_t ld_acc, int64_t m_begin, int64_t m_end);
}  // namespace avx2

// ------------------------------------------------------------------------------------------------------------------
// Outlier product for many outlier columns (outlier_gemm.cpp).
// ------------------------------------------------------------------------------------------------------------------
// out[m, n] = sum_j x_outlier[m, j] * w_outlier(n, j) (fp32 FMAs) for the problem's M tokens, N weight rows and
// ep.n_outliers columns, for the epilogue to add. `out` must hold M rows of ldo >= outlier_product_cols(N) floats (the
// kernels write whole 32-row strips). Threaded over strips of weight rows; independent of the thread count.
int64_t outlier_product_cols(int64_t N);
// The outlier columns cols[0 .. J) as a bitset over K (64 per word, zero past K); empty when they are not strictly
// ascending indices into K (the order pick_columns keeps).
std::vector<uint64_t> outlier_column_bits(const int64_t* cols, int64_t J, int64_t K);
void outlier_product(Isa isa, const GemmProblem& p, float* out, int64_t ldo);

// The same product fused into the packed VNNI GEMM on AVX512-BF16 (see Epilogue::packed_outliers): each register tile
// of kPackedRows tokens x 32 weight rows, after its int8 sums, runs VDPBF16PS over the outlier column pairs, with the
// tokens' pieces broadcast from x_pairs and the weight rows' outlier codes (exact in bf16) from panels that packed()
// builds next to the int8 panels. No [M, N] product is written, and the outlier codes are picked from rows the
// packing reads anyway.
struct PackedOutliers {
  // [ceil(M / kPackedRows) token panels][pairs][n_pieces][kPackedRows]: piece t of x_outlier[m, 2p] (low half) and
  // x_outlier[m, 2p + 1] (high half) as bf16, zero past M and past J.
  const uint32_t* x_pairs = nullptr;
  int64_t pairs = 0;  // ceil(n_outliers / 2)
  int n_pieces = 0;   // 1 for bf16 activations, 2 for fp16, up to 3 for fp32
  // The outlier columns of a weight row, in x_outlier's order.
  const ColumnPicker* cols = nullptr;
};
// Fills `out` (its arrays in x_pairs and cols) for p's outlier columns, from ep.x_outlier or, when that is not given,
// from bf16 activations ep.x; false when the CPU has no AVX512-BF16, the columns are not ascending, or an activation
// is outside the range the bf16 paths compute exactly (then outlier_product() computes the product with fp32 FMAs).
bool prepare_packed_outliers(Isa isa, const GemmProblem& p, std::vector<uint32_t>& x_pairs, ColumnPicker& cols,
                             PackedOutliers& out);

// The same product in the small-M (decode) kernel on AVX512-BF16, for more outlier columns than it sums with scalar
// FMAs: after each tile's int8 sums, the tile's weight rows (just streamed, in cache) have their outlier codes picked
// (pick_columns, VPERMB) and dotted with every token's pieces by VDPBF16PS, 32 columns per instruction, then scaled
// by the row's col_scale. Gathering the codes column by column instead (VPGATHERQD) cost more than streaming the
// rows once the tokens' outlier columns numbered a few dozen.
struct SmallOutliers {
  // [jp / 32][n_pieces][M][32]: piece t of x_outlier[i, c] as bf16 at [c / 32][t][i][c % 32], zero past n_outliers
  // (a chunk of 32 columns holds every token's pieces side by side, read with one pointer)
  const uint16_t* x_pieces = nullptr;
  int64_t jp = 0;    // n_outliers rounded up to 32
  int n_pieces = 0;  // pieces the tokens' values need: 1 for bf16 activations, up to 2 for fp16, 3 for fp32
  const ColumnPicker* cols = nullptr;  // the outlier columns of a weight row, in x_outlier's order
};
// Fills `out` (its arrays in x_pieces and cols) for p's outlier columns from ep.x_outlier; false when the CPU has no
// AVX512-BF16, the columns are not ascending, or an activation is outside the range the bf16 paths compute exactly
// (then the kernel dequantizes the gathered codes and uses fp32 FMAs).
bool prepare_small_outliers(Isa isa, const GemmProblem& p, std::vector<uint16_t>& x_pieces, ColumnPicker& cols,
                            SmallOutliers& out);

// The same product in 32 x 32 blocks on AMX-BF16, fused into the AMX GEMM (see Epilogue::amx_outliers).
struct AmxOutliers {
  // bf16 pieces of x_outlier, zero-padded, as AMX B tiles: [n_pieces][mp / 16 token panels][jp / 32 steps] of
  // [16 column pairs][16 tokens][2]
  const uint16_t* pieces = nullptr;
  int64_t mp = 0;    // tokens, rounded up to 32
  int64_t jp = 0;    // outlier columns, rounded up to 32
  int n_pieces = 0;  // 1 for bf16 activations, 2 for fp16, up to 3 for fp32
};
// Splits p's outlier activations into `storage`; false when the CPU has no AMX-BF16 or a value is outside the range
// the AMX path takes exactly (then outlier_product() computes the product with fp32 FMAs). Checked once per call.
bool prepare_amx_outliers(Isa isa, const GemmProblem& p, std::vector<uint16_t>& storage, AmxOutliers& out);
// A tiles of the outlier weights of rows [n0, n0 + 32): amx_outlier_tile_elems(jp) bf16 values.
int64_t amx_outlier_tile_elems(int64_t jp);
void gather_amx_outlier_tiles(const GemmProblem& p, const AmxOutliers& o, int64_t n0, uint16_t* tiles);
namespace amx {
// block[i * 32 + c] = product of token m0 + i and weight row n0 + c (times col_scale), for a 32 x 32 block whose
// weight tiles were gathered from row n0. Uses (clobbers) all eight tiles; configure_tiles() must have run.
void outlier_block(const GemmProblem& p, const AmxOutliers& o, const uint16_t* tiles, int64_t m0, int64_t n0,
                   float* block);
}  // namespace amx

}  // namespace hf_int8::cpu
