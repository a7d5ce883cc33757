// CPU kernels of point_sample, point_mask_loss and pairwise_mask_cost.
// Every kernel splits its work so that each output element is written by one thread in a fixed
// order, so the results (gradients included) are deterministic. The vectorized loops
// (cpu_kernels.h) are compiled once per x86-64 level, like masked attention's.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/dispatch.h"
#include "point_loss/sampling.h"
#include "point_loss/targets.h"

namespace m2f {
namespace point_loss {
namespace {

// Sums over points are accumulated in double: P can be 12,544 and the results are compared at 1e-5.
using sum_t = double;

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

void check_coords(const at::Tensor& coords, const at::Tensor& input, int64_t batch) {
  check_cpu(coords, "coords");
  TORCH_CHECK(coords.dim() == 3 && coords.size(0) == batch && coords.size(2) == 2,
              "coords must have shape (N, P, 2), got ", coords.sizes());
  TORCH_CHECK(coords.scalar_type() == input.scalar_type() || coords.scalar_type() == at::kFloat,
              "coords must be float32 or have the dtype of the input, got ", coords.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> point_sample_backward_cpu(const at::Tensor& grad_output,
                                                             const at::Tensor& input,
                                                             const at::Tensor& coords,
                                                             bool /*deterministic*/) {
  check_cpu(input, "input");
  check_cpu(grad_output, "grad_output");
  TORCH_CHECK(input.dim() == 4, "input must have shape (N, C, H, W), got ", input.sizes());
  check_coords(coords, input, input.size(0));
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2),
                width = input.size(3);
  const int64_t num_points = coords.size(1);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({batch, channels, num_points}),
              "grad_output must have shape (N, C, P), got ", grad_output.sizes());
  at::Tensor grad_output_acc = grad_output.to(accumulate_type(input.scalar_type())).contiguous();
  at::Tensor grad_input_acc =
      at::zeros(input.sizes(), input.options().dtype(accumulate_type(input.scalar_type())));
  at::Tensor coords_acc = coords.to(accumulate_type(input.scalar_type())).contiguous();
  at::Tensor grad_coords_acc = at::empty(coords.sizes(), coords_acc.options());
  M2F_DISPATCH_FLOATING_TYPES(input.scalar_type(), "point_sample_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* input_ptr = input.data_ptr<scalar_t>();
    const acc_t* coords_ptr = coords_acc.data_ptr<acc_t>();
    const acc_t* grad_output_ptr = grad_output_acc.data_ptr<acc_t>();
    acc_t* grad_input_ptr = grad_input_acc.data_ptr<acc_t>();
    acc_t* grad_coords_ptr = grad_coords_acc.data_ptr<acc_t>();
    // Each (n, c) plane of grad_input is owned by one thread.
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane_index = begin; plane_index < end; ++plane_index) {
        const int64_t n = plane_index / channels;
        acc_t* plane_grad = grad_input_ptr + plane_index * height * width;
        const acc_t* plane_grad_output = grad_output_ptr + plane_index * num_points;
        for (int64_t p = 0; p < num_points; ++p) {
          const int64_t coord_index = 2 * (n * num_points + p);
          const BilinearPoint<acc_t> point = locate_point<acc_t>(
              coords_ptr[coord_index], coords_ptr[coord_index + 1], height, width);
          const CornerWeights<acc_t> corners = corner_weights(height, width, point);
          const acc_t grad = plane_grad_output[p];
          for (int k = 0; k < corners.count; ++k)
            plane_grad[corners.index[k]] += grad * corners.weight[k];
        }
      }
    });
    at::parallel_for(0, batch * num_points, 256, [&](int64_t begin, int64_t end) {
      for (int64_t index = begin; index < end; ++index) {
        const int64_t n = index / num_points, p = index % num_points;
        const BilinearPoint<acc_t> point =
            locate_point<acc_t>(coords_ptr[2 * index], coords_ptr[2 * index + 1], height, width);
        acc_t grad_x = 0, grad_y = 0;
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* plane = input_ptr + (n * channels + c) * height * width;
          acc_t value_grad_x, value_grad_y;
          sample_plane_coord_grad<acc_t>(plane, height, width, point, &value_grad_x, &value_grad_y);
          const acc_t grad = grad_output_ptr[(n * channels + c) * num_points + p];
          grad_x += grad * value_grad_x;
          grad_y += grad * value_grad_y;
        }
        grad_coords_ptr[2 * index] = grad_x;
        grad_coords_ptr[2 * index + 1] = grad_y;
      }
    });
  });
  return {grad_input_acc.to(input.scalar_type()), grad_coords_acc.to(coords.scalar_type())};
}

