// Python module of the CPU extension (hf_int8._C). Importing it runs the TORCH_LIBRARY_IMPL blocks of the other
// csrc/cpu files; this file only exposes what the kernels were built with and which ISA they picked at run time.
#include <torch/extension.h>

#include "hf_int8/cpu_features.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_int8 native CPU kernels";
  m.def("cpu_isa", &hf_int8::cpu::selected_isa_name,
        "ISA the CPU kernels use on this machine: avx512-vnni, avx2, or none (reference)");
}
