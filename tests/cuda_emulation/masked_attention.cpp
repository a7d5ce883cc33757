// masked_attention's CUDA kernels and launch sequences (csrc/masked_attention/kernels.cuh) run on
// the CPU through cuda_emulation.h, as masked_attention_{forward,backward}_cuda run them on a GPU.
// One C entry point per pass and dtype; tests/ops/test_cuda_kernels_on_cpu.py calls them through
// ctypes with contiguous tensors. Exactly one of mask_logits (q's dtype) and blocked (bool) is
// non-null.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cuda_emulation.h"
#include "masked_attention/kernels.cuh"

namespace {

using m2f::masked_attention::AttentionPlan;
using m2f::masked_attention::Sizes;

// NaN where a kernel does not write: a result that reads such an element is NaN.
std::vector<float> unwritten(int64_t size) {
  return std::vector<float>(size, std::numeric_limits<float>::quiet_NaN());
}

template <typename scalar_t>
m2f::masked_attention::MaskSource<scalar_t> row_flags(const Sizes& s, const AttentionPlan& plan,
                                                      const void* mask_logits, const void* blocked,
                                                      float threshold_logit,
                                                      std::vector<uint8_t>& flags) {
  flags.assign(plan.mask_rows, 2);  // neither 0 nor 1
  return m2f::masked_attention::launch_row_flags<scalar_t>(
      cuda_emulation::Launch{}, s, plan, static_cast<const scalar_t*>(mask_logits),
      static_cast<const bool*>(blocked), threshold_logit, flags.data());
}

template <typename scalar_t>
void forward(const int64_t* sizes, int64_t multiprocessors, const void* q, const void* k,
             const void* v, const void* mask_logits, const void* blocked, float threshold_logit,
             float scale, void* out, float* lse) {
  const Sizes s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5]};
  const AttentionPlan plan = m2f::masked_attention::attention_plan(s, multiprocessors);
  std::vector<uint8_t> flags;
  const auto mask = row_flags<scalar_t>(s, plan, mask_logits, blocked, threshold_logit, flags);
  std::vector<float> partial_max = unwritten(plan.num_splits * plan.num_rows);
  std::vector<float> partial_sum = unwritten(plan.num_splits * plan.num_rows);
  std::vector<float> partial_acc = unwritten(plan.num_splits * plan.num_rows * s.head_dim);
  m2f::masked_attention::launch_forward<scalar_t>(
      cuda_emulation::Launch{}, s, plan, static_cast<const scalar_t*>(q),
      static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v), mask, scale,
      static_cast<scalar_t*>(out), lse, partial_max.data(), partial_sum.data(), partial_acc.data());
}

template <typename scalar_t>
void backward(const int64_t* sizes, int64_t multiprocessors, const void* grad_out, const void* q,
              const void* k, const void* v, const void* out, const float* lse,
              const void* mask_logits, const void* blocked, float threshold_logit, float scale,
              void* grad_q, void* grad_k, void* grad_v) {
  const Sizes s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5]};
  const AttentionPlan plan = m2f::masked_attention::attention_plan(s, multiprocessors);
  std::vector<uint8_t> flags;
  const auto mask = row_flags<scalar_t>(s, plan, mask_logits, blocked, threshold_logit, flags);
  std::vector<float> delta = unwritten(plan.num_rows);
  std::vector<float> partial_grad_q = unwritten(plan.num_splits * plan.num_rows * s.head_dim);
  m2f::masked_attention::launch_backward<scalar_t>(
      cuda_emulation::Launch{}, s, plan, static_cast<const scalar_t*>(grad_out),
      static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k),
      static_cast<const scalar_t*>(v), static_cast<const scalar_t*>(out), lse, mask, scale,
      delta.data(), partial_grad_q.data(), static_cast<scalar_t*>(grad_q),
      static_cast<scalar_t*>(grad_k), static_cast<scalar_t*>(grad_v));
}

}  // namespace

// sizes: B, H, Q, K, d, Hm.
#define M2F_ATTENTION_ENTRIES(name, scalar_t)                                                      \
  extern "C" void masked_attention_forward_##name(                                                 \
      const int64_t* sizes, int64_t multiprocessors, const void* q, const void* k, const void* v,  \
      const void* mask_logits, const void* blocked, float threshold_logit, float scale, void* out, \
      float* lse) {                                                                                \
    forward<scalar_t>(sizes, multiprocessors, q, k, v, mask_logits, blocked, threshold_logit,      \
                      scale, out, lse);                                                            \
  }                                                                                                \
  extern "C" void masked_attention_backward_##name(                                                \
      const int64_t* sizes, int64_t multiprocessors, const void* grad_out, const void* q,          \
      const void* k, const void* v, const void* out, const float* lse, const void* mask_logits,    \
      const void* blocked, float threshold_logit, float scale, void* grad_q, void* grad_k,         \
      void* grad_v) {                                                                              \
    backward<scalar_t>(sizes, multiprocessors, grad_out, q, k, v, out, lse, mask_logits, blocked,  \
                       threshold_logit, scale, grad_q, grad_k, grad_v);                            \
  }

M2F_ATTENTION_ENTRIES(float, float)
M2F_ATTENTION_ENTRIES(half, c10::Half)
M2F_ATTENTION_ENTRIES(bfloat16, c10::BFloat16)
