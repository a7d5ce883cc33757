// CPU kernels of point_sample, point_mask_loss and pairwise_mask_cost.
// Every kernel splits its work so that each output element is written by one thread in a fixed
// order, so the results (gradients included) are deterministic.
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

#include "common/cpu_multiversion.h"
#include "common/dispatch.h"
#include "point_loss/sampling.h"

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

at::Tensor point_sample_forward_cpu(const at::Tensor& input, const at::Tensor& coords) {
  check_cpu(input, "input");
  TORCH_CHECK(input.dim() == 4, "input must have shape (N, C, H, W), got ", input.sizes());
  check_coords(coords, input, input.size(0));
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2),
                width = input.size(3);
  const int64_t num_points = coords.size(1);
  at::Tensor output = at::empty({batch, channels, num_points}, input.options());
  at::Tensor coords_acc = coords.to(accumulate_type(input.scalar_type())).contiguous();
  M2F_DISPATCH_FLOATING_TYPES(input.scalar_type(), "point_sample_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* input_ptr = input.data_ptr<scalar_t>();
    const acc_t* coords_ptr = coords_acc.data_ptr<acc_t>();
    scalar_t* output_ptr = output.data_ptr<scalar_t>();
    at::parallel_for(0, batch * num_points, 256, [&](int64_t begin, int64_t end) {
      for (int64_t index = begin; index < end; ++index) {
        const int64_t n = index / num_points, p = index % num_points;
        const BilinearPoint<acc_t> point =
            locate_point<acc_t>(coords_ptr[2 * index], coords_ptr[2 * index + 1], height, width);
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* plane = input_ptr + (n * channels + c) * height * width;
          output_ptr[(n * channels + c) * num_points + p] =
              static_cast<scalar_t>(sample_plane<acc_t>(plane, height, width, point));
        }
      }
    });
  });
  return output;
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
  const at::ScalarType target_type = target_masks.scalar_type();
  TORCH_CHECK(target_type == at::kByte || target_type == at::kBool ||
                  target_type == mask_logits.scalar_type(),
              "target_masks must be uint8, bool or the dtype of mask_logits, got ", target_type);
  check_coords(coords, mask_logits, mask_logits.size(0));
}

// Points per chunk in the loss kernels: a chunk is sampled first (scalar gathers, with prefetch),
// then its sigmoid / softplus terms are computed 4 lanes at a time (logit_terms_chunk).
constexpr int64_t kChunk = 256;
// Sampling reads the (large) target planes at random; the cells of the point this far ahead are
// prefetched so that several cache misses are in flight at once.
constexpr int64_t kPrefetchDistance = 16;

template <typename acc_t, typename value_t>
M2F_CPU_INLINE void prefetch_cell(const value_t* plane, int64_t height, int64_t width,
                                  const acc_t* coords) {
#if defined(__GNUC__)
  const BilinearPoint<acc_t> point = locate_point<acc_t>(coords[0], coords[1], height, width);
  if (!point.valid) return;
  const int64_t col = point.x0 < 0 ? 0 : point.x0;
  if (point.y0 >= 0) __builtin_prefetch(plane + point.y0 * width + col);
  if (point.y0 + 1 < height) __builtin_prefetch(plane + (point.y0 + 1) * width + col);
#endif
}

// sigmoid(x) and log(1 + exp(-|x|)) of a chunk of logits. The float version works on 16 lanes at a
// time with GCC/Clang vector extensions (one AVX-512 register, or several AVX2/SSE/NEON ones,
// whichever the calling M2F_CPU_MULTIVERSION clone targets): exp by range reduction and a degree-7
// Taylor polynomial, log1p by its atanh series (relative errors below 1e-7).
// `count` is rounded up to a multiple of 16: the buffers hold kChunk entries.
M2F_CPU_INLINE void logit_terms_chunk(const double* logits, double* probs, double* log_terms,
                                      int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const LogitTerms<double> terms = logit_terms(logits[i]);
    probs[i] = terms.prob;
    if (log_terms != nullptr) log_terms[i] = terms.log_term;
  }
}

