// The kernels' accumulation type: float32 for float16/bfloat16/float32, float64 for float64.
#pragma once

namespace m2f {

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
