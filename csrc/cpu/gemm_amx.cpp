// AMX-INT8 GEMM core for more than a few tokens (Sapphire Rapids and later).
//
// TDPBSSD multiplies signed by signed bytes into int32 tiles, so no +128 shift is needed. The operands are swapped
// with respect to the usual C = A B^T: the int8 weight, row-major [N, K], *is* the A-tile layout (16 rows x 64 bytes
// of K), so tiles load it straight from memory and the weight is never repacked; the activation codes, small next
// to the weight, are packed once per call into the B-tile layout [K/4][16 rows][4] (pack_activations). A 32 x 32
// block of C^T (32 weight rows x 32 tokens) lives in four accumulator tiles while K is walked 64 bytes at a time; it
// is stored once, transposed 16 x 16 in registers and finished by the AVX-512 epilogue.
//
// Blocking: each thread owns a range of weight rows, taken in blocks of about 1 MiB that stay in L2 while every
// 32-token block of the packed activations passes over them; the first pass prefetches the block from memory.
#include "hf_int8/cpu_avx512.h"
#include "hf_int8/cpu_kernels.h"

#if HF_INT8_X86
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace hf_int8::cpu::amx {

namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask the kernel for an extended state component
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data state

struct alignas(64) TileConfig {
  uint8_t palette_id = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr unsigned kCpuidAmxBf16Bit = 22;  // CPUID.(EAX=7, ECX=0):EDX
constexpr unsigned kCpuidAmxTileBit = 24;
constexpr unsigned kCpuidAmxInt8Bit = 25;

bool detect() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_tile = (edx >> kCpuidAmxTileBit) & 1u, amx_int8 = (edx >> kCpuidAmxInt8Bit) & 1u;
  if (!amx_tile || !amx_int8) return false;
  // Linux hands out the 8 KiB tile state only on request; without it the first tile instruction faults.
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool detect_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return (edx >> kCpuidAmxBf16Bit) & 1u;
}

constexpr int64_t kPrefetchRows = 32;     // weight rows per tile block (two A tiles)
constexpr int64_t kPrefetchBytes = 1024;  // how far ahead the first pass prefetches each weight row

// C^T[32 weight rows][32 tokens] (+)= w[32 rows, bytes k0..k1] x packed activations (x0: tokens 0-15, x1: 16-31).
// kAccumulate: start from the partial sums stored in c (K-blocked path) instead of zero.
// kPrefetch: the weight rows come from memory on this pass; prefetch them a few 64-byte steps ahead.
template <bool kAccumulate, bool kPrefetch, bool kTwoTokenTiles = true>
HF_INT8_TARGET_AMX void block32(const int8_t* w, int64_t ldw, const uint8_t* x0, const uint8_t* x1, int64_t k0,
                                int64_t k1, int32_t* c) {
  if constexpr (kAccumulate) {
    _tile_loadd(0, c, 128);
    _tile_loadd(2, c + 16 * 32, 128);
    if constexpr (kTwoTokenTiles) {
      _tile_loadd(1, c + 16, 128);
      _tile_loadd(3, c + 16 * 32 + 16, 128);
    }
  } else {
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (kTwoTokenTiles) {
      _tile_zero(1);
      _tile_zero(3);
    }
  }
  for (int64_t k = k0; k < k1; k += 64) {
    if constexpr (kPrefetch) {
      for (int64_t r = 0; r < kPrefetchRows; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + k + kPrefetchBytes), _MM_HINT_T0);
      }
    }
    _tile_loadd(4, w + k, ldw);
    _tile_loadd(5, w + 16 * ldw + k, ldw);
    _tile_loadd(6, x0 + k * 16, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(2, 5, 6);
    if constexpr (kTwoTokenTiles) {
      _tile_loadd(7, x1 + k * 16, 64);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(2, c + 16 * 32, 128);
  if constexpr (kTwoTokenTiles) {
    _tile_stored(1, c + 16, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

// With a single 16-token panel left (x1 == nullptr) only two accumulator tiles do work.
template <bool kAccumulate, bool kPrefetch>
HF_INT8_TARGET_AMX void block32_any(const int8_t* w, int64_t ldw, const uint8_t* x0, const uint8_t* x1, int64_t k0,
                                    int64_t k1, int32_t* c) {
  if (x1 != nullptr) {
    block32<kAccumulate, kPrefetch, true>(w, ldw, x0, x1, k0, k1, c);
  } else {
    block32<kAccumulate, kPrefetch, false>(w, ldw, x0, x0, k0, k1, c);
  }
}

template <bool kPrefetch>
HF_INT8_TARGET_AMX void block32_full(const int8_t* w, int64_t ldw, const uint8_t* x0, const uint8_t* x1, int64_t kp,
                                     int32_t* c) {
  block32_any<false, kPrefetch>(w, ldw, x0, x1, 0, kp, c);
}

// Finishes the tokens [m0, m0 + m_valid) x weight rows [n0, n0 + n_valid) of a stored C^T block; `outliers` is the
// block's outlier product [32 tokens][32 rows] when it is fused here, else nullptr.
HF_INT8_TARGET_AMX void finish_block(const GemmProblem& p, const int32_t* c, int64_t m0, int64_t m_valid, int64_t n0,
                                     int64_t n_valid, const float* outliers) {
  for (int64_t mh = 0; mh < std::min<int64_t>(m_valid, 32); mh += 16) {
    for (int64_t nh = 0; nh < std::min<int64_t>(n_valid, 32); nh += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + (nh + i) * 32 + mh);
      avx512::transpose16(r);  // r[i] now holds token mh + i, weight rows nh .. nh + 15
      const int64_t rows = std::min<int64_t>(16, m_valid - mh);
      for (int64_t i = 0; i < rows; ++i) {
        const float* o = outliers != nullptr ? outliers + (mh + i) * 32 + nh : nullptr;
        avx512::finish16(p, m0 + mh + i, n0 + nh, n_valid - nh, r[i], o);
      }
    }
  }
}

// Whether the tiles must read the 32 weight rows from n0 out of a zero-padded copy: they would read past the weight
// (fewer than 32 rows left, or K not a multiple of 64 at the very end). Elsewhere reading into the next row is
// harmless, since the packed activations are zero past K.
bool needs_padded_rows(const GemmProblem& p, int64_t n0) {
  return n0 + 32 > p.N || (n0 + 32 == p.N && p.K % kKAlign != 0);
}

// Copies weight rows [n0, min(n0 + 32, N)) into `padded`: 32 rows of kp bytes, zero past K and past N.
void copy_padded_rows(const GemmProblem& p, int64_t n0, int64_t kp, std::vector<int8_t>& padded) {
  padded.assign(static_cast<size_t>(32 * kp), 0);
  for (int64_t r = 0; r < std::min<int64_t>(32, p.N - n0); ++r) {
    std::memcpy(padded.data() + r * kp, p.b + (n0 + r) * p.ldb, static_cast<size_t>(p.K));
  }
}

// The fused outlier product (Epilogue::amx_outliers): the A tiles of the outlier weights of one block of weight rows,
// gathered once per block, and the 32 x 32 product of the block being finished.
class FusedOutliers {
 public:
  explicit FusedOutliers(const GemmProblem& p) : p_(p), o_(p.ep.amx_outliers) {
    if (o_ != nullptr) elems_ = amx_outlier_tile_elems(o_->jp);
  }
  void gather(int64_t nb, int64_t nb_end) {
    if (o_ == nullptr) return;
    nb_ = nb;
    tiles_.resize(static_cast<size_t>(ceil_div(nb_end - nb, 32) * elems_));
    for (int64_t n0 = nb; n0 < nb_end; n0 += 32) {
      gather_amx_outlier_tiles(p_, *o_, n0, tiles_.data() + (n0 - nb) / 32 * elems_);
    }
  }
  // The product block of tokens m0.. and weight rows n0.. (n0 in the gathered block), or nullptr when not fused.
  const float* block(int64_t m0, int64_t n0) {
    if (o_ == nullptr) return nullptr;
    outlier_block(p_, *o_, tiles_.data() + (n0 - nb_) / 32 * elems_, m0, n0, block_);
    return block_;
  }

 private:
  const GemmProblem& p_;
  const AmxOutliers* o_;
  int64_t elems_ = 0;
  int64_t nb_ = 0;
  std::vector<uint16_t> tiles_;
  alignas(64) float block_[32 * 32];
};

}  // namespace

bool available() {
  static const bool ok = detect();
  return ok;
}

bool bf16_available() {
  static const bool ok = available() && detect_bf16();
  return ok;
}

HF_INT8_TARGET_AMX void configure_tiles() {
  TileConfig cfg;
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {  // 0-3: C (16 x 16 32-bit), 4-5: A (16 rows x 64 bytes), 6-7: B (16 groups x 64)
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC 12 does not treat LDTILECFG as reading its operand and drops the stores above as dead once this function is
  // not inlined (the tiles then stay unconfigured: SIGILL): make them visible.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

void pack_activations(const GemmProblem& p, int64_t panel_begin, int64_t panel_end, uint8_t* panels) {
  const int64_t kq = round_up(p.K, kKAlign) / 4;
  for (int64_t q = panel_begin; q < panel_end; ++q) {
    const int64_t m0 = q * kPanelCols;
    avx512::pack_panel(p.a + m0 * p.lda, p.lda, std::min<int64_t>(kPanelCols, p.M - m0), p.K, kq, /*flip=*/false,
                       panels + q * kq * 64);
  }
}

HF_INT8_TARGET_AMX void gemm(const GemmProblem& p, const uint8_t* x_panels, int64_t n_begin, int64_t n_end,
                             int64_t rows_per_block) {
  const int64_t kp = round_up(p.K, kKAlign);
  const int64_t panel_bytes = kp * 16;
  const int64_t m_panels = ceil_div(p.M, kPanelCols);
  alignas(64) int32_t c[32 * 32];
  std::vector<int8_t> padded;
  FusedOutliers outliers(p);
  configure_tiles();
  for (int64_t nb = n_begin; nb < n_end; nb += rows_per_block) {
    const int64_t nb_end = std::min(n_end, nb + rows_per_block);
    outliers.gather(nb, nb_end);
    for (int64_t mp = 0; mp < m_panels; mp += 2) {
      const uint8_t* x0 = x_panels + mp * panel_bytes;
      const uint8_t* x1 = mp + 1 < m_panels ? x0 + panel_bytes : nullptr;  // odd count: one token tile
      const int64_t m0 = mp * kPanelCols;
      for (int64_t ns = nb; ns < nb_end; ns += 32) {
        const int64_t n_valid = std::min<int64_t>(32, nb_end - ns);
        const int8_t* w = p.b + ns * p.ldb;
        int64_t ldw = p.ldb;
        if (needs_padded_rows(p, ns)) {  // the last weight rows
          copy_padded_rows(p, ns, kp, padded);
          w = padded.data();
          ldw = kp;
        }
        if (mp == 0) {
          block32_full<true>(w, ldw, x0, x1, kp, c);
        } else {
          block32_full<false>(w, ldw, x0, x1, kp, c);
        }
        finish_block(p, c, m0, p.M - m0, ns, n_valid, outliers.block(m0, ns));
      }
    }
  }
  _tile_release();
}

HF_INT8_TARGET_AMX void gemm_kblocked(const GemmProblem& p, const uint8_t* x_panels, int64_t n_begin, int64_t n_end,
                                      int64_t rows_per_block) {
  const int64_t kp = round_up(p.K, kKAlign);
  const int64_t panel_bytes = kp * 16;
  const int64_t m_panels = ceil_div(p.M, kPanelCols);
  const int64_t subs_max = ceil_div(rows_per_block, 32);
  const int64_t pairs_max = kKBlockTokens / 32;
  std::unique_ptr<int32_t[]> cbuf_owner(new int32_t[static_cast<size_t>(pairs_max * subs_max * 1024 + 16)]);
  int32_t* cbuf = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(cbuf_owner.get()) + 63) & ~uintptr_t(63));
  std::vector<int8_t> padded;
  FusedOutliers outliers(p);
  configure_tiles();
  for (int64_t nb = n_begin; nb < n_end; nb += rows_per_block) {
    const int64_t nb_end = std::min(n_end, nb + rows_per_block);
    const int64_t subs = ceil_div(nb_end - nb, 32);
    outliers.gather(nb, nb_end);
    // Weight rows of each 32-row sub-block: in place, or a zero-padded copy for the last rows.
    const int64_t last = nb + (subs - 1) * 32;
    const bool pad_last = needs_padded_rows(p, last);
    if (pad_last) copy_padded_rows(p, last, kp, padded);
    for (int64_t mb = 0; mb < p.M; mb += kKBlockTokens) {
      const int64_t pairs = ceil_div(std::min<int64_t>(kKBlockTokens, p.M - mb), 32);
      for (int64_t kc = 0; kc < kp; kc += kKBlockBytes) {
        const int64_t kc_end = std::min(kp, kc + kKBlockBytes);
        for (int64_t pr = 0; pr < pairs; ++pr) {
          const int64_t mp = mb / kPanelCols + 2 * pr;
          const uint8_t* x0 = x_panels + mp * panel_bytes;
          const uint8_t* x1 = mp + 1 < m_panels ? x0 + panel_bytes : nullptr;  // odd count: one token tile
          for (int64_t sb = 0; sb < subs; ++sb) {
            const bool tail = pad_last && sb == subs - 1;
            const int8_t* w = tail ? padded.data() : p.b + (nb + sb * 32) * p.ldb;
            const int64_t ldw = tail ? kp : p.ldb;
            int32_t* c = cbuf + (pr * subs + sb) * 1024;
            const bool first_pass = mb == 0;
            if (kc == 0) {
              first_pass ? block32_any<false, true>(w, ldw, x0, x1, kc, kc_end, c)
                         : block32_any<false, false>(w, ldw, x0, x1, kc, kc_end, c);
            } else {
              first_pass ? block32_any<true, true>(w, ldw, x0, x1, kc, kc_end, c)
                         : block32_any<true, false>(w, ldw, x0, x1, kc, kc_end, c);
            }
          }
        }
      }
      for (int64_t pr = 0; pr < pairs; ++pr) {
        const int64_t m0 = mb + pr * 32;
        for (int64_t sb = 0; sb < subs; ++sb) {
          const int64_t n0 = nb + sb * 32;
          finish_block(p, cbuf + (pr * subs + sb) * 1024, m0, p.M - m0, n0, std::min<int64_t>(32, nb_end - n0),
                       outliers.block(m0, n0));
        }
      }
    }
  }
  _tile_release();
}

}  // namespace hf_int8::cpu::amx

#else  // not x86

namespace hf_int8::cpu::amx {
bool available() { return false; }
bool bf16_available() { return false; }
void configure_tiles() {}
void pack_activations(const GemmProblem&, int64_t, int64_t, uint8_t*) {}
void gemm(const GemmProblem&, const uint8_t*, int64_t, int64_t, int64_t) {}
void gemm_kblocked(const GemmProblem&, const uint8_t*, int64_t, int64_t, int64_t) {}
}  // namespace hf_int8::cpu::amx

#endif  // HF_INT8_X86
