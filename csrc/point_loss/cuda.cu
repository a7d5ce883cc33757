// point_sample, point_mask_loss and pairwise_mask_cost on CUDA: argument checks, buffers and
// launches on the current stream of the kernels and launch sequences in kernels.cuh and
// pairwise_kernels.cuh.
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
#include "common/stream_launch.cuh"
#include "point_loss/kernels.cuh"
#include "point_loss/pairwise_kernels.cuh"
#include "point_loss/targets.h"

namespace m2f {
namespace point_loss {
namespace {

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
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

// The limits of scatter_grid.
void check_scatter_grid(int64_t planes, int64_t height) {
  TORCH_CHECK(planes <= std::numeric_limits<int32_t>::max() && scatter_row_blocks(height) <= 65535,
              "the deterministic backward supports at most 2^31 - 1 planes of at most ",
              65535 * kScatterThreads, " rows, got ", planes, " planes of ", height, " rows");
}

// ---------------------------------------------------------------------------------------------------------
// point_sample

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
  const StreamLaunch launch{at::cuda::getCurrentCUDAStream()};
  M2F_DISPATCH_FLOATING_TYPES(input.scalar_type(), "point_sample_forward_cuda", [&] {
    dispatch_coords_type<scalar_t>(coords, [&](auto coords_ptr) {
      launch_point_sample_forward(launch, input.data_ptr<scalar_t>(), coords_ptr,
                                  output.data_ptr<scalar_t>(), batch, channels, height, width,
                                  num_points);
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
  if (deterministic) check_scatter_grid(batch * channels, height);
  const StreamLaunch launch{at::cuda::getCurrentCUDAStream()};
  M2F_DISPATCH_FLOATING_TYPES(input.scalar_type(), "point_sample_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_coords_type<scalar_t>(coords, [&](auto coords_ptr) {
      using coord_t = std::remove_const_t<std::remove_pointer_t<decltype(coords_ptr)>>;
      launch_point_sample_backward(
          launch, deterministic, grad_output_acc.data_ptr<acc_t>(), input.data_ptr<scalar_t>(),
          coords_ptr, grad_input_acc.data_ptr<acc_t>(), grad_coords.data_ptr<coord_t>(), batch,
          channels, height, width, num_points);
    });
  });
  return {grad_input_acc.to(input.scalar_type()), grad_coords};
}

// ---------------------------------------------------------------------------------------------------------
// point_mask_loss

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

// The forward and the atomic backward launch a block per loss_splits(P) points of each mask.
void check_loss_blocks(int64_t num_masks, int64_t num_points) {
  TORCH_CHECK(num_masks * loss_splits(num_points) <= std::numeric_limits<int32_t>::max(),
              "point_mask_loss supports at most 2^31 - 1 blocks of ", kLossSplitPoints,
              " points, got ", num_masks, " masks of ", num_points, " points");
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
  check_loss_blocks(num_masks, num_points);
  const int64_t num_splits = loss_splits(num_points);
  at::Tensor partial_sums = at::empty({num_masks, num_splits, 4}, out_options);
  const StreamLaunch launch{at::cuda::getCurrentCUDAStream()};
  M2F_DISPATCH_FLOATING_TYPES(mask_logits.scalar_type(), "point_mask_loss_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_target_type<scalar_t>(target_masks, [&](auto targets_ptr) {
      dispatch_coords_type<scalar_t>(coords, [&](auto coords_ptr) {
        launch_point_mask_loss_forward(launch, mask_logits.data_ptr<scalar_t>(), targets_ptr,
                                       coords_ptr, partial_sums.data_ptr<acc_t>(),
                                       ce.data_ptr<acc_t>(), dice.data_ptr<acc_t>(),
                                       dice_sums.data_ptr<acc_t>(), num_masks, height, width,
                                       target_height, target_width, num_points);
      });
    });
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
  if (deterministic) {
    check_scatter_grid(num_masks, height);
  } else {
    check_loss_blocks(num_masks, num_points);
  }
  const StreamLaunch launch{at::cuda::getCurrentCUDAStream()};
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
        launch_point_mask_loss_backward(launch, deterministic, source, grad_acc.data_ptr<acc_t>(),
                                        num_masks);
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
  const StreamLaunch launch{at::cuda::getCurrentCUDAStream()};
  M2F_DISPATCH_FLOATING_TYPES(pred_point_logits.scalar_type(), "pairwise_mask_cost_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_soft_target_type<scalar_t>(target_point_labels, [&](auto labels_ptr) {
      launch_pairwise_mask_cost(launch, plan, pred_point_logits.data_ptr<scalar_t>(), labels_ptr,
                                partial_dots.data_ptr<acc_t>(),
                                partial_query_sums.data_ptr<acc_t>(),
                                partial_target_sums.data_ptr<acc_t>(), ce.data_ptr<acc_t>(),
                                dice.data_ptr<acc_t>(), num_queries, num_targets, num_points);
    });
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
