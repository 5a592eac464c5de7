// Whether this extension holds device code that can run on a given GPU, answered by the driver itself.
//
// The probe kernel is compiled with the same nvcc targets as every other kernel of the extension, so asking the
// runtime for its attributes loads (or JIT-compiles from PTX) exactly the image the real kernels would use. With no
// usable image the runtime answers cudaErrorNoKernelImageForDevice (or cudaErrorInvalidDeviceFunction) here, once,
// instead of at the first real launch. The run-time side is hf_int8/ops/_health.py.
#include <cuda_runtime.h>

namespace hf_int8 {
namespace cuda {
namespace {

__global__ void hf_int8_arch_probe_kernel(int* flag) {
  if (flag != nullptr) *flag = 1;
}

}  // namespace

cudaError_t probe_kernel_image(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  if (device != previous && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(&attributes, hf_int8_arch_probe_kernel);
  // A failed query is recorded as the runtime's last error: clear it, or the next kernel launch's
  // cudaGetLastError() check would report it as its own failure.
  (void)cudaGetLastError();
  if (device != previous) cudaSetDevice(previous);
  return err;
}

}  // namespace cuda
}  // namespace hf_int8
