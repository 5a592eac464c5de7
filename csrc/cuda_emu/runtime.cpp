// The CUDA emulator's runtime (see include/hf_int8_emu/runtime.h): fibers, block barrier, warp collectives, cp.async
// groups. x86-64 only (the fiber switch is a few lines of assembly); built without the sanitizers' instrumentation
// but with their fiber annotations, so that AddressSanitizer follows the stack switches of the instrumented kernels,
// and ThreadSanitizer sees each CUDA thread as a thread of its own: switches between fibers carry no ordering, a
// block barrier orders everything before it against everything after it, and warp collectives order nothing (as
// under independent thread scheduling), so shared memory used across threads without a barrier is reported as a
// data race whatever the schedule.
#include "hf_int8_emu/runtime.h"

#include <pthread.h>
#include <sys/mman.h>

#include <xmmintrin.h>
#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

// The runtime itself is built without instrumentation; HF_INT8_EMU_ASAN_FIBERS keeps the fiber annotations that an
// AddressSanitizer build of the kernels needs.
#if defined(__SANITIZE_ADDRESS__) || defined(HF_INT8_EMU_ASAN_FIBERS)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define HF_INT8_EMU_ASAN 1
#endif

#if defined(HF_INT8_EMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_read_range(void* addr, unsigned long size);
void __tsan_write_range(void* addr, unsigned long size);
}
namespace {
constexpr unsigned kTsanSwitchNoSync = 1;  // __tsan_switch_to_fiber_no_sync
void tsan_acquire(void* sync) { __tsan_acquire(sync); }
void tsan_release(void* sync) { __tsan_release(sync); }
void tsan_read(const void* p, size_t n) { __tsan_read_range(const_cast<void*>(p), n); }
void tsan_write(void* p, size_t n) { __tsan_write_range(p, n); }
}  // namespace
#else
namespace {
void tsan_acquire(void*) {}
void tsan_release(void*) {}
void tsan_read(const void*, size_t) {}
void tsan_write(void*, size_t) {}
}  // namespace
#endif

// switch_stack(save, load): saves the callee-saved registers and the FP control words on the current stack, stores
// the stack pointer in *save, loads `load` and restores the same from there.
extern "C" void hf_int8_emu_switch_stack(void** save, void* load);
asm(R"(
  .text
  .globl hf_int8_emu_switch_stack
  .type hf_int8_emu_switch_stack, @function
hf_int8_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size hf_int8_emu_switch_stack, .-hf_int8_emu_switch_stack
  .section .note.GNU-stack,"",@progbits
  .text
)");

