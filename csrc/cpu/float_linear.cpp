// op float_linear on CPU: y = x @ weight^T + bias for the linear layers an llmint8 model keeps in floating point (the
// output head above all), with fp32 accumulation and one rounding to x's dtype, as hf_int8/ops/reference.py.
//
// Why: at decode a bf16 head is a matrix-vector product, and torch's bf16 linear reads its weight at ~24 GB/s on an
// AMD EPYC Zen 5 (Qwen2.5's 151936 x 1536 head: 19.5 ms a token, against ~6-9 ms for a plain read of its 467 MB, 2
// threads); it was a third of a batch-1 decode step. The kernel here streams each weight row from memory once, like
// the int8 decode kernel (gemm_avx512.cpp), and multiplies it with up to kTileRows tokens at a time with VDPBF16PS
// (AVX512-BF16): bf16 x bf16 products are exact in fp32 and accumulate in fp32.
//
// Served here: bf16 x and weight, at most kMaxRows tokens on a CPU with AVX512-BF16 (Isa::kAvx512Bf16 and up), at
// most kMaxRowsAvx2 on one with AVX2 and FMA only (dot_tile_avx2). Every other call (more tokens, fp32 / fp16, CPUs
// without AVX2) runs torch's own at::linear, as nn.Linear would; fp16 is computed in fp32 there, as the reference
// does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "hf_int8/cpu_avx512.h"

namespace hf_int8::cpu {

namespace {

// Tokens above which torch's bf16 GEMM is as fast as streaming (measured on an AMD EPYC Zen 5, 2 threads: see
// docs/kernels-cpu.md, "Layers kept in floating point").
constexpr int64_t kMaxRows = 16;
// The same on CPUs without AVX512-BF16 (the AVX2 tile, one FMA per product; measured with HF_INT8_CPU_ISA=avx2 on
// the Zen 5: 1.4x torch at 4 tokens, 1.0x at 5, in docs/kernels-cpu.md).
constexpr int64_t kMaxRowsAvx2 = 4;

#if HF_INT8_X86
namespace bf16 {

// Tokens dotted with one tile of weight rows at a time; more tokens take several passes over the same rows, the later
// ones from L1 (NR rows of at most a few KiB each).
constexpr int kTileRows = 4;
// The AVX2 tile: 2 tokens x 4 weight rows (8 accumulators, 4 widened weight vectors and one of x: 13 of the 16 ymm).
constexpr int kTileRowsAvx2 = 2;
// Weight rows streamed at once per thread: a thread's rows are split into kStreams contiguous slices, and each tile
// takes the next row of every slice (the int8 decode kernel's order; gemm_avx512.cpp, stream_prefetch_bytes).
constexpr int kStreams = 4;
// Software prefetch distance in each stream.
constexpr int64_t kPrefetchBytes = 1024;

// out[i][j] = sum_k x[i][k] * w[j][k] in fp32, for MR token rows of x (row stride K) and NR weight rows, 32 values of
// K per step, the K tail with a masked load (zeros past K add nothing). Not inlined: inside the driver's loop GCC
// spilled accumulators (the int8 kernel's experience, dot_tile in gemm_avx512.cpp).
template <int MR, int NR>
__attribute__((noinline)) HF_INT8_TARGET_AVX512_BF16 void dot_tile(const uint16_t* x, int64_t K,
                                                                   const uint16_t* const (&w)[NR],
                                                                   float (&out)[MR][NR]) {
  __m512 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w[j] + k) + kPrefetchBytes, _MM_HINT_T0);
      wv[j] = _mm512_loadu_si512(w[j] + k);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i * K + k));
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, reinterpret_cast<__m512bh>(wv[j]));
    }
  }
  if (k < K) {
    const __mmask32 tail = avx512::mask32(K - k);
    __m512i wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_epi16(tail, w[j] + k);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(tail, x + i * K + k));
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, reinterpret_cast<__m512bh>(wv[j]));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

// The same tile on AVX2 + FMA (CPUs without AVX512-BF16): x as fp32 rows (converted once per call), each weight
// vector widened from bf16 to fp32 by a shift (exact), then one FMA per token: the same exact products, summed in
// fp32. 8 values of K per step; the K tail one value at a time.
template <int MR, int NR>
__attribute__((noinline)) HF_INT8_TARGET_AVX2 void dot_tile_avx2(const float* x, int64_t K,
                                                                 const uint16_t* const (&w)[NR],
                                                                 float (&out)[MR][NR]) {
  __m256 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w[j] + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j] + k));
      wv[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * K + k);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc[i][j]), _mm256_extractf128_ps(acc[i][j], 1));
      const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
      float sum = _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
      for (int64_t t = k; t < K; ++t) {
        sum = std::fma(x[i * K + t], static_cast<float>(c10::BFloat16(w[j][t], c10::BFloat16::from_bits())), sum);
      }
      out[i][j] = sum;
    }
  }
}

struct Problem {
  const uint16_t* x;   // [M, K] bf16
  const float* xf;     // [M, K] fp32 copy of x for the AVX2 tile, or nullptr (AVX512-BF16 tile)
  const uint16_t* w;   // [N, K] bf16
  const float* bias;   // [N] or nullptr
  c10::BFloat16* out;  // [M, N]
  int64_t M, N, K;
};

