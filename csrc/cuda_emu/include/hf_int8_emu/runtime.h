// hf_int8's CUDA emulator: runs the unchanged CUDA kernels of csrc/cuda on the CPU, block by block, one cooperative
// fiber per CUDA thread, so that their logic (indexing, fragment layouts, synchronisation within a block) is tested
// in `make test` under AddressSanitizer and UndefinedBehaviorSanitizer on machines without a GPU.
//
// What is emulated, and how (the PTX ISA's definitions, written independently of csrc/include/hf_int8/tile_layout.h):
//  * __syncthreads: a block barrier; threads that have exited count as arrived.
//  * warp collectives (shfl.xor, ballot, any, ldmatrix, mma): every lane of the warp deposits its operands and waits
//    until all 32 have arrived; the last one computes the result for all. A collective reached by only part of a
//    warp (a lane exited, or lanes at different collectives) is reported as an error, as is a deadlock.
//  * global atomics (split-K): plain read-modify-writes, atomic because nothing else runs meanwhile; blocks run in
//    an order set by the schedule (forward, reverse, shuffled).
//  * cp.async: each copy is deferred to the latest moment the PTX memory model allows (the wait_group that retires
//    its group), so a missing wait or barrier reads stale shared memory instead of passing by luck.
//  * the order in which runnable threads resume is a run-time choice (forward, reverse, seeded random), so a result
//    that depends on it (a race) shows up as a difference between schedules.
// Not emulated: inter-block concurrency (blocks run one after another), timing, hardware encodings.
#pragma once

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef HF_INT8_EMU_SM
#define HF_INT8_EMU_SM 800
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct alignas(8) uint2 {
  unsigned x, y;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
typedef struct HfInt8EmuStream* cudaStream_t;

namespace hf_int8 {
namespace emu {

enum class Schedule { kForward, kReverse, kRandom };

// Scheduling policy for the following launches (the driver sets it from the command line).
void set_schedule(Schedule schedule, uint64_t seed);

struct Coords {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
// Coordinates of the CUDA thread running now.
const Coords& coords();

void syncthreads();

// Warp collectives (full warp).
uint32_t shfl_xor_bits(uint32_t bits, int lane_mask);
template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable<T>::value, "32-bit shuffles only");
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = shfl_xor_bits(bits, lane_mask);
  std::memcpy(&v, &bits, 4);
  return v;
}
unsigned ballot(bool pred);
bool any(bool pred);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row);
void mma_m16n8k32_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void mma_m8n8k16_s8(int& c0, int& c1, uint32_t a, uint32_t b);
void mma_m16n8k16_float(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16);

// Per-thread operations.
int dp4a(int a, int b, int c);
uint4 load16(const void* p);  // checks 16-byte alignment, like the hardware
void cp_async16(void* smem_dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
void atomic_add(int* p, int v);
unsigned atomic_add(unsigned* p, unsigned v);
void fence_device();
int load_l2(const int* p);
float load_l2(const float* p);

[[noreturn]] void trap(const char* what);
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

cudaError_t memset_async(void* p, int value, size_t bytes);
cudaError_t take_last_error();

// Runs `body(closure)` once per thread of every block of the grid. Invalid launch configurations (empty grid, more
// than 1024 threads, ...) are reported as cudaErrorInvalidConfiguration through cudaGetLastError, as on a GPU.
void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* closure);

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, Args&&... args) {
  struct Closure {
    void (*kernel)(KernelArgs...);
    std::tuple<std::decay_t<Args>...> args;
  } closure{kernel, std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...)};
  run_grid(
      grid, block,
      [](void* p) {
        auto* c = static_cast<Closure*>(p);
        std::apply(c->kernel, c->args);  // every thread gets the kernel parameters by value, as on the device
      },
      &closure);
}

// Counters of the last run_grid calls since reset (for the driver's report).
struct Stats {
  uint64_t blocks = 0, threads = 0, switches = 0, barriers = 0, collectives = 0;
};
Stats& stats();

}  // namespace emu
}  // namespace hf_int8