namespace hf_int8 {
namespace emu {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = size_t(256) << 10;  // ASan's redzones make kernel frames several times larger

enum class Wait { kReady, kBarrier, kWarp, kDone };
enum class Op { kNone, kShfl, kBallot, kAny, kLdmatrix, kMma16832, kMma8816, kMma16816F };

const char* op_name(Op op) {
  switch (op) {
    case Op::kShfl: return "shfl.xor";
    case Op::kBallot: return "vote.ballot";
    case Op::kAny: return "vote.any";
    case Op::kLdmatrix: return "ldmatrix.x4";
    case Op::kMma16832: return "mma.m16n8k32";
    case Op::kMma8816: return "mma.m8n8k16";
    case Op::kMma16816F: return "mma.m16n8k16.f32";
    default: return "none";
  }
}

struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Fiber {
  void* sp = nullptr;
  void* tsan_fiber = nullptr;
  char* stack = nullptr;
  void* asan_fake_stack = nullptr;
  Coords coords{};
  int linear = 0, warp = 0, lane = 0;
  Wait wait = Wait::kReady;
  uint64_t wait_gen = 0;
  std::vector<PendingCopy> open_group;
  std::vector<std::vector<PendingCopy>> committed;  // oldest first
};

struct LaneIO {
  uint32_t in[10];
  uint32_t out[4];
};

struct WarpState {
  int arrived = 0;
  uint64_t gen = 0;
  Op op = Op::kNone;
  int exited = 0;
  LaneIO io[kWarpSize];
};

struct Block {
  std::vector<Fiber> fibers;  // kept between blocks (their stacks are reused)
  std::vector<WarpState> warps;
  int nthreads = 0;
  int live = 0;
  int barrier_arrived = 0;
  uint64_t barrier_gen = 0;
  int current = -1;
  void* main_sp = nullptr;
  void* main_fake_stack = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
  Schedule schedule = Schedule::kForward;
  std::mt19937_64 rng{0};
  cudaError_t last_error = cudaSuccess;
  void* main_tsan_fiber = nullptr;
  // ThreadSanitizer sync objects (their addresses): the barrier, a block's start (released by the launching thread
  // only) and its end (released by every exiting thread).
  char barrier_sync = 0, block_start_sync = 0, block_end_sync = 0;
};

Block g;
Stats g_stats;

Fiber& self() { return g.fibers[g.current]; }

[[noreturn]] void vfail(const char* fmt, va_list ap) {
  std::fprintf(stderr, "hf_int8 CUDA emulator: ");
  if (g.current >= 0) {
    const Coords& c = g.fibers[g.current].coords;
    std::fprintf(stderr, "block (%u, %u, %u) thread (%u, %u, %u): ", c.block_idx.x, c.block_idx.y, c.block_idx.z,
                 c.thread_idx.x, c.thread_idx.y, c.thread_idx.z);
  }
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(3);
}

// ---- context switching ----
void switch_to(int to, bool exiting) {
  void** save = g.current >= 0 ? &g.fibers[g.current].sp : &g.main_sp;
  void* load = to >= 0 ? g.fibers[to].sp : g.main_sp;
#if defined(HF_INT8_EMU_ASAN)
  void** fake_save = exiting ? nullptr : (g.current >= 0 ? &g.fibers[g.current].asan_fake_stack : &g.main_fake_stack);
  if (to >= 0) {
    __sanitizer_start_switch_fiber(fake_save, g.fibers[to].stack, kStackBytes);
  } else {
    __sanitizer_start_switch_fiber(fake_save, g.main_stack_bottom, g.main_stack_size);
  }
#else
  (void)exiting;
#endif
  const int from = g.current;
  g.current = to;
  ++g_stats.switches;
#if defined(HF_INT8_EMU_TSAN)
  __tsan_switch_to_fiber(to >= 0 ? g.fibers[to].tsan_fiber : g.main_tsan_fiber, kTsanSwitchNoSync);
#endif
  hf_int8_emu_switch_stack(save, load);
  // Resumed: whoever switched back set g.current to us.
#if defined(HF_INT8_EMU_ASAN)
  __sanitizer_finish_switch_fiber(from >= 0 ? g.fibers[from].asan_fake_stack : g.main_fake_stack, nullptr, nullptr);
#else
  (void)from;
#endif
}

bool runnable(const Fiber& f) {
  switch (f.wait) {
    case Wait::kReady: return true;
    case Wait::kBarrier: return g.barrier_gen != f.wait_gen;
    case Wait::kWarp: return g.warps[f.warp].gen != f.wait_gen;
    default: return false;
  }
}

[[noreturn]] void report_deadlock() {
  std::fprintf(stderr, "hf_int8 CUDA emulator: deadlock in block (%u, %u, %u): no thread can proceed\n",
               g.fibers[0].coords.block_idx.x, g.fibers[0].coords.block_idx.y, g.fibers[0].coords.block_idx.z);
  int shown = 0;
  for (int i = 0; i < g.nthreads && shown < 8; ++i) {
    const Fiber& f = g.fibers[i];
    if (f.wait == Wait::kDone) continue;
    std::fprintf(stderr, "  thread %d (warp %d lane %d) waits at %s\n", i, f.warp, f.lane,
                 f.wait == Wait::kBarrier ? "__syncthreads" : op_name(g.warps[f.warp].op));
    ++shown;
  }
  std::_Exit(3);
}

// Next thread to run after the current one, by the schedule; -1 when none is runnable.
int pick_next() {
  const int n = g.nthreads;
  const int cur = g.current < 0 ? 0 : g.current;
  if (g.schedule == Schedule::kRandom) {
    int candidates = 0;
    for (int i = 0; i < n; ++i) candidates += runnable(g.fibers[i]) ? 1 : 0;
    if (candidates == 0) return -1;
    int pick = static_cast<int>(g.rng() % static_cast<uint64_t>(candidates));
    for (int i = 0; i < n; ++i)
      if (runnable(g.fibers[i]) && pick-- == 0) return i;
    return -1;
  }
  for (int step = 1; step <= n; ++step) {
    const int j = g.schedule == Schedule::kForward ? (cur + step) % n : ((cur - step) % n + n) % n;
    if (runnable(g.fibers[j])) return j;
  }
  return -1;
}

// The current thread waits (its wait state is set); run others until it can go on.
void block_current() {
  const int next = pick_next();
  if (next < 0) report_deadlock();
  if (next != g.current) switch_to(next, false);
  self().wait = Wait::kReady;
}

void materialize(std::vector<PendingCopy>& group) {
  for (const PendingCopy& c : group) {
    tsan_write(c.dst, 16);  // the issuing thread's write, at the moment it becomes visible
    std::memcpy(c.dst, c.bytes, 16);
  }
  group.clear();
}

extern "C" [[noreturn]] void hf_int8_emu_fiber_main() {
#if defined(HF_INT8_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  tsan_acquire(&g.block_start_sync);
  g.body(g.closure);
  Fiber& f = self();
  // Copies still in flight at exit land anyway (nothing can read them in this block any more).
  for (auto& group : f.committed) materialize(group);
  f.committed.clear();
  materialize(f.open_group);
  f.wait = Wait::kDone;
  tsan_release(&g.block_end_sync);
  tsan_release(&g.barrier_sync);  // an exited thread counts as arrived at every later barrier
  --g.live;
  WarpState& w = g.warps[f.warp];
  ++w.exited;
  if (w.arrived > 0) fail("lane %d exited while %d lane(s) of its warp wait in %s", f.lane, w.arrived, op_name(w.op));
  if (g.barrier_arrived > 0 && g.barrier_arrived == g.live) {  // exited threads count as arrived
    g.barrier_arrived = 0;
    ++g.barrier_gen;
  }
  const int next = g.live > 0 ? pick_next() : -1;
  if (g.live > 0 && next < 0) report_deadlock();
  switch_to(next, true);
  __builtin_unreachable();
}

void init_stack(Fiber& f) {
#if defined(HF_INT8_EMU_TSAN)
  if (f.tsan_fiber == nullptr) f.tsan_fiber = __tsan_create_fiber(0);
#endif
  if (f.stack == nullptr) {
    void* mem = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) fail("cannot map a %zu-byte fiber stack", kStackBytes);
    f.stack = static_cast<char*>(mem);
  }
#if defined(HF_INT8_EMU_ASAN)
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
  // Frame for the first switch into this fiber: FP control words, six callee-saved registers, return address.
  // The return address sits 16 bytes below the 16-byte aligned top, so the entry sees rsp % 16 == 8 as after a call.
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(&hf_int8_emu_fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  --sp;
  uint32_t control[2] = {_mm_getcsr(), 0x037fu};
  std::memcpy(sp, control, sizeof(control));
  f.sp = sp;
}

void run_block(dim3 grid, dim3 block, dim3 block_idx) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  g.nthreads = n;
  g.live = n;
  g.barrier_arrived = 0;
  g.warps.assign(static_cast<size_t>((n + kWarpSize - 1) / kWarpSize), WarpState{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    f.coords.thread_idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.coords.block_idx = block_idx;
    f.coords.block_dim = block;
    f.coords.grid_dim = grid;
    f.linear = i;
    f.warp = i / kWarpSize;
    f.lane = i % kWarpSize;
    f.wait = Wait::kReady;
    f.open_group.clear();
    f.committed.clear();
    init_stack(f);
  }
  g.current = -1;
  const int first = g.schedule == Schedule::kReverse  ? n - 1
                    : g.schedule == Schedule::kRandom ? static_cast<int>(g.rng() % static_cast<uint64_t>(n))
                                                      : 0;
  tsan_release(&g.block_start_sync);
  switch_to(first, false);
  tsan_acquire(&g.block_end_sync);
  if (g.live != 0) fail("block ended with %d live threads", g.live);
  ++g_stats.blocks;
  g_stats.threads += static_cast<uint64_t>(n);
}

// Runs a warp collective for the current lane: deposits `in`, waits for all 32 lanes, copies the lane's result out.
// `compute` fills io[].out for every lane once all have arrived.
template <typename Compute>
void collective(Op op, const uint32_t* in, int nin, uint32_t* out, int nout, Compute compute) {
  Fiber& f = self();
  WarpState& w = g.warps[f.warp];
  const int warp_lanes = std::min(kWarpSize, g.nthreads - f.warp * kWarpSize);
  if (warp_lanes != kWarpSize) fail("%s with a full-warp mask in a partial warp of %d lanes", op_name(op), warp_lanes);
  if (w.exited > 0) fail("%s with a full-warp mask after %d lane(s) of the warp exited", op_name(op), w.exited);
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("divergent warp: lane %d reached %s while other lanes wait in %s", f.lane, op_name(op), op_name(w.op));
  }
  std::memcpy(w.io[f.lane].in, in, sizeof(uint32_t) * static_cast<size_t>(nin));
  ++g_stats.collectives;
  if (++w.arrived == kWarpSize) {
    compute(w.io);
    w.arrived = 0;
    ++w.gen;
  } else {
    f.wait = Wait::kWarp;
    f.wait_gen = w.gen;
    block_current();
  }
  std::memcpy(out, w.io[f.lane].out, sizeof(uint32_t) * static_cast<size_t>(nout));
}

int8_t byte_of(uint32_t word, int i) { return static_cast<int8_t>(static_cast<uint8_t>(word >> (8 * i))); }

}  // namespace