void check_loss_inputs(const at::Tensor& mask_logits, const at::Tensor& target_masks,
                       const at::Tensor& coords) {
  check_cpu(mask_logits, "mask_logits");
  check_cpu(target_masks, "target_masks");
  TORCH_CHECK(mask_logits.dim() == 3, "mask_logits must have shape (N, H, W), got ",
              mask_logits.sizes());
  TORCH_CHECK(target_masks.dim() == 3 && target_masks.size(0) == mask_logits.size(0),
              "target_masks must have shape (N, Ht, Wt), got ", target_masks.sizes());
  check_target_type(target_masks, mask_logits, "target_masks", /*allow_bytes=*/true);
  check_coords(coords, mask_logits, mask_logits.size(0));
}

// Points per chunk in the loss kernels: a chunk is sampled first (sample_chunk), then its sigmoid /
// softplus terms are computed kVectorLanes at a time (logit_terms_chunk).
constexpr int64_t kChunk = 256;
// Sampling reads the (large) target planes at random; the point-by-point path prefetches the cells
// of the point this far ahead (the lane path, those of the next kVectorLanes points) so that
// several cache misses are in flight at once.
constexpr int64_t kPrefetchDistance = 16;

// One mask of point_mask_loss: its logits (height, width), its target (target_height,
// target_width) and its num_points sampling coords (x, y) in [0, 1].
template <typename acc_t, typename scalar_t, typename target_t>
struct MaskPoints {
  const scalar_t* logits;
  int64_t height, width;
  const target_t* targets;
  int64_t target_height, target_width;
  const acc_t* coords;
  int64_t num_points;

  // Mask n of the batch whose mask 0 this is.
  MaskPoints at(int64_t n) const {
    return {logits + n * height * width,
            height,
            width,
            targets + n * target_height * target_width,
            target_height,
            target_width,
            coords + 2 * n * num_points,
            num_points};
  }
};

// Mask 0 of point_mask_loss's inputs (coords in acc_t, targets read as target_t).
template <typename acc_t, typename scalar_t, typename target_t>
MaskPoints<acc_t, scalar_t, target_t> first_mask(const at::Tensor& mask_logits,
                                                 const target_t* targets,
                                                 const at::Tensor& target_masks,
                                                 const at::Tensor& coords) {
  return {mask_logits.data_ptr<scalar_t>(),
          mask_logits.size(1),
          mask_logits.size(2),
          targets,
          target_masks.size(1),
          target_masks.size(2),
          coords.data_ptr<acc_t>(),
          coords.size(1)};
}

// Sums over the points of one mask of the sigmoid CE, prob * target, prob and target.
struct MaskLossSums {
  sum_t ce = 0, prob_target = 0, prob = 0, target = 0;
};

#if M2F_CPU_X86_LEVELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace avx512 {
constexpr int64_t kVectorLanes = 16;
#include "point_loss/cpu_kernels.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace avx2 {
constexpr int64_t kVectorLanes = 8;
#include "point_loss/cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
constexpr int64_t kVectorLanes = 4;
#include "point_loss/cpu_kernels.h"
}  // namespace baseline

// The kernels of the level cpu_isa() picks.
template <typename acc_t, typename scalar_t, typename target_t>
MaskLossSums mask_loss_sums(CpuIsa isa, const MaskPoints<acc_t, scalar_t, target_t>& mask) {
  switch (isa) {
#if M2F_CPU_X86_LEVELS
    case CpuIsa::kAvx512:
      return avx512::mask_loss_sums(mask);
    case CpuIsa::kAvx2:
      return avx2::mask_loss_sums(mask);
#endif
    default:
      return baseline::mask_loss_sums(mask);
  }
}

