// Python module of the CPU extension (hf_int8._C). Importing it runs the TORCH_LIBRARY_IMPL blocks of the other
// csrc/cpu files; this file only exposes what the kernels were built with and which ISA they picked at run time.
#include <torch/extension.h>

#include "hf_int8/cpu_features.h"
#include "hf_int8/cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_int8 native CPU kernels";
  m.def("cpu_isa", &hf_int8::cpu::selected_isa_name,
        "ISA the CPU kernels use on this machine: amx, avx512-vnni, avx2, or none (portable C++ and at::_int_mm)");
  m.def(
      "gemm_path",
      [](int64_t tokens) { return std::string(hf_int8::cpu::gemm_path_name(hf_int8::cpu::selected_isa(), tokens)); },
      "Kernel the int8 GEMM runs for this many tokens (rows) on the selected ISA", pybind11::arg("tokens"));
}