void set_schedule(Schedule schedule, uint64_t seed) {
  g.schedule = schedule;
  g.rng.seed(seed);
}

const Coords& coords() { return self().coords; }

Stats& stats() { return g_stats; }

void syncthreads() {
  Fiber& f = self();
  if (g.warps[f.warp].arrived > 0)
    fail("__syncthreads while %d lane(s) of warp %d wait in %s", g.warps[f.warp].arrived, f.warp,
         op_name(g.warps[f.warp].op));
  ++g_stats.barriers;
  tsan_release(&g.barrier_sync);
  if (++g.barrier_arrived == g.live) {
    g.barrier_arrived = 0;
    ++g.barrier_gen;
  } else {
    f.wait = Wait::kBarrier;
    f.wait_gen = g.barrier_gen;
    block_current();
  }
  tsan_acquire(&g.barrier_sync);
}

uint32_t shfl_xor_bits(uint32_t bits, int lane_mask) {
  const uint32_t in[2] = {bits, static_cast<uint32_t>(lane_mask)};
  uint32_t out = 0;
  collective(Op::kShfl, in, 2, &out, 1, [](LaneIO* io) {
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int src = lane ^ static_cast<int>(io[lane].in[1]);
      io[lane].out[0] = src < kWarpSize ? io[src].in[0] : io[lane].in[0];
    }
  });
  return out;
}

