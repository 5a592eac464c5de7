// int8 GEMM driver: picks the kernel for the ISA and the number of rows, splits the columns between threads
// (at::parallel_for) and lets the kernel finish every element through the fused epilogue. Also the ops int8_matmul
// and int8_scaled_matmul.
//
// Paths (see gemm_path_name):
//   avx512-vnni small-M   M <= 8, streams B once (decode); also M <= 16 without AMX unless many outlier columns
//   amx                   M > 8 on CPUs with AMX-INT8
//   avx512-vnni packed    otherwise with AVX-512 VNNI
//   avx2                  CPUs with AVX2 but no VNNI, any M (exact 16-bit products, B blocks stay in L2)
//   avx2 onednn           CPUs with VNNI capped to AVX2 (HF_INT8_CPU_ISA), M > 8: at::_int_mm (oneDNN runs VNNI
//                         or AMX there, faster than our AVX2 kernel) + AVX2 epilogue
//   generic               anything else: at::_int_mm plus the scalar epilogue
// Every output element is computed by one thread, with K in a fixed order and exact integer arithmetic, so results do
// not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "hf_int8/cpu_kernels.h"

namespace hf_int8::cpu {

namespace {

enum class Path { kGeneric, kAvx2, kAvx2Onednn, kSmallM, kPackedVnni, kAmx };

constexpr int64_t kPackedBlockBytes = 1 << 20;  // packed B per work item: about this many bytes (stays in L2)
constexpr int64_t kSmallMGrain = 64;            // B rows per thread at least, small-M path
constexpr int64_t kAmxKBlockedMaxK = 4096;      // AMX: K-blocked up to this K (bytes, padded), full-K above
// Large M: up to this many outlier columns the epilogue sums their product itself (a few FMAs per output, from a
// dequantized table); above it the product is a GEMM of its own: fused into the AMX kernel block by block (AMX-BF16)
// or into the packed VNNI kernel tile by tile (AVX512-BF16), else computed first (outlier_gemm.cpp, fp32 FMAs) and
// added by the epilogue. Summing thousands of columns element by element
// in the epilogue was 12x slower than the reference path (Qwen2.5's down_proj: 6361 of 8960 columns). The small-M
// (decode) kernel always sums the product itself: it gathers each weight row's outlier weights once, from the row it
// has just streamed, and dots them with every token.
constexpr int64_t kFusedOutliersMax = 8;
// Packed VNNI path, Isa::kAvx512Bf16 and up: the int8 GEMM skips the outlier columns (zero in A; GemmProblem::b_keep)
// when the multiply-adds that saves, tokens x outlier columns x weight rows, reach kCompactMinWork times the bytes
// picked to do it, (tokens + weight rows) x K: one VPERMB per 64 columns of every activation and weight row, ~5 int8
// multiply-adds' time per byte. Measured on an AMD EPYC Zen 5, 2 threads, bf16 activations, with the outlier product
// fused, against the same call without it, call by call in one process (a temporary switch, not kept): on 1536x8960
// and 8960x1536, 1.1-1.4x faster from 64 tokens at 25% outlier columns and from 512 tokens at 10-37% (ratio 16-140),
// even at 512 tokens with 3-6.5% and at 128 tokens with 10% (ratio 13-24), slower at 16-64 tokens with 5-25% (ratio
// 2-11, up to 1.3x); on 1536x256 with 512 tokens and 6% (ratio 2) picking the activation rows cost as much as the
// whole outlier product.
constexpr int64_t kCompactMinWork = 16;

// Small-M path: the outlier product as two more int8 rows per token (Epilogue::piece_unit). Taken above the columns
// the kernel sums with scalar FMAs, where gathering each weight row's outlier codes cost more than streaming the row
// (Qwen2.5's int8 output head: 44-244 outlier columns a decoded token, 9.3 ms a call against 3.4 ms without
// outliers), for up to kPieceMaxTokens tokens (3 rows each: one register tile of the kernel, as measured) and
// kPieceMaxCols columns (so the hi and lo sums stay exact in fp32), when every outlier value is an exact multiple of
// its token's unit.
constexpr int64_t kPieceMinCols = 9;
constexpr int64_t kPieceMaxTokens = 2;
constexpr int64_t kPieceMaxCols = 1024;
// Small-M path on AVX512-BF16: from this many outlier columns the kernel picks each row's outlier codes and dots them
// by VDPBF16PS (SmallOutliers) instead of gathering them (VPGATHERQD) into fp32 FMAs. Measured on an AMD EPYC Zen 5, 1
// thread, 1536 x 600 weights in L2 (no memory traffic to hide either cost), bf16 activations: at 8 tokens 5% slower
// with 16 columns, even at 24-32, 6-10% faster from 48; at 4 tokens even at 16, 10-25% faster from 24; at 8 tokens
// streaming 1536 x 151936 (an output head) from memory with 200 columns 11.7 -> 6.7 ms a call.
constexpr int64_t kSmallBf16MinCols = 24;
// q = x / unit with |q| < 2^kPieceBits: hi = floor((q + 128) / 256) in [-64, 64], lo = q - 256 * hi in [-128, 127].
constexpr int kPieceBits = 14;

// Token rows, then each token's hi and lo rows; their row sums; the units. False (nothing to use) when a value is not
// finite or not a multiple of its token's unit: the kernel then sums the product from the weights in floating point.
struct OutlierPieces {
  at::Tensor rows, rowsum;
  std::vector<float> unit;
};

bool make_outlier_pieces(const GemmProblem& q, OutlierPieces& pieces) {
  const Epilogue& ep = q.ep;
  const int64_t M = q.M, J = ep.n_outliers, K = q.K;
  pieces.rows = at::zeros({3 * M, K}, at::kChar);
  pieces.rowsum = at::empty({3 * M}, at::kInt);
  pieces.unit.assign(static_cast<size_t>(M), 1.0f);
  int8_t* rows = pieces.rows.data_ptr<int8_t>();
  int32_t* rowsum = pieces.rowsum.data_ptr<int32_t>();
  for (int64_t i = 0; i < M; ++i) {
    std::memcpy(rows + i * K, q.a + i * q.lda, static_cast<size_t>(K));
    rowsum[i] = q.a_rowsum[i];
    const float* x = ep.x_outlier + i * J;
    float absmax = 0.0f;
    for (int64_t c = 0; c < J; ++c) {
      if (!std::isfinite(x[c])) return false;
      absmax = std::max(absmax, std::fabs(x[c]));
    }
    int exponent = 0;
    std::frexp(absmax, &exponent);  // absmax < 2^exponent
    const int unit_exponent = exponent - kPieceBits;
    const float unit = std::ldexp(1.0f, unit_exponent);
    if (absmax > 0.0f && (!std::isnormal(unit) || !std::isnormal(absmax))) return false;
    int8_t* hi = rows + (M + 2 * i) * K;
    int8_t* lo = hi + K;
    int32_t hi_sum = 0, lo_sum = 0;
    for (int64_t c = 0; c < J; ++c) {
      const float scaled = std::ldexp(x[c], -unit_exponent);  // exact: a power of two
      const float whole = std::nearbyint(scaled);
      if (whole != scaled) return false;
      const auto piece = static_cast<int32_t>(whole);  // |piece| < 2^14
      const int32_t h = (piece + 128) >> 8;
      const int32_t l = piece - 256 * h;
      hi[ep.outlier_cols[c]] = static_cast<int8_t>(h);
      lo[ep.outlier_cols[c]] = static_cast<int8_t>(l);
      hi_sum += h;
      lo_sum += l;
    }
    rowsum[M + 2 * i] = hi_sum;
    rowsum[M + 2 * i + 1] = lo_sum;
    pieces.unit[static_cast<size_t>(i)] = unit;
  }
  return true;
}

// The streaming (small-M) kernel for up to kSmallTileM rows; for up to kSmallMaxM rows too on CPUs without AMX, with
// more than a few outlier columns only on AVX512-BF16 (its FMA route costs more than the packed path's product).
// Measured on an AMD EPYC Zen 5, 2 threads, bf16 activations, 9-16 tokens (docs/benchmarks.md, "9-16 tokens with many
// outlier columns"): with 70% outlier columns 1.04-1.56x faster than the packed path on 4096x4096, 4096x11008,
// 11008x4096 and 1536x8960, with 40% 1.03-1.59x on Qwen2.5's shapes (one cell 0.74x, not repeated on rerun); without
// outliers 16 tokens 0.48 against 0.73 ms on 1536 x 8960, 12 tokens 0.39 against 0.65. Before tile_outliers_bf16 kept
// a token group's accumulators across a tile's rows, the packed path won from about 25% outlier columns at 16 tokens
// and took those calls.
Path choose(Isa isa, int64_t M, int64_t n_outliers = 0) {
  if (isa >= Isa::kAvx512Vnni && M <= avx512::kSmallTileM) return Path::kSmallM;
  if (isa >= Isa::kAvx512Vnni && isa < Isa::kAmx && M <= avx512::kSmallMaxM &&
      (n_outliers < kPieceMinCols || isa >= Isa::kAvx512Bf16)) {
    return Path::kSmallM;
  }
  if (isa >= Isa::kAmx) return Path::kAmx;
  if (isa >= Isa::kAvx512Vnni) return Path::kPackedVnni;
  // oneDNN's int8 GEMM beats our AVX2 kernel past a few rows only where it runs on VNNI or AMX, i.e. on a CPU that
  // has them and is capped to AVX2 here (tests). On a CPU without VNNI (AMD Zen 2/3, Intel before Ice Lake) its AVX2
  // kernel is ~9x slower than ours at 32 rows (2048x2048: 184 ms vs 21 ms on a Zen 3), so ours serves every M there.
  if (isa >= Isa::kAvx2) {
    const bool onednn_is_fast = detected_isa() >= Isa::kAvx512Vnni;
    return M <= avx2::kMaxRows || !onednn_is_fast ? Path::kAvx2 : Path::kAvx2Onednn;
  }
  return Path::kGeneric;
}

// Precomputes w_outlier(n, j) = float(b[n, col_j]) * col_scale[n] as [n_outliers, N].
at::Tensor outlier_weights(const GemmProblem& p) {
  const Epilogue& ep = p.ep;
  at::Tensor w = at::empty({ep.n_outliers, p.N}, at::kFloat);
  float* dst = w.data_ptr<float>();
  at::parallel_for(0, p.N, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t j = 0; j < ep.n_outliers; ++j) {
        dst[j * p.N + n] = static_cast<float>(p.b[n * p.ldb + ep.outlier_cols[j]]) * ep.col_scale[n];
      }
    }
  });
  return w;
}

