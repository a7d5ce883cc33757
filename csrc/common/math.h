// Host/device qualifier and the scalar math functions of the accumulation types (float, double),
// shared by every kernel header.
#pragma once

#include <cmath>

// Always inlined, on the host too: the CPU kernels call these per element from loops compiled per
// instruction set, where an out-of-line call (through the PLT, with a struct returned in memory)
// cost more than the arithmetic.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define M2F_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define M2F_HOST_DEVICE inline __attribute__((always_inline))
#else
#define M2F_HOST_DEVICE inline
#endif

namespace m2f {

M2F_HOST_DEVICE float exp_acc(float x) { return expf(x); }
M2F_HOST_DEVICE double exp_acc(double x) { return exp(x); }
M2F_HOST_DEVICE float log_acc(float x) { return logf(x); }
M2F_HOST_DEVICE double log_acc(double x) { return log(x); }
M2F_HOST_DEVICE float log1p_acc(float x) { return log1pf(x); }
M2F_HOST_DEVICE double log1p_acc(double x) { return log1p(x); }

// x * y rounded on its own, never fused with the add that follows into one multiply-add (compilers
// fuse by default where the hardware has FMA): sampling cells must come out as the float64
// reference computes them, x = loc * size - 0.5 rounded after each operation, or a location on a
// pixel boundary gets the neighbouring cell and its gradient. T: float, double or, on the host, a
// GCC vector of them that fits one register.
template <typename T>
M2F_HOST_DEVICE T unfused_product(T x, T y) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fmul_rn(x, y);
  } else {
    return __dmul_rn(x, y);
  }
#elif defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  T product = x * y;
  __asm__("" : "+x"(product));  // the compiler cannot see through it, so cannot fuse it
  return product;
#elif defined(__GNUC__)
  T product = x * y;
  __asm__("" : "+m"(product));
  return product;
#else
  return x * y;
#endif
}

}  // namespace m2f
