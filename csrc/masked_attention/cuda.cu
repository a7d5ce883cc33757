// Masked cross-attention on CUDA: argument checks, buffers and launches on the current stream of
// the kernels and launch sequences in kernels.cuh.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/stream_launch.cuh"
#include "masked_attention/attention.h"
#include "masked_attention/checks.h"
#include "masked_attention/kernels.cuh"

namespace m2f {
namespace masked_attention {
namespace {

// The shared checks plus what the CUDA kernels need.
Sizes check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mask_logits,
                        const std::optional<at::Tensor>& attn_mask) {
  const Sizes s = check_inputs(q, k, v, mask_logits, attn_mask);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf ||
                  q.scalar_type() == at::kBFloat16,
              "the CUDA masked attention takes float32, float16 or bfloat16, got ", q.scalar_type(),
              " (float64 runs on the cpu and torch backends)");
  TORCH_CHECK(s.head_dim == 16 || s.head_dim == 32 || s.head_dim == 64,
              "the CUDA masked attention supports head dims 16, 32 and 64, got ", s.head_dim);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  TORCH_CHECK(ceil_div(s.queries, kQueryTile) <= 65535, "the CUDA masked attention takes at most ",
              65535 * kQueryTile, " queries, got ", s.queries);
  return s;
}

int64_t multiprocessor_count() {
  int device = 0, multiprocessors = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  return multiprocessors;
}

// Allocates the row flags and runs their pass (launch_row_flags) on the call's mask.
template <typename scalar_t>
MaskSource<scalar_t> run_row_flags(const StreamLaunch& launch, const Sizes& s,
                                   const AttentionPlan& plan,
                                   const std::optional<at::Tensor>& mask_logits,
                                   const std::optional<at::Tensor>& attn_mask,
                                   double threshold_logit, at::Tensor& flags) {
  const at::Tensor& mask = mask_logits.has_value() ? *mask_logits : *attn_mask;
  flags = at::empty({plan.mask_rows}, mask.options().dtype(at::kByte));
  return launch_row_flags<scalar_t>(
      launch, s, plan, mask_logits.has_value() ? mask_logits->data_ptr<scalar_t>() : nullptr,
      attn_mask.has_value() ? attn_mask->data_ptr<bool>() : nullptr,
      static_cast<float>(threshold_logit), flags.data_ptr<uint8_t>());
}

#define M2F_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE( \
                         at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

std::tuple<at::Tensor, at::Tensor> masked_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask_logits, const std::optional<at::Tensor>& attn_mask,
    double threshold_logit, double scale) {
  const Sizes s = check_cuda_inputs(q, k, v, mask_logits, attn_mask);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({s.batch, s.heads, s.queries}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || s.keys == 0) return {out.zero_(), lse.zero_()};
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  const AttentionPlan plan = attention_plan(s, multiprocessor_count());
  at::Tensor partial_max, partial_sum, partial_acc;
  if (plan.num_splits > 1) {
    const auto options = q.options().dtype(at::kFloat);
    partial_max = at::empty({plan.num_splits, plan.num_rows}, options);
    partial_sum = at::empty({plan.num_splits, plan.num_rows}, options);
    partial_acc = at::empty({plan.num_splits, plan.num_rows, s.head_dim}, options);
  }
  M2F_DISPATCH_CUDA_TYPES(q.scalar_type(), "masked_attention_forward_cuda", [&] {
    at::Tensor flags;
    const auto mask =
        run_row_flags<scalar_t>(launch, s, plan, mask_logits, attn_mask, threshold_logit, flags);
    const bool split = plan.num_splits > 1;
    launch_forward<scalar_t>(launch, s, plan, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                             v.data_ptr<scalar_t>(), mask, static_cast<float>(scale),
                             out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                             split ? partial_max.data_ptr<float>() : nullptr,
                             split ? partial_sum.data_ptr<float>() : nullptr,
                             split ? partial_acc.data_ptr<float>() : nullptr);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask_logits,
    const std::optional<at::Tensor>& attn_mask, double threshold_logit, double scale,
    bool /*deterministic: this backward always is*/) {
  const Sizes s = check_cuda_inputs(q, k, v, mask_logits, attn_mask);
  check_backward_inputs(grad_out, q, out, lse, s);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_()};
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  const AttentionPlan plan = attention_plan(s, multiprocessor_count());
  at::Tensor delta = at::empty({plan.num_rows}, q.options().dtype(at::kFloat));
  at::Tensor partial_grad_q;
  if (plan.num_splits > 1) {
    partial_grad_q =
        at::empty({plan.num_splits, plan.num_rows, s.head_dim}, q.options().dtype(at::kFloat));
  }
  M2F_DISPATCH_CUDA_TYPES(q.scalar_type(), "masked_attention_backward_cuda", [&] {
    at::Tensor flags;
    const auto mask =
        run_row_flags<scalar_t>(launch, s, plan, mask_logits, attn_mask, threshold_logit, flags);
    launch_backward<scalar_t>(
        launch, s, plan, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
        k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), mask, static_cast<float>(scale), delta.data_ptr<float>(),
        plan.num_splits > 1 ? partial_grad_q.data_ptr<float>() : nullptr,
        grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>());
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace masked_attention
}  // namespace m2f

TORCH_LIBRARY_IMPL(m2f_kernels, CUDA, m) {
  m.impl("_masked_attention_forward", &m2f::masked_attention::masked_attention_forward_cuda);
  m.impl("_masked_attention_backward", &m2f::masked_attention::masked_attention_backward_cuda);
}