// x_outlier[m, j] = float(x[m, cols[j]]): the outlier columns of x [M, ldx] (row-major), threaded over rows.
// (Tensor.index_select along dim 1 took ~4% of a Qwen2.5 prefill.) From one outlier column per kPickFromColumns on,
// 16-bit activations are picked by vector permutes instead (gather_columns16).
constexpr int64_t kPickFromColumns = 32;
template <typename T>
void gather_columns(const T* x, int64_t M, int64_t ldx, const int64_t* cols, int64_t J, float* out) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(J, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = x + m * ldx;
      float* dst = out + m * J;
      for (int64_t j = 0; j < J; ++j) dst[j] = static_cast<float>(row[cols[j]]);
    }
  });
}

at::Tensor gather_x_outlier(Isa isa, const GemmProblem& p) {
  const Epilogue& ep = p.ep;
  const int64_t M = p.M, J = ep.n_outliers, K = p.K;
  at::Tensor out = at::empty({M, J}, at::kFloat);
  float* xo = out.data_ptr<float>();
  if (ep.x_kind != InKind::kF32 && isa >= Isa::kAvx512Vnni && J * kPickFromColumns >= K) {
    const std::vector<uint64_t> bits = outlier_column_bits(ep.outlier_cols, J, K);
    if (!bits.empty()) {
      const ColumnPicker picker = make_column_picker(bits, K, /*lane_bytes=*/2);
      const auto* x16 = static_cast<const uint16_t*>(ep.x);
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
        avx512::gather_columns16(x16, ep.x_ld, m0, m1, picker, ep.x_kind == InKind::kBF16, xo);
      });
      return out;
    }
  }
  switch (ep.x_kind) {
    case InKind::kBF16:
      gather_columns(static_cast<const at::BFloat16*>(ep.x), M, ep.x_ld, ep.outlier_cols, J, xo);
      break;
    case InKind::kF16: gather_columns(static_cast<const at::Half*>(ep.x), M, ep.x_ld, ep.outlier_cols, J, xo); break;
    default: gather_columns(static_cast<const float*>(ep.x), M, ep.x_ld, ep.outlier_cols, J, xo); break;
  }
  return out;
}

