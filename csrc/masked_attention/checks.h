// Argument checks shared by the CPU and CUDA masked-attention kernels (host code).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "common/checks.h"
#include "masked_attention/attention.h"

namespace m2f {
namespace masked_attention {

// q (B, H, Q, d), k and v (B, H, K, d), and exactly one of mask_logits (B, Q, K) in q's dtype or
// attn_mask (B, Hm, Q, K) bool with Hm in {1, H}; all contiguous and on one device.
inline Sizes check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask_logits,
                          const std::optional<at::Tensor>& attn_mask) {
  M2F_CHECK_DIM(q, 4);
  M2F_CHECK_DIM(k, 4);
  M2F_CHECK_DIM(v, 4);
  M2F_CHECK_CONTIGUOUS(q);
  M2F_CHECK_CONTIGUOUS(k);
  M2F_CHECK_CONTIGUOUS(v);
  M2F_CHECK_SAME_DTYPE(q, k);
  M2F_CHECK_SAME_DTYPE(q, v);
  M2F_CHECK_SAME_DEVICE(q, k);
  M2F_CHECK_SAME_DEVICE(q, v);
  Sizes s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 1};
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(k.size(0) == s.batch && k.size(1) == s.heads && k.size(3) == s.head_dim,
              "k must be (B, H, K, d) matching q (B, H, Q, d)");
  TORCH_CHECK(mask_logits.has_value() != attn_mask.has_value(),
              "exactly one of mask_logits and attn_mask must be given");
  if (mask_logits.has_value()) {
    const at::Tensor& m = *mask_logits;
    M2F_CHECK_CONTIGUOUS(m);
    M2F_CHECK_SAME_DTYPE(q, m);
    M2F_CHECK_SAME_DEVICE(q, m);
    TORCH_CHECK(
        m.dim() == 3 && m.size(0) == s.batch && m.size(1) == s.queries && m.size(2) == s.keys,
        "mask_logits must be (B, Q, K)");
  } else {
    const at::Tensor& m = *attn_mask;
    M2F_CHECK_CONTIGUOUS(m);
    M2F_CHECK_SAME_DEVICE(q, m);
    TORCH_CHECK(m.scalar_type() == at::kBool, "attn_mask must be bool");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == s.batch && (m.size(1) == 1 || m.size(1) == s.heads) &&
                    m.size(2) == s.queries && m.size(3) == s.keys,
                "attn_mask must be (B, Hm, Q, K) with Hm in {1, H}");
    s.mask_heads = m.size(1);
  }
  return s;
}

// The backward's extra inputs: grad_out and out of q's shape, dtype and device, lse float32 (B, H,
// Q) on q's device; all contiguous.
inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& out, const at::Tensor& lse, const Sizes& s) {
  M2F_CHECK_CONTIGUOUS(grad_out);
  M2F_CHECK_CONTIGUOUS(out);
  M2F_CHECK_CONTIGUOUS(lse);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "grad_out and out must have q's shape");
  M2F_CHECK_SAME_DTYPE(q, grad_out);
  M2F_CHECK_SAME_DTYPE(q, out);
  M2F_CHECK_SAME_DEVICE(q, grad_out);
  M2F_CHECK_SAME_DEVICE(q, out);
  M2F_CHECK_SAME_DEVICE(q, lse);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == s.batch &&
                  lse.size(1) == s.heads && lse.size(2) == s.queries,
              "lse must be float32 (B, H, Q)");
}

}  // namespace masked_attention
}  // namespace m2f
