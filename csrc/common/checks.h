// Argument checks shared by the kernels. The Python ops layer validates inputs with clear messages
// first; these checks keep the C++ entry points safe for C++ users who call the ops directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <limits>

#define M2F_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define M2F_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must have " #n " dimensions, got ", (x).dim())
#define M2F_CHECK_SAME_DTYPE(x, y)                                                               \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must share a dtype, got ", \
              (x).scalar_type(), " and ", (y).scalar_type())
#define M2F_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device")
#define M2F_CHECK_INDEX(x) \
  TORCH_CHECK((x).scalar_type() == at::kLong, #x " must be int64, got ", (x).scalar_type())

namespace m2f {

// True when every offset into `t` fits in int32, so kernels may use 32-bit indexing.
inline bool fits_int32(const at::Tensor& t) {
  return t.numel() <= static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

}  // namespace m2f
