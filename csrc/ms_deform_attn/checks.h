// Argument checks shared by the CPU and CUDA deformable-attention kernels (host code).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "ms_deform_attn/sampling.h"

namespace m2f {
namespace msda {

// grad_output (N, Q, M * D), contiguous, with value's dtype and device.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                              const Sizes& sz) {
  M2F_CHECK_CONTIGUOUS(grad_output);
  M2F_CHECK_SAME_DTYPE(value, grad_output);
  M2F_CHECK_SAME_DEVICE(value, grad_output);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == sz.batch &&
                  grad_output.size(1) == sz.num_queries &&
                  grad_output.size(2) == sz.num_heads * sz.channels,
              "grad_output must have shape (N, Q, M * D)");
}

}  // namespace msda
}  // namespace m2f