unsigned ballot(bool pred) {
  const uint32_t in = pred ? 1u : 0u;
  uint32_t out = 0;
  collective(Op::kBallot, &in, 1, &out, 1, [](LaneIO* io) {
    uint32_t mask = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) mask |= (io[lane].in[0] & 1u) << lane;
    for (int lane = 0; lane < kWarpSize; ++lane) io[lane].out[0] = mask;
  });
  return out;
}

bool any(bool pred) {
  const uint32_t in = pred ? 1u : 0u;
  uint32_t out = 0;
  collective(Op::kAny, &in, 1, &out, 1, [](LaneIO* io) {
    uint32_t found = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) found |= io[lane].in[0];
    for (int lane = 0; lane < kWarpSize; ++lane) io[lane].out[0] = found;
  });
  return out != 0;
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  // Each lane reads the 16-byte row it addresses (so the sanitizers see the access in that lane's context).
  if ((reinterpret_cast<uintptr_t>(smem_row) & 15u) != 0)
    fail("ldmatrix row address %p is not 16-byte aligned", smem_row);
  uint32_t row[4];
  tsan_read(smem_row, 16);
  std::memcpy(row, smem_row, 16);
  collective(Op::kLdmatrix, row, 4, r, 4, [](LaneIO* io) {
    // PTX ISA, ldmatrix .m8n8 .x4 .b16: lanes 8q..8q+7 address rows 0..7 of matrix q; lane i receives in register
    // q the two b16 elements 2 (i % 4), 2 (i % 4) + 1 of row i / 4 of matrix q, i.e. 32-bit word i % 4 of the row.
    for (int lane = 0; lane < kWarpSize; ++lane)
      for (int q = 0; q < 4; ++q) io[lane].out[q] = io[8 * q + lane / 4].in[lane % 4];
  });
}