template <typename acc_t, typename scalar_t, typename target_t>
void mask_loss_grad(CpuIsa isa, const MaskPoints<acc_t, scalar_t, target_t>& mask,
                    const PointLossGradScales<acc_t>& scales, acc_t* grad_plane) {
  switch (isa) {
#if M2F_CPU_X86_LEVELS
    case CpuIsa::kAvx512:
      return avx512::mask_loss_grad(mask, scales, grad_plane);
    case CpuIsa::kAvx2:
      return avx2::mask_loss_grad(mask, scales, grad_plane);
#endif
    default:
      return baseline::mask_loss_grad(mask, scales, grad_plane);
  }
}

template <typename acc_t>
void pairwise_rows(CpuIsa isa, const acc_t* logits, const acc_t* targets, const acc_t* target_sums,
                   int64_t num_targets, int64_t num_points, int64_t begin, int64_t end, acc_t* ce,
                   acc_t* dice) {
  switch (isa) {
#if M2F_CPU_X86_LEVELS
    case CpuIsa::kAvx512:
      return avx512::pairwise_rows(logits, targets, target_sums, num_targets, num_points, begin,
                                   end, ce, dice);
    case CpuIsa::kAvx2:
      return avx2::pairwise_rows(logits, targets, target_sums, num_targets, num_points, begin, end,
                                 ce, dice);
#endif
    default:
      return baseline::pairwise_rows(logits, targets, target_sums, num_targets, num_points, begin,
                                     end, ce, dice);
  }
}

template <typename scalar_t, typename acc_t>
void point_sample_points(CpuIsa isa, const scalar_t* input, int64_t channels, int64_t height,
                         int64_t width, const acc_t* coords, int64_t num_points, int64_t begin,
                         int64_t end, scalar_t* output) {
  switch (isa) {
#if M2F_CPU_X86_LEVELS
    case CpuIsa::kAvx512:
      return avx512::point_sample_points(input, channels, height, width, coords, num_points, begin,
                                         end, output);
    case CpuIsa::kAvx2:
      return avx2::point_sample_points(input, channels, height, width, coords, num_points, begin,
                                       end, output);
#endif
    default:
      return baseline::point_sample_points(input, channels, height, width, coords, num_points,
                                           begin, end, output);
  }
}

