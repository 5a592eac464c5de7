// Run-time selection of the CPU kernels' instruction set.
#pragma once

#include <string>

namespace hf_int8::cpu {

// Ordered: each level implies the ones below it. kAmx adds AMX-INT8 tiles (for the large-M GEMM) to kAvx512Vnni.
enum class Isa { kNone = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };

// Best ISA this CPU supports, capped by HF_INT8_CPU_ISA (values: amx, avx512-vnni, avx2, none) when it is set.
Isa selected_isa();
// Best ISA this CPU supports, ignoring HF_INT8_CPU_ISA: what libraries such as oneDNN will use on it.
Isa detected_isa();
std::string selected_isa_name();

}  // namespace hf_int8::cpu
