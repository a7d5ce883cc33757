// Dtype dispatch for the kernels: float32, float64, float16 and bfloat16.
#pragma once

#include <ATen/Dispatch.h>

#include "common/acc_type.h"

#define M2F_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, \
                                  __VA_ARGS__)