void mma_m16n8k32_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t in[10];
  for (int i = 0; i < 4; ++i) in[i] = a[i];
  for (int i = 0; i < 2; ++i) in[4 + i] = b[i];
  for (int i = 0; i < 4; ++i) in[6 + i] = static_cast<uint32_t>(c[i]);
  uint32_t out[4];
  collective(Op::kMma16832, in, 10, out, 4, [](LaneIO* io) {
    // PTX ISA, "Matrix Fragments for mma.m16n8k32" (.s8), groupID = lane >> 2, threadID_in_group = lane % 4:
    //  A element a_i (i = 0..15, byte i % 4 of register i / 4): row groupID (+8 for 4 <= i < 8 and i >= 12),
    //    column threadID_in_group * 4 + (i & 3) (+16 for i >= 8);
    //  B element b_i (i = 0..7): row threadID_in_group * 4 + (i & 3) (+16 for i >= 4), column groupID;
    //  C/D element c_i (i = 0..3): row groupID (+8 for i >= 2), column threadID_in_group * 2 + (i & 1).
    int8_t A[16][32], B[32][8];
    int32_t C[16][8];
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int gid = lane >> 2, tig = lane & 3;
      for (int i = 0; i < 16; ++i) {
        const int row = gid + ((i >= 4 && i < 8) || i >= 12 ? 8 : 0);
        const int col = tig * 4 + (i & 3) + (i >= 8 ? 16 : 0);
        A[row][col] = byte_of(io[lane].in[i / 4], i % 4);
      }
      for (int i = 0; i < 8; ++i) {
        const int row = tig * 4 + (i & 3) + (i >= 4 ? 16 : 0);
        B[row][gid] = byte_of(io[lane].in[4 + i / 4], i % 4);
      }
      for (int i = 0; i < 4; ++i)
        C[gid + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)] = static_cast<int32_t>(io[lane].in[6 + i]);
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int gid = lane >> 2, tig = lane & 3;
      for (int i = 0; i < 4; ++i) {
        const int row = gid + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
        int64_t acc = C[row][col];
        for (int kk = 0; kk < 32; ++kk) acc += int32_t(A[row][kk]) * int32_t(B[kk][col]);
        io[lane].out[i] = static_cast<uint32_t>(acc);  // .s32 accumulation wraps (no .satfinite)
      }
    }
  });
  for (int i = 0; i < 4; ++i) c[i] = static_cast<int>(out[i]);
}

