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
inline void prefetch_cell(const value_t* plane, int64_t height, int64_t width,
                          const acc_t* coords) {
#if defined(__GNUC__)
  const BilinearPoint<acc_t> point = locate_point<acc_t>(coords[0], coords[1], height, width);
  if (!point.valid) return;
  const int64_t col = point.x0 < 0 ? 0 : point.x0;
  if (point.y0 >= 0) __builtin_prefetch(plane + point.y0 * width + col);
  if (point.y0 + 1 < height) __builtin_prefetch(plane + (point.y0 + 1) * width + col);
#endif
}

// sigmoid(x) and log(1 + exp(-|x|)) of a chunk of logits. The float version works on 4 lanes at a
// time with GCC/Clang vector extensions (SSE on x86-64, NEON on ARM): exp by range reduction and a
// degree-7 Taylor polynomial, log1p by its atanh series (relative errors below 1e-7).
// `count` is rounded up to a multiple of 4: the buffers hold kChunk entries.
inline void logit_terms_chunk(const double* logits, double* probs, double* log_terms,
                              int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const LogitTerms<double> terms = logit_terms(logits[i]);
    probs[i] = terms.prob;
    if (log_terms != nullptr) log_terms[i] = terms.log_term;
  }
}

#if defined(__GNUC__)
typedef float Float4 __attribute__((vector_size(16)));
typedef int32_t Int4 __attribute__((vector_size(16)));

inline Float4 splat(float value) { return Float4{value, value, value, value}; }

// Lanes of if_true where mask is all ones, of if_false where it is zero.
inline Float4 blend(Int4 mask, Float4 if_true, Float4 if_false) {
  return reinterpret_cast<Float4>((mask & reinterpret_cast<Int4>(if_true)) |
                                  (~mask & reinterpret_cast<Int4>(if_false)));
}

// exp(v) for v <= 0: 2^k exp(r), k = round(v / ln 2), |r| <= ln(2) / 2.
inline Float4 exp_nonpositive(Float4 v) {
  v = blend(v < splat(-87.0f), splat(-87.0f), v);  // exp(-87) is still a normal float
  const Int4 k = __builtin_convertvector(v * splat(1.44269504f) - splat(0.5f), Int4);
  const Float4 k_float = __builtin_convertvector(k, Float4);
  const Float4 r =
      (v - k_float * splat(0.693145751953125f)) - k_float * splat(1.428606765330187e-06f);
  Float4 poly = splat(1.0f / 5040.0f);
  poly = poly * r + splat(1.0f / 720.0f);
  poly = poly * r + splat(1.0f / 120.0f);
  poly = poly * r + splat(1.0f / 24.0f);
  poly = poly * r + splat(1.0f / 6.0f);
  poly = poly * r + splat(0.5f);
  poly = poly * r + splat(1.0f);
  poly = poly * r + splat(1.0f);
  return poly * reinterpret_cast<Float4>((k + 127) << 23);
}

// log(1 + u) for u in [0, 1]: 2 atanh(s), s = u / (2 + u) <= 1/3, series up to s^15.
inline Float4 log1p_unit(Float4 u) {
  const Float4 s = u / (splat(2.0f) + u);
  const Float4 s2 = s * s;
  Float4 series = splat(1.0f / 15.0f);
  series = series * s2 + splat(1.0f / 13.0f);
  series = series * s2 + splat(1.0f / 11.0f);
  series = series * s2 + splat(1.0f / 9.0f);
  series = series * s2 + splat(1.0f / 7.0f);
  series = series * s2 + splat(1.0f / 5.0f);
  series = series * s2 + splat(1.0f / 3.0f);
  series = series * s2 + splat(1.0f);
  return splat(2.0f) * s * series;
}