at::Tensor point_sample_forward_cpu(const at::Tensor& input, const at::Tensor& coords) {
  check_cpu(input, "input");
  TORCH_CHECK(input.dim() == 4, "input must have shape (N, C, H, W), got ", input.sizes());
  check_coords(coords, input, input.size(0));
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2),
                width = input.size(3);
  const int64_t num_points = coords.size(1);
  at::Tensor output = at::empty({batch, channels, num_points}, input.options());
  at::Tensor coords_acc = coords.to(accumulate_type(input.scalar_type())).contiguous();
  const CpuIsa isa = cpu_isa();
  M2F_DISPATCH_FLOATING_TYPES(input.scalar_type(), "point_sample_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* input_ptr = input.data_ptr<scalar_t>();
    const acc_t* coords_ptr = coords_acc.data_ptr<acc_t>();
    scalar_t* output_ptr = output.data_ptr<scalar_t>();
    // Tasks: (batch entry, chunk of kChunk points).
    const int64_t chunks = (num_points + kChunk - 1) / kChunk;
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / chunks, first = (task % chunks) * kChunk;
        point_sample_points(isa, input_ptr + n * channels * height * width, channels, height, width,
                            coords_ptr + 2 * n * num_points, num_points, first,
                            std::min(num_points, first + kChunk),
                            output_ptr + n * channels * num_points);
      }
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> point_mask_loss_forward_cpu(
    const at::Tensor& mask_logits, const at::Tensor& target_masks, const at::Tensor& coords) {
  check_loss_inputs(mask_logits, target_masks, coords);
  const int64_t num_masks = mask_logits.size(0);
  const int64_t num_points = coords.size(1);
  const auto out_options = mask_logits.options().dtype(accumulate_type(mask_logits.scalar_type()));
  at::Tensor ce = at::empty({num_masks}, out_options);
  at::Tensor dice = at::empty({num_masks}, out_options);
  at::Tensor dice_sums = at::empty({num_masks, 3}, out_options);
  if (num_points == 0)
    return {ce.zero_(), dice.zero_(), dice_sums.zero_()};  // ce: 0 over no points
  at::Tensor coords_acc = coords.to(accumulate_type(mask_logits.scalar_type())).contiguous();
  const CpuIsa isa = cpu_isa();
  M2F_DISPATCH_FLOATING_TYPES(mask_logits.scalar_type(), "point_mask_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* ce_ptr = ce.data_ptr<acc_t>();
    acc_t* dice_ptr = dice.data_ptr<acc_t>();
    acc_t* sums_ptr = dice_sums.data_ptr<acc_t>();
    dispatch_target_type<scalar_t>(target_masks, [&](auto targets_ptr) {
      using target_t = std::remove_cv_t<std::remove_pointer_t<decltype(targets_ptr)>>;
      const auto masks =
          first_mask<acc_t, scalar_t, target_t>(mask_logits, targets_ptr, target_masks, coords_acc);
      at::parallel_for(0, num_masks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const MaskPoints<acc_t, scalar_t, target_t> mask = masks.at(n);
          const MaskLossSums sums = mask_loss_sums(isa, mask);
          ce_ptr[n] = static_cast<acc_t>(sums.ce / static_cast<sum_t>(num_points));
          dice_ptr[n] =
              static_cast<acc_t>(dice_loss<sum_t>(sums.prob_target, sums.prob, sums.target));
          sums_ptr[3 * n] = static_cast<acc_t>(sums.prob_target);
          sums_ptr[3 * n + 1] = static_cast<acc_t>(sums.prob);
          sums_ptr[3 * n + 2] = static_cast<acc_t>(sums.target);
        }
      });
    });
  });
  return {ce, dice, dice_sums};
}