#if defined(__GNUC__)
// The vector helpers are always inlined, so no vector crosses a function boundary whose ABI
// depends on the instruction set.
#pragma GCC diagnostic ignored "-Wpsabi"
constexpr int64_t kVectorLanes = 16;
typedef float FloatVector __attribute__((vector_size(4 * kVectorLanes)));
typedef int32_t IntVector __attribute__((vector_size(4 * kVectorLanes)));

M2F_CPU_INLINE FloatVector splat(float value) { return FloatVector{} + value; }

// Lanes of if_true where mask is all ones, of if_false where it is zero.
M2F_CPU_INLINE FloatVector blend(IntVector mask, FloatVector if_true, FloatVector if_false) {
  return reinterpret_cast<FloatVector>((mask & reinterpret_cast<IntVector>(if_true)) |
                                       (~mask & reinterpret_cast<IntVector>(if_false)));
}

// exp(v) for v <= 0: 2^k exp(r), k = round(v / ln 2), |r| <= ln(2) / 2.
M2F_CPU_INLINE FloatVector exp_nonpositive(FloatVector v) {
  v = blend(v < splat(-87.0f), splat(-87.0f), v);  // exp(-87) is still a normal float
  const IntVector k = __builtin_convertvector(v * splat(1.44269504f) - splat(0.5f), IntVector);
  const FloatVector k_float = __builtin_convertvector(k, FloatVector);
  const FloatVector r =
      (v - k_float * splat(0.693145751953125f)) - k_float * splat(1.428606765330187e-06f);
  FloatVector poly = splat(1.0f / 5040.0f);
  poly = poly * r + splat(1.0f / 720.0f);
  poly = poly * r + splat(1.0f / 120.0f);
  poly = poly * r + splat(1.0f / 24.0f);
  poly = poly * r + splat(1.0f / 6.0f);
  poly = poly * r + splat(0.5f);
  poly = poly * r + splat(1.0f);
  poly = poly * r + splat(1.0f);
  return poly * reinterpret_cast<FloatVector>((k + 127) << 23);
}

// log(1 + u) for u in [0, 1]: 2 atanh(s), s = u / (2 + u) <= 1/3, series up to s^15.
M2F_CPU_INLINE FloatVector log1p_unit(FloatVector u) {
  const FloatVector s = u / (splat(2.0f) + u);
  const FloatVector s2 = s * s;
  FloatVector series = splat(1.0f / 15.0f);
  series = series * s2 + splat(1.0f / 13.0f);
  series = series * s2 + splat(1.0f / 11.0f);
  series = series * s2 + splat(1.0f / 9.0f);
  series = series * s2 + splat(1.0f / 7.0f);
  series = series * s2 + splat(1.0f / 5.0f);
  series = series * s2 + splat(1.0f / 3.0f);
  series = series * s2 + splat(1.0f);
  return splat(2.0f) * s * series;
}

M2F_CPU_INLINE void logit_terms_chunk(const float* logits, float* probs, float* log_terms,
                                      int64_t count) {
  for (int64_t i = 0; i < count; i += kVectorLanes) {
    FloatVector logit;
    std::memcpy(&logit, logits + i, sizeof(logit));
    const IntVector negative =
        reinterpret_cast<IntVector>(logit) >> 31;  // all ones where the sign bit is set
    const FloatVector magnitude =
        reinterpret_cast<FloatVector>(reinterpret_cast<IntVector>(logit) & 0x7fffffff);
    const FloatVector decay = exp_nonpositive(-magnitude);  // exp(-|x|)
    const FloatVector inv = splat(1.0f) / (splat(1.0f) + decay);
    const FloatVector prob = blend(negative, decay * inv, inv);
    std::memcpy(probs + i, &prob, sizeof(prob));
    if (log_terms != nullptr) {
      const FloatVector log_term = log1p_unit(decay);
      std::memcpy(log_terms + i, &log_term, sizeof(log_term));
    }
  }
}
#else
inline void logit_terms_chunk(const float* logits, float* probs, float* log_terms, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const LogitTerms<float> terms = logit_terms(logits[i]);
    probs[i] = terms.prob;
    if (log_terms != nullptr) log_terms[i] = terms.log_term;
  }
}
#endif

