// Python module of the CUDA extension (hf_int8._C_cuda). Importing it runs the TORCH_LIBRARY_IMPL blocks of
// quantize_ops.cpp and gemm_ops.cpp (CUDA kernels of every hf_int8 op); this file reports how it was built and
// whether its device code runs on a given GPU (arch_probe.cu).
// It includes pybind11 alone, not torch/extension.h, to keep the build short.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <string>

#include "launch.h"

// The nvcc code targets setup.py built, e.g. sm_80,sm_90,compute_90 (a compile definition: see setup.py).
#define HF_INT8_MODULE_STR2(...) #__VA_ARGS__
#define HF_INT8_MODULE_STR(...) HF_INT8_MODULE_STR2(__VA_ARGS__)
#if defined(HF_INT8_CUDA_TARGETS)
static const char kBuiltTargets[] = HF_INT8_MODULE_STR(HF_INT8_CUDA_TARGETS);
#else
static const char kBuiltTargets[] = "";  // built without setup.py: unknown, the run-time check asks the driver
#endif

namespace hf_int8 {
namespace cuda {

cudaError_t probe_kernel_image(int device);  // arch_probe.cu

namespace {

// "sm_80,sm_90,compute_90" -> "8.0;9.0+PTX" (TORCH_CUDA_ARCH_LIST's notation; a PTX-only target gives "X.Y+PTX"
// too). Targets come sorted by arch with compute_XY right after sm_XY (setup.py).
std::string built_arch_list() {
  std::string out, targets(kBuiltTargets);
  size_t start = 0;
  while (start < targets.size()) {
    size_t end = targets.find(',', start);
    if (end == std::string::npos) end = targets.size();
    const std::string target = targets.substr(start, end - start);
    start = end + 1;
    const bool ptx = target.rfind("compute_", 0) == 0;
    std::string number = target.substr(target.find('_') + 1);  // "90", "100", "90a"
    size_t digits = 0;
    while (digits < number.size() && number[digits] >= '0' && number[digits] <= '9') ++digits;
    if (digits < 2) continue;
    const std::string arch = number.substr(0, digits - 1) + "." + number.substr(digits - 1);  // "9.0a"
    if (ptx) {
      const std::string last = out.substr(out.rfind(';') == std::string::npos ? 0 : out.rfind(';') + 1);
      if (last == arch) {
        out += "+PTX";
        continue;
      }
    }
    out += (out.empty() ? "" : ";") + arch + (ptx ? "+PTX" : "");
  }
  return out;
}

// Name of the runtime's answer for device: "cudaSuccess" when an image of this extension runs there.
std::string probe(int device) { return cudaGetErrorName(probe_kernel_image(device)); }

}  // namespace
}  // namespace cuda
}  // namespace hf_int8

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_int8 CUDA kernels (registered for the CUDA dispatch key of the hf_int8 ops)";
  m.def("compiled_archs", &hf_int8::cuda::compiled_arch_list,
        "__CUDA_ARCH_LIST__ the device code was compiled for, e.g. '800,900'");
  m.def(
      "built_targets", [] { return std::string(kBuiltTargets); },
      "nvcc code targets embedded in the extension, e.g. 'sm_80,sm_90,compute_90' (compute_XY: PTX)");
  m.def("built_arch_list", &hf_int8::cuda::built_arch_list,
        "The targets in TORCH_CUDA_ARCH_LIST notation, e.g. '8.0;9.0+PTX' ('' when unknown)");
  m.def("probe_kernel_image", &hf_int8::cuda::probe, pybind11::arg("device"),
        "Asks the CUDA runtime whether this extension's device code runs on `device`: 'cudaSuccess', or the error "
        "name (cudaErrorNoKernelImageForDevice, cudaErrorInvalidDeviceFunction, ...)");
  m.def("gemm_kernel_for", &hf_int8::cuda::gemm_kernel_for, pybind11::arg("m"),
        "Name of the GEMM kernel used for m rows (gemv_dp4a, imma_64x64 or imma_128x128)");
  m.def("gemm_splits", &hf_int8::cuda::int8_gemm_splits, pybind11::arg("m"), pybind11::arg("n"), pybind11::arg("k"),
        pybind11::arg("sm_count"),
        "How many blocks share each tile of C (split-K) for an m x n x k GEMM on a device with sm_count "
        "multiprocessors (1: K is not split)");
  m.def("gemm_workspace_bytes", &hf_int8::cuda::int8_gemm_workspace_bytes, pybind11::arg("m"), pybind11::arg("n"),
        pybind11::arg("k"), pybind11::arg("sm_count"), pybind11::arg("fp16_outliers") = false,
        "Bytes of device scratch the split-K GEMM needs (0: none); fp16_outliers: an int8_linear with an outlier mask "
        "and fp16/bf16 activations, whose fused outlier product is split too");
}
