// Masked cross-attention on the CPU: forward (online softmax over key blocks) and backward (P
// recomputed from the forward's lse). The mask is read per (query, key) from mask_logits (B, Q, K)
// or the bool attn_mask (B, Hm, Q, K); the fully-blocked-row rule is decided by a first pass that
// stores one "row has a visible key" flag per mask row (shared by the heads when Hm == 1).
//
// Parallelism: at::parallel_for over (batch, chunk of keys); a task handles all heads and queries
// of its keys, so K and V are read once and a mask block shared by the heads is tested once. The
// forward merges the chunks' online-softmax states, the backward sums the chunks' dq slices, both
// in chunk order; dk and dv belong to one task each. Results do not depend on the thread count, and
// the backward is deterministic.
//
// The kernels (cpu_kernels.h) are compiled once per x86-64 level, each with its own lane count and
// register tiles, and cpu_isa() picks one per call: a generic 16-float vector, right for AVX-512,
// is split so badly for AVX2 that the matrix loops ran about 10x slower there.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/dispatch.h"
#include "masked_attention/attention.h"
#include "masked_attention/checks.h"

namespace m2f {
namespace masked_attention {
namespace {

// Output rows x lane vectors of the register tiles of the three matrix products.
struct TileShape {
  int64_t rows, vectors;
};

#if M2F_CPU_X86_LEVELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace avx512 {
constexpr int64_t kLanes = 16;  // one zmm register of floats (of 32)
constexpr TileShape kScoreTile{4, 4}, kWeightedRowsTile{4, 2}, kTransposedWeightsTile{8, 2};
#include "masked_attention/cpu_kernels.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace avx2 {
constexpr int64_t kLanes = 8;  // one ymm register of floats (of 16)
constexpr TileShape kScoreTile{6, 2}, kWeightedRowsTile{4, 2}, kTransposedWeightsTile{4, 2};
#include "masked_attention/cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
constexpr int64_t kLanes = 4;  // one SSE / NEON register of floats
constexpr TileShape kScoreTile{4, 2}, kWeightedRowsTile{4, 2}, kTransposedWeightsTile{4, 2};
#include "masked_attention/cpu_kernels.h"
}  // namespace baseline

std::tuple<at::Tensor, at::Tensor> masked_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask_logits, const std::optional<at::Tensor>& attn_mask,
    double threshold_logit, double scale) {
  const Sizes s = check_inputs(q, k, v, mask_logits, attn_mask);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({s.batch, s.heads, s.queries}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || s.keys == 0) return {out.zero_(), lse.fill_(0)};
  M2F_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_attention_forward_cpu", [&] {
    switch (cpu_isa()) {
#if M2F_CPU_X86_LEVELS
      case CpuIsa::kAvx512:
        return avx512::forward_kernel<scalar_t>(q, k, v, mask_logits, attn_mask, threshold_logit,
                                                scale, s, out, lse);
      case CpuIsa::kAvx2:
        return avx2::forward_kernel<scalar_t>(q, k, v, mask_logits, attn_mask, threshold_logit,
                                              scale, s, out, lse);
#endif
      default:
        return baseline::forward_kernel<scalar_t>(q, k, v, mask_logits, attn_mask, threshold_logit,
                                                  scale, s, out, lse);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask_logits,
    const std::optional<at::Tensor>& attn_mask, double threshold_logit, double scale,
    bool /*deterministic: the CPU backward always is*/) {
  const Sizes s = check_inputs(q, k, v, mask_logits, attn_mask);
  check_backward_inputs(grad_out, q, out, lse, s);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_()};
  M2F_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_attention_backward_cpu", [&] {
    switch (cpu_isa()) {
#if M2F_CPU_X86_LEVELS
      case CpuIsa::kAvx512:
        return avx512::backward_kernel<scalar_t>(grad_out, q, k, v, out, lse, mask_logits,
                                                 attn_mask, threshold_logit, scale, s, grad_q,
                                                 grad_k, grad_v);
      case CpuIsa::kAvx2:
        return avx2::backward_kernel<scalar_t>(grad_out, q, k, v, out, lse, mask_logits, attn_mask,
                                               threshold_logit, scale, s, grad_q, grad_k, grad_v);
#endif
      default:
        return baseline::backward_kernel<scalar_t>(grad_out, q, k, v, out, lse, mask_logits,
                                                   attn_mask, threshold_logit, scale, s, grad_q,
                                                   grad_k, grad_v);
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace masked_attention
}  // namespace m2f

TORCH_LIBRARY_IMPL(m2f_kernels, CPU, m) {
  m.impl("_masked_attention_forward", &m2f::masked_attention::masked_attention_forward_cpu);
  m.impl("_masked_attention_backward", &m2f::masked_attention::masked_attention_backward_cpu);
}
