// Python module of the CUDA extension (hf_int8._C_cuda). Importing it runs the TORCH_LIBRARY_IMPL blocks of
// quantize_ops.cpp and gemm_ops.cpp (CUDA kernels of every hf_int8 op); this file only reports how it was built.
// It includes pybind11 alone, not torch/extension.h, to keep the build short.
#include <pybind11/pybind11.h>

#include "launch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_int8 CUDA kernels (registered for the CUDA dispatch key of the hf_int8 ops)";
  m.def("compiled_archs", &hf_int8::cuda::compiled_arch_list,
        "__CUDA_ARCH_LIST__ the device code was compiled for, e.g. '800,900'");
  m.def("gemm_kernel_for", &hf_int8::cuda::gemm_kernel_for, pybind11::arg("m"),
        "Name of the GEMM kernel used for m rows (gemv_dp4a, imma_64x64 or imma_128x128)");
}