// The whole outlier product x_outlier [M, J] @ w_outlier^T as fp32 (outlier_gemm.cpp), for the epilogue to add.
at::Tensor outlier_product_of(Isa isa, const GemmProblem& p) {
  at::Tensor out = at::empty({p.M, outlier_product_cols(p.N)}, at::kFloat);
  outlier_product(isa, p, out.data_ptr<float>(), out.size(1));
  return out;
}

}  // namespace

ColumnPicker make_column_picker(const std::vector<uint64_t>& bits, int64_t K, int lane_bytes) {
  TORCH_CHECK(lane_bytes == 1 || lane_bytes == 2, "make_column_picker: lane_bytes must be 1 or 2, got ", lane_bytes);
  ColumnPicker c;
  c.K = K;
  c.lanes = 64 / lane_bytes;
  const int64_t groups = static_cast<int64_t>(bits.size()) * (64 / c.lanes);
  const uint64_t group_mask = c.lanes == 64 ? ~uint64_t{0} : (uint64_t{1} << c.lanes) - 1;
  for (int64_t w = 0; w < groups; ++w) {
    const int64_t first = w * c.lanes;
    uint64_t word = (bits[static_cast<size_t>(first / 64)] >> (first % 64)) & group_mask;
    if (word == 0) continue;
    c.words.push_back(w);
    c.taken.push_back(static_cast<uint8_t>(__builtin_popcountll(word)));
    c.count += __builtin_popcountll(word);
    const size_t start = c.index.size();
    c.index.resize(start + static_cast<size_t>(c.lanes), 0);
    for (size_t lane = start; word != 0; word &= word - 1)
      c.index[lane++] = static_cast<uint8_t>(__builtin_ctzll(word));
  }
  return c;
}

