#include "hf_int8/cpu_features.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "hf_int8/cpu_kernels.h"

namespace hf_int8::cpu {

namespace {

Isa detect() {
#if HF_INT8_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    // kAvx512Bf16 also uses VPERMB (AVX512-VBMI), which every CPU with AVX512-BF16 but Cooper Lake has
    if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512vbmi")) return Isa::kAvx512Vnni;
    return amx::available() ? Isa::kAmx : Isa::kAvx512Bf16;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kNone;
}

Isa parse(const std::string& name) {
  if (name == "amx") return Isa::kAmx;
  if (name == "avx512-bf16") return Isa::kAvx512Bf16;
  if (name == "avx512-vnni") return Isa::kAvx512Vnni;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "none") return Isa::kNone;
  TORCH_CHECK_VALUE(false, "HF_INT8_CPU_ISA must be amx, avx512-bf16, avx512-vnni, avx2 or none, got '", name, "'");
}

}  // namespace

Isa detected_isa() {
  static const Isa best = detect();  // CPUID and the AMX permission request happen once per process
  return best;
}

Isa selected_isa() {
  const Isa best = detected_isa();
  // The variable is read on every call (cheap) so tests can force a path by setting it at run time.
  const char* forced = std::getenv("HF_INT8_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0') return best;
  Isa wanted = parse(forced);
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

std::string selected_isa_name() {
  switch (selected_isa()) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512-bf16";
    case Isa::kAvx512Vnni: return "avx512-vnni";
    case Isa::kAvx2: return "avx2";
    default: return "none";
  }
}

}  // namespace hf_int8::cpu
