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

}  // namespace m2f