namespace {

void finish_all(const GemmProblem& p, const int32_t* acc, int64_t ld_acc) {
  at::parallel_for(0, p.M, std::max<int64_t>(1, 4096 / std::max<int64_t>(p.N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t n = 0; n < p.N; ++n) finish_element(p, m, n, acc != nullptr ? acc[m * ld_acc + n] : 0);
    }
  });
}

void run_onednn(const GemmProblem& p, bool avx2_epilogue) {
  const at::Tensor a = at::from_blob(const_cast<int8_t*>(p.a), {p.M, p.K}, {p.lda, 1}, at::kChar).contiguous();
  const at::Tensor b = at::from_blob(const_cast<int8_t*>(p.b), {p.N, p.K}, {p.ldb, 1}, at::kChar);
  // With K == 1 the operands are views with strides (1, 1), which oneDNN misreads (uninitialised int32 results):
  // the product is then an exact int32 outer product.
  const at::Tensor acc = p.K == 1 ? (a.to(at::kInt) * b.to(at::kInt).t()).contiguous() : at::_int_mm(a, b.t());
  if (!avx2_epilogue) {
    finish_all(p, acc.data_ptr<int32_t>(), acc.stride(0));
    return;
  }
  const int32_t* c = acc.data_ptr<int32_t>();
  const int64_t ld = acc.stride(0);
  at::parallel_for(0, p.M, std::max<int64_t>(1, 4096 / std::max<int64_t>(p.N, 1)),
                   [&](int64_t m0, int64_t m1) { avx2::finish_rows(p, c, ld, m0, m1); });
}

// Columns of B per work item: about kPackedBlockBytes of B, a multiple of 32, and at least one item per thread.
int64_t block_columns(const GemmProblem& p, int64_t kp) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::clamp<int64_t>(kPackedBlockBytes / kp / 32 * 32, 32, 512);
  return std::min(block, round_up(ceil_div(p.N, threads), 32));
}