inline void logit_terms_chunk(const float* logits, float* probs, float* log_terms, int64_t count) {
  for (int64_t i = 0; i < count; i += 4) {
    Float4 logit;
    std::memcpy(&logit, logits + i, sizeof(logit));
    const Int4 negative =
        reinterpret_cast<Int4>(logit) >> 31;  // all ones where the sign bit is set
    const Float4 magnitude = reinterpret_cast<Float4>(reinterpret_cast<Int4>(logit) & 0x7fffffff);
    const Float4 decay = exp_nonpositive(-magnitude);  // exp(-|x|)
    const Float4 inv = splat(1.0f) / (splat(1.0f) + decay);
    const Float4 prob = blend(negative, decay * inv, inv);
    std::memcpy(probs + i, &prob, sizeof(prob));
    if (log_terms != nullptr) {
      const Float4 log_term = log1p_unit(decay);
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
inline void sample_chunk(const scalar_t* logit_plane, int64_t height, int64_t width,
                         const target_t* target_plane, int64_t target_height, int64_t target_width,
                         const acc_t* mask_coords, int64_t num_points, int64_t begin, int64_t count,
                         acc_t* logits, acc_t* targets) {
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
      at::parallel_for(0, num_masks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* logit_plane = logits_ptr + n * height * width;
          const auto* target_plane = targets_ptr + n * target_height * target_width;
          const acc_t* mask_coords = coords_ptr + 2 * n * num_points;
          sum_t ce_sum = 0, prob_target_sum = 0, prob_sum = 0, target_sum = 0;
          alignas(16) acc_t logits[kChunk] = {}, targets[kChunk] = {}, probs[kChunk],
                            log_terms[kChunk];
          for (int64_t chunk_begin = 0; chunk_begin < num_points; chunk_begin += kChunk) {
            const int64_t count = std::min(kChunk, num_points - chunk_begin);
            sample_chunk(logit_plane, height, width, target_plane, target_height, target_width,
                         mask_coords, num_points, chunk_begin, count, logits, targets);
            logit_terms_chunk(logits, probs, log_terms, count);
            for (int64_t i = 0; i < count; ++i) {
              ce_sum += sigmoid_ce(logits[i], log_terms[i], targets[i]);
              prob_target_sum += probs[i] * targets[i];
              prob_sum += probs[i];
              target_sum += targets[i];
            }
          }
          ce_ptr[n] = static_cast<acc_t>(ce_sum / static_cast<sum_t>(num_points));
          dice_ptr[n] = static_cast<acc_t>(dice_loss<sum_t>(prob_target_sum, prob_sum, target_sum));
          sums_ptr[3 * n] = static_cast<acc_t>(prob_target_sum);
          sums_ptr[3 * n + 1] = static_cast<acc_t>(prob_sum);
          sums_ptr[3 * n + 2] = static_cast<acc_t>(target_sum);
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
      // Each mask's gradient plane is owned by one thread.
      at::parallel_for(0, num_masks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* logit_plane = logits_ptr + n * height * width;
          const auto* target_plane = targets_ptr + n * target_height * target_width;
          const acc_t* mask_coords = coords_ptr + 2 * n * num_points;
          acc_t* grad_plane = grad_ptr + n * height * width;
          const PointLossGradScales<acc_t> scales = point_loss_grad_scales<acc_t>(
              grad_ce_ptr[n], grad_dice_ptr[n], num_points, sums_ptr[3 * n], sums_ptr[3 * n + 1],
              sums_ptr[3 * n + 2]);
          alignas(16) acc_t logits[kChunk] = {}, targets[kChunk] = {}, probs[kChunk], grads[kChunk];
          for (int64_t chunk_begin = 0; chunk_begin < num_points; chunk_begin += kChunk) {
            const int64_t count = std::min(kChunk, num_points - chunk_begin);
            sample_chunk(logit_plane, height, width, target_plane, target_height, target_width,
                         mask_coords, num_points, chunk_begin, count, logits, targets);
            logit_terms_chunk(logits, probs, static_cast<acc_t*>(nullptr), count);
            for (int64_t i = 0; i < count; ++i) {
              grads[i] = point_loss_grad(scales, probs[i], targets[i]);
            }
            for (int64_t i = 0; i < count; ++i) {
              const int64_t p = chunk_begin + i;
              const BilinearPoint<acc_t> point =
                  locate_point<acc_t>(mask_coords[2 * p], mask_coords[2 * p + 1], height, width);
              const CornerWeights<acc_t> corners = corner_weights(height, width, point);
              for (int k = 0; k < corners.count; ++k)
                grad_plane[corners.index[k]] += grads[i] * corners.weight[k];
            }
          }
        }
      });
    });
  });
  return grad_logits_acc.to(mask_logits.scalar_type());
}

// Number of independent partial sums in the pairwise dot products (lets the compiler vectorize
// them).
constexpr int64_t kDotLanes = 16;
// Targets whose dot products share one pass over a query's terms.
constexpr int64_t kTargetBlock = 4;

// Sums over the P points of positive . t, negative . (1 - t) and prob . t for the kTargets target
// rows from targets (row stride num_points), each summed in kDotLanes partial sums, then in lane
// order.
template <int64_t kTargets, typename acc_t>
M2F_CPU_INLINE void pairwise_dots_block(const acc_t* positive, const acc_t* negative,
                                        const acc_t* prob, const acc_t* targets, int64_t num_points,
                                        sum_t* positive_total, sum_t* negative_total,
                                        sum_t* prob_total) {
  acc_t positive_dot[kTargets][kDotLanes] = {}, negative_dot[kTargets][kDotLanes] = {},
        prob_dot[kTargets][kDotLanes] = {};
  int64_t p = 0;
  for (; p + kDotLanes <= num_points; p += kDotLanes) {
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
    for (int64_t q = p, lane = 0; q < num_points; ++q, ++lane) {
      positive_dot[t][lane] += positive[q] * target[q];
      negative_dot[t][lane] += negative[q] * (acc_t(1) - target[q]);
      prob_dot[t][lane] += prob[q] * target[q];
    }
    positive_total[t] = negative_total[t] = prob_total[t] = 0;
    for (int64_t lane = 0; lane < kDotLanes; ++lane) {
      positive_total[t] += positive_dot[t][lane];
      negative_total[t] += negative_dot[t][lane];
      prob_total[t] += prob_dot[t][lane];
    }
  }
}