// Finishes out[m0 + i, rows[j]] for an MR x NR tile: bias in fp32, one rounding to bf16.
template <int MR, int NR>
void finish(const Problem& p, int64_t m0, const int64_t (&rows)[NR], const float (&sums)[MR][NR]) {
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const float v = p.bias != nullptr ? sums[i][j] + p.bias[rows[j]] : sums[i][j];
      p.out[(m0 + i) * p.N + rows[j]] = c10::BFloat16(v);
    }
  }
}

// One pass: tokens [m0, m0 + MR) against weight rows `rows`, on the tile of this problem's ISA.
template <int MR, int NR>
void pass(const Problem& p, int64_t m0, const int64_t (&rows)[NR], const uint16_t* const (&w)[NR]) {
  float sums[MR][NR];
  if constexpr (MR <= kTileRowsAvx2) {
    if (p.xf != nullptr) {
      dot_tile_avx2<MR, NR>(p.xf + m0 * p.K, p.K, w, sums);
      finish<MR, NR>(p, m0, rows, sums);
      return;
    }
  }
  dot_tile<MR, NR>(p.x + m0 * p.K, p.K, w, sums);
  finish<MR, NR>(p, m0, rows, sums);
}

// All M tokens against weight rows `rows`, a tile's worth of tokens per pass.
template <int NR>
void tile_rows(const Problem& p, const int64_t (&rows)[NR]) {
  const uint16_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = p.w + rows[j] * p.K;
  const int64_t tile_tokens = p.xf != nullptr ? kTileRowsAvx2 : kTileRows;
  for (int64_t m0 = 0; m0 < p.M; m0 += tile_tokens) {
    switch (std::min(tile_tokens, p.M - m0)) {
      case 1: pass<1, NR>(p, m0, rows, w); break;
      case 2: pass<2, NR>(p, m0, rows, w); break;
      case 3: pass<3, NR>(p, m0, rows, w); break;
      default: pass<4, NR>(p, m0, rows, w); break;
    }
  }
}

// Weight rows [n_begin, n_end) of one thread: kStreams slices read side by side, then the rows left over one by one.
void rows_of_thread(const Problem& p, int64_t n_begin, int64_t n_end) {
  const int64_t per_stream = (n_end - n_begin) / kStreams;
  for (int64_t r = 0; r < per_stream; ++r) {
    int64_t rows[kStreams];
    for (int j = 0; j < kStreams; ++j) rows[j] = n_begin + j * per_stream + r;
    tile_rows<kStreams>(p, rows);
  }
  for (int64_t n = n_begin + per_stream * kStreams; n < n_end; ++n) {
    const int64_t rows[1] = {n};
    tile_rows<1>(p, rows);
  }
}

}  // namespace bf16
#endif

// Weight rows per thread at least, streaming path.
constexpr int64_t kGrainRows = 64;

bool streams(Isa isa, const at::Tensor& x, const at::Tensor& weight, int64_t M) {
#if HF_INT8_X86
  const int64_t max_rows = isa >= Isa::kAvx512Bf16 ? kMaxRows : kMaxRowsAvx2;
  return isa >= Isa::kAvx2 && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
         M <= max_rows;
#else
  return false;
#endif
}

at::Tensor float_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  in_kind(x, "x");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == x.scalar_type(),
                    "hf_int8::float_linear: weight must be a 2-D tensor of x's dtype ", x.scalar_type(), ", got ",
                    weight.scalar_type(), " of shape ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "hf_int8::float_linear: x must have ", K,
                    " features in its last dimension, got shape ", x.sizes());
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type(),
                      "hf_int8::float_linear: bias must have shape (", N, ",) and x's dtype ", x.scalar_type(),
                      ", got ", bias->scalar_type(), " of shape ", bias->sizes());
  }
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;

  // Rows as one contiguous [M, K] matrix on every path: the result of a row does not depend on x's shape or strides.
  const at::Tensor x2d = x.contiguous().view({M, K});
  const Isa isa = selected_isa();
  if (!streams(isa, x, weight, M) || M == 0 || N == 0 || K == 0) {
    if (x.scalar_type() == at::kHalf) {  // torch's CPU fp16 GEMM need not accumulate in fp32; the reference does
      const std::optional<at::Tensor> bias_f =
          bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
      return at::linear(x2d.to(at::kFloat), weight.to(at::kFloat), bias_f).to(at::kHalf).view(out_shape);
    }
    return at::linear(x2d, weight, bias).view(out_shape);
  }
#if HF_INT8_X86
  const at::Tensor w = weight.contiguous();
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  const at::Tensor xf = isa >= Isa::kAvx512Bf16 ? at::Tensor() : x2d.to(at::kFloat).contiguous();
  const bf16::Problem p{reinterpret_cast<const uint16_t*>(x2d.data_ptr()),
                        xf.defined() ? xf.data_ptr<float>() : nullptr,
                        reinterpret_cast<const uint16_t*>(w.data_ptr()),
                        bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
                        out.data_ptr<c10::BFloat16>(),
                        M,
                        N,
                        K};
  at::parallel_for(0, N, kGrainRows, [&](int64_t n0, int64_t n1) { bf16::rows_of_thread(p, n0, n1); });
  return out.view(out_shape);
#else
  return at::linear(x2d, weight, bias).view(out_shape);
#endif
}

}  // namespace

}  // namespace hf_int8::cpu

TORCH_LIBRARY_IMPL(hf_int8, CPU, m) { m.impl("float_linear", &hf_int8::cpu::float_linear_cpu); }
