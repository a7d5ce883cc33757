// The `launch(grid, block, kernel, args...)` callable of the kernel headers' launch sequences, on a
// CUDA stream (the tests' CPU emulation passes its own).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace m2f {

struct StreamLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) const {
    kernel<<<grid, block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace m2f
