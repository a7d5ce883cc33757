// Multi-scale deformable attention, CUDA: argument checks, buffers, the deterministic mode's sort,
// and the launches of kernels.cuh on the current stream. forward_cuda and backward_cuda are
// templates over the sample source, instantiated at the bottom for the fused op (fused_cuda.cu)
// too.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/stream_launch.cuh"
#include "ms_deform_attn/checks.h"
#include "ms_deform_attn/kernels.cuh"
#include "ms_deform_attn/sampling.h"

namespace m2f {
namespace msda {

template <typename scalar_t, typename Samples>
void forward_cuda(const Sizes& sz, const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const Samples& samples, at::Tensor& output) {
  if (sz.batch * sz.num_queries * sz.num_heads == 0) return;
  // No samples (L * P = 0: the fused softmax would read an empty logits row) or no values.
  if (sz.level_points() == 0 || value.numel() == 0) {
    output.zero_();
    return;
  }
  launch_forward(StreamLaunch{at::cuda::getCurrentCUDAStream()}, sz, value.data_ptr<scalar_t>(),
                 spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(), samples,
                 output.data_ptr<scalar_t>());
}

template <typename scalar_t, typename key_t, typename Samples>
void deterministic_grad_value(const Sizes& sz, const at::Tensor& grad_output,
                              const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                              const Samples& samples, at::Tensor& grad_value) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t num_samples = sz.batch * sz.num_queries * sz.num_heads * sz.level_points();
  const int64_t num_rows = sz.batch * sz.num_values * sz.num_heads;
  const StreamLaunch launch{at::cuda::getCurrentCUDAStream()};
  const auto key_dtype = std::is_same_v<key_t, int32_t> ? at::kInt : at::kLong;
  at::Tensor destination = at::empty({4 * num_samples}, grad_value.options().dtype(key_dtype));
  at::Tensor coefficient = at::empty({4 * num_samples}, grad_value.options());
  launch_contributions<scalar_t>(
      launch, sz, spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
      samples, destination.data_ptr<key_t>(), coefficient.data_ptr<accscalar_t>());
  // A stable sort keeps the contributions of each row in sample order: a fixed summation order.
  const auto [sorted, order] = destination.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor row_begin = at::searchsorted(sorted, at::arange(num_rows + 1, sorted.options()));
  launch_gather_grad_value(launch, sz, grad_output.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
                           coefficient.data_ptr<accscalar_t>(), row_begin.data_ptr<int64_t>(),
                           grad_value.data_ptr<accscalar_t>());
}

// grad_value (N, S, M, D), grad_weight (N, Q, M, L, P) and grad_xy (N, Q, M, L, P, 2) are
// zero-filled tensors of the accumulation dtype.
template <typename scalar_t, typename Samples>
void backward_cuda(const Sizes& sz, const at::Tensor& grad_output, const at::Tensor& value,
                   const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const Samples& samples, bool deterministic, bool normalized_xy,
                   at::Tensor& grad_value, at::Tensor& grad_weight, at::Tensor& grad_xy) {
  using accscalar_t = acc_t<scalar_t>;
  if (sz.batch * sz.num_queries * sz.num_heads == 0 || sz.level_points() == 0 ||
      value.numel() == 0) {
    return;
  }
  launch_backward(StreamLaunch{at::cuda::getCurrentCUDAStream()}, sz,
                  grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                  spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
                  samples, normalized_xy,
                  deterministic ? nullptr : grad_value.data_ptr<accscalar_t>(),
                  grad_weight.data_ptr<accscalar_t>(), grad_xy.data_ptr<accscalar_t>());
  if (deterministic) {
    const int64_t num_rows = sz.batch * sz.num_values * sz.num_heads;
    if (num_rows < std::numeric_limits<int32_t>::max()) {
      deterministic_grad_value<scalar_t, int32_t>(sz, grad_output, spatial_shapes,
                                                  level_start_index, samples, grad_value);
    } else {
      deterministic_grad_value<scalar_t, int64_t>(sz, grad_output, spatial_shapes,
                                                  level_start_index, samples, grad_value);
    }
  }
}

}  // namespace msda

