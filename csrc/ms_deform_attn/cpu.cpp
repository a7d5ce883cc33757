// Multi-scale deformable attention, C++ CPU kernels (plain and fused).
//
// Shapes: value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
// sampling_locations (N, Q, M, L, P, 2); attention_weights (N, Q, M, L, P); output (N, Q, M * D).
// Fused: reference_points (N, Q, L, 2); sampling_offsets (N, Q, M, L, P, 2) in pixels of level l;
// attention_logits (N, Q, M, L * P) (softmax over L * P inside the kernel).
//
// Forward is parallel over (batch, query). Backward is parallel over (batch, head): each task owns
// the slice grad_value[n, :, m, :], so there are no races and the result does not depend on
// scheduling. The loops (cpu_kernels.h) are compiled once per x86-64 level (common/cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/dispatch.h"
#include "ms_deform_attn/checks.h"
#include "ms_deform_attn/sampling.h"

namespace m2f {
namespace {

using msda::BilinearPoint;
using msda::check_grad_output;
using msda::Sizes;

constexpr int kLanes = 8;  // channels per SIMD step of the backward dot products

// Every level's rows lie inside value's S rows, so the kernels never read outside value. The Python
// ops check the same with clearer errors; a direct call of the kernel op reaches this.
void check_level_table(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       int64_t num_values) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  for (int64_t level = 0; level < spatial_shapes.size(0); ++level) {
    const int64_t height = shapes[2 * level], width = shapes[2 * level + 1], start = starts[level];
    TORCH_CHECK(height >= 0 && width >= 0, "spatial_shapes must be non-negative, level ", level,
                " has (", height, ", ", width, ")");
    TORCH_CHECK(
        start >= 0 && start <= num_values && (width == 0 || height <= (num_values - start) / width),
        "level ", level, " (start ", start, ", ", height, " x ", width, ") reaches past value's ",
        num_values, " rows");
  }
}

Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, int64_t num_queries, int64_t num_points) {
  M2F_CHECK_DIM(value, 4);
  M2F_CHECK_DIM(spatial_shapes, 2);
  M2F_CHECK_DIM(level_start_index, 1);
  M2F_CHECK_INDEX(spatial_shapes);
  M2F_CHECK_INDEX(level_start_index);
  M2F_CHECK_CONTIGUOUS(value);
  M2F_CHECK_CONTIGUOUS(spatial_shapes);
  M2F_CHECK_CONTIGUOUS(level_start_index);
  TORCH_CHECK(spatial_shapes.size(1) == 2, "spatial_shapes must have shape (L, 2)");
  TORCH_CHECK(level_start_index.size(0) == spatial_shapes.size(0),
              "level_start_index must have one entry per level");
  check_level_table(spatial_shapes, level_start_index, value.size(1));
  return Sizes{value.size(0),          value.size(1), value.size(2), value.size(3),
               spatial_shapes.size(0), num_points,    num_queries};
}

// The per-sample tensor `samples` (N, Q, M, L, ...) must match value (N, S, M, D) and the L levels.
void check_sample_shape(const at::Tensor& samples, const char* name, const Sizes& sz) {
  TORCH_CHECK(samples.size(0) == sz.batch && samples.size(2) == sz.num_heads, name,
              " must have value's batch size and head count");
  TORCH_CHECK(samples.size(3) == sz.num_levels, name, " must have one entry per level");
}

void check_plain_inputs(const at::Tensor& value, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  M2F_CHECK_DIM(sampling_locations, 6);
  M2F_CHECK_DIM(attention_weights, 5);
  M2F_CHECK_CONTIGUOUS(sampling_locations);
  M2F_CHECK_CONTIGUOUS(attention_weights);
  M2F_CHECK_SAME_DTYPE(value, sampling_locations);
  M2F_CHECK_SAME_DTYPE(value, attention_weights);
  TORCH_CHECK(sampling_locations.size(5) == 2, "sampling_locations must end in (x, y)");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must have shape (N, Q, M, L, P)");
}