void mma_m8n8k16_s8(int& c0, int& c1, uint32_t a, uint32_t b) {
  const uint32_t in[4] = {a, b, static_cast<uint32_t>(c0), static_cast<uint32_t>(c1)};
  uint32_t out[2];
  collective(Op::kMma8816, in, 4, out, 2, [](LaneIO* io) {
    // PTX ISA, "Matrix Fragments for mma.m8n8k16" (.s8): A element a_i (i = 0..3): row groupID, column
    // threadID_in_group * 4 + i; B element b_i: row threadID_in_group * 4 + i, column groupID; C/D element c_i
    // (i = 0..1): row groupID, column threadID_in_group * 2 + i.
    int8_t A[8][16], B[16][8];
    int32_t C[8][8];
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int gid = lane >> 2, tig = lane & 3;
      for (int i = 0; i < 4; ++i) {
        A[gid][tig * 4 + i] = byte_of(io[lane].in[0], i);
        B[tig * 4 + i][gid] = byte_of(io[lane].in[1], i);
      }
      for (int i = 0; i < 2; ++i) C[gid][tig * 2 + i] = static_cast<int32_t>(io[lane].in[2 + i]);
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int gid = lane >> 2, tig = lane & 3;
      for (int i = 0; i < 2; ++i) {
        int64_t acc = C[gid][tig * 2 + i];
        for (int kk = 0; kk < 16; ++kk) acc += int32_t(A[gid][kk]) * int32_t(B[kk][tig * 2 + i]);
        io[lane].out[i] = static_cast<uint32_t>(acc);
      }
    }
  });
  c0 = static_cast<int>(out[0]);
  c1 = static_cast<int>(out[1]);
}

// A 16-bit element of an f16 or bf16 mma operand register, as a float (exact).
float half_element(uint32_t word, int i, bool bf16) {
  const auto bits = static_cast<uint16_t>(word >> (16 * i));
  if (bf16) {
    const uint32_t f32 = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &f32, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

void mma_m16n8k16_float(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  uint32_t in[10];
  for (int i = 0; i < 4; ++i) in[i] = a[i];
  for (int i = 0; i < 2; ++i) in[4 + i] = b[i];
  for (int i = 0; i < 4; ++i) std::memcpy(&in[6 + i], &c[i], 4);
  uint32_t out[4];
  auto compute = [](LaneIO* io, bool is_bf16) {
    // PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16/.bf16), groupID = lane >> 2,
    // threadID_in_group = lane % 4: A element a_i (i = 0..7, half i % 2 of register i / 2): row groupID (+8 for
    // i in {2, 3, 6, 7}), column threadID_in_group * 2 + (i & 1) (+8 for i >= 4); B element b_i (i = 0..3): row
    // threadID_in_group * 2 + (i & 1) (+8 for i >= 2), column groupID; C/D as for mma.m16n8k32.
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int gid = lane >> 2, tig = lane & 3;
      for (int i = 0; i < 8; ++i) {
        const int row = gid + ((i & 2) != 0 ? 8 : 0);
        const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = half_element(io[lane].in[i / 2], i % 2, is_bf16);
      }
      for (int i = 0; i < 4; ++i)
        B[tig * 2 + (i & 1) + (i >= 2 ? 8 : 0)][gid] = half_element(io[lane].in[4 + i / 2], i % 2, is_bf16);
      for (int i = 0; i < 4; ++i) std::memcpy(&C[gid + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)], &io[lane].in[6 + i], 4);
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int gid = lane >> 2, tig = lane & 3;
      for (int i = 0; i < 4; ++i) {
        const int row = gid + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
        // Products of 16-bit floats are exact in double; the hardware's fp32 accumulation order and rounding are
        // unspecified, so the emulator sums exactly (in double) and rounds once.
        double acc = C[row][col];
        for (int kk = 0; kk < 16; ++kk) acc += double(A[row][kk]) * double(B[kk][col]);
        const auto v = static_cast<float>(acc);
        std::memcpy(&io[lane].out[i], &v, 4);
      }
    }
  };
  if (bf16) {
    collective(Op::kMma16816F, in, 10, out, 4, [&](LaneIO* io) { compute(io, true); });
  } else {
    collective(Op::kMma16816F, in, 10, out, 4, [&](LaneIO* io) { compute(io, false); });
  }
  for (int i = 0; i < 4; ++i) std::memcpy(&c[i], &out[i], 4);
}

