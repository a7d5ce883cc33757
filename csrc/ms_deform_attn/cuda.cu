// Multi-scale deformable attention, CUDA kernels.
//
// Shapes as in cpu.cpp. One group of `group_size` threads (a power of two <= 32, inside one warp)
// handles one head (n, q, m); each thread reads VEC channels at a time (16-byte loads when D and
// the pointers allow) and the group sums per-sample partial results with warp shuffles. Offsets are
// 64-bit.
//
// Backward: the default adds grad_value with float atomics. The deterministic mode uses no float
// atomics: it lists the (sample, corner) contributions, sorts them by destination (stable, so in
// sample order) and sums each destination row in that fixed order.
//
// The kernels are templates over the sample source (sampling.h): the fused op (fused_cuda.cu) uses
// the same kernels with FusedSamples through forward_cuda / backward_cuda, instantiated at the
// bottom.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "ms_deform_attn/checks.h"
#include "ms_deform_attn/sampling.h"

namespace m2f {
namespace msda {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T val[VEC];
};

template <typename scalar_t, int VEC, typename accscalar_t>
__device__ __forceinline__ void load_vec(const scalar_t* src, accscalar_t (&dst)[VEC]) {
  const Packed<scalar_t, VEC> packed = *reinterpret_cast<const Packed<scalar_t, VEC>*>(src);
#pragma unroll
  for (int j = 0; j < VEC; ++j) dst[j] = static_cast<accscalar_t>(packed.val[j]);
}

template <typename scalar_t, int VEC, typename accscalar_t>
__device__ __forceinline__ void store_vec(scalar_t* dst, const accscalar_t (&src)[VEC]) {
  Packed<scalar_t, VEC> packed;
#pragma unroll
  for (int j = 0; j < VEC; ++j) packed.val[j] = static_cast<scalar_t>(src[j]);
  *reinterpret_cast<Packed<scalar_t, VEC>*>(dst) = packed;
}

// dst must be aligned to VEC floats (it points into a freshly allocated accumulation buffer).
template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* dst, const float (&src)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kWidth = VEC % 4 == 0 ? 4 : (VEC % 2 == 0 ? 2 : 1);  // sm_90 vector atomics
#else
  constexpr int kWidth = 1;
#endif
  if constexpr (kWidth == 4) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + j),
                make_float4(src[j], src[j + 1], src[j + 2], src[j + 3]));
    }
  } else if constexpr (kWidth == 2) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      atomicAdd(reinterpret_cast<float2*>(dst + j), make_float2(src[j], src[j + 1]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, src[j]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(double* dst, const double (&src)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, src[j]);
}

// Sum over the `group_size` lanes of a group (xor butterfly: every lane gets the total, in the same
// order).
template <typename T>
__device__ __forceinline__ T group_sum(T x, int group_size, unsigned group_mask) {
  for (int offset = group_size / 2; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(group_mask, x, offset, group_size);
  }
  return x;
}

__device__ __forceinline__ unsigned lanes_of_group(int group_size) {
  if (group_size == 32) return 0xffffffffu;
  const unsigned first_lane = (threadIdx.x & 31u) & ~static_cast<unsigned>(group_size - 1);
  return ((1u << group_size) - 1u) << first_lane;
}

template <typename scalar_t, int VEC, typename Samples>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Sizes sz, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, Samples samples, int group_size,
                   scalar_t* __restrict__ output) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t head_index = thread / group_size;
  const int lane = static_cast<int>(thread % group_size);
  if (head_index >= sz.batch * sz.num_queries * sz.num_heads) return;
  const int64_t m = head_index % sz.num_heads;
  const int64_t n = head_index / (sz.num_heads * sz.num_queries);
  const auto head = samples.head(head_index, sz);
  const int64_t pixel_stride = sz.num_heads * sz.channels;
  const int64_t chunks = sz.channels / VEC;
  const scalar_t* head_value = value + (n * sz.num_values * sz.num_heads + m) * sz.channels;

  for (int64_t chunk = lane; chunk < chunks; chunk += group_size) {
    accscalar_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0;
    int64_t point = 0;
    for (int64_t l = 0; l < sz.num_levels; ++l) {
      const int64_t height = shapes[2 * l];
      const int64_t width = shapes[2 * l + 1];
      const scalar_t* level_value = head_value + starts[l] * pixel_stride + chunk * VEC;
      for (int64_t p = 0; p < sz.num_points; ++p, ++point) {
        const BilinearPoint<accscalar_t> pt = bilinear_point<accscalar_t>(
            head.loc_x(point, l, width), head.loc_y(point, l, height), height, width);
        if (!pt.valid) continue;
        const accscalar_t weight = head.weight(point);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (pt.corner[k] < 0) continue;
          accscalar_t v[VEC];
          load_vec<scalar_t, VEC>(level_value + pt.corner[k] * pixel_stride, v);
          const accscalar_t corner_weight = weight * pt.weight[k];
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += corner_weight * v[j];
        }
      }
    }
    store_vec<scalar_t, VEC>(output + head_index * sz.channels + chunk * VEC, acc);
  }
}

