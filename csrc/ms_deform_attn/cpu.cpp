// Multi-scale deformable attention, C++ CPU kernels (plain and fused).
//
// Shapes: value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
// sampling_locations (N, Q, M, L, P, 2); attention_weights (N, Q, M, L, P); output (N, Q, M * D).
// Fused: reference_points (N, Q, L, 2); sampling_offsets (N, Q, M, L, P, 2) in pixels of level l;
// attention_logits (N, Q, M, L * P) (softmax over L * P inside the kernel).
//
// Forward is parallel over (batch, query). Backward is parallel over (batch, head): each task owns
// the slice grad_value[n, :, m, :], so there are no races and the result does not depend on
// scheduling.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "ms_deform_attn/checks.h"
#include "ms_deform_attn/sampling.h"

namespace m2f {
namespace {

using msda::BilinearPoint;
using msda::check_grad_output;
using msda::Sizes;

constexpr int kLanes = 8;  // channels per SIMD step of the backward dot products

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

// output[n, q, m, :] = sum_{l, p} weight * bilinear(value[n, level l, m, :], location).
template <typename scalar_t, typename Samples>
void forward_kernel(const Sizes& sz, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const Samples& samples, scalar_t* output) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t level_points = sz.num_levels * sz.num_points;
  const int64_t grain = std::max<int64_t>(1, 256 / (sz.num_heads * level_points));
  at::parallel_for(0, sz.batch * sz.num_queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<accscalar_t> acc(sz.channels);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / sz.num_queries;
      for (int64_t m = 0; m < sz.num_heads; ++m) {
        const int64_t head_index = nq * sz.num_heads + m;
        const auto head = samples.head(head_index, sz);
        std::fill(acc.begin(), acc.end(), accscalar_t(0));
        int64_t point = 0;
        for (int64_t l = 0; l < sz.num_levels; ++l) {
          const int64_t height = shapes[2 * l];
          const int64_t width = shapes[2 * l + 1];
          const scalar_t* level_value =
              value + ((n * sz.num_values + starts[l]) * sz.num_heads + m) * sz.channels;
          for (int64_t p = 0; p < sz.num_points; ++p, ++point) {
            const BilinearPoint<accscalar_t> pt = msda::bilinear_point<accscalar_t>(
                head.loc_x(point, l, width), head.loc_y(point, l, height), height, width);
            if (!pt.valid) continue;
            const accscalar_t weight = head.weight(point);
            for (int k = 0; k < 4; ++k) {
              if (pt.corner[k] < 0) continue;
              const accscalar_t corner_weight = weight * pt.weight[k];
              const scalar_t* v = level_value + pt.corner[k] * sz.num_heads * sz.channels;
              accscalar_t* a = acc.data();
              for (int64_t d = 0; d < sz.channels; ++d) {
                a[d] += corner_weight * static_cast<accscalar_t>(v[d]);
              }
            }
          }
        }
        scalar_t* out = output + head_index * sz.channels;
        for (int64_t d = 0; d < sz.channels; ++d) out[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// Backward over (batch, head) tasks. For each sample it adds weight * corner weight * grad_out to
// the corners of grad_value (accumulation dtype, (N, S, M, D)) and stores d loss / d weight in
// grad_weight (N, Q, M, L, P) and d loss / d (x, y) in grad_xy (N, Q, M, L, P, 2): in pixels, or in
// normalized units (times (W, H)) when `normalized_xy`.
template <typename scalar_t, typename Samples>
void backward_kernel(const Sizes& sz, const scalar_t* grad_output, const scalar_t* value,
                     const int64_t* shapes, const int64_t* starts, const Samples& samples,
                     acc_t<scalar_t>* grad_value, acc_t<scalar_t>* grad_weight,
                     acc_t<scalar_t>* grad_xy, bool normalized_xy) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t level_points = sz.num_levels * sz.num_points;
  at::parallel_for(0, sz.batch * sz.num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<accscalar_t> go(sz.channels);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / sz.num_heads;
      const int64_t m = nm % sz.num_heads;
      for (int64_t q = 0; q < sz.num_queries; ++q) {
        const int64_t head_index = (n * sz.num_queries + q) * sz.num_heads + m;
        const auto head = samples.head(head_index, sz);
        accscalar_t* head_grad_weight = grad_weight + head_index * level_points;
        accscalar_t* head_grad_xy = grad_xy + 2 * head_index * level_points;
        const scalar_t* grad_out = grad_output + head_index * sz.channels;
        for (int64_t d = 0; d < sz.channels; ++d) go[d] = static_cast<accscalar_t>(grad_out[d]);
        int64_t point = 0;
        for (int64_t l = 0; l < sz.num_levels; ++l) {
          const int64_t height = shapes[2 * l];
          const int64_t width = shapes[2 * l + 1];
          const int64_t level_offset =
              ((n * sz.num_values + starts[l]) * sz.num_heads + m) * sz.channels;
          for (int64_t p = 0; p < sz.num_points; ++p, ++point) {
            const BilinearPoint<accscalar_t> pt = msda::bilinear_point<accscalar_t>(
                head.loc_x(point, l, width), head.loc_y(point, l, height), height, width);
            if (!pt.valid) continue;
            const accscalar_t weight = head.weight(point);
            accscalar_t corner_dot[4] = {0, 0, 0, 0};
            for (int k = 0; k < 4; ++k) {
              if (pt.corner[k] < 0) continue;
              const int64_t offset = level_offset + pt.corner[k] * sz.num_heads * sz.channels;
              const scalar_t* v = value + offset;
              accscalar_t* gv = grad_value + offset;
              const accscalar_t corner_weight = weight * pt.weight[k];
              const accscalar_t* g = go.data();
              // kLanes independent partial sums (a fixed order) let the compiler use SIMD.
              accscalar_t partial[kLanes] = {};
              int64_t d = 0;
              for (; d + kLanes <= sz.channels; d += kLanes) {
                for (int j = 0; j < kLanes; ++j) {
                  partial[j] += g[d + j] * static_cast<accscalar_t>(v[d + j]);
                  gv[d + j] += corner_weight * g[d + j];
                }
              }
              accscalar_t dot = 0;
              for (; d < sz.channels; ++d) {
                dot += g[d] * static_cast<accscalar_t>(v[d]);
                gv[d] += corner_weight * g[d];
              }
              for (int j = 0; j < kLanes; ++j) dot += partial[j];
              corner_dot[k] = dot;
            }
            const msda::SampleGrad<accscalar_t> grad =
                msda::sample_grad<accscalar_t>(pt, corner_dot, weight);
            head_grad_weight[point] = grad.attention_weight;
            head_grad_xy[2 * point] = normalized_xy ? grad.x * width : grad.x;
            head_grad_xy[2 * point + 1] = normalized_xy ? grad.y * height : grad.y;
          }
        }
      }
    }
  });
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
      // pixel gradient. grad_logits holds d loss / d weight until finish_fused_backward.
      backward_kernel<scalar_t>(
          sz, grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(), samples,
          grad_value.data_ptr<accscalar_t>(), grad_logits.data_ptr<accscalar_t>(),
          grad_offsets.data_ptr<accscalar_t>(), /*normalized_xy=*/false);
      const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
      const scalar_t* logits = attention_logits.data_ptr<scalar_t>();
      const accscalar_t* grad_offsets_data = grad_offsets.data_ptr<accscalar_t>();
      accscalar_t* grad_logits_data = grad_logits.data_ptr<accscalar_t>();
      accscalar_t* grad_reference_data = grad_reference.data_ptr<accscalar_t>();
      at::parallel_for(0, sz.batch * sz.num_queries, 64, [&](int64_t begin, int64_t end) {
        for (int64_t query = begin; query < end; ++query) {
          msda::finish_fused_backward<scalar_t, accscalar_t>(
              query, sz, shapes, logits, grad_offsets_data, grad_logits_data, grad_reference_data);
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
