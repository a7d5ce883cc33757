// CUDA kernels of point_sample, point_mask_loss and pairwise_mask_cost (shapes as in cpu.cpp).
//
// Forward kernels write each output element from one thread; the loss sums each mask's points in
// blocks of kLossSplitPoints with a fixed block reduction and adds the blocks in order, so they are
// deterministic. Backward scatter to the image planes: the default adds
// with atomics; the deterministic mode uses scatter_rows_kernel, where each thread owns one image
// row and adds the contributions of the points in point order, without atomics. The pairwise
// costs' kernels are in pairwise_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/dispatch.h"
#include "point_loss/pairwise_kernels.cuh"
#include "point_loss/sampling.h"
#include "point_loss/targets.h"

namespace m2f {
namespace point_loss {
namespace {

constexpr int kThreads = 256;
// Points per block of the loss forward: 4 per thread, so the 100 masks of a batch fill the GPU.
constexpr int64_t kLossSplitPoints = 4 * kThreads;
constexpr int kScatterThreads = 256;

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

unsigned grid_size(int64_t total, int threads) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 1 << 20)));
}

void check_cuda(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

void check_coords(const at::Tensor& coords, const at::Tensor& input, int64_t batch) {
  check_cuda(coords, "coords");
  TORCH_CHECK(coords.device() == input.device(), "coords must be on the device of the input");
  TORCH_CHECK(coords.dim() == 3 && coords.size(0) == batch && coords.size(2) == 2,
              "coords must have shape (N, P, 2), got ", coords.sizes());
  TORCH_CHECK(coords.scalar_type() == input.scalar_type() || coords.scalar_type() == at::kFloat,
              "coords must be float32 or have the dtype of the input, got ", coords.scalar_type());
}

// Calls body(coords_ptr) with coords read as float32 or as the input's scalar_t.
template <typename scalar_t, typename Body>
void dispatch_coords_type(const at::Tensor& coords, Body&& body) {
  if (coords.scalar_type() == at::kFloat) {
    body(coords.data_ptr<float>());
  } else {
    body(coords.data_ptr<scalar_t>());
  }
}

template <typename acc_t, typename coord_t>
__device__ __forceinline__ BilinearPoint<acc_t> locate(const coord_t* coords, int64_t point_index,
                                                       int64_t height, int64_t width) {
  return locate_point<acc_t>(static_cast<acc_t>(coords[2 * point_index]),
                             static_cast<acc_t>(coords[2 * point_index + 1]), height, width);
}

template <typename acc_t>
__device__ __forceinline__ void atomic_add_corners(acc_t* plane, int64_t height, int64_t width,
                                                   const BilinearPoint<acc_t>& point, acc_t grad) {
  const CornerWeights<acc_t> corners = corner_weights(height, width, point);
  for (int k = 0; k < corners.count; ++k)
    atomicAdd(plane + corners.index[k], grad * corners.weight[k]);
}

// Grid of scatter_rows_kernel: a block per (plane, kScatterThreads rows); needs height > 0.
dim3 scatter_grid(int64_t planes, int64_t height) {
  const int64_t row_blocks = (height + kScatterThreads - 1) / kScatterThreads;
  TORCH_CHECK(planes <= std::numeric_limits<int32_t>::max() && row_blocks <= 65535,
              "the deterministic backward supports at most 2^31 - 1 planes of at most ",
              65535 * kScatterThreads, " rows, got ", planes, " planes of ", height, " rows");
  return dim3(static_cast<unsigned>(planes), static_cast<unsigned>(row_blocks));
}

// Deterministic scatter: block (plane, row block); thread t owns row blockIdx.y * kScatterThreads +
// t of the plane. Points are processed in chunks: each thread locates one point of the chunk
// (source.load gives its cell and gradient), then every thread adds the chunk's contributions to
// its own row in point order.
template <typename acc_t, typename Source>
__global__ void scatter_rows_kernel(Source source, acc_t* __restrict__ grad, int64_t height,
                                    int64_t width, int64_t num_points) {
  __shared__ int chunk_x0[kScatterThreads];
  __shared__ int chunk_y0[kScatterThreads];
  __shared__ acc_t chunk_lx[kScatterThreads];
  __shared__ acc_t chunk_ly[kScatterThreads];
  __shared__ acc_t chunk_grad[kScatterThreads];
  const int64_t plane = blockIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kScatterThreads + threadIdx.x;
  acc_t* grad_row = grad + (plane * height + row) * width;
  for (int64_t start = 0; start < num_points; start += kScatterThreads) {
    const int64_t p = start + threadIdx.x;
    int x0 = 0, y0 = -2;  // y0 = -2 matches no row
    acc_t lx = 0, ly = 0, point_grad = 0;
    if (p < num_points) {
      BilinearPoint<acc_t> point;
      source.load(plane, p, &point, &point_grad);
      if (point.valid) {
        x0 = static_cast<int>(point.x0);
        y0 = static_cast<int>(point.y0);
        lx = point.lx;
        ly = point.ly;
      }
    }
    chunk_x0[threadIdx.x] = x0;
    chunk_y0[threadIdx.x] = y0;
    chunk_lx[threadIdx.x] = lx;
    chunk_ly[threadIdx.x] = ly;
    chunk_grad[threadIdx.x] = point_grad;
    __syncthreads();
    if (row < height) {
      const int count = static_cast<int>(num_points - start < kScatterThreads ? num_points - start
                                                                              : kScatterThreads);
      for (int k = 0; k < count; ++k) {
        const int cell_row = chunk_y0[k];
        if (cell_row != row && cell_row + 1 != row) continue;
        const acc_t row_weight = cell_row == row ? acc_t(1) - chunk_ly[k] : chunk_ly[k];
        const acc_t weighted = chunk_grad[k] * row_weight;
        const int cell_col = chunk_x0[k];
        if (cell_col >= 0) grad_row[cell_col] += weighted * (acc_t(1) - chunk_lx[k]);
        if (cell_col + 1 < width) grad_row[cell_col + 1] += weighted * chunk_lx[k];
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// point_sample

template <typename scalar_t, typename coord_t>
__global__ void point_sample_forward_kernel(const scalar_t* __restrict__ input,
                                            const coord_t* __restrict__ coords,
                                            scalar_t* __restrict__ output, int64_t channels,
                                            int64_t height, int64_t width, int64_t num_points,
                                            int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = index / num_points;
    const int64_t p = index - plane * num_points;
    const int64_t n = plane / channels;
    const BilinearPoint<acc_t> point = locate<acc_t>(coords, n * num_points + p, height, width);
    output[index] = static_cast<scalar_t>(
        sample_plane<acc_t>(input + plane * height * width, height, width, point));
  }
}

template <typename scalar_t, typename coord_t>
__global__ void point_sample_grad_input_atomic_kernel(
    const at::opmath_type<scalar_t>* __restrict__ grad_output, const coord_t* __restrict__ coords,
    at::opmath_type<scalar_t>* __restrict__ grad_input, int64_t channels, int64_t height,
    int64_t width, int64_t num_points, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = index / num_points;
    const int64_t p = index - plane * num_points;
    const int64_t n = plane / channels;
    const BilinearPoint<acc_t> point = locate<acc_t>(coords, n * num_points + p, height, width);
    if (!point.valid) continue;
    atomic_add_corners(grad_input + plane * height * width, height, width, point,
                       grad_output[index]);
  }
}

template <typename acc_t, typename coord_t>
struct PointSampleGradSource {
  const acc_t* grad_output;
  const coord_t* coords;
  int64_t channels;
  int64_t height;
  int64_t width;
  int64_t num_points;

  __device__ void load(int64_t plane, int64_t p, BilinearPoint<acc_t>* point, acc_t* grad) const {
    const int64_t n = plane / channels;
    *point = locate<acc_t>(coords, n * num_points + p, height, width);
    *grad = grad_output[plane * num_points + p];
  }
};

template <typename scalar_t, typename coord_t>
__global__ void point_sample_grad_coords_kernel(
    const at::opmath_type<scalar_t>* __restrict__ grad_output, const scalar_t* __restrict__ input,
    const coord_t* __restrict__ coords, coord_t* __restrict__ grad_coords, int64_t channels,
    int64_t height, int64_t width, int64_t num_points, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = index / num_points;
    const int64_t p = index - n * num_points;
    const BilinearPoint<acc_t> point = locate<acc_t>(coords, index, height, width);
    acc_t grad_x = 0, grad_y = 0;
    if (point.valid) {
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t plane = n * channels + c;
        acc_t value_grad_x, value_grad_y;
        sample_plane_coord_grad<acc_t>(input + plane * height * width, height, width, point,
                                       &value_grad_x, &value_grad_y);
        const acc_t grad = grad_output[plane * num_points + p];
        grad_x += grad * value_grad_x;
        grad_y += grad * value_grad_y;
      }
    }
    grad_coords[2 * index] = static_cast<coord_t>(grad_x);
    grad_coords[2 * index + 1] = static_cast<coord_t>(grad_y);
  }
}

at::Tensor point_sample_forward_cuda(const at::Tensor& input, const at::Tensor& coords) {
  check_cuda(input, "input");
  TORCH_CHECK(input.dim() == 4, "input must have shape (N, C, H, W), got ", input.sizes());
  check_coords(coords, input, input.size(0));
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2),
                width = input.size(3);
  const int64_t num_points = coords.size(1);
  at::Tensor output = at::empty({batch, channels, num_points}, input.options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  const auto stream = at::cuda::getCurrentCUDAStream();
  M2F_DISPATCH_FLOATING_TYPES(input.scalar_type(), "point_sample_forward_cuda", [&] {
    dispatch_coords_type<scalar_t>(coords, [&](auto coords_ptr) {
      point_sample_forward_kernel<<<grid_size(total, kThreads), kThreads, 0, stream>>>(
          input.data_ptr<scalar_t>(), coords_ptr, output.data_ptr<scalar_t>(), channels, height,
          width, num_points, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> point_sample_backward_cuda(const at::Tensor& grad_output,
                                                              const at::Tensor& input,
                                                              const at::Tensor& coords,
                                                              bool deterministic) {
  check_cuda(input, "input");
  check_cuda(grad_output, "grad_output");
  TORCH_CHECK(input.dim() == 4, "input must have shape (N, C, H, W), got ", input.sizes());
  check_coords(coords, input, input.size(0));
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2),
                width = input.size(3);
  const int64_t num_points = coords.size(1);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({batch, channels, num_points}),
              "grad_output must have shape (N, C, P), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == input.device(), "grad_output must be on the device of input");
  const at::ScalarType acc_type = accumulate_type(input.scalar_type());
  at::Tensor grad_output_acc = grad_output.to(acc_type).contiguous();
  at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(acc_type));
  at::Tensor grad_coords = at::empty(coords.sizes(), coords.options());
  // An empty image has zero gradients everywhere (and no rows to give the deterministic grid).
  if (grad_output.numel() == 0 || input.numel() == 0)
    return {grad_input_acc.to(input.scalar_type()), grad_coords.zero_()};
  const auto stream = at::cuda::getCurrentCUDAStream();
  M2F_DISPATCH_FLOATING_TYPES(input.scalar_type(), "point_sample_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_coords_type<scalar_t>(coords, [&](auto coords_ptr) {
      using coord_t = std::remove_const_t<std::remove_pointer_t<decltype(coords_ptr)>>;
      const acc_t* grad_output_ptr = grad_output_acc.data_ptr<acc_t>();
      acc_t* grad_input_ptr = grad_input_acc.data_ptr<acc_t>();
      if (deterministic) {
        PointSampleGradSource<acc_t, coord_t> source{grad_output_ptr, coords_ptr, channels,
                                                     height,          width,      num_points};
        scatter_rows_kernel<<<scatter_grid(batch * channels, height), kScatterThreads, 0, stream>>>(
            source, grad_input_ptr, height, width, num_points);
      } else {
        const int64_t total = batch * channels * num_points;
        point_sample_grad_input_atomic_kernel<scalar_t>
            <<<grid_size(total, kThreads), kThreads, 0, stream>>>(grad_output_ptr, coords_ptr,
                                                                  grad_input_ptr, channels, height,
                                                                  width, num_points, total);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t total_points = batch * num_points;
      point_sample_grad_coords_kernel<<<grid_size(total_points, kThreads), kThreads, 0, stream>>>(
          grad_output_ptr, input.data_ptr<scalar_t>(), coords_ptr, grad_coords.data_ptr<coord_t>(),
          channels, height, width, num_points, total_points);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_input_acc.to(input.scalar_type()), grad_coords};
}

// ---------------------------------------------------------------------------------------------------------
// point_mask_loss

template <typename acc_t, int N>
__device__ void block_sum(acc_t (&values)[N]) {
  __shared__ acc_t warp_sums[kThreads / 32][N];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    for (int offset = 16; offset > 0; offset /= 2)
      values[i] += __shfl_down_sync(0xffffffffu, values[i], offset);
    if (lane == 0) warp_sums[warp][i] = values[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      acc_t total = 0;
      for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w][i];
      values[i] = total;
    }
  }
}

// Logit and target at one point (bilinear in both planes) and the point's cell in the logit plane.
template <typename acc_t, typename scalar_t, typename target_t, typename coord_t>
__device__ __forceinline__ void sample_logit_and_target(
    const scalar_t* logit_plane, const target_t* target_plane, const coord_t* coords,
    int64_t point_index, int64_t height, int64_t width, int64_t target_height, int64_t target_width,
    BilinearPoint<acc_t>* point, acc_t* logit, acc_t* target) {
  const acc_t x = static_cast<acc_t>(coords[2 * point_index]);
  const acc_t y = static_cast<acc_t>(coords[2 * point_index + 1]);
  *point = locate_point<acc_t>(x, y, height, width);
  *logit = sample_plane<acc_t>(logit_plane, height, width, *point);
  *target = sample_plane<acc_t>(target_plane, target_height, target_width,
                                locate_point<acc_t>(x, y, target_height, target_width));
}

// Block n * num_splits + s sums the four point terms of points [s, s + 1) * kLossSplitPoints of
// mask n into partial_sums[n][s] = (ce, sum p t, sum p, sum t). A mask's splits are neighbouring
// blocks, which run together and share the mask's planes in the cache.
template <typename scalar_t, typename target_t, typename coord_t>
__global__ void __launch_bounds__(kThreads)
    point_mask_loss_partial_kernel(const scalar_t* __restrict__ logits,
                                   const target_t* __restrict__ targets,
                                   const coord_t* __restrict__ coords,
                                   at::opmath_type<scalar_t>* __restrict__ partial_sums,
                                   int64_t height, int64_t width, int64_t target_height,
                                   int64_t target_width, int64_t num_points, int64_t num_splits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x / num_splits;
  const int64_t split = blockIdx.x - n * num_splits;
  const int64_t end = std::min<int64_t>((split + 1) * kLossSplitPoints, num_points);
  const scalar_t* logit_plane = logits + n * height * width;
  const target_t* target_plane = targets + n * target_height * target_width;
  acc_t sums[4] = {0, 0, 0, 0};  // ce, sum p t, sum p, sum t
  for (int64_t p = split * kLossSplitPoints + threadIdx.x; p < end; p += kThreads) {
    BilinearPoint<acc_t> point;
    acc_t logit, target;
    sample_logit_and_target(logit_plane, target_plane, coords, n * num_points + p, height, width,
                            target_height, target_width, &point, &logit, &target);
    const LogitTerms<acc_t> terms = logit_terms(logit);
    const acc_t prob = terms.prob;
    sums[0] += sigmoid_ce(logit, terms.log_term, target);
    sums[1] += prob * target;
    sums[2] += prob;
    sums[3] += target;
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
    acc_t* out = partial_sums + static_cast<int64_t>(blockIdx.x) * 4;
    for (int i = 0; i < 4; ++i) out[i] = sums[i];
  }
}

// One thread per mask (grid-stride: the grid is capped): sums the mask's splits in split order and
// writes ce, dice and dice_sums.
template <typename acc_t>
__global__ void point_mask_loss_finalize_kernel(const acc_t* __restrict__ partial_sums,
                                                acc_t* __restrict__ ce, acc_t* __restrict__ dice,
                                                acc_t* __restrict__ dice_sums, int64_t num_masks,
                                                int64_t num_splits, int64_t num_points) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < num_masks;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sums[4] = {0, 0, 0, 0};
    for (int64_t split = 0; split < num_splits; ++split)
      for (int i = 0; i < 4; ++i) sums[i] += partial_sums[(n * num_splits + split) * 4 + i];
    ce[n] = sums[0] / static_cast<acc_t>(num_points);
    dice[n] = dice_loss(sums[1], sums[2], sums[3]);
    dice_sums[3 * n] = sums[1];
    dice_sums[3 * n + 1] = sums[2];
    dice_sums[3 * n + 2] = sums[3];
  }
}

template <typename scalar_t, typename target_t, typename coord_t>
struct PointLossGradSource {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* grad_ce;
  const acc_t* grad_dice;
  const scalar_t* logits;
  const target_t* targets;
  const coord_t* coords;
  const acc_t* dice_sums;
  int64_t height;
  int64_t width;
  int64_t target_height;
  int64_t target_width;
  int64_t num_points;

  __device__ void load(int64_t n, int64_t p, BilinearPoint<acc_t>* point, acc_t* grad) const {
    acc_t logit, target;
    sample_logit_and_target(logits + n * height * width, targets + n * target_height * target_width,
                            coords, n * num_points + p, height, width, target_height, target_width,
                            point, &logit, &target);
    const PointLossGradScales<acc_t> scales =
        point_loss_grad_scales<acc_t>(grad_ce[n], grad_dice[n], num_points, dice_sums[3 * n],
                                      dice_sums[3 * n + 1], dice_sums[3 * n + 2]);
    *grad = point_loss_grad(scales, sigmoid(logit), target);
  }
};

template <typename Source, typename acc_t>
__global__ void point_loss_grad_atomic_kernel(Source source, acc_t* __restrict__ grad,
                                              int64_t height, int64_t width, int64_t num_points,
                                              int64_t total) {
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = index / num_points;
    BilinearPoint<acc_t> point;
    acc_t point_grad;
    source.load(n, index - n * num_points, &point, &point_grad);
    if (!point.valid) continue;
    atomic_add_corners(grad + n * height * width, height, width, point, point_grad);
  }
}

void check_loss_inputs(const at::Tensor& mask_logits, const at::Tensor& target_masks,
                       const at::Tensor& coords) {
  check_cuda(mask_logits, "mask_logits");
  check_cuda(target_masks, "target_masks");
  TORCH_CHECK(target_masks.device() == mask_logits.device(),
              "target_masks must be on the device of mask_logits");
  TORCH_CHECK(mask_logits.dim() == 3, "mask_logits must have shape (N, H, W), got ",
              mask_logits.sizes());
  TORCH_CHECK(target_masks.dim() == 3 && target_masks.size(0) == mask_logits.size(0),
              "target_masks must have shape (N, Ht, Wt), got ", target_masks.sizes());
  check_target_type(target_masks, mask_logits, "target_masks", /*allow_bytes=*/true);
  check_coords(coords, mask_logits, mask_logits.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> point_mask_loss_forward_cuda(
    const at::Tensor& mask_logits, const at::Tensor& target_masks, const at::Tensor& coords) {
  check_loss_inputs(mask_logits, target_masks, coords);
  const c10::cuda::CUDAGuard device_guard(mask_logits.device());
  const int64_t num_masks = mask_logits.size(0), height = mask_logits.size(1),
                width = mask_logits.size(2);
  const int64_t target_height = target_masks.size(1), target_width = target_masks.size(2);
  const int64_t num_points = coords.size(1);
  const auto out_options = mask_logits.options().dtype(accumulate_type(mask_logits.scalar_type()));
  at::Tensor ce = at::empty({num_masks}, out_options);
  at::Tensor dice = at::empty({num_masks}, out_options);
  at::Tensor dice_sums = at::empty({num_masks, 3}, out_options);
  if (num_masks == 0) return {ce, dice, dice_sums};
  if (num_points == 0)
    return {ce.zero_(), dice.zero_(), dice_sums.zero_()};  // ce: 0 over no points
  const int64_t num_splits =
      std::max<int64_t>(1, (num_points + kLossSplitPoints - 1) / kLossSplitPoints);
  TORCH_CHECK(num_masks * num_splits <= std::numeric_limits<int32_t>::max(),
              "point_mask_loss supports at most 2^31 - 1 blocks of ", kLossSplitPoints,
              " points, got ", num_masks, " masks of ", num_points, " points");
  at::Tensor partial_sums = at::empty({num_masks, num_splits, 4}, out_options);
  const auto stream = at::cuda::getCurrentCUDAStream();
  M2F_DISPATCH_FLOATING_TYPES(mask_logits.scalar_type(), "point_mask_loss_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_target_type<scalar_t>(target_masks, [&](auto targets_ptr) {
      dispatch_coords_type<scalar_t>(coords, [&](auto coords_ptr) {
        const unsigned blocks = static_cast<unsigned>(num_masks * num_splits);
        point_mask_loss_partial_kernel<<<blocks, kThreads, 0, stream>>>(
            mask_logits.data_ptr<scalar_t>(), targets_ptr, coords_ptr,
            partial_sums.data_ptr<acc_t>(), height, width, target_height, target_width, num_points,
            num_splits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    point_mask_loss_finalize_kernel<<<grid_size(num_masks, kThreads), kThreads, 0, stream>>>(
        partial_sums.data_ptr<acc_t>(), ce.data_ptr<acc_t>(), dice.data_ptr<acc_t>(),
        dice_sums.data_ptr<acc_t>(), num_masks, num_splits, num_points);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ce, dice, dice_sums};
}

at::Tensor point_mask_loss_backward_cuda(const at::Tensor& grad_ce, const at::Tensor& grad_dice,
                                         const at::Tensor& mask_logits,
                                         const at::Tensor& target_masks, const at::Tensor& coords,
                                         const at::Tensor& dice_sums, bool deterministic) {
  check_loss_inputs(mask_logits, target_masks, coords);
  const c10::cuda::CUDAGuard device_guard(mask_logits.device());
  const int64_t num_masks = mask_logits.size(0), height = mask_logits.size(1),
                width = mask_logits.size(2);
  const int64_t target_height = target_masks.size(1), target_width = target_masks.size(2);
  const int64_t num_points = coords.size(1);
  TORCH_CHECK(grad_ce.numel() == num_masks && grad_dice.numel() == num_masks,
              "grad_ce and grad_dice must have N elements");
  TORCH_CHECK(dice_sums.sizes() == at::IntArrayRef({num_masks, 3}),
              "dice_sums must have shape (N, 3)");
  TORCH_CHECK(grad_ce.device() == mask_logits.device() &&
                  grad_dice.device() == mask_logits.device() &&
                  dice_sums.device() == mask_logits.device(),
              "grad_ce, grad_dice and dice_sums must be on the device of mask_logits");
  const at::ScalarType acc_type = accumulate_type(mask_logits.scalar_type());
  at::Tensor grad_ce_acc = grad_ce.to(acc_type).contiguous();
  at::Tensor grad_dice_acc = grad_dice.to(acc_type).contiguous();
  at::Tensor dice_sums_acc = dice_sums.to(acc_type).contiguous();
  at::Tensor grad_acc = at::zeros(mask_logits.sizes(), mask_logits.options().dtype(acc_type));
  if (mask_logits.numel() == 0 || num_points == 0) return grad_acc.to(mask_logits.scalar_type());
  const auto stream = at::cuda::getCurrentCUDAStream();
  M2F_DISPATCH_FLOATING_TYPES(mask_logits.scalar_type(), "point_mask_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_target_type<scalar_t>(target_masks, [&](auto targets_ptr) {
      dispatch_coords_type<scalar_t>(coords, [&](auto coords_ptr) {
        using target_t = std::remove_const_t<std::remove_pointer_t<decltype(targets_ptr)>>;
        using coord_t = std::remove_const_t<std::remove_pointer_t<decltype(coords_ptr)>>;
        PointLossGradSource<scalar_t, target_t, coord_t> source{grad_ce_acc.data_ptr<acc_t>(),
                                                                grad_dice_acc.data_ptr<acc_t>(),
                                                                mask_logits.data_ptr<scalar_t>(),
                                                                targets_ptr,
                                                                coords_ptr,
                                                                dice_sums_acc.data_ptr<acc_t>(),
                                                                height,
                                                                width,
                                                                target_height,
                                                                target_width,
                                                                num_points};
        if (deterministic) {
          scatter_rows_kernel<<<scatter_grid(num_masks, height), kScatterThreads, 0, stream>>>(
              source, grad_acc.data_ptr<acc_t>(), height, width, num_points);
        } else {
          const int64_t total = num_masks * num_points;
          point_loss_grad_atomic_kernel<<<grid_size(total, kThreads), kThreads, 0, stream>>>(
              source, grad_acc.data_ptr<acc_t>(), height, width, num_points, total);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad_acc.to(mask_logits.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------
// pairwise_mask_cost

std::tuple<at::Tensor, at::Tensor> pairwise_mask_cost_cuda(const at::Tensor& pred_point_logits,
                                                           const at::Tensor& target_point_labels) {
  check_cuda(pred_point_logits, "pred_point_logits");
  check_cuda(target_point_labels, "target_point_labels");
  TORCH_CHECK(pred_point_logits.dim() == 2, "pred_point_logits must have shape (Q, P)");
  TORCH_CHECK(
      target_point_labels.dim() == 2 && target_point_labels.size(1) == pred_point_logits.size(1),
      "target_point_labels must have shape (T, P)");
  check_target_type(target_point_labels, pred_point_logits, "target_point_labels",
                    /*allow_bytes=*/false);
  TORCH_CHECK(target_point_labels.device() == pred_point_logits.device(),
              "target_point_labels must be on the device of pred_point_logits");
  const c10::cuda::CUDAGuard device_guard(pred_point_logits.device());
  const int64_t num_queries = pred_point_logits.size(0), num_targets = target_point_labels.size(0);
  const int64_t num_points = pred_point_logits.size(1);
  TORCH_CHECK_VALUE(num_points > 0, "pred_point_logits must have at least one point (P >= 1)");
  const auto out_options =
      pred_point_logits.options().dtype(accumulate_type(pred_point_logits.scalar_type()));
  at::Tensor ce = at::empty({num_queries, num_targets}, out_options);
  at::Tensor dice = at::empty({num_queries, num_targets}, out_options);
  if (num_queries == 0 || num_targets == 0) return {ce, dice};
  const int64_t sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const PairwisePlan plan = pairwise_plan(num_queries, num_targets, num_points, sm_count);
  TORCH_CHECK(plan.query_tiles <= std::numeric_limits<int32_t>::max() && plan.target_tiles <= 65535,
              "pairwise_mask_cost supports at most ", 65535 * kPairTile, " targets, got ",
              num_targets);
  at::Tensor partial_dots = at::empty({plan.num_splits, num_queries, num_targets, 2}, out_options);
  at::Tensor partial_query_sums = at::empty({plan.num_splits, num_queries, 2}, out_options);
  at::Tensor partial_target_sums = at::empty({plan.num_splits, num_targets}, out_options);
  const auto stream = at::cuda::getCurrentCUDAStream();
  M2F_DISPATCH_FLOATING_TYPES(pred_point_logits.scalar_type(), "pairwise_mask_cost_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(plan.query_tiles),
                    static_cast<unsigned>(plan.target_tiles),
                    static_cast<unsigned>(plan.num_splits));
    dispatch_soft_target_type<scalar_t>(target_point_labels, [&](auto labels_ptr) {
      using label_t = std::remove_const_t<std::remove_pointer_t<decltype(labels_ptr)>>;
      pairwise_partial_kernel<scalar_t, label_t><<<grid, kPairThreads, 0, stream>>>(
          pred_point_logits.data_ptr<scalar_t>(), labels_ptr, partial_dots.data_ptr<acc_t>(),
          partial_query_sums.data_ptr<acc_t>(), partial_target_sums.data_ptr<acc_t>(), num_queries,
          num_targets, num_points, plan.points_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    pairwise_finalize_kernel<<<static_cast<unsigned>(plan.finalize_blocks), kPairFinalizeThreads, 0,
                               stream>>>(
        partial_dots.data_ptr<acc_t>(), partial_query_sums.data_ptr<acc_t>(),
        partial_target_sums.data_ptr<acc_t>(), ce.data_ptr<acc_t>(), dice.data_ptr<acc_t>(),
        num_queries, num_targets, num_points, plan.num_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ce, dice};
}

}  // namespace
}  // namespace point_loss
}  // namespace m2f

TORCH_LIBRARY_IMPL(m2f_kernels, CUDA, m) {
  m.impl("_point_sample_forward", &m2f::point_loss::point_sample_forward_cuda);
  m.impl("_point_sample_backward", &m2f::point_loss::point_sample_backward_cuda);
  m.impl("_point_mask_loss_forward", &m2f::point_loss::point_mask_loss_forward_cuda);
  m.impl("_point_mask_loss_backward", &m2f::point_loss::point_mask_loss_backward_cuda);
  m.impl("_pairwise_mask_cost", &m2f::point_loss::pairwise_mask_cost_cuda);
}
