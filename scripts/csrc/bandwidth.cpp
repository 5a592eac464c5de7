// Memory read-bandwidth probe of scripts/bench_linear.py: a development tool, not part of the installed package.
// bench_linear.py builds it on first use with torch.utils.cpp_extension.load (cached in the torch extensions folder)
// as the module `hf_int8_stream_read`; it needs nothing from csrc/.
//
// The "fraction of the bandwidth bound" a decode kernel reaches is only meaningful against a read that is as good as
// the hardware allows. Plain torch reductions read one stream per thread and stay well below what a core can pull
// (single thread here: torch.sum 6-7 GB/s, the decode kernel 11 GB/s), which made the bound look exceeded. This
// probe reads the buffer the way the small-M GEMM reads weights: each thread walks 8 equal slices of its share at
// once, 64 bytes per slice per step, with software prefetch 1 KiB ahead. It returns a checksum so the reads cannot be
// optimised away.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define PROBE_X86 1
#include <immintrin.h>
#else
#define PROBE_X86 0
#endif

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

#if PROBE_X86
// Compiled for AVX2 on its own (no -march), so the module loads on any x86-64 and only calls it where AVX2 exists.
__attribute__((target("avx2"))) uint64_t read_avx2(const uint8_t* p, int64_t lines_per_stream, int64_t stride) {
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

bool cpu_has_avx2() {
#if PROBE_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// Reads every byte of `buffer` as fast as a core can stream; returns a checksum. `avx2`: use AVX2 loads where the
// CPU has them (the caller passes false when the kernels it compares against are capped below AVX2).
int64_t stream_read(const at::Tensor& buffer, bool avx2) {
  TORCH_CHECK_VALUE(buffer.device().is_cpu(), "stream_read: buffer must be on the CPU, got ", buffer.device());
  TORCH_CHECK_VALUE(buffer.is_contiguous(), "stream_read: buffer must be contiguous");
  const auto* base = static_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() * static_cast<int64_t>(buffer.element_size());
  const int64_t chunk = kStreams * kLine * 1024;  // 512 KiB per work item
  const int64_t n_chunks = bytes / chunk;
  const bool use_avx2 = avx2 && cpu_has_avx2();
  std::vector<uint64_t> sums(static_cast<size_t>(std::max<int64_t>(n_chunks, 1)), 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    // Each thread reads its contiguous share [c0, c1) as 8 slices in flight.
    const int64_t share = (c1 - c0) * chunk;
    const int64_t stride = share / kStreams;
    const uint8_t* p = base + c0 * chunk;
    uint64_t sum;
#if PROBE_X86
    sum = use_avx2 ? read_avx2(p, stride / kLine, stride) : read_generic(p, stride / kLine, stride);
#else
    (void)use_avx2;
    sum = read_generic(p, stride / kLine, stride);
#endif
    sums[static_cast<size_t>(c0)] = sum;
  });
  uint64_t total = 0;
  for (uint64_t s : sums) total ^= s;
  return static_cast<int64_t>(total);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Memory read-bandwidth probe of scripts/bench_linear.py";
  m.def("stream_read", &stream_read,
        "Reads a contiguous CPU buffer like the decode kernel reads weights (8 streams per thread, prefetch); returns "
        "a checksum",
        pybind11::arg("buffer"), pybind11::arg("avx2") = true);
}