namespace {

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

msda::Sizes plain_sizes(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  M2F_CHECK_DIM(value, 4);
  M2F_CHECK_DIM(spatial_shapes, 2);
  M2F_CHECK_DIM(level_start_index, 1);
  M2F_CHECK_DIM(sampling_locations, 6);
  M2F_CHECK_DIM(attention_weights, 5);
  M2F_CHECK_INDEX(spatial_shapes);
  M2F_CHECK_INDEX(level_start_index);
  for (const at::Tensor* t :
       {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->is_cuda(), "ms_deform_attn (CUDA): all inputs must be CUDA tensors");
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn (CUDA): all inputs must be contiguous");
    M2F_CHECK_SAME_DEVICE(value, (*t));
  }
  M2F_CHECK_SAME_DTYPE(value, sampling_locations);
  M2F_CHECK_SAME_DTYPE(value, attention_weights);
  TORCH_CHECK(spatial_shapes.size(1) == 2, "spatial_shapes must have shape (L, 2)");
  TORCH_CHECK(sampling_locations.size(5) == 2, "sampling_locations must end in (x, y)");
  TORCH_CHECK(
      sampling_locations.size(0) == value.size(0) && sampling_locations.size(2) == value.size(2),
      "sampling_locations must have value's batch size and head count");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must have shape (N, Q, M, L, P)");
  TORCH_CHECK(spatial_shapes.size(0) == sampling_locations.size(3) &&
                  level_start_index.size(0) == sampling_locations.size(3),
              "spatial_shapes and level_start_index must have one row per level");
  return msda::Sizes{value.size(0),
                     value.size(1),
                     value.size(2),
                     value.size(3),
                     sampling_locations.size(3),
                     sampling_locations.size(4),
                     sampling_locations.size(1)};
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const msda::Sizes sz =
      plain_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor output =
      at::empty({sz.batch, sz.num_queries, sz.num_heads * sz.channels}, value.options());
  M2F_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const msda::PlainSamples<scalar_t, acc_t<scalar_t>> samples{
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>()};
    msda::forward_cuda<scalar_t>(sz, value, spatial_shapes, level_start_index, samples, output);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool deterministic) {
  const msda::Sizes sz =
      plain_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  msda::check_grad_output(grad_output, value, sz);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto acc_options = value.options().dtype(acc_dtype(value.scalar_type()));
  at::Tensor grad_value = at::zeros(value.sizes(), acc_options);
  at::Tensor grad_locations = at::zeros(sampling_locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(attention_weights.sizes(), acc_options);
  M2F_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    const msda::PlainSamples<scalar_t, acc_t<scalar_t>> samples{
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>()};
    msda::backward_cuda<scalar_t>(sz, grad_output, value, spatial_shapes, level_start_index,
                                  samples, deterministic, /*normalized_xy=*/true, grad_value,
                                  grad_weights, grad_locations);
  });
  const auto dtype = value.scalar_type();
  return {grad_value.to(dtype), grad_locations.to(dtype), grad_weights.to(dtype)};
}

}  // namespace

namespace msda {

#define M2F_MSDA_INSTANTIATE(scalar_t, Samples)                                                 \
  template void forward_cuda<scalar_t, Samples>(const Sizes&, const at::Tensor&,                \
                                                const at::Tensor&, const at::Tensor&,           \
                                                const Samples&, at::Tensor&);                   \
  template void backward_cuda<scalar_t, Samples>(                                               \
      const Sizes&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, \
      const Samples&, bool, bool, at::Tensor&, at::Tensor&, at::Tensor&);

using FusedSamplesFloat = FusedSamples<float, float>;
using FusedSamplesDouble = FusedSamples<double, double>;
using FusedSamplesHalf = FusedSamples<c10::Half, float>;
using FusedSamplesBFloat16 = FusedSamples<c10::BFloat16, float>;
M2F_MSDA_INSTANTIATE(float, FusedSamplesFloat)
M2F_MSDA_INSTANTIATE(double, FusedSamplesDouble)
M2F_MSDA_INSTANTIATE(c10::Half, FusedSamplesHalf)
M2F_MSDA_INSTANTIATE(c10::BFloat16, FusedSamplesBFloat16)

#undef M2F_MSDA_INSTANTIATE

}  // namespace msda

TORCH_LIBRARY_IMPL(m2f_kernels, CUDA, m) {
  m.impl("_ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace m2f