at::Tensor point_mask_loss_backward_cpu(const at::Tensor& grad_ce, const at::Tensor& grad_dice,
                                        const at::Tensor& mask_logits,
                                        const at::Tensor& target_masks, const at::Tensor& coords,
                                        const at::Tensor& dice_sums, bool /*deterministic*/) {
  check_loss_inputs(mask_logits, target_masks, coords);
  const int64_t num_masks = mask_logits.size(0),
                plane_size = mask_logits.size(1) * mask_logits.size(2);
  const int64_t num_points = coords.size(1);
  TORCH_CHECK(grad_ce.numel() == num_masks && grad_dice.numel() == num_masks,
              "grad_ce and grad_dice must have N elements");
  TORCH_CHECK(dice_sums.sizes() == at::IntArrayRef({num_masks, 3}),
              "dice_sums must have shape (N, 3)");
  const at::ScalarType acc_type = accumulate_type(mask_logits.scalar_type());
  at::Tensor grad_ce_acc = grad_ce.to(acc_type).contiguous();
  at::Tensor grad_dice_acc = grad_dice.to(acc_type).contiguous();
  at::Tensor dice_sums_acc = dice_sums.to(acc_type).contiguous();
  at::Tensor coords_acc = coords.to(acc_type).contiguous();
  at::Tensor grad_logits_acc =
      at::zeros(mask_logits.sizes(), mask_logits.options().dtype(acc_type));
  const CpuIsa isa = cpu_isa();
  M2F_DISPATCH_FLOATING_TYPES(mask_logits.scalar_type(), "point_mask_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* grad_ce_ptr = grad_ce_acc.data_ptr<acc_t>();
    const acc_t* grad_dice_ptr = grad_dice_acc.data_ptr<acc_t>();
    const acc_t* sums_ptr = dice_sums_acc.data_ptr<acc_t>();
    acc_t* grad_ptr = grad_logits_acc.data_ptr<acc_t>();
    dispatch_target_type<scalar_t>(target_masks, [&](auto targets_ptr) {
      using target_t = std::remove_cv_t<std::remove_pointer_t<decltype(targets_ptr)>>;
      const auto masks =
          first_mask<acc_t, scalar_t, target_t>(mask_logits, targets_ptr, target_masks, coords_acc);
      // Each mask's gradient plane is owned by one thread.
      at::parallel_for(0, num_masks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const MaskPoints<acc_t, scalar_t, target_t> mask = masks.at(n);
          const PointLossGradScales<acc_t> scales = point_loss_grad_scales<acc_t>(
              grad_ce_ptr[n], grad_dice_ptr[n], num_points, sums_ptr[3 * n], sums_ptr[3 * n + 1],
              sums_ptr[3 * n + 2]);
          mask_loss_grad(isa, mask, scales, grad_ptr + n * plane_size);
        }
      });
    });
  });
  return grad_logits_acc.to(mask_logits.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> pairwise_mask_cost_cpu(const at::Tensor& pred_point_logits,
                                                          const at::Tensor& target_point_labels) {
  check_cpu(pred_point_logits, "pred_point_logits");
  check_cpu(target_point_labels, "target_point_labels");
  TORCH_CHECK(pred_point_logits.dim() == 2, "pred_point_logits must have shape (Q, P)");
  TORCH_CHECK(
      target_point_labels.dim() == 2 && target_point_labels.size(1) == pred_point_logits.size(1),
      "target_point_labels must have shape (T, P)");
  check_target_type(target_point_labels, pred_point_logits, "target_point_labels",
                    /*allow_bytes=*/false);
  const int64_t num_queries = pred_point_logits.size(0), num_targets = target_point_labels.size(0);
  const int64_t num_points = pred_point_logits.size(1);
  TORCH_CHECK_VALUE(num_points > 0, "pred_point_logits must have at least one point (P >= 1)");
  const at::ScalarType acc_type = accumulate_type(pred_point_logits.scalar_type());
  at::Tensor ce =
      at::empty({num_queries, num_targets}, pred_point_logits.options().dtype(acc_type));
  at::Tensor dice =
      at::empty({num_queries, num_targets}, pred_point_logits.options().dtype(acc_type));
  if (num_queries == 0 || num_targets == 0) return {ce, dice};
  at::Tensor targets = target_point_labels.to(acc_type).contiguous();
  at::Tensor target_sums = at::empty({num_targets}, targets.options());
  const at::Tensor logits = pred_point_logits.to(acc_type).contiguous();
  const CpuIsa isa = cpu_isa();
  M2F_DISPATCH_FLOATING_TYPES(pred_point_logits.scalar_type(), "pairwise_mask_cost_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* logits_ptr = logits.data_ptr<acc_t>();
    const acc_t* targets_ptr = targets.data_ptr<acc_t>();
    acc_t* target_sums_ptr = target_sums.data_ptr<acc_t>();
    at::parallel_for(0, num_targets, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {  // in double, without a (T, P) double copy
        double sum = 0.0;
        for (int64_t p = 0; p < num_points; ++p) sum += targets_ptr[t * num_points + p];
        target_sums_ptr[t] = static_cast<acc_t>(sum);
      }
    });
    acc_t* ce_ptr = ce.data_ptr<acc_t>();
    acc_t* dice_ptr = dice.data_ptr<acc_t>();
    at::parallel_for(0, num_queries, 1, [&](int64_t begin, int64_t end) {
      pairwise_rows(isa, logits_ptr, targets_ptr, target_sums_ptr, num_targets, num_points, begin,
                    end, ce_ptr, dice_ptr);
    });
  });
  return {ce, dice};
}

}  // namespace
}  // namespace point_loss
}  // namespace m2f

TORCH_LIBRARY_IMPL(m2f_kernels, CPU, m) {
  m.impl("_point_sample_forward", &m2f::point_loss::point_sample_forward_cpu);
  m.impl("_point_sample_backward", &m2f::point_loss::point_sample_backward_cpu);
  m.impl("_point_mask_loss_forward", &m2f::point_loss::point_mask_loss_forward_cpu);
  m.impl("_point_mask_loss_backward", &m2f::point_loss::point_mask_loss_backward_cpu);
  m.impl("_pairwise_mask_cost", &m2f::point_loss::pairwise_mask_cost_cpu);
}
