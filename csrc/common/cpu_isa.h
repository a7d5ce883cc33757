// Instruction-set selection for the hot loops of the C++ CPU kernels.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define M2F_CPU_X86_LEVELS 1
#else
#define M2F_CPU_X86_LEVELS 0
#endif

// Helpers of the hot loops are inlined into their callers, which are compiled per level.
#if defined(__GNUC__)
#define M2F_CPU_INLINE inline __attribute__((always_inline))
#else
#define M2F_CPU_INLINE inline
#endif

namespace m2f {

// The instruction sets of kernels compiled once per x86-64 level (x86-64-v4: AVX-512, x86-64-v3:
// AVX2 + FMA, baseline: SSE2), which choose their vector width and tiles per level.
enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest level this CPU supports (kBaseline off x86-64 Linux/GCC), lowered by the environment
// variable M2F_KERNELS_CPU_ISA=avx2|baseline so that every level's kernels can be tested on one
// machine (avx512 lowers nothing; another value is an error). Read at each call: tests change it.
inline CpuIsa cpu_isa() {
#if M2F_CPU_X86_LEVELS
  static const CpuIsa supported = __builtin_cpu_supports("x86-64-v4")   ? CpuIsa::kAvx512
                                  : __builtin_cpu_supports("x86-64-v3") ? CpuIsa::kAvx2
                                                                        : CpuIsa::kBaseline;
  CpuIsa requested = supported;
  if (const char* name = std::getenv("M2F_KERNELS_CPU_ISA"); name != nullptr && *name != '\0') {
    if (std::strcmp(name, "avx2") == 0) {
      requested = CpuIsa::kAvx2;
    } else if (std::strcmp(name, "baseline") == 0) {
      requested = CpuIsa::kBaseline;
    } else {
      TORCH_CHECK(std::strcmp(name, "avx512") == 0,
                  "M2F_KERNELS_CPU_ISA must be avx512, avx2 or baseline, got '", name, "'");
    }
  }
  return static_cast<int>(requested) < static_cast<int>(supported) ? requested : supported;
#else
  return CpuIsa::kBaseline;
#endif
}

}  // namespace m2f
