// Dtype dispatch for the kernels: float32, float64, float16 and bfloat16.
#pragma once

#include <ATen/Dispatch.h>

#define M2F_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, \
                                  __VA_ARGS__)

namespace m2f {

// Accumulation type: float32 for float16/bfloat16/float32, float64 for float64.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

}  // namespace m2f