// Per-sample gradients (grad_weight, grad_xy) and, when grad_value is not null, the atomic
// grad_value. grad_xy is in pixels, or in normalized units (times (W, H)) when `normalized_xy`.
template <typename scalar_t, int VEC, typename Samples>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Sizes sz, const scalar_t* __restrict__ grad_output,
                    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, Samples samples, int group_size,
                    bool normalized_xy, acc_t<scalar_t>* __restrict__ grad_value,
                    acc_t<scalar_t>* __restrict__ grad_weight,
                    acc_t<scalar_t>* __restrict__ grad_xy) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t head_index = thread / group_size;
  const int lane = static_cast<int>(thread % group_size);
  if (head_index >= sz.batch * sz.num_queries * sz.num_heads) return;
  const unsigned group_mask = lanes_of_group(group_size);
  const int64_t m = head_index % sz.num_heads;
  const int64_t n = head_index / (sz.num_heads * sz.num_queries);
  const auto head = samples.head(head_index, sz);
  const int64_t pixel_stride = sz.num_heads * sz.channels;
  const int64_t chunks = sz.channels / VEC;
  const int64_t head_offset = (n * sz.num_values * sz.num_heads + m) * sz.channels;
  const scalar_t* head_grad_output = grad_output + head_index * sz.channels;
  const int64_t first_point = head_index * sz.level_points();

  int64_t point = 0;
  for (int64_t l = 0; l < sz.num_levels; ++l) {
    const int64_t height = shapes[2 * l];
    const int64_t width = shapes[2 * l + 1];
    const int64_t level_offset = head_offset + starts[l] * pixel_stride;
    for (int64_t p = 0; p < sz.num_points; ++p, ++point) {
      const BilinearPoint<accscalar_t> pt = bilinear_point<accscalar_t>(
          head.loc_x(point, l, width), head.loc_y(point, l, height), height, width);
      if (!pt.valid) continue;  // the same for all lanes of the group
      const accscalar_t weight = head.weight(point);
      accscalar_t corner_dot[4] = {0, 0, 0, 0};
      for (int64_t chunk = lane; chunk < chunks; chunk += group_size) {
        accscalar_t go[VEC];
        load_vec<scalar_t, VEC>(head_grad_output + chunk * VEC, go);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (pt.corner[k] < 0) continue;
          const int64_t offset = level_offset + pt.corner[k] * pixel_stride + chunk * VEC;
          accscalar_t v[VEC];
          load_vec<scalar_t, VEC>(value + offset, v);
#pragma unroll
          for (int j = 0; j < VEC; ++j) corner_dot[k] += go[j] * v[j];
          if (grad_value != nullptr) {
            const accscalar_t corner_weight = weight * pt.weight[k];
            accscalar_t contribution[VEC];
#pragma unroll
            for (int j = 0; j < VEC; ++j) contribution[j] = corner_weight * go[j];
            atomic_add_vec<VEC>(grad_value + offset, contribution);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) corner_dot[k] = group_sum(corner_dot[k], group_size, group_mask);
      if (lane == 0) {
        const SampleGrad<accscalar_t> grad = sample_grad<accscalar_t>(pt, corner_dot, weight);
        const int64_t sample = first_point + point;
        grad_weight[sample] = grad.attention_weight;
        grad_xy[2 * sample] = normalized_xy ? grad.x * static_cast<accscalar_t>(width) : grad.x;
        grad_xy[2 * sample + 1] =
            normalized_xy ? grad.y * static_cast<accscalar_t>(height) : grad.y;
      }
    }
  }
}