void run_packed_vnni(const GemmProblem& p) {
  const int64_t kp = round_up(p.K, 4);
  const PackedOutliers* po = p.ep.packed_outliers;
  const int64_t outlier_words = po != nullptr ? avx512::outlier_panel_words(po->pairs) : 0;  // per 16 columns
  at::Tensor x_panels = at::empty({p.M * kp}, at::kChar);
  int8_t* xp = x_panels.data_ptr<int8_t>();
  const int64_t row_panels = ceil_div(p.M, avx512::kPackedRows);
  at::parallel_for(0, row_panels, std::max<int64_t>(1, 16384 / kp), [&](int64_t q0, int64_t q1) {
    avx512::pack_rows(p, q0 * avx512::kPackedRows, std::min(p.M, q1 * avx512::kPackedRows), xp);
  });
  // A column's packed bytes: its int8 quads and, with fused outliers, its dword of each outlier pair.
  const int64_t block = block_columns(p, kp + outlier_words / kPanelCols * 4);
  const int64_t n_blocks = ceil_div(p.N, block);
  const size_t panel_bytes = static_cast<size_t>(ceil_div(block, kPanelCols) * kp * 16);
  const size_t outlier_panel_words = static_cast<size_t>(ceil_div(block, kPanelCols) * outlier_words);
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    static thread_local std::vector<uint8_t> panels;
    static thread_local std::vector<uint32_t> outlier_panels;
    if (panels.size() < panel_bytes) panels.resize(panel_bytes);
    if (outlier_panels.size() < outlier_panel_words) outlier_panels.resize(outlier_panel_words);
    for (int64_t blk = b0; blk < b1; ++blk) {
      avx512::packed(p, xp, blk * block, std::min(p.N, (blk + 1) * block), panels.data(), outlier_panels.data());
    }
  });
}

void run_amx(const GemmProblem& p) {
  const int64_t kp = round_up(p.K, amx::kKAlign);
  const int64_t m_panels = ceil_div(p.M, kPanelCols);
  at::Tensor x_panels = at::empty({m_panels * kp * 16}, at::kByte);
  uint8_t* xp = x_panels.data_ptr<uint8_t>();
  at::parallel_for(0, m_panels, std::max<int64_t>(1, 4096 / kp),
                   [&](int64_t q0, int64_t q1) { amx::pack_activations(p, q0, q1, xp); });
  // K-blocked for K up to kAmxKBlockedMaxK: measured 0-27% faster there (128-2048 tokens), 13% slower at K = 11008
  // with 2048 tokens, where the full-K blocks with ~1 MiB of weight rows win.
  const bool kblocked = kp <= kAmxKBlockedMaxK;
  const int64_t block =
      kblocked ? std::min<int64_t>(256, round_up(ceil_div(p.N, at::get_num_threads()), 32)) : block_columns(p, kp);
  const int64_t n_chunks = ceil_div(p.N, block);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    if (kblocked) {
      amx::gemm_kblocked(p, xp, c0 * block, std::min(p.N, c1 * block), block);
    } else {
      amx::gemm(p, xp, c0 * block, std::min(p.N, c1 * block), block);
    }
  });
}

}  // namespace

const char* gemm_path_name(Isa isa, int64_t M) {
  switch (choose(isa, M)) {
    case Path::kSmallM: return "avx512-vnni small-M";
    case Path::kAmx: return "amx";
    case Path::kPackedVnni: return "avx512-vnni packed";
    case Path::kAvx2: return "avx2";
    case Path::kAvx2Onednn: return "avx2 onednn";
    default: return "generic";
  }
}