// Samples the logits and targets of points [begin, begin + count) of one mask (count <= kChunk).
template <typename acc_t, typename scalar_t, typename target_t>
M2F_CPU_INLINE void sample_chunk(const scalar_t* logit_plane, int64_t height, int64_t width,
                                 const target_t* target_plane, int64_t target_height,
                                 int64_t target_width, const acc_t* mask_coords, int64_t num_points,
                                 int64_t begin, int64_t count, acc_t* logits, acc_t* targets) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t p = begin + i;
    if (p + kPrefetchDistance < num_points) {
      const acc_t* ahead = mask_coords + 2 * (p + kPrefetchDistance);
      prefetch_cell(target_plane, target_height, target_width, ahead);
    }
    const acc_t x = mask_coords[2 * p];
    const acc_t y = mask_coords[2 * p + 1];
    logits[i] =
        sample_plane<acc_t>(logit_plane, height, width, locate_point<acc_t>(x, y, height, width));
    targets[i] = sample_plane<acc_t>(target_plane, target_height, target_width,
                                     locate_point<acc_t>(x, y, target_height, target_width));
  }
}

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
};

// Sums over the points of one mask of the sigmoid CE, prob * target, prob and target.
struct MaskLossSums {
  sum_t ce = 0, prob_target = 0, prob = 0, target = 0;
};

template <typename acc_t, typename scalar_t, typename target_t>
M2F_CPU_MULTIVERSION MaskLossSums
mask_loss_sums(const MaskPoints<acc_t, scalar_t, target_t>& mask) {
  MaskLossSums sums;
  alignas(64) acc_t logits[kChunk] = {}, targets[kChunk] = {}, probs[kChunk], log_terms[kChunk];
  for (int64_t begin = 0; begin < mask.num_points; begin += kChunk) {
    const int64_t count = std::min(kChunk, mask.num_points - begin);
    sample_chunk(mask.logits, mask.height, mask.width, mask.targets, mask.target_height,
                 mask.target_width, mask.coords, mask.num_points, begin, count, logits, targets);
    logit_terms_chunk(logits, probs, log_terms, count);
    for (int64_t i = 0; i < count; ++i) {
      sums.ce += sigmoid_ce(logits[i], log_terms[i], targets[i]);
      sums.prob_target += probs[i] * targets[i];
      sums.prob += probs[i];
      sums.target += targets[i];
    }
  }
  return sums;
}

// Adds the loss gradient of every point of one mask to grad_plane (height, width).
template <typename acc_t, typename scalar_t, typename target_t>
M2F_CPU_MULTIVERSION void mask_loss_grad(const MaskPoints<acc_t, scalar_t, target_t>& mask,
                                         const PointLossGradScales<acc_t>& scales,
                                         acc_t* grad_plane) {
  alignas(64) acc_t logits[kChunk] = {}, targets[kChunk] = {}, probs[kChunk], grads[kChunk];
  for (int64_t begin = 0; begin < mask.num_points; begin += kChunk) {
    const int64_t count = std::min(kChunk, mask.num_points - begin);
    sample_chunk(mask.logits, mask.height, mask.width, mask.targets, mask.target_height,
                 mask.target_width, mask.coords, mask.num_points, begin, count, logits, targets);
    logit_terms_chunk(logits, probs, static_cast<acc_t*>(nullptr), count);
    for (int64_t i = 0; i < count; ++i) grads[i] = point_loss_grad(scales, probs[i], targets[i]);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t p = begin + i;
      const BilinearPoint<acc_t> point =
          locate_point<acc_t>(mask.coords[2 * p], mask.coords[2 * p + 1], mask.height, mask.width);
      const CornerWeights<acc_t> corners = corner_weights(mask.height, mask.width, point);
      for (int k = 0; k < corners.count; ++k)
        grad_plane[corners.index[k]] += grads[i] * corners.weight[k];
    }
  }
}

