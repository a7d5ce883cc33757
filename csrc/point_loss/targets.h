// The element types the point-loss kernels read targets in, shared by the CPU and CUDA host code.
//
// Soft targets come in the logits' dtype or in their accumulation dtype (float32 beside
// float16/bfloat16 logits), so float32 targets are never narrowed to the logits' precision.
// Binary masks may also come as uint8 or bool (read as uint8).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <type_traits>

namespace m2f {
namespace point_loss {

inline bool is_byte_type(at::ScalarType type) { return type == at::kByte || type == at::kBool; }

// Checks `targets` is in the dtype of `logits` or in its accumulation dtype (or uint8/bool when
// `allow_bytes`).
inline void check_target_type(const at::Tensor& targets, const at::Tensor& logits,
                              const char* targets_name, bool allow_bytes) {
  const at::ScalarType type = targets.scalar_type();
  const at::ScalarType logits_type = logits.scalar_type();
  const bool soft = type == logits_type || type == at::toOpMathType(logits_type);
  TORCH_CHECK(soft || (allow_bytes && is_byte_type(type)), targets_name, " must be ",
              allow_bytes ? "uint8, bool, " : "", "the dtype of the logits (", logits_type,
              ") or its accumulation dtype (", at::toOpMathType(logits_type), "), got ", type);
}

// Calls body(pointer) with `targets` read as scalar_t (the logits' dtype) or as its accumulation
// type.
template <typename scalar_t, typename Body>
void dispatch_soft_target_type(const at::Tensor& targets, Body&& body) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (!std::is_same_v<acc_t, scalar_t>) {
    if (targets.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
      body(static_cast<const acc_t*>(targets.const_data_ptr()));
      return;
    }
  }
  body(static_cast<const scalar_t*>(targets.const_data_ptr()));
}

// As dispatch_soft_target_type, and uint8/bool targets read as uint8.
template <typename scalar_t, typename Body>
void dispatch_target_type(const at::Tensor& targets, Body&& body) {
  if (is_byte_type(targets.scalar_type())) {
    body(static_cast<const uint8_t*>(targets.const_data_ptr()));
  } else {
    dispatch_soft_target_type<scalar_t>(targets, body);
  }
}

}  // namespace point_loss
}  // namespace m2f
