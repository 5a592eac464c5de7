// Memory read-bandwidth probe for scripts/bench_linear.py (exposed as hf_int8._C.stream_read).
//
// The "fraction of the bandwidth bound" a decode kernel reaches is only meaningful against a read that is as good as
// the hardware allows. Plain torch reductions read one stream per thread and stay well below what a core can pull
// (single thread here: torch.sum 6-7 GB/s, the decode kernel 11 GB/s), which made the bound look exceeded. This
// probe reads the buffer the way the small-M GEMM reads weights: each thread walks 8 equal slices of its share at
// once, 64 bytes per slice per step, with software prefetch 1 KiB ahead. It returns a checksum so the reads cannot be
// optimised away.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "hf_int8/cpu_kernels.h"

#if HF_INT8_X86
#include <immintrin.h>
#endif

namespace hf_int8::cpu {

namespace {

constexpr int64_t kStreams = 8;
constexpr int64_t kLine = 64;
constexpr int64_t kPrefetch = 1024;

uint64_t read_generic(const uint8_t* p, int64_t lines_per_stream, int64_t stride) {
  uint64_t acc = 0;
  for (int64_t l = 0; l < lines_per_stream; ++l) {
    for (int64_t s = 0; s < kStreams; ++s) {
      uint64_t v;
      std::memcpy(&v, p + s * stride + l * kLine, sizeof(v));
      acc ^= v;
    }
  }
  return acc;
}

#if HF_INT8_X86
HF_INT8_TARGET_AVX2 uint64_t read_avx2(const uint8_t* p, int64_t lines_per_stream, int64_t stride) {
  __m256i acc = _mm256_setzero_si256();
  for (int64_t l = 0; l < lines_per_stream; ++l) {
    for (int64_t s = 0; s < kStreams; ++s) {
      const uint8_t* q = p + s * stride + l * kLine;
      _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetch), _MM_HINT_T0);
      acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
      acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
    }
  }
  return static_cast<uint64_t>(_mm256_extract_epi64(acc, 0) ^ _mm256_extract_epi64(acc, 3));
}
#endif

}  // namespace

int64_t stream_read(const at::Tensor& buffer) {
  check_cpu(buffer, "buffer");
  TORCH_CHECK_VALUE(buffer.is_contiguous(), "hf_int8._C.stream_read: buffer must be contiguous");
  const auto* base = static_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() * static_cast<int64_t>(buffer.element_size());
  const int64_t chunk = kStreams * kLine * 1024;  // 512 KiB per work item
  const int64_t n_chunks = bytes / chunk;
  const bool avx2 = selected_isa() >= Isa::kAvx2;
  std::vector<uint64_t> sums(static_cast<size_t>(std::max<int64_t>(n_chunks, 1)), 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    // Each thread reads its contiguous share [c0, c1) as 8 slices in flight.
    const int64_t share = (c1 - c0) * chunk;
    const int64_t stride = share / kStreams;
    const uint8_t* p = base + c0 * chunk;
    uint64_t sum;
#if HF_INT8_X86
    sum = avx2 ? read_avx2(p, stride / kLine, stride) : read_generic(p, stride / kLine, stride);
#else
    (void)avx2;
    sum = read_generic(p, stride / kLine, stride);
#endif
    sums[static_cast<size_t>(c0)] = sum;
  });
  uint64_t total = 0;
  for (uint64_t s : sums) total ^= s;
  return static_cast<int64_t>(total);
}

}  // namespace hf_int8::cpu
