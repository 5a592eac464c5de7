// AMX-INT8 GEMM core for many tokens (Sapphire Rapids and later).
//
// TDPBSSD multiplies signed by signed bytes into int32 tiles, so no +128 shift is needed. B is packed per 16 columns
// into the same [K/4][16][4] layout as the VNNI path (K zero-padded to 64), which is exactly what a B tile holds for
// 64 bytes of K. A 32 x 32 block of C lives in four accumulator tiles while K is walked 64 bytes at a time (two A tiles
// read straight from the row-major activation codes, two B tiles from the packed panels); the block is then stored
// once and finished by the AVX-512 epilogue.
#include "hf_int8/cpu_avx512_epilogue.h"
#include "hf_int8/cpu_kernels.h"

#if HF_INT8_X86
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

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

bool detect() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_tile = (edx >> 24) & 1u, amx_int8 = (edx >> 25) & 1u;
  if (!amx_tile || !amx_int8) return false;
  // Linux hands out the 8 KiB tile state only on request; without it the first tile instruction faults.
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

HF_INT8_TARGET_AMX void configure_tiles() {
  TileConfig cfg;
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {  // 0-3: C (16 x 16 int32), 4-5: A (16 rows x 64 bytes), 6-7: B (16 groups x 64)
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// C[32][32] = A[32 rows, kp bytes] x panels (b0: columns 0-15, b1: columns 16-31), kp a multiple of 64.
HF_INT8_TARGET_AMX void block32(const int8_t* a, int64_t lda, const uint8_t* b0, const uint8_t* b1, int64_t kp,
                                int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < kp; k += 64) {
    _tile_loadd(4, a + k, lda);
    _tile_loadd(5, a + 16 * lda + k, lda);
    _tile_loadd(6, b0 + k * 16, 64);
    _tile_loadd(7, b1 + k * 16, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * 32, 128);
  _tile_stored(3, c + 16 * 32 + 16, 128);
}

}  // namespace

bool available() {
  static const bool ok = detect();
  return ok;
}

HF_INT8_TARGET_AMX void packed(const GemmProblem& p, int64_t n_begin, int64_t n_end, uint8_t* panels) {
  const int64_t kp = ceil_div(p.K, kKAlign) * kKAlign;
  const int64_t kq = kp / 4;
  const int64_t panel_bytes = kq * 64;
  const int64_t n_panels = ceil_div(n_end - n_begin, kPanelCols);
  for (int64_t q = 0; q < n_panels; ++q) {
    const int64_t n0 = n_begin + q * kPanelCols;
    avx512::pack_panel(p.b + n0 * p.ldb, p.ldb, std::min<int64_t>(kPanelCols, n_end - n0), p.K, kq,
                       /*flip=*/false, panels + q * panel_bytes);
  }
  configure_tiles();
  alignas(64) int32_t c[32 * 32];
  for (int64_t m0 = 0; m0 < p.M; m0 += kBlockRows) {
    const int64_t rows = std::min<int64_t>(kBlockRows, p.M - m0);
    for (int64_t q = 0; q < n_panels; q += 2) {
      const uint8_t* b0 = panels + q * panel_bytes;
      const uint8_t* b1 = q + 1 < n_panels ? b0 + panel_bytes : b0;  // odd count: the second half is not stored
      block32(p.a + m0 * p.lda, p.lda, b0, b1, kp, c);
      const int64_t n0 = n_begin + q * kPanelCols;
      const int64_t n_valid = std::min<int64_t>(2 * kPanelCols, n_end - n0);
      for (int64_t i = 0; i < rows; ++i) {
        avx512::finish16(p, m0 + i, n0, n_valid, _mm512_load_si512(c + i * 32));
        if (n_valid > 16) avx512::finish16(p, m0 + i, n0 + 16, n_valid - 16, _mm512_load_si512(c + i * 32 + 16));
      }
    }
  }
  _tile_release();
}

}  // namespace hf_int8::cpu::amx

#else  // not x86

namespace hf_int8::cpu::amx {
bool available() { return false; }
void packed(const GemmProblem&, int64_t, int64_t, uint8_t*) {}
}  // namespace hf_int8::cpu::amx

#endif  // HF_INT8_X86
