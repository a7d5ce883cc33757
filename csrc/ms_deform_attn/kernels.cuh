// Multi-scale deformable attention's CUDA kernels and the launch sequences of the plain and fused
// ops, written against a `launch(grid, block, kernel, args...)` callable: cuda.cu and fused_cuda.cu
// launch on a stream, tests/cuda_emulation runs the same kernels and sequences on the CPU.
//
// Shapes as in cpu.cpp. One group of `group_size` threads (a power of two <= 32, inside one warp)
// handles one head (n, q, m); each thread reads VEC channels at a time (16-byte loads when D and
// the pointers allow) and the group sums per-sample partial results with warp shuffles. Offsets are
// 64-bit.
//
// Backward: the default adds grad_value with float atomics. The deterministic mode uses no float
// atomics: contribution_kernel lists the (sample, corner) contributions, the caller sorts them by
// destination (stable, so in sample order) and gather_grad_value_kernel sums each destination row
// in that fixed order.
//
// The kernels are templates over the sample source (sampling.h): PlainSamples for ms_deform_attn,
// FusedSamples for ms_deform_attn_fused, whose backward ends with finish_backward_kernel.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/acc_type.h"
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
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // sm_90 vector atomics
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + j),
                make_float4(src[j], src[j + 1], src[j + 2], src[j + 3]));
    }
  } else if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      atomicAdd(reinterpret_cast<float2*>(dst + j), make_float2(src[j], src[j + 1]));
    }
  } else
#endif
  {
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

inline LaunchShape launch_shape(int64_t channels, int64_t element_size,
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

inline int64_t num_blocks(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

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

constexpr int kFinishThreads = 128;

// One thread per query (n, q): softmax backward and grad_reference (finish_fused_backward).
template <typename scalar_t>
__global__ void __launch_bounds__(kFinishThreads)
    finish_backward_kernel(Sizes sz, const int64_t* __restrict__ shapes,
                           const scalar_t* __restrict__ logits,
                           const acc_t<scalar_t>* __restrict__ grad_offsets,
                           acc_t<scalar_t>* __restrict__ grad_logits,
                           acc_t<scalar_t>* __restrict__ grad_reference) {
  const int64_t query = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (query >= sz.batch * sz.num_queries) return;
  finish_fused_backward<scalar_t, acc_t<scalar_t>>(query, sz, shapes, logits, grad_offsets,
                                                   grad_logits, grad_reference);
}

// Launch sequences. Every one expects at least one head, one sample per head and one value row
// (the ops return zeros before calling them otherwise). shapes (L, 2) and starts (L,) are the level
// tables; gradients are zero-filled buffers of the accumulation type.

// output (N, Q, M * D): every element written (zero where no sample lands in the image).
template <typename scalar_t, typename Samples, typename Launch>
void launch_forward(const Launch& launch, const Sizes& sz, const scalar_t* value,
                    const int64_t* shapes, const int64_t* starts, const Samples& samples,
                    scalar_t* output) {
  const int64_t heads = sz.batch * sz.num_queries * sz.num_heads;
  const LaunchShape shape = launch_shape(sz.channels, sizeof(scalar_t), {value, output});
  with_vec<scalar_t>(shape.vec, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    launch(num_blocks(heads * shape.group_size), kThreads, forward_kernel<scalar_t, VEC, Samples>,
           sz, value, shapes, starts, samples, shape.group_size, output);
  });
}

// grad_weight (N, Q, M, L, P) and grad_xy (N, Q, M, L, P, 2); grad_value (N, S, M, D) with atomics,
// or nullptr for the deterministic mode (launch_contributions and launch_gather_grad_value).
template <typename scalar_t, typename Samples, typename Launch>
void launch_backward(const Launch& launch, const Sizes& sz, const scalar_t* grad_output,
                     const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const Samples& samples, bool normalized_xy, acc_t<scalar_t>* grad_value,
                     acc_t<scalar_t>* grad_weight, acc_t<scalar_t>* grad_xy) {
  const int64_t heads = sz.batch * sz.num_queries * sz.num_heads;
  const LaunchShape shape =
      launch_shape(sz.channels, sizeof(scalar_t), {value, grad_output, grad_value});
  with_vec<scalar_t>(shape.vec, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    launch(num_blocks(heads * shape.group_size), kThreads, backward_kernel<scalar_t, VEC, Samples>,
           sz, grad_output, value, shapes, starts, samples, shape.group_size, normalized_xy,
           grad_value, grad_weight, grad_xy);
  });
}

// Deterministic grad_value, step 1: destination and coefficient (4 * N * Q * M * L * P each) of
// every (sample, corner); destinations of num_rows = N * S * M mean "nothing".
template <typename scalar_t, typename key_t, typename Samples, typename Launch>
void launch_contributions(const Launch& launch, const Sizes& sz, const int64_t* shapes,
                          const int64_t* starts, const Samples& samples, key_t* destination,
                          acc_t<scalar_t>* coefficient) {
  const int64_t num_samples = sz.batch * sz.num_queries * sz.num_heads * sz.level_points();
  launch(num_blocks(num_samples), kThreads, contribution_kernel<scalar_t, key_t, Samples>, sz,
         shapes, starts, samples, destination, coefficient);
}

// Step 2, after the stable sort of the destinations: `order` the sorted positions, row_begin
// (N * S * M + 1) where each row's run starts in them.
template <typename scalar_t, typename Launch>
void launch_gather_grad_value(const Launch& launch, const Sizes& sz, const scalar_t* grad_output,
                              const int64_t* order, const acc_t<scalar_t>* coefficient,
                              const int64_t* row_begin, acc_t<scalar_t>* grad_value) {
  const int64_t num_rows = sz.batch * sz.num_values * sz.num_heads;
  const LaunchShape shape = launch_shape(sz.channels, sizeof(scalar_t), {grad_output});
  with_vec<scalar_t>(shape.vec, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    launch(num_blocks(num_rows * shape.group_size), kThreads,
           gather_grad_value_kernel<scalar_t, VEC>, sz, grad_output, order, coefficient, row_begin,
           shape.group_size, grad_value);
  });
}

// The fused backward's last step, after launch_backward left d loss / d weight in grad_logits and
// d loss / d pixel in grad_offsets: the softmax backward and grad_reference (N, Q, L, 2).
template <typename scalar_t, typename Launch>
void launch_finish_backward(const Launch& launch, const Sizes& sz, const int64_t* shapes,
                            const scalar_t* logits, const acc_t<scalar_t>* grad_offsets,
                            acc_t<scalar_t>* grad_logits, acc_t<scalar_t>* grad_reference) {
  const int64_t queries = sz.batch * sz.num_queries;
  launch((queries + kFinishThreads - 1) / kFinishThreads, kFinishThreads,
         finish_backward_kernel<scalar_t>, sz, shapes, logits, grad_offsets, grad_logits,
         grad_reference);
}

}  // namespace msda
}  // namespace m2f