// Calls body(target_t) with the element type used to read target_masks.
template <typename scalar_t, typename Body>
void dispatch_target_type(const at::Tensor& target_masks, Body&& body) {
  if (target_masks.scalar_type() == at::kByte || target_masks.scalar_type() == at::kBool) {
    body(static_cast<const uint8_t*>(target_masks.data_ptr()));
  } else {
    body(target_masks.data_ptr<scalar_t>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> point_mask_loss_forward_cpu(
    const at::Tensor& mask_logits, const at::Tensor& target_masks, const at::Tensor& coords) {
  check_loss_inputs(mask_logits, target_masks, coords);
  const int64_t num_masks = mask_logits.size(0), height = mask_logits.size(1),
                width = mask_logits.size(2);
  const int64_t target_height = target_masks.size(1), target_width = target_masks.size(2);
  const int64_t num_points = coords.size(1);
  const auto out_options = mask_logits.options().dtype(accumulate_type(mask_logits.scalar_type()));
  at::Tensor ce = at::empty({num_masks}, out_options);
  at::Tensor dice = at::empty({num_masks}, out_options);
  at::Tensor dice_sums = at::empty({num_masks, 3}, out_options);
  at::Tensor coords_acc = coords.to(accumulate_type(mask_logits.scalar_type())).contiguous();
  M2F_DISPATCH_FLOATING_TYPES(mask_logits.scalar_type(), "point_mask_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* logits_ptr = mask_logits.data_ptr<scalar_t>();
    const acc_t* coords_ptr = coords_acc.data_ptr<acc_t>();
    acc_t* ce_ptr = ce.data_ptr<acc_t>();
    acc_t* dice_ptr = dice.data_ptr<acc_t>();
    acc_t* sums_ptr = dice_sums.data_ptr<acc_t>();
    dispatch_target_type<scalar_t>(target_masks, [&](auto targets_ptr) {
      using target_t = std::remove_cv_t<std::remove_pointer_t<decltype(targets_ptr)>>;
      at::parallel_for(0, num_masks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const MaskPoints<acc_t, scalar_t, target_t> mask{
              logits_ptr + n * height * width,
              height,
              width,
              targets_ptr + n * target_height * target_width,
              target_height,
              target_width,
              coords_ptr + 2 * n * num_points,
              num_points};
          const MaskLossSums sums = mask_loss_sums(mask);
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
  const int64_t num_masks = mask_logits.size(0), height = mask_logits.size(1),
                width = mask_logits.size(2);
  const int64_t target_height = target_masks.size(1), target_width = target_masks.size(2);
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
  M2F_DISPATCH_FLOATING_TYPES(mask_logits.scalar_type(), "point_mask_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* logits_ptr = mask_logits.data_ptr<scalar_t>();
    const acc_t* coords_ptr = coords_acc.data_ptr<acc_t>();
    const acc_t* grad_ce_ptr = grad_ce_acc.data_ptr<acc_t>();
    const acc_t* grad_dice_ptr = grad_dice_acc.data_ptr<acc_t>();
    const acc_t* sums_ptr = dice_sums_acc.data_ptr<acc_t>();
    acc_t* grad_ptr = grad_logits_acc.data_ptr<acc_t>();
    dispatch_target_type<scalar_t>(target_masks, [&](auto targets_ptr) {
      using target_t = std::remove_cv_t<std::remove_pointer_t<decltype(targets_ptr)>>;
      // Each mask's gradient plane is owned by one thread.
      at::parallel_for(0, num_masks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const MaskPoints<acc_t, scalar_t, target_t> mask{
              logits_ptr + n * height * width,
              height,
              width,
              targets_ptr + n * target_height * target_width,
              target_height,
              target_width,
              coords_ptr + 2 * n * num_points,
              num_points};
          const PointLossGradScales<acc_t> scales = point_loss_grad_scales<acc_t>(
              grad_ce_ptr[n], grad_dice_ptr[n], num_points, sums_ptr[3 * n], sums_ptr[3 * n + 1],
              sums_ptr[3 * n + 2]);
          mask_loss_grad(mask, scales, grad_ptr + n * height * width);
        }
      });
    });
  });
  return grad_logits_acc.to(mask_logits.scalar_type());
}

// Number of independent partial sums in the pairwise dot products (lets the compiler vectorize
// them).
constexpr int64_t kDotLanes = 16;
// Targets whose dot products share one pass over a chunk of a query's terms.
constexpr int64_t kTargetBlock = 4;

// Partial sums of one (query, target) pair: positive . t, negative . (1 - t) and prob . t, each in
// kDotLanes lanes.
template <typename acc_t>
struct PairwiseDots {
  acc_t positive[kDotLanes];
  acc_t negative[kDotLanes];
  acc_t prob[kDotLanes];
};

// Adds points [0, count) of a chunk to the dots of kTargets targets (rows of `targets`, stride
// num_points, already offset to the chunk). Full groups of kDotLanes points go to their lanes, the
// rest to the first lanes.
template <int64_t kTargets, typename acc_t>
M2F_CPU_INLINE void accumulate_dots_block(const acc_t* positive, const acc_t* negative,
                                          const acc_t* prob, const acc_t* targets,
                                          int64_t num_points, int64_t count,
                                          PairwiseDots<acc_t>* dots) {
  acc_t positive_dot[kTargets][kDotLanes], negative_dot[kTargets][kDotLanes],
      prob_dot[kTargets][kDotLanes];
  for (int64_t t = 0; t < kTargets; ++t) {
    for (int64_t lane = 0; lane < kDotLanes; ++lane) {
      positive_dot[t][lane] = dots[t].positive[lane];
      negative_dot[t][lane] = dots[t].negative[lane];
      prob_dot[t][lane] = dots[t].prob[lane];
    }
  }
  int64_t p = 0;
  for (; p + kDotLanes <= count; p += kDotLanes) {
    for (int64_t t = 0; t < kTargets; ++t) {
      const acc_t* target = targets + t * num_points + p;
      for (int64_t lane = 0; lane < kDotLanes; ++lane) {
        const acc_t label = target[lane];
        positive_dot[t][lane] += positive[p + lane] * label;
        negative_dot[t][lane] += negative[p + lane] * (acc_t(1) - label);
        prob_dot[t][lane] += prob[p + lane] * label;
      }
    }
  }
  for (int64_t t = 0; t < kTargets; ++t) {
    const acc_t* target = targets + t * num_points;
    for (int64_t q = p, lane = 0; q < count; ++q, ++lane) {
      positive_dot[t][lane] += positive[q] * target[q];
      negative_dot[t][lane] += negative[q] * (acc_t(1) - target[q]);
      prob_dot[t][lane] += prob[q] * target[q];
    }
    for (int64_t lane = 0; lane < kDotLanes; ++lane) {
      dots[t].positive[lane] = positive_dot[t][lane];
      dots[t].negative[lane] = negative_dot[t][lane];
      dots[t].prob[lane] = prob_dot[t][lane];
    }
  }
}

template <typename acc_t>
sum_t sum_lanes(const acc_t* lanes) {
  sum_t total = 0;
  for (int64_t lane = 0; lane < kDotLanes; ++lane) total += lanes[lane];
  return total;
}

// The CE and dice costs of one query row of P logits x against every target, kChunk points at a
// time: the chunk's terms softplus(-x), softplus(x) (the sigmoid-CE against labels 1 and 0) and
// sigmoid(x) come from logit_terms_chunk, then go into the dots of every target while they are in
// L1. `dots` holds num_targets entries.
template <typename acc_t>
M2F_CPU_MULTIVERSION void pairwise_query_costs(const acc_t* logits, const acc_t* targets,
                                               const acc_t* target_sums, int64_t num_targets,
                                               int64_t num_points, PairwiseDots<acc_t>* dots,
                                               acc_t* ce, acc_t* dice) {
  std::memset(static_cast<void*>(dots), 0, num_targets * sizeof(PairwiseDots<acc_t>));
  alignas(64) acc_t chunk[kChunk] = {}, probs[kChunk], log_terms[kChunk], positive[kChunk],
                    negative[kChunk];
  acc_t prob_lanes[kDotLanes] = {};
  for (int64_t begin = 0; begin < num_points; begin += kChunk) {
    const int64_t count = std::min(kChunk, num_points - begin);
    std::memcpy(chunk, logits + begin, count * sizeof(acc_t));
    logit_terms_chunk(chunk, probs, log_terms, count);
    for (int64_t i = 0; i < count; ++i) {
      positive[i] = std::max(-chunk[i], acc_t(0)) + log_terms[i];
      negative[i] = std::max(chunk[i], acc_t(0)) + log_terms[i];
    }
    for (int64_t i = 0; i < count; ++i) prob_lanes[i % kDotLanes] += probs[i];
    const acc_t* chunk_targets = targets + begin;
    int64_t t = 0;
    for (; t + kTargetBlock <= num_targets; t += kTargetBlock) {
      accumulate_dots_block<kTargetBlock>(positive, negative, probs, chunk_targets + t * num_points,
                                          num_points, count, dots + t);
    }
    for (; t < num_targets; ++t) {
      accumulate_dots_block<1>(positive, negative, probs, chunk_targets + t * num_points,
                               num_points, count, dots + t);
    }
  }
  const sum_t prob_sum = sum_lanes(prob_lanes);
  for (int64_t t = 0; t < num_targets; ++t) {
    ce[t] = static_cast<acc_t>(pairwise_ce_cost<sum_t>(sum_lanes(dots[t].positive),
                                                       sum_lanes(dots[t].negative), num_points));
    dice[t] = static_cast<acc_t>(pairwise_dice_cost<sum_t>(sum_lanes(dots[t].prob), prob_sum,
                                                           static_cast<sum_t>(target_sums[t])));
  }
}

std::tuple<at::Tensor, at::Tensor> pairwise_mask_cost_cpu(const at::Tensor& pred_point_logits,
                                                          const at::Tensor& target_point_labels) {
  check_cpu(pred_point_logits, "pred_point_logits");
  check_cpu(target_point_labels, "target_point_labels");
  TORCH_CHECK(pred_point_logits.dim() == 2, "pred_point_logits must have shape (Q, P)");
  TORCH_CHECK(
      target_point_labels.dim() == 2 && target_point_labels.size(1) == pred_point_logits.size(1),
      "target_point_labels must have shape (T, P)");
  TORCH_CHECK(target_point_labels.scalar_type() == pred_point_logits.scalar_type(),
              "target_point_labels must have the dtype of pred_point_logits");
  const int64_t num_queries = pred_point_logits.size(0), num_targets = target_point_labels.size(0);
  const int64_t num_points = pred_point_logits.size(1);
  const at::ScalarType acc_type = accumulate_type(pred_point_logits.scalar_type());
  at::Tensor ce =
      at::empty({num_queries, num_targets}, pred_point_logits.options().dtype(acc_type));
  at::Tensor dice =
      at::empty({num_queries, num_targets}, pred_point_logits.options().dtype(acc_type));
  if (num_queries == 0 || num_targets == 0) return {ce, dice};
  at::Tensor targets = target_point_labels.to(acc_type).contiguous();
  at::Tensor target_sums = targets.sum(1, /*keepdim=*/false, at::kDouble).to(acc_type).contiguous();
  const at::Tensor logits = pred_point_logits.to(acc_type).contiguous();
  M2F_DISPATCH_FLOATING_TYPES(pred_point_logits.scalar_type(), "pairwise_mask_cost_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* logits_ptr = logits.data_ptr<acc_t>();
    const acc_t* targets_ptr = targets.data_ptr<acc_t>();
    const acc_t* target_sums_ptr = target_sums.data_ptr<acc_t>();
    acc_t* ce_ptr = ce.data_ptr<acc_t>();
    acc_t* dice_ptr = dice.data_ptr<acc_t>();
    at::parallel_for(0, num_queries, 1, [&](int64_t begin, int64_t end) {
      std::vector<PairwiseDots<acc_t>> dots(num_targets);
      for (int64_t q = begin; q < end; ++q) {
        pairwise_query_costs(logits_ptr + q * num_points, targets_ptr, target_sums_ptr, num_targets,
                             num_points, dots.data(), ce_ptr + q * num_targets,
                             dice_ptr + q * num_targets);
      }
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