// Deterministic grad_value, step 1: for each (sample, corner) its destination row (n, s, m) of
// grad_value (or `num_rows` when it contributes nothing) and its coefficient weight * bilinear
// weight.
template <typename scalar_t, typename key_t, typename Samples>
__global__ void __launch_bounds__(kThreads)
    contribution_kernel(Sizes sz, const int64_t* __restrict__ shapes,
                        const int64_t* __restrict__ starts, Samples samples,
                        key_t* __restrict__ destination,
                        acc_t<scalar_t>* __restrict__ coefficient) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t sample = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t level_points = sz.level_points();
  if (sample >= sz.batch * sz.num_queries * sz.num_heads * level_points) return;
  const int64_t head_index = sample / level_points;
  const int64_t point = sample % level_points;
  const int64_t l = point / sz.num_points;
  const int64_t m = head_index % sz.num_heads;
  const int64_t n = head_index / (sz.num_heads * sz.num_queries);
  const int64_t height = shapes[2 * l];
  const int64_t width = shapes[2 * l + 1];
  const auto head = samples.head(head_index, sz);
  const BilinearPoint<accscalar_t> pt = bilinear_point<accscalar_t>(
      head.loc_x(point, l, width), head.loc_y(point, l, height), height, width);
  const accscalar_t weight = pt.valid ? head.weight(point) : accscalar_t(0);
  const int64_t num_rows = sz.batch * sz.num_values * sz.num_heads;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t row = pt.corner[k] < 0
                            ? num_rows
                            : (n * sz.num_values + starts[l] + pt.corner[k]) * sz.num_heads + m;
    destination[4 * sample + k] = static_cast<key_t>(row);
    coefficient[4 * sample + k] = weight * pt.weight[k];
  }
}

// Deterministic grad_value, step 2: one group per row (n, s, m) sums its contributions in sorted
// order.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    gather_grad_value_kernel(Sizes sz, const scalar_t* __restrict__ grad_output,
                             const int64_t* __restrict__ order,
                             const acc_t<scalar_t>* __restrict__ coefficient,
                             const int64_t* __restrict__ row_begin, int group_size,
                             acc_t<scalar_t>* __restrict__ grad_value) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = thread / group_size;
  const int lane = static_cast<int>(thread % group_size);
  if (row >= sz.batch * sz.num_values * sz.num_heads) return;
  const int64_t begin = row_begin[row];
  const int64_t end = row_begin[row + 1];
  const int64_t chunks = sz.channels / VEC;
  const int64_t samples_per_head = 4 * sz.level_points();
  for (int64_t chunk = lane; chunk < chunks; chunk += group_size) {
    accscalar_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t entry = order[e];
      const int64_t head_index = entry / samples_per_head;
      const accscalar_t c = coefficient[entry];
      accscalar_t go[VEC];
      load_vec<scalar_t, VEC>(grad_output + head_index * sz.channels + chunk * VEC, go);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += c * go[j];
    }
    accscalar_t* dst = grad_value + row * sz.channels + chunk * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) dst[j] = acc[j];
  }
}

// Channels per load (VEC) and threads per group for `channels` channels of `element_size` bytes.
struct LaunchShape {
  int vec;
  int group_size;
};

