// Function attributes for the hot loops of the C++ CPU kernels.
#pragma once

// A hot loop is compiled for AVX-512, AVX2 and baseline x86-64 and the CPU picks one at load.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define M2F_CPU_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define M2F_CPU_MULTIVERSION
#endif

// Helpers of the hot loops are inlined into each of their callers' versions.
#if defined(__GNUC__)
#define M2F_CPU_INLINE inline __attribute__((always_inline))
#else
#define M2F_CPU_INLINE inline
#endif