void check_fused_inputs(const at::Tensor& value, const at::Tensor& reference_points,
                        const at::Tensor& sampling_offsets, const at::Tensor& attention_logits) {
  M2F_CHECK_DIM(reference_points, 4);
  M2F_CHECK_DIM(sampling_offsets, 6);
  M2F_CHECK_DIM(attention_logits, 4);
  M2F_CHECK_CONTIGUOUS(reference_points);
  M2F_CHECK_CONTIGUOUS(sampling_offsets);
  M2F_CHECK_CONTIGUOUS(attention_logits);
  M2F_CHECK_SAME_DTYPE(value, reference_points);
  M2F_CHECK_SAME_DTYPE(value, sampling_offsets);
  M2F_CHECK_SAME_DTYPE(value, attention_logits);
  TORCH_CHECK(sampling_offsets.size(5) == 2, "sampling_offsets must end in (x, y)");
  const auto& off = sampling_offsets.sizes();
  TORCH_CHECK(reference_points.sizes() == at::IntArrayRef({off[0], off[1], off[3], 2}),
              "reference_points must have shape (N, Q, L, 2)");
  TORCH_CHECK(
      attention_logits.sizes() == at::IntArrayRef({off[0], off[1], off[2], off[3] * off[4]}),
      "attention_logits must have shape (N, Q, M, L * P)");
}

#if M2F_CPU_X86_LEVELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace avx512 {
constexpr int64_t kVectorBytes = 64;  // one AVX-512 register
#include "ms_deform_attn/cpu_kernels.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace avx2 {
constexpr int64_t kVectorBytes = 32;  // one AVX register
#include "ms_deform_attn/cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
constexpr int64_t kVectorBytes = 16;  // one SSE / NEON register
#include "ms_deform_attn/cpu_kernels.h"
}  // namespace baseline

// The loops of the level cpu_isa() picks.
template <typename scalar_t, typename Samples>
void forward_kernel(const Sizes& sz, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const Samples& samples, scalar_t* output) {
  switch (cpu_isa()) {
#if M2F_CPU_X86_LEVELS
    case CpuIsa::kAvx512:
      return avx512::forward_kernel(sz, value, shapes, starts, samples, output);
    case CpuIsa::kAvx2:
      return avx2::forward_kernel(sz, value, shapes, starts, samples, output);
#endif
    default:
      return baseline::forward_kernel(sz, value, shapes, starts, samples, output);
  }
}

template <typename scalar_t, typename Samples>
void backward_kernel(const Sizes& sz, const scalar_t* grad_output, const scalar_t* value,
                     const int64_t* shapes, const int64_t* starts, const Samples& samples,
                     acc_t<scalar_t>* grad_value, acc_t<scalar_t>* grad_weight,
                     acc_t<scalar_t>* grad_xy, bool normalized_xy) {
  switch (cpu_isa()) {
#if M2F_CPU_X86_LEVELS
    case CpuIsa::kAvx512:
      return avx512::backward_kernel(sz, grad_output, value, shapes, starts, samples, grad_value,
                                     grad_weight, grad_xy, normalized_xy);
    case CpuIsa::kAvx2:
      return avx2::backward_kernel(sz, grad_output, value, shapes, starts, samples, grad_value,
                                   grad_weight, grad_xy, normalized_xy);
#endif
    default:
      return baseline::backward_kernel(sz, grad_output, value, shapes, starts, samples, grad_value,
                                       grad_weight, grad_xy, normalized_xy);
  }
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_plain_inputs(value, sampling_locations, attention_weights);
  const Sizes sz = check_inputs(value, spatial_shapes, level_start_index,
                                sampling_locations.size(1), sampling_locations.size(4));
  check_sample_shape(sampling_locations, "sampling_locations", sz);
  at::Tensor output =
      at::empty({sz.batch, sz.num_queries, sz.num_heads * sz.channels}, value.options());
  // No samples per head (L * P == 0) or no pixels: every output is an empty sum.
  if (output.numel() == 0) return output;
  if (sz.level_points() == 0 || value.numel() == 0) return output.zero_();
  M2F_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const msda::PlainSamples<scalar_t, acc_t<scalar_t>> samples{
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>()};
    forward_kernel<scalar_t>(sz, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                             level_start_index.data_ptr<int64_t>(), samples,
                             output.data_ptr<scalar_t>());
  });
  return output;
}

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool /*deterministic: the CPU kernel always is*/) {
  check_plain_inputs(value, sampling_locations, attention_weights);
  const Sizes sz = check_inputs(value, spatial_shapes, level_start_index,
                                sampling_locations.size(1), sampling_locations.size(4));
  check_sample_shape(sampling_locations, "sampling_locations", sz);
  check_grad_output(grad_output, value, sz);
  const auto acc_options = value.options().dtype(acc_dtype(value.scalar_type()));
  at::Tensor grad_value = at::zeros(value.sizes(), acc_options);
  at::Tensor grad_locations = at::zeros(sampling_locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(attention_weights.sizes(), acc_options);
  if (grad_locations.numel() > 0 && value.numel() > 0) {
    M2F_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using accscalar_t = acc_t<scalar_t>;
      const msda::PlainSamples<scalar_t, accscalar_t> samples{
          sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>()};
      backward_kernel<scalar_t>(
          sz, grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(), samples,
          grad_value.data_ptr<accscalar_t>(), grad_weights.data_ptr<accscalar_t>(),
          grad_locations.data_ptr<accscalar_t>(), /*normalized_xy=*/true);
    });
  }
  const auto dtype = value.scalar_type();
  return {grad_value.to(dtype), grad_locations.to(dtype), grad_weights.to(dtype)};
}