// Sum of n values in kDotLanes partial sums, then in lane order.
template <typename acc_t>
M2F_CPU_MULTIVERSION sum_t lane_sum(const acc_t* values, int64_t n) {
  sum_t partial[kDotLanes] = {};
  int64_t p = 0;
  for (; p + kDotLanes <= n; p += kDotLanes) {
    for (int64_t lane = 0; lane < kDotLanes; ++lane) partial[lane] += values[p + lane];
  }
  for (int64_t lane = 0; p < n; ++p, ++lane) partial[lane] += values[p];
  sum_t total = 0;
  for (int64_t lane = 0; lane < kDotLanes; ++lane) total += partial[lane];
  return total;
}

// pairwise_dots_block for every target of one query, kTargetBlock targets per pass.
template <typename acc_t>
M2F_CPU_MULTIVERSION void pairwise_dots(const acc_t* positive, const acc_t* negative,
                                        const acc_t* prob, const acc_t* targets,
                                        int64_t num_targets, int64_t num_points,
                                        sum_t* positive_total, sum_t* negative_total,
                                        sum_t* prob_total) {
  int64_t t = 0;
  for (; t + kTargetBlock <= num_targets; t += kTargetBlock) {
    pairwise_dots_block<kTargetBlock>(positive, negative, prob, targets + t * num_points,
                                      num_points, positive_total + t, negative_total + t,
                                      prob_total + t);
  }
  for (; t < num_targets; ++t) {
    pairwise_dots_block<1>(positive, negative, prob, targets + t * num_points, num_points,
                           positive_total + t, negative_total + t, prob_total + t);
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
  // The per-point terms of logit_terms() for every query row, (Q, P) each, with ATen's vectorized
  // exp and log1p (a scalar log1p per point costs more than all the dot products): softplus(-x) and
  // softplus(x) = max(-+x, 0) + log(1 + exp(-|x|)), and sigmoid(x).
  const at::Tensor logits = pred_point_logits.to(acc_type);
  const at::Tensor log_term = at::log1p(at::exp(-logits.abs()));
  const at::Tensor positive_terms = (at::relu(-logits) + log_term).contiguous();
  const at::Tensor negative_terms = (at::relu(logits) + log_term).contiguous();
  const at::Tensor prob_terms = at::sigmoid(logits).contiguous();
  M2F_DISPATCH_FLOATING_TYPES(pred_point_logits.scalar_type(), "pairwise_mask_cost_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* positive_ptr = positive_terms.data_ptr<acc_t>();
    const acc_t* negative_ptr = negative_terms.data_ptr<acc_t>();
    const acc_t* prob_ptr = prob_terms.data_ptr<acc_t>();
    const acc_t* targets_ptr = targets.data_ptr<acc_t>();
    const acc_t* target_sums_ptr = target_sums.data_ptr<acc_t>();
    acc_t* ce_ptr = ce.data_ptr<acc_t>();
    acc_t* dice_ptr = dice.data_ptr<acc_t>();
    at::parallel_for(0, num_queries, 1, [&](int64_t begin, int64_t end) {
      std::vector<sum_t> positive_total(num_targets), negative_total(num_targets),
          prob_total(num_targets);
      for (int64_t q = begin; q < end; ++q) {
        const acc_t* prob = prob_ptr + q * num_points;
        const sum_t prob_sum = lane_sum(prob, num_points);
        pairwise_dots(positive_ptr + q * num_points, negative_ptr + q * num_points, prob,
                      targets_ptr, num_targets, num_points, positive_total.data(),
                      negative_total.data(), prob_total.data());
        for (int64_t t = 0; t < num_targets; ++t) {
          ce_ptr[q * num_targets + t] = static_cast<acc_t>(
              pairwise_ce_cost<sum_t>(positive_total[t], negative_total[t], num_points));
          dice_ptr[q * num_targets + t] = static_cast<acc_t>(pairwise_dice_cost<sum_t>(
              prob_total[t], prob_sum, static_cast<sum_t>(target_sums_ptr[t])));
        }
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
