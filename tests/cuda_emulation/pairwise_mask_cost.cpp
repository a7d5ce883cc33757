// pairwise_mask_cost's CUDA kernels and launch sequence (csrc/point_loss/pairwise_kernels.cuh) run
// on the CPU through cuda_emulation.h, as pairwise_mask_cost_cuda runs them on a GPU. One C entry
// point per (logits, labels) type pair the CUDA op dispatches to;
// tests/ops/test_cuda_kernels_on_cpu.py calls them through ctypes. Inputs are contiguous; ce and
// dice are (Q, T) in the accumulation type.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cuda_emulation.h"
#include "point_loss/pairwise_kernels.cuh"

namespace {

template <typename scalar_t, typename label_t>
void pairwise_mask_cost(const void* logits, const void* labels, void* ce, void* dice,
                        int64_t num_queries, int64_t num_targets, int64_t num_points,
                        int64_t sm_count) {
  using namespace m2f::point_loss;
  using acc_t = at::opmath_type<scalar_t>;
  const PairwisePlan plan = pairwise_plan(num_queries, num_targets, num_points, sm_count);
  // NaN where the partial kernel does not write: a sum that reads such an element is NaN.
  const acc_t unwritten = std::numeric_limits<acc_t>::quiet_NaN();
  std::vector<acc_t> partial_dots(plan.num_splits * num_queries * num_targets * 2, unwritten);
  std::vector<acc_t> partial_query_sums(plan.num_splits * num_queries * 2, unwritten);
  std::vector<acc_t> partial_target_sums(plan.num_splits * num_targets, unwritten);
  launch_pairwise_mask_cost(cuda_emulation::Launch{}, plan, static_cast<const scalar_t*>(logits),
                            static_cast<const label_t*>(labels), partial_dots.data(),
                            partial_query_sums.data(), partial_target_sums.data(),
                            static_cast<acc_t*>(ce), static_cast<acc_t*>(dice), num_queries,
                            num_targets, num_points);
}

}  // namespace

#define M2F_PAIRWISE_ENTRY(name, scalar_t, label_t)                                           \
  extern "C" void name(const void* logits, const void* labels, void* ce, void* dice,          \
                       int64_t num_queries, int64_t num_targets, int64_t num_points,          \
                       int64_t sm_count) {                                                    \
    pairwise_mask_cost<scalar_t, label_t>(logits, labels, ce, dice, num_queries, num_targets, \
                                          num_points, sm_count);                              \
  }

M2F_PAIRWISE_ENTRY(pairwise_mask_cost_float_float, float, float)
M2F_PAIRWISE_ENTRY(pairwise_mask_cost_double_double, double, double)
M2F_PAIRWISE_ENTRY(pairwise_mask_cost_half_half, c10::Half, c10::Half)
M2F_PAIRWISE_ENTRY(pairwise_mask_cost_half_float, c10::Half, float)
M2F_PAIRWISE_ENTRY(pairwise_mask_cost_bfloat16_bfloat16, c10::BFloat16, c10::BFloat16)
M2F_PAIRWISE_ENTRY(pairwise_mask_cost_bfloat16_float, c10::BFloat16, float)