LaunchShape launch_shape(int64_t channels, int64_t element_size,
                         std::initializer_list<const void*> pointers) {
  int vec = static_cast<int>(16 / element_size);
  auto fits = [&](int v) {
    if (channels % v != 0) return false;
    for (const void* ptr : pointers) {
      if (reinterpret_cast<uintptr_t>(ptr) % (v * element_size) != 0) return false;
    }
    return true;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  const int64_t chunks = channels / vec;
  int group_size = 1;
  while (group_size < chunks && group_size < 32) group_size *= 2;
  return {vec, group_size};
}

int64_t num_blocks(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

// Calls f(std::integral_constant<int, VEC>) with VEC = vec, for loads of at most 16 bytes.
template <typename scalar_t, typename F>
void with_vec(int vec, const F& f) {
  if constexpr (sizeof(scalar_t) <= 2) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (sizeof(scalar_t) <= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if (vec == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

template <typename scalar_t, typename Samples>
void forward_cuda(const Sizes& sz, const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const Samples& samples, at::Tensor& output) {
  // Writes every output element (zero where no sample lands in the image).
  const int64_t heads = sz.batch * sz.num_queries * sz.num_heads;
  if (heads == 0) return;
  // No samples (L * P = 0: the fused softmax would read an empty logits row) or no values.
  if (sz.level_points() == 0 || value.numel() == 0) {
    output.zero_();
    return;
  }
  const LaunchShape shape =
      launch_shape(sz.channels, sizeof(scalar_t), {value.data_ptr(), output.data_ptr()});
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_vec<scalar_t>(shape.vec, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    forward_kernel<scalar_t, VEC, Samples>
        <<<num_blocks(heads * shape.group_size), kThreads, 0, stream>>>(
            sz, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), samples, shape.group_size,
            output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename key_t, typename Samples>
void deterministic_grad_value(const Sizes& sz, const at::Tensor& grad_output,
                              const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                              const Samples& samples, at::Tensor& grad_value) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t num_samples = sz.batch * sz.num_queries * sz.num_heads * sz.level_points();
  const int64_t num_rows = sz.batch * sz.num_values * sz.num_heads;
  if (num_samples == 0) return;  // grad_value stays zero
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto key_dtype = std::is_same_v<key_t, int32_t> ? at::kInt : at::kLong;
  at::Tensor destination = at::empty({4 * num_samples}, grad_value.options().dtype(key_dtype));
  at::Tensor coefficient = at::empty({4 * num_samples}, grad_value.options());
  contribution_kernel<scalar_t, key_t, Samples><<<num_blocks(num_samples), kThreads, 0, stream>>>(
      sz, spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(), samples,
      destination.data_ptr<key_t>(), coefficient.data_ptr<accscalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // A stable sort keeps the contributions of each row in sample order: a fixed summation order.
  const auto [sorted, order] = destination.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor row_begin = at::searchsorted(sorted, at::arange(num_rows + 1, sorted.options()));
  const LaunchShape shape = launch_shape(sz.channels, sizeof(scalar_t), {grad_output.data_ptr()});
  with_vec<scalar_t>(shape.vec, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    gather_grad_value_kernel<scalar_t, VEC>
        <<<num_blocks(num_rows * shape.group_size), kThreads, 0, stream>>>(
            sz, grad_output.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
            coefficient.data_ptr<accscalar_t>(), row_begin.data_ptr<int64_t>(), shape.group_size,
            grad_value.data_ptr<accscalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_value (N, S, M, D), grad_weight (N, Q, M, L, P) and grad_xy (N, Q, M, L, P, 2) are
// zero-filled tensors of the accumulation dtype.
template <typename scalar_t, typename Samples>
void backward_cuda(const Sizes& sz, const at::Tensor& grad_output, const at::Tensor& value,
                   const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const Samples& samples, bool deterministic, bool normalized_xy,
                   at::Tensor& grad_value, at::Tensor& grad_weight, at::Tensor& grad_xy) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t heads = sz.batch * sz.num_queries * sz.num_heads;
  if (heads == 0 || sz.level_points() == 0 || value.numel() == 0) return;
  const LaunchShape shape =
      launch_shape(sz.channels, sizeof(scalar_t),
                   {value.data_ptr(), grad_output.data_ptr(), grad_value.data_ptr()});
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_vec<scalar_t>(shape.vec, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    backward_kernel<scalar_t, VEC, Samples>
        <<<num_blocks(heads * shape.group_size), kThreads, 0, stream>>>(
            sz, grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
            spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(), samples,
            shape.group_size, normalized_xy,
            deterministic ? nullptr : grad_value.data_ptr<accscalar_t>(),
            grad_weight.data_ptr<accscalar_t>(), grad_xy.data_ptr<accscalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