at::Tensor ms_deform_attn_fused_forward_cpu(const at::Tensor& value,
                                            const at::Tensor& spatial_shapes,
                                            const at::Tensor& level_start_index,
                                            const at::Tensor& reference_points,
                                            const at::Tensor& sampling_offsets,
                                            const at::Tensor& attention_logits) {
  check_fused_inputs(value, reference_points, sampling_offsets, attention_logits);
  const Sizes sz = check_inputs(value, spatial_shapes, level_start_index, sampling_offsets.size(1),
                                sampling_offsets.size(4));
  check_sample_shape(sampling_offsets, "sampling_offsets", sz);
  at::Tensor output =
      at::empty({sz.batch, sz.num_queries, sz.num_heads * sz.channels}, value.options());
  if (output.numel() == 0) return output;
  if (sz.level_points() == 0 || value.numel() == 0) return output.zero_();
  M2F_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_fused_forward_cpu", [&] {
    const msda::FusedSamples<scalar_t, acc_t<scalar_t>> samples{
        reference_points.data_ptr<scalar_t>(), sampling_offsets.data_ptr<scalar_t>(),
        attention_logits.data_ptr<scalar_t>()};
    forward_kernel<scalar_t>(sz, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                             level_start_index.data_ptr<int64_t>(), samples,
                             output.data_ptr<scalar_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_fused_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& reference_points,
    const at::Tensor& sampling_offsets, const at::Tensor& attention_logits,
    bool /*deterministic: the CPU kernel always is*/) {
  check_fused_inputs(value, reference_points, sampling_offsets, attention_logits);
  const Sizes sz = check_inputs(value, spatial_shapes, level_start_index, sampling_offsets.size(1),
                                sampling_offsets.size(4));
  check_sample_shape(sampling_offsets, "sampling_offsets", sz);
  check_grad_output(grad_output, value, sz);
  const auto acc_options = value.options().dtype(acc_dtype(value.scalar_type()));
  at::Tensor grad_value = at::zeros(value.sizes(), acc_options);
  at::Tensor grad_offsets = at::zeros(sampling_offsets.sizes(), acc_options);
  at::Tensor grad_logits = at::zeros(attention_logits.sizes(), acc_options);
  at::Tensor grad_reference = at::zeros(reference_points.sizes(), acc_options);
  if (grad_offsets.numel() > 0 && value.numel() > 0) {
    M2F_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_fused_backward_cpu", [&] {
      using accscalar_t = acc_t<scalar_t>;
      const msda::FusedSamples<scalar_t, accscalar_t> samples{
          reference_points.data_ptr<scalar_t>(), sampling_offsets.data_ptr<scalar_t>(),
          attention_logits.data_ptr<scalar_t>()};
      // The pixel coordinate is (reference + offset / W) * W - 0.5, so d loss / d offset is the
      // pixel gradient; the kernel leaves d loss / d logit in grad_logits.
      backward_kernel<scalar_t>(
          sz, grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(), samples,
          grad_value.data_ptr<accscalar_t>(), grad_logits.data_ptr<accscalar_t>(),
          grad_offsets.data_ptr<accscalar_t>(), /*normalized_xy=*/false);
      const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
      const accscalar_t* grad_offsets_data = grad_offsets.data_ptr<accscalar_t>();
      accscalar_t* grad_reference_data = grad_reference.data_ptr<accscalar_t>();
      at::parallel_for(0, sz.batch * sz.num_queries, 64, [&](int64_t begin, int64_t end) {
        for (int64_t query = begin; query < end; ++query) {
          msda::reference_backward<accscalar_t>(query, sz, shapes, grad_offsets_data,
                                                grad_reference_data);
        }
      });
    });
  }
  const auto dtype = value.scalar_type();
  return {grad_value.to(dtype), grad_reference.to(dtype), grad_offsets.to(dtype),
          grad_logits.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(m2f_kernels, CPU, m) {
  m.impl("_ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
  m.impl("_ms_deform_attn_fused_forward", &ms_deform_attn_fused_forward_cpu);
  m.impl("_ms_deform_attn_fused_backward", &ms_deform_attn_fused_backward_cpu);
}

}  // namespace m2f
