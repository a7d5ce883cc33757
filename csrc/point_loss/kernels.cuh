// point_sample's and point_mask_loss's CUDA kernels (shapes as in cpu.cpp) and their launch
// sequences, written against a `launch(grid, block, kernel, args...)` callable: cuda.cu launches on
// a stream, tests/cuda_emulation runs the same kernels and sequences on the CPU.
//
// Forward kernels write each output element from one thread; the loss sums each mask's points in
// blocks of kLossSplitPoints with a fixed block reduction and adds the blocks in order, so they are
// deterministic. Backward scatter to the image planes: the default adds with atomics; the
// deterministic mode uses scatter_rows_kernel, where each thread owns one image row and adds the
// contributions of the points in point order, without atomics.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "point_loss/sampling.h"

namespace m2f {
namespace point_loss {

constexpr int kThreads = 256;
// Points per block of the loss forward: 4 per thread, so the 100 masks of a batch fill the GPU.
constexpr int64_t kLossSplitPoints = 4 * kThreads;
constexpr int kScatterThreads = 256;

// Blocks of `threads` for a grid-stride loop over `total` elements (at least one, at most 2^20).
inline unsigned grid_size(int64_t total, int threads) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 1 << 20)));
}

inline int64_t scatter_row_blocks(int64_t height) {
  return (height + kScatterThreads - 1) / kScatterThreads;
}

