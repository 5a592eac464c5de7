#include "hf_int8/cpu_features.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace hf_int8::cpu {

namespace {

Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
    return Isa::kAvx512Vnni;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kNone;
}

Isa parse(const std::string& name) {
  if (name == "avx512-vnni") return Isa::kAvx512Vnni;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "none") return Isa::kNone;
  throw std::invalid_argument("HF_INT8_CPU_ISA must be avx512-vnni, avx2 or none, got '" + name + "'");
}

}  // namespace

Isa selected_isa() {
  // Read on every call (cheap) so tests can force a path by setting the variable at run time.
  Isa best = detect();
  const char* forced = std::getenv("HF_INT8_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0') return best;
  Isa wanted = parse(forced);
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

std::string selected_isa_name() {
  switch (selected_isa()) {
    case Isa::kAvx512Vnni: return "avx512-vnni";
    case Isa::kAvx2: return "avx2";
    default: return "none";
  }
}

}  // namespace hf_int8::cpu
