// Run-time selection of the CPU kernels' instruction set.
#pragma once

#include <string>

namespace hf_int8::cpu {

// Ordered: each level implies the ones below it. kAvx512Bf16 adds VDPBF16PS and VPERMB (AVX512-BF16 and AVX512-VBMI:
// the outlier product fused into the packed GEMM, picking columns out of rows) to kAvx512Vnni; kAmx adds AMX-INT8
// tiles (for the large-M GEMM) to kAvx512Bf16 (every CPU with AMX has AVX512-BF16; one without it is treated as
// kAvx512Vnni).
enum class Isa { kNone = 0, kAvx2 = 1, kAvx512Vnni = 2, kAvx512Bf16 = 3, kAmx = 4 };

// Best ISA this CPU supports, capped by HF_INT8_CPU_ISA (values: amx, avx512-bf16, avx512-vnni, avx2, none) when it is
// set.
Isa selected_isa();
// Best ISA this CPU supports, ignoring HF_INT8_CPU_ISA: what libraries such as oneDNN will use on it.
Isa detected_isa();
std::string selected_isa_name();

}  // namespace hf_int8::cpu
