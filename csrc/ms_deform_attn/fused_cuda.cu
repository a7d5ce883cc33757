// Fused multi-scale deformable attention, CUDA: location = reference + offset / (W, H) and
// weight = softmax over the L * P logits are computed inside the sampling kernels of kernels.cuh
// (through FusedSamples), so the (N, Q, M, L, P, 2) locations and the weights are never stored.
//
// reference_points (N, Q, L, 2) normalized (x, y); sampling_offsets (N, Q, M, L, P, 2) in pixels of
// level l; attention_logits (N, Q, M, L * P). Backward returns grad_value, grad_reference_points,
// grad_sampling_offsets, grad_attention_logits.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/stream_launch.cuh"
#include "ms_deform_attn/checks.h"
#include "ms_deform_attn/kernels.cuh"
#include "ms_deform_attn/sampling.h"

namespace m2f {
namespace msda {

// Defined in cuda.cu and instantiated there for FusedSamples of every dtype.
template <typename scalar_t, typename Samples>
void forward_cuda(const Sizes& sz, const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const Samples& samples, at::Tensor& output);
template <typename scalar_t, typename Samples>
void backward_cuda(const Sizes& sz, const at::Tensor& grad_output, const at::Tensor& value,
                   const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const Samples& samples, bool deterministic, bool normalized_xy,
                   at::Tensor& grad_value, at::Tensor& grad_weight, at::Tensor& grad_xy);

}  // namespace msda

namespace {

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

msda::Sizes fused_sizes(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& reference_points,
                        const at::Tensor& sampling_offsets, const at::Tensor& attention_logits) {
  M2F_CHECK_DIM(value, 4);
  M2F_CHECK_DIM(spatial_shapes, 2);
  M2F_CHECK_DIM(level_start_index, 1);
  M2F_CHECK_DIM(reference_points, 4);
  M2F_CHECK_DIM(sampling_offsets, 6);
  M2F_CHECK_DIM(attention_logits, 4);
  M2F_CHECK_INDEX(spatial_shapes);
  M2F_CHECK_INDEX(level_start_index);
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &reference_points,
                              &sampling_offsets, &attention_logits}) {
    TORCH_CHECK(t->is_cuda(), "ms_deform_attn_fused (CUDA): all inputs must be CUDA tensors");
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn_fused (CUDA): all inputs must be contiguous");
    M2F_CHECK_SAME_DEVICE(value, (*t));
  }
  M2F_CHECK_SAME_DTYPE(value, reference_points);
  M2F_CHECK_SAME_DTYPE(value, sampling_offsets);
  M2F_CHECK_SAME_DTYPE(value, attention_logits);
  const int64_t levels = sampling_offsets.size(3);
  const int64_t points = sampling_offsets.size(4);
  TORCH_CHECK(spatial_shapes.size(1) == 2, "spatial_shapes must have shape (L, 2)");
  TORCH_CHECK(sampling_offsets.size(5) == 2, "sampling_offsets must end in (x, y)");
  const auto& off = sampling_offsets.sizes();
  TORCH_CHECK(off[0] == value.size(0) && off[2] == value.size(2),
              "sampling_offsets must have value's batch size and head count");
  TORCH_CHECK(reference_points.sizes() == at::IntArrayRef({off[0], off[1], levels, 2}),
              "reference_points must have shape (N, Q, L, 2)");
  TORCH_CHECK(
      attention_logits.sizes() == at::IntArrayRef({off[0], off[1], off[2], levels * points}),
      "attention_logits must have shape (N, Q, M, L * P)");
  TORCH_CHECK(spatial_shapes.size(0) == levels && level_start_index.size(0) == levels,
              "spatial_shapes and level_start_index must have one row per level");
  return msda::Sizes{value.size(0), value.size(1), value.size(2),           value.size(3),
                     levels,        points,        sampling_offsets.size(1)};
}

at::Tensor ms_deform_attn_fused_forward_cuda(const at::Tensor& value,
                                             const at::Tensor& spatial_shapes,
                                             const at::Tensor& level_start_index,
                                             const at::Tensor& reference_points,
                                             const at::Tensor& sampling_offsets,
                                             const at::Tensor& attention_logits) {
  const msda::Sizes sz = fused_sizes(value, spatial_shapes, level_start_index, reference_points,
                                     sampling_offsets, attention_logits);
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor output =
      at::empty({sz.batch, sz.num_queries, sz.num_heads * sz.channels}, value.options());
  M2F_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_fused_forward_cuda", [&] {
    const msda::FusedSamples<scalar_t, acc_t<scalar_t>> samples{
        reference_points.data_ptr<scalar_t>(), sampling_offsets.data_ptr<scalar_t>(),
        attention_logits.data_ptr<scalar_t>()};
    msda::forward_cuda<scalar_t>(sz, value, spatial_shapes, level_start_index, samples, output);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_fused_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& reference_points,
    const at::Tensor& sampling_offsets, const at::Tensor& attention_logits, bool deterministic) {
  const msda::Sizes sz = fused_sizes(value, spatial_shapes, level_start_index, reference_points,
                                     sampling_offsets, attention_logits);
  msda::check_grad_output(grad_output, value, sz);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto acc_options = value.options().dtype(acc_dtype(value.scalar_type()));
  at::Tensor grad_value = at::zeros(value.sizes(), acc_options);
  at::Tensor grad_offsets = at::zeros(sampling_offsets.sizes(), acc_options);
  at::Tensor grad_logits = at::zeros(attention_logits.sizes(), acc_options);
  at::Tensor grad_reference = at::zeros(reference_points.sizes(), acc_options);
  const int64_t queries = sz.batch * sz.num_queries;
  // Without samples (L * P = 0) the softmax has no logits to read and every gradient is zero.
  if (queries > 0 && sz.level_points() > 0 && value.numel() > 0) {
    M2F_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_fused_backward_cuda", [&] {
      using accscalar_t = acc_t<scalar_t>;
      const msda::FusedSamples<scalar_t, accscalar_t> samples{
          reference_points.data_ptr<scalar_t>(), sampling_offsets.data_ptr<scalar_t>(),
          attention_logits.data_ptr<scalar_t>()};
      // The pixel coordinate is (reference + offset / W) * W - 0.5, so d loss / d offset is the
      // pixel gradient (normalized_xy = false). grad_logits holds d loss / d weight until the
      // softmax backward in finish_backward_kernel.
      msda::backward_cuda<scalar_t>(sz, grad_output, value, spatial_shapes, level_start_index,
                                    samples, deterministic, /*normalized_xy=*/false, grad_value,
                                    grad_logits, grad_offsets);
      msda::launch_finish_backward(
          StreamLaunch{at::cuda::getCurrentCUDAStream()}, sz, spatial_shapes.data_ptr<int64_t>(),
          attention_logits.data_ptr<scalar_t>(), grad_offsets.data_ptr<accscalar_t>(),
          grad_logits.data_ptr<accscalar_t>(), grad_reference.data_ptr<accscalar_t>());
    });
  }
  const auto dtype = value.scalar_type();
  return {grad_value.to(dtype), grad_reference.to(dtype), grad_offsets.to(dtype),
          grad_logits.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(m2f_kernels, CUDA, m) {
  m.impl("_ms_deform_attn_fused_forward", &ms_deform_attn_fused_forward_cuda);
  m.impl("_ms_deform_attn_fused_backward", &ms_deform_attn_fused_backward_cuda);
}

}  // namespace m2f
