// The PTX-level primitives the hf_int8 CUDA kernels use, in one place, with two implementations:
//  * on the device (nvcc, __CUDA_ARCH__ set): inline PTX or the CUDA intrinsic that emits it;
//  * on the host (HF_INT8_CUDA_EMULATION, csrc/cuda_emu): the emulator's implementation of the same instruction,
//    written from the PTX ISA's definition (fragment layouts, zero-fill, group semantics), so that the unchanged
//    kernel bodies run on a CPU under the sanitizers (tests/test_cuda_emulation.py).
// Kernels call only these for warp-level and asynchronous operations; nothing else in csrc/cuda uses inline PTX.
//
// HF_INT8_SM is the architecture the code is compiled for (__CUDA_ARCH__ on the device, HF_INT8_EMU_SM in the
// emulator): 800+ uses cp.async and mma.m16n8k32; 750 copies through registers and splits the MMA into four
// mma.m8n8k16 on the same fragments (tile_layout.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(HF_INT8_CUDA_EMULATION)
#include "hf_int8_emu/runtime.h"
#define HF_INT8_SM HF_INT8_EMU_SM
#elif defined(__CUDA_ARCH__)
#define HF_INT8_SM __CUDA_ARCH__
#else
#define HF_INT8_SM 0  // host pass of nvcc: device bodies are not compiled for the host
#endif

namespace hf_int8 {
namespace ptx {

constexpr unsigned kFullWarp = 0xffffffffu;

// ---- warp collectives (all 32 lanes, full mask) ----
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
#if defined(HF_INT8_CUDA_EMULATION)
  return ::hf_int8::emu::shfl_xor(v, lane_mask);
#else
  return __shfl_xor_sync(kFullWarp, v, lane_mask);
#endif
}

__device__ __forceinline__ unsigned ballot(bool pred) {
#if defined(HF_INT8_CUDA_EMULATION)
  return ::hf_int8::emu::ballot(pred);
#else
  return __ballot_sync(kFullWarp, pred);
#endif
}

__device__ __forceinline__ bool any(bool pred) {
#if defined(HF_INT8_CUDA_EMULATION)
  return ::hf_int8::emu::any(pred);
#else
  return __any_sync(kFullWarp, pred) != 0;
#endif
}

// ---- per-thread integer and memory operations ----
// Sum of the four signed byte products of a and b, plus c (dp4a.s32.s32).
__device__ __forceinline__ int dp4a(int a, int b, int c) {
#if defined(HF_INT8_CUDA_EMULATION)
  return ::hf_int8::emu::dp4a(a, b, c);
#else
  return __dp4a(a, b, c);
#endif
}

// 16-byte global loads: streaming (evict-first, ld.global.cs) and read-only cached (ld.global.nc).
__device__ __forceinline__ uint4 load_stream16(const void* p) {
#if defined(HF_INT8_CUDA_EMULATION)
  return ::hf_int8::emu::load16(p);
#else
  return __ldcs(reinterpret_cast<const uint4*>(p));
#endif
}

__device__ __forceinline__ uint4 load_cached16(const void* p) {
#if defined(HF_INT8_CUDA_EMULATION)
  return ::hf_int8::emu::load16(p);
#else
  return __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

// ---- asynchronous global -> shared copies (sm_80+) ----
// cp.async.cg.shared.global [dst], [src], 16, src_bytes: copies src_bytes (0 or 16) and zero-fills the rest.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src, int src_bytes) {
#if HF_INT8_SM >= 800 && defined(HF_INT8_CUDA_EMULATION)
  ::hf_int8::emu::cp_async16(smem_dst, src, src_bytes);
#elif HF_INT8_SM >= 800
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#else
  (void)smem_dst;
  (void)src;
  (void)src_bytes;
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if HF_INT8_SM >= 800 && defined(HF_INT8_CUDA_EMULATION)
  ::hf_int8::emu::cp_async_commit();
#elif HF_INT8_SM >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if HF_INT8_SM >= 800 && defined(HF_INT8_CUDA_EMULATION)
  ::hf_int8::emu::cp_async_wait(kPending);
#elif HF_INT8_SM >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// ---- tensor-core fragments ----
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8q..8q+7 give the 16-byte rows of matrix q; r[q] receives, in
// lane i, bytes 4 (i % 4) .. +3 of row i / 4 of matrix q.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if HF_INT8_SM >= 750 && defined(HF_INT8_CUDA_EMULATION)
  ::hf_int8::emu::ldmatrix_x4(r, smem_row);
#elif HF_INT8_SM >= 750
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  (void)r;
  (void)smem_row;
  __trap();
#endif
}

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32: c[16x8] += a[16x32] . b[32x8] (sm_80+).
__device__ __forceinline__ void mma_m16n8k32_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if HF_INT8_SM >= 800 && defined(HF_INT8_CUDA_EMULATION)
  ::hf_int8::emu::mma_m16n8k32_s8(c, a, b);
#elif HF_INT8_SM >= 800
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  (void)c;
  (void)a;
  (void)b;
  __trap();
#endif
}

// mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32: c[8x8] += a[8x16] . b[16x8] (sm_75+).
__device__ __forceinline__ void mma_m8n8k16_s8(int& c0, int& c1, uint32_t a, uint32_t b) {
#if HF_INT8_SM >= 750 && defined(HF_INT8_CUDA_EMULATION)
  ::hf_int8::emu::mma_m8n8k16_s8(c0, c1, a, b);
#elif HF_INT8_SM >= 750
  asm("mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
      : "+r"(c0), "+r"(c1)
      : "r"(a), "r"(b));
#else
  (void)c0;
  (void)c1;
  (void)a;
  (void)b;
  __trap();
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: c[16x8] += a[16x16] . b[16x8] with fp32
// accumulation (sm_80+), on bf16 operands when `bf16`, else fp16 (a uniform branch). Each 32-bit register holds two
// 16-bit elements, the lower-indexed one in the low half.
__device__ __forceinline__ void mma_m16n8k16_f32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 bool bf16) {
#if HF_INT8_SM >= 800 && defined(HF_INT8_CUDA_EMULATION)
  ::hf_int8::emu::mma_m16n8k16_float(c, a, b, bf16);
#elif HF_INT8_SM >= 800
  if (bf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)c;
  (void)a;
  (void)b;
  (void)bf16;
  __trap();
#endif
}

// ---- global atomics and ordering between blocks (split-K) ----
// *p += v at the L2 (red.global.add.s32: the old value is not returned). Integer addition is associative, so the
// sum does not depend on the order in which blocks arrive.
__device__ __forceinline__ void red_add(int* p, int v) {
#if defined(HF_INT8_CUDA_EMULATION)
  ::hf_int8::emu::atomic_add(p, v);
#else
  atomicAdd(p, v);
#endif
}

// *p += v, returning the old value (atom.global.add.u32).
__device__ __forceinline__ unsigned atomic_add(unsigned* p, unsigned v) {
#if defined(HF_INT8_CUDA_EMULATION)
  return ::hf_int8::emu::atomic_add(p, v);
#else
  return atomicAdd(p, v);
#endif
}

// membar.gl: this thread's global writes (and atomics) are ordered before its later ones, device-wide.
__device__ __forceinline__ void fence_device() {
#if defined(HF_INT8_CUDA_EMULATION)
  ::hf_int8::emu::fence_device();
#else
  __threadfence();
#endif
}

// ld.global.cg: a 32-bit load (int or float) served by the L2 (never from this SM's L1, which other SMs' atomics do
// not update).
template <typename T>
__device__ __forceinline__ T load_l2(const T* p) {
#if defined(HF_INT8_CUDA_EMULATION)
  return ::hf_int8::emu::load_l2(p);
#else
  return __ldcg(p);
#endif
}

}  // namespace ptx
}  // namespace hf_int8