// Grid of scatter_rows_kernel: a block per (plane, kScatterThreads rows); needs height > 0, planes
// < 2^31 and fewer than 65,536 row blocks (check_scatter_grid in cuda.cu).
inline dim3 scatter_grid(int64_t planes, int64_t height) {
  return dim3(static_cast<unsigned>(planes), static_cast<unsigned>(scatter_row_blocks(height)));
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
  for_each_corner(height, width, point,
                  [&](int64_t index, acc_t weight) { atomicAdd(plane + index, grad * weight); });
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

// The points of block n * num_splits + s of the loss kernels: [s, s + 1) * kLossSplitPoints of
// mask n, cut at num_points. This thread's first point is begin + threadIdx.x; it steps by
// kThreads.
struct LossBlockPoints {
  int64_t mask, begin, end;
};

__device__ __forceinline__ LossBlockPoints loss_block_points(int64_t num_splits,
                                                             int64_t num_points) {
  const int64_t n = blockIdx.x / num_splits;
  const int64_t begin = (blockIdx.x - n * num_splits) * kLossSplitPoints;
  return {n, begin, std::min<int64_t>(begin + kLossSplitPoints, num_points)};
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
  const LossBlockPoints block = loss_block_points(num_splits, num_points);
  const int64_t n = block.mask;
  const scalar_t* logit_plane = logits + n * height * width;
  const target_t* target_plane = targets + n * target_height * target_width;
  acc_t sums[4] = {0, 0, 0, 0};  // ce, sum p t, sum p, sum t
  for (int64_t p = block.begin + threadIdx.x; p < block.end; p += kThreads) {
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

  __device__ PointLossGradScales<acc_t> scales(int64_t n) const {
    return point_loss_grad_scales<acc_t>(grad_ce[n], grad_dice[n], num_points, dice_sums[3 * n],
                                         dice_sums[3 * n + 1], dice_sums[3 * n + 2]);
  }

  __device__ void load(int64_t n, int64_t p, const PointLossGradScales<acc_t>& mask_scales,
                       BilinearPoint<acc_t>* point, acc_t* grad) const {
    acc_t logit, target;
    sample_logit_and_target(logits + n * height * width, targets + n * target_height * target_width,
                            coords, n * num_points + p, height, width, target_height, target_width,
                            point, &logit, &target);
    *grad = point_loss_grad(mask_scales, sigmoid(logit), target);
  }

  __device__ void load(int64_t n, int64_t p, BilinearPoint<acc_t>* point, acc_t* grad) const {
    load(n, p, scales(n), point, grad);
  }
};

// Block n * num_splits + s adds the gradients of the points that the forward's block of the same
// index summed (loss_block_points), with mask n's scales computed once.
template <typename Source, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    point_loss_grad_atomic_kernel(Source source, acc_t* __restrict__ grad, int64_t num_splits) {
  const LossBlockPoints block = loss_block_points(num_splits, source.num_points);
  const PointLossGradScales<acc_t> mask_scales = source.scales(block.mask);
  acc_t* plane = grad + block.mask * source.height * source.width;
  for (int64_t p = block.begin + threadIdx.x; p < block.end; p += kThreads) {
    BilinearPoint<acc_t> point;
    acc_t point_grad;
    source.load(block.mask, p, mask_scales, &point, &point_grad);
    atomic_add_corners(plane, source.height, source.width, point, point_grad);  // none if invalid
  }
}

// Blocks per mask of the loss forward.
inline int64_t loss_splits(int64_t num_points) {
  return std::max<int64_t>(1, (num_points + kLossSplitPoints - 1) / kLossSplitPoints);
}

// output (N, C, P) sampled from input (N, C, H, W) at coords (N, P, 2); total = N * C * P > 0.
template <typename scalar_t, typename coord_t, typename Launch>
void launch_point_sample_forward(const Launch& launch, const scalar_t* input, const coord_t* coords,
                                 scalar_t* output, int64_t batch, int64_t channels, int64_t height,
                                 int64_t width, int64_t num_points) {
  const int64_t total = batch * channels * num_points;
  launch(grid_size(total, kThreads), kThreads, point_sample_forward_kernel<scalar_t, coord_t>,
         input, coords, output, channels, height, width, num_points, total);
}

// grad_input (N, C, H, W), zeroed, and grad_coords (N, P, 2) from grad_output (N, C, P); the
// gradients of the image in the accumulation type. Needs non-empty grad_output and input.
template <typename scalar_t, typename coord_t, typename Launch>
void launch_point_sample_backward(const Launch& launch, bool deterministic,
                                  const at::opmath_type<scalar_t>* grad_output,
                                  const scalar_t* input, const coord_t* coords,
                                  at::opmath_type<scalar_t>* grad_input, coord_t* grad_coords,
                                  int64_t batch, int64_t channels, int64_t height, int64_t width,
                                  int64_t num_points) {
  using acc_t = at::opmath_type<scalar_t>;
  if (deterministic) {
    using Source = PointSampleGradSource<acc_t, coord_t>;
    const Source source{grad_output, coords, channels, height, width, num_points};
    launch(scatter_grid(batch * channels, height), kScatterThreads,
           scatter_rows_kernel<acc_t, Source>, source, grad_input, height, width, num_points);
  } else {
    const int64_t total = batch * channels * num_points;
    launch(grid_size(total, kThreads), kThreads,
           point_sample_grad_input_atomic_kernel<scalar_t, coord_t>, grad_output, coords,
           grad_input, channels, height, width, num_points, total);
  }
  const int64_t total_points = batch * num_points;
  launch(grid_size(total_points, kThreads), kThreads,
         point_sample_grad_coords_kernel<scalar_t, coord_t>, grad_output, input, coords,
         grad_coords, channels, height, width, num_points, total_points);
}

// ce, dice (N) and dice_sums (N, 3) of masks (N, H, W) against targets (N, Ht, Wt) at coords
// (N, P, 2); partial_sums holds N * loss_splits(P) * 4 values. Needs N > 0 and P > 0.
template <typename scalar_t, typename target_t, typename coord_t, typename Launch>
void launch_point_mask_loss_forward(const Launch& launch, const scalar_t* logits,
                                    const target_t* targets, const coord_t* coords,
                                    at::opmath_type<scalar_t>* partial_sums,
                                    at::opmath_type<scalar_t>* ce, at::opmath_type<scalar_t>* dice,
                                    at::opmath_type<scalar_t>* dice_sums, int64_t num_masks,
                                    int64_t height, int64_t width, int64_t target_height,
                                    int64_t target_width, int64_t num_points) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_splits = loss_splits(num_points);
  launch(num_masks * num_splits, kThreads,
         point_mask_loss_partial_kernel<scalar_t, target_t, coord_t>, logits, targets, coords,
         partial_sums, height, width, target_height, target_width, num_points, num_splits);
  launch(grid_size(num_masks, kThreads), kThreads, point_mask_loss_finalize_kernel<acc_t>,
         static_cast<const acc_t*>(partial_sums), ce, dice, dice_sums, num_masks, num_splits,
         num_points);
}

// Adds the loss gradient of every point to grad (N, H, W), zeroed, in the accumulation type.
// Needs N * H * W > 0, P > 0 and, without `deterministic`, N * loss_splits(P) < 2^31 blocks.
template <typename scalar_t, typename target_t, typename coord_t, typename Launch>
void launch_point_mask_loss_backward(const Launch& launch, bool deterministic,
                                     const PointLossGradSource<scalar_t, target_t, coord_t>& source,
                                     at::opmath_type<scalar_t>* grad, int64_t num_masks) {
  using acc_t = at::opmath_type<scalar_t>;
  using Source = PointLossGradSource<scalar_t, target_t, coord_t>;
  if (deterministic) {
    launch(scatter_grid(num_masks, source.height), kScatterThreads,
           scatter_rows_kernel<acc_t, Source>, source, grad, source.height, source.width,
           source.num_points);
  } else {
    const int64_t num_splits = loss_splits(source.num_points);
    launch(num_masks * num_splits, kThreads, point_loss_grad_atomic_kernel<Source, acc_t>, source,
           grad, num_splits);
  }
}

}  // namespace point_loss
}  // namespace m2f