void gemm(Isa isa, const GemmProblem& p) {
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) {  // empty sums: every accumulator is 0
    finish_all(p, nullptr, 0);
    return;
  }
  const Path path = choose(isa, p.M, p.ep.kind != OutKind::kInt32 ? p.ep.n_outliers : 0);
  GemmProblem q = p;

  // Row sums of A for the +128 shift of the VNNI kernels.
  at::Tensor rowsum;
  if ((path == Path::kSmallM || path == Path::kPackedVnni) && q.a_rowsum == nullptr) {
    rowsum = at::empty({p.M}, at::kInt);
    int32_t* rs = rowsum.data_ptr<int32_t>();
    for (int64_t m = 0; m < p.M; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < p.K; ++k) s += q.a[m * q.lda + k];
      rs[m] = s;
    }
    q.a_rowsum = rs;
  }

  // The outlier product (see kFusedOutliersMax): fused into the AMX kernel, computed up front, or summed by the
  // epilogue (the small-M kernel gathers the weights from the B rows it just streamed, the others read a table built
  // once here).
  at::Tensor w_outlier, product;
  std::vector<uint16_t> amx_pieces;
  AmxOutliers amx_outliers;
  std::vector<uint32_t> packed_pairs;
  ColumnPicker packed_cols;
  PackedOutliers packed_outliers;
  const bool many_outliers = q.ep.n_outliers > kFusedOutliersMax;
  at::Tensor x_outlier;
  if (q.ep.kind != OutKind::kInt32 && q.ep.n_outliers > 0) {
    const bool fused_packed = path == Path::kPackedVnni && many_outliers;
    // The packed path on AVX512-BF16 splits bf16 activations straight from x; every other route reads x_outlier. When
    // that declines (a value outside the bf16 range), splitting the same values from x_outlier would decline too.
    const bool raw = fused_packed && q.ep.x_outlier == nullptr && q.ep.x_kind == InKind::kBF16;
    if (raw && prepare_packed_outliers(isa, q, packed_pairs, packed_cols, packed_outliers)) {
      q.ep.packed_outliers = &packed_outliers;
    } else {
      if (q.ep.x_outlier == nullptr) {
        x_outlier = gather_x_outlier(isa, q);
        q.ep.x_outlier = x_outlier.data_ptr<float>();
      }
      if (path == Path::kAmx && many_outliers && prepare_amx_outliers(isa, q, amx_pieces, amx_outliers)) {
        q.ep.amx_outliers = &amx_outliers;
      } else if (fused_packed && !raw && prepare_packed_outliers(isa, q, packed_pairs, packed_cols, packed_outliers)) {
        q.ep.packed_outliers = &packed_outliers;
      } else if (path != Path::kSmallM && many_outliers) {
        product = outlier_product_of(isa, q);
        q.ep.outlier_product = product.data_ptr<float>();
        q.ep.outlier_product_ld = product.size(1);
      } else if (q.ep.w_outlier_t == nullptr && path != Path::kSmallM) {
        w_outlier = outlier_weights(q);
        q.ep.w_outlier_t = w_outlier.data_ptr<float>();
      }
    }
  }

  // Small-M path, many outlier columns: the product rides the int8 GEMM as exact pieces (OutlierPieces).
  OutlierPieces pieces;
  if (path == Path::kSmallM && q.ep.kind != OutKind::kInt32 && q.ep.n_outliers >= kPieceMinCols &&
      q.ep.n_outliers <= kPieceMaxCols && q.M <= kPieceMaxTokens && make_outlier_pieces(q, pieces)) {
    q.ep.piece_tokens = q.M;
    q.ep.piece_unit = pieces.unit.data();
    q.ep.n_outliers = 0;
    q.ep.outlier_cols = nullptr;
    q.ep.x_outlier = nullptr;
    q.a = pieces.rows.data_ptr<int8_t>();
    q.lda = q.K;
    q.a_rowsum = pieces.rowsum.data_ptr<int32_t>();
    q.M = 3 * q.M;
  }

  // Small-M path, many outlier columns and no exact pieces, on AVX512-BF16: the kernel dots the codes it picks from
  // each streamed row with the tokens' bf16 pieces (SmallOutliers).
  std::vector<uint16_t> small_pieces;
  ColumnPicker small_cols;
  SmallOutliers small_outliers;
  if (path == Path::kSmallM && q.ep.kind != OutKind::kInt32 && q.ep.n_outliers >= kSmallBf16MinCols &&
      prepare_small_outliers(isa, q, small_pieces, small_cols, small_outliers)) {
    q.ep.small_outliers = &small_outliers;
  }

  // Many outlier columns: the int8 GEMM runs over the other columns only, A's picked here, B's as it is packed.
  ColumnPicker keep;
  at::Tensor a_kept;
  if (path == Path::kPackedVnni && isa >= Isa::kAvx512Bf16 && q.ep.n_outliers > kFusedOutliersMax &&
      q.ep.n_outliers * q.M * q.N >= kCompactMinWork * (q.M + q.N) * q.K) {
    std::vector<uint64_t> bits = outlier_column_bits(q.ep.outlier_cols, q.ep.n_outliers, q.K);
    for (uint64_t& word : bits) word = ~word;  // the other columns
    if (!bits.empty() && q.K % 64 != 0) bits.back() &= ~uint64_t{0} >> (64 - q.K % 64);
    keep = make_column_picker(bits, q.K);
    if (keep.count > 0) {
      const int64_t ld = round_up(keep.count + 64, 64);
      a_kept = at::empty({q.M, ld}, at::kChar);
      int8_t* dst = a_kept.data_ptr<int8_t>();
      at::parallel_for(0, q.M, std::max<int64_t>(1, 16384 / q.K), [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) avx512::pick_columns(q.a + m * q.lda, keep, dst + m * ld);
      });
      q.b_keep = &keep;
      q.a = dst;
      q.lda = ld;
      q.K = keep.count;
    }
  }

  switch (path) {
    case Path::kSmallM:
      at::parallel_for(0, p.N, kSmallMGrain, [&](int64_t n0, int64_t n1) { avx512::small_m(q, n0, n1); });
      break;
    case Path::kAmx: run_amx(q); break;
    case Path::kPackedVnni: run_packed_vnni(q); break;
    case Path::kAvx2: at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) { avx2::gemm(q, n0, n1); }); break;
    case Path::kAvx2Onednn: run_onednn(q, /*avx2_epilogue=*/true); break;
    default: run_onednn(q, /*avx2_epilogue=*/false); break;
  }
}