// Blocks run one after another and the threads of a block are fibers of one OS thread, so plain read-modify-writes
// are atomic here; the sanitizers see them as accesses of the issuing thread.
void atomic_add(int* p, int v) {
  tsan_write(p, 4);
  *p = static_cast<int>(static_cast<uint32_t>(*p) + static_cast<uint32_t>(v));  // wraps like red.add.s32
}

unsigned atomic_add(unsigned* p, unsigned v) {
  tsan_write(p, 4);
  const unsigned old = *p;
  *p = old + v;
  return old;
}

void fence_device() {}

int load_l2(const int* p) {
  tsan_read(p, 4);
  return *p;
}

float load_l2(const float* p) {
  tsan_read(p, 4);
  return *p;
}

int dp4a(int a, int b, int c) {
  const auto ua = static_cast<uint32_t>(a), ub = static_cast<uint32_t>(b);
  int64_t acc = c;
  for (int i = 0; i < 4; ++i) acc += int32_t(byte_of(ua, i)) * int32_t(byte_of(ub, i));
  return static_cast<int>(static_cast<uint32_t>(acc));
}

uint4 load16(const void* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0)
    fail("16-byte global load from %p, which is not 16-byte aligned", p);
  uint4 v;
  tsan_read(p, 16);
  std::memcpy(&v, p, 16);
  return v;
}

void cp_async16(void* smem_dst, const void* src, int src_bytes) {
  if (src_bytes != 0 && src_bytes != 16) fail("cp.async src-size %d (the kernels use 0 or 16)", src_bytes);
  if ((reinterpret_cast<uintptr_t>(smem_dst) & 15u) != 0)
    fail("cp.async destination %p is not 16-byte aligned", smem_dst);
  if (src_bytes > 0 && (reinterpret_cast<uintptr_t>(src) & 15u) != 0)
    fail("cp.async source %p is not 16-byte aligned", src);
  PendingCopy copy;
  copy.dst = smem_dst;
  std::memset(copy.bytes, 0, sizeof(copy.bytes));
  if (src_bytes > 0) {
    tsan_read(src, static_cast<size_t>(src_bytes));
    std::memcpy(copy.bytes, src, static_cast<size_t>(src_bytes));
  }
  self().open_group.push_back(copy);
}

void cp_async_commit() {
  Fiber& f = self();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = self();
  // The oldest groups complete first: everything but the newest `pending` committed groups lands now, not earlier.
  while (static_cast<int>(f.committed.size()) > pending) {
    materialize(f.committed.front());
    f.committed.erase(f.committed.begin());
  }
}

[[noreturn]] void trap(const char* what) { fail("%s", what); }

[[noreturn]] void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(fmt, ap);
}

cudaError_t memset_async(void* p, int value, size_t bytes) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t take_last_error() {
  const cudaError_t e = g.last_error;
  g.last_error = cudaSuccess;
  return e;
}

void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* closure) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    g.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (g.main_stack_bottom == nullptr) {
    pthread_attr_t attr;
    void* addr = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &addr, &size);
      pthread_attr_destroy(&attr);
    }
    g.main_stack_bottom = addr;
    g.main_stack_size = size;
  }
  if (g.fibers.size() < threads) g.fibers.resize(threads);
#if defined(HF_INT8_EMU_TSAN)
  if (g.main_tsan_fiber == nullptr) g.main_tsan_fiber = __tsan_get_current_fiber();
#endif
  g.body = body;
  g.closure = closure;
  // Blocks run in an order set by the schedule too (forward, reverse, shuffled), so a kernel whose blocks
  // coordinate (split-K's last-arriving block) is tested with the last block being any of them.
  std::vector<dim3> order;
  order.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  if (g.schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
  if (g.schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), g.rng);
  for (const dim3& b : order) run_block(grid, block, b);
  g.current = -1;
}

}  // namespace emu
}  // namespace hf_int8