GemmProblem gemm_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, OutKind kind) {
  GemmProblem p;
  p.M = a.size(0);
  p.N = b.size(0);
  p.K = a.size(1);
  p.a = a.data_ptr<int8_t>();
  p.lda = p.K;
  p.b = b.data_ptr<int8_t>();
  p.ldb = p.K;
  p.ep.kind = kind;
  p.ep.out = out.data_ptr();
  p.ep.ldo = p.N;
  return p;
}

// ---------------------------------------------------------------------------------------------------------------
// Ops.
// ---------------------------------------------------------------------------------------------------------------
namespace {

void check_int8_matrix(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kChar, "hf_int8::", op, ": ", name, " must be int8, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, "hf_int8::", op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

OutKind out_kind(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat: return OutKind::kF32;
    case at::kBFloat16: return OutKind::kBF16;
    case at::kHalf: return OutKind::kF16;
    default:
      TORCH_CHECK_VALUE(false, "hf_int8::", op, ": out_dtype must be float32, bfloat16 or float16, got ", dtype);
  }
  return OutKind::kF32;  // not reached
}

// A per-row / per-column scale or bias as a contiguous fp32 vector of `n` elements.
at::Tensor fp32_vector(const at::Tensor& t, int64_t n, const char* op, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "hf_int8::", op, ": ", name, " must have shape (", n, ",), got ",
                    t.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "hf_int8::", op, ": ", name,
                    " must be a floating-point tensor, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

at::Tensor int8_matmul_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_int8_matrix(a, "int8_matmul", "a");
  check_int8_matrix(b, "int8_matmul", "b");
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "hf_int8::int8_matmul: a [M, K] and b [N, K] must share K, got ",
                    a.sizes(), " and ", b.sizes());
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty({ac.size(0), bc.size(0)}, ac.options().dtype(at::kInt));
  gemm(selected_isa(), gemm_problem(ac, bc, out, OutKind::kInt32));
  return out;
}

at::Tensor int8_scaled_matmul_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_scale,
                                  const at::Tensor& col_scale, const std::optional<at::Tensor>& bias,
                                  at::ScalarType out_dtype) {
  constexpr const char* op = "int8_scaled_matmul";
  check_int8_matrix(a, op, "a");
  check_int8_matrix(b, op, "b");
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "hf_int8::int8_scaled_matmul: a [M, K] and b [N, K] must share K, got ",
                    a.sizes(), " and ", b.sizes());
  const OutKind kind = out_kind(out_dtype, op);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t M = ac.size(0), N = bc.size(0);
  const at::Tensor rs = fp32_vector(row_scale, M, op, "row_scale");
  const at::Tensor cs = fp32_vector(col_scale, N, op, "col_scale");
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = fp32_vector(*bias, N, op, "bias");
  at::Tensor out = at::empty({M, N}, ac.options().dtype(out_dtype));
  GemmProblem p = gemm_problem(ac, bc, out, kind);
  p.ep.row_scale = rs.data_ptr<float>();
  p.ep.col_scale = cs.data_ptr<float>();
  p.ep.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  gemm(selected_isa(), p);
  return out;
}

}  // namespace

}  // namespace hf_int8::cpu

TORCH_LIBRARY_IMPL(hf_int8, CPU, m) {
  m.impl("int8_matmul", &hf_int8::cpu::int8_matmul_cpu);
  m.impl("int8_scaled_matmul", &hf_int8::cpu::int8_scaled_matmul_cpu);
}
