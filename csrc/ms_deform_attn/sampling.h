// Per-sample math of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// Torch-free: every function here is plain arithmetic on the accumulation type (float or double).
// Locations follow the bilinear convention of common/bilinear.h (align_corners=False, a sample
// outside -1 < x < W, -1 < y < H contributes nothing, corners outside the image read zero).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/bilinear.h"

namespace m2f {
namespace msda {

// One bilinear sample on a level of `height` x `width` pixels. Corners are ordered (y0, x0), (y0,
// x1), (y1, x0), (y1, x1).
template <typename acc_t>
struct BilinearPoint {
  bool valid;  // the sample contributes (value and gradient)
  int64_t
      corner[4];    // y * width + x of each corner inside the level, -1 when the corner is outside
  acc_t weight[4];  // bilinear weight of each corner
  acc_t dweight_dx[4];  // d weight / d x, x in pixels
  acc_t dweight_dy[4];  // d weight / d y, y in pixels
};

template <typename acc_t>
M2F_HOST_DEVICE BilinearPoint<acc_t> bilinear_point(acc_t loc_x, acc_t loc_y, int64_t height,
                                                    int64_t width) {
  BilinearPoint<acc_t> pt;
  const BilinearCell<acc_t> cell = bilinear_cell<acc_t>(loc_x, loc_y, height, width);
  pt.valid = cell.valid;
  if (!pt.valid) {
    for (int k = 0; k < 4; ++k) {
      pt.corner[k] = -1;
      pt.weight[k] = pt.dweight_dx[k] = pt.dweight_dy[k] = 0;
    }
    return pt;
  }
  const int64_t x0 = cell.x0;
  const int64_t y0 = cell.y0;
  const int64_t x1 = x0 + 1;
  const int64_t y1 = y0 + 1;
  const acc_t lx = cell.lx;
  const acc_t ly = cell.ly;
  const acc_t hx = 1 - lx;
  const acc_t hy = 1 - ly;

  const bool x0_in = x0 >= 0;
  const bool x1_in = x1 < width;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y1 < height;
  pt.corner[0] = (y0_in && x0_in) ? y0 * width + x0 : -1;
  pt.corner[1] = (y0_in && x1_in) ? y0 * width + x1 : -1;
  pt.corner[2] = (y1_in && x0_in) ? y1 * width + x0 : -1;
  pt.corner[3] = (y1_in && x1_in) ? y1 * width + x1 : -1;

  pt.weight[0] = hy * hx;
  pt.weight[1] = hy * lx;
  pt.weight[2] = ly * hx;
  pt.weight[3] = ly * lx;
  pt.dweight_dx[0] = -hy;
  pt.dweight_dx[1] = hy;
  pt.dweight_dx[2] = -ly;
  pt.dweight_dx[3] = ly;
  pt.dweight_dy[0] = -hx;
  pt.dweight_dy[1] = -lx;
  pt.dweight_dy[2] = hx;
  pt.dweight_dy[3] = lx;
  return pt;
}

// Gradients of one sample from the per-corner dot products corner_dot[k] = sum_d grad_out[d] *
// v_k[d] (zero for corners outside the image). The sample adds attention_weight * bilinear(v) to
// the output.
template <typename acc_t>
struct SampleGrad {
  acc_t attention_weight;  // d loss / d attention_weight
  acc_t x;                 // d loss / d x, x in pixels
  acc_t y;                 // d loss / d y, y in pixels
};

template <typename acc_t>
M2F_HOST_DEVICE SampleGrad<acc_t> sample_grad(const BilinearPoint<acc_t>& pt,
                                              const acc_t corner_dot[4], acc_t attention_weight) {
  SampleGrad<acc_t> grad{0, 0, 0};
  for (int k = 0; k < 4; ++k) {
    grad.attention_weight += pt.weight[k] * corner_dot[k];
    grad.x += pt.dweight_dx[k] * corner_dot[k];
    grad.y += pt.dweight_dy[k] * corner_dot[k];
  }
  grad.x *= attention_weight;
  grad.y *= attention_weight;
  return grad;
}

// Fused variant: location = reference + offset / (W, H), offsets in pixels of the level.
template <typename acc_t>
M2F_HOST_DEVICE acc_t fused_location(acc_t reference, acc_t offset, int64_t size) {
  return reference + offset / static_cast<acc_t>(size);
}

// Softmax statistics of `count` logits: the maximum and the sum of exp(logit - maximum).
template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t sum;
};

template <typename acc_t, typename logit_t>
M2F_HOST_DEVICE SoftmaxStats<acc_t> softmax_stats(const logit_t* logits, int count) {
  SoftmaxStats<acc_t> stats;
  stats.max = static_cast<acc_t>(logits[0]);
  for (int i = 1; i < count; ++i) {
    const acc_t logit = static_cast<acc_t>(logits[i]);
    stats.max = logit > stats.max ? logit : stats.max;
  }
  stats.sum = 0;
  for (int i = 0; i < count; ++i) {
    stats.sum += exp_acc(static_cast<acc_t>(logits[i]) - stats.max);
  }
  return stats;
}

template <typename acc_t>
M2F_HOST_DEVICE acc_t softmax_weight(const SoftmaxStats<acc_t>& stats, acc_t logit) {
  return exp_acc(logit - stats.max) / stats.sum;
}

// Sizes of one call: value (N, S, M, D), L levels, P points per level, Q queries.
struct Sizes {
  int64_t batch, num_values, num_heads, channels, num_levels, num_points, num_queries;
  M2F_HOST_DEVICE int64_t level_points() const { return num_levels * num_points; }
};

// Where the samples of one head (flat index over (n, q, m)) come from. `point` runs over the L * P
// samples of the head, level-major.
//
// Plain: sampling_locations (N, Q, M, L, P, 2) normalized (x, y) and attention_weights (N, Q, M, L,
// P).
template <typename scalar_t, typename acc_t>
struct PlainSamples {
  const scalar_t* locations;
  const scalar_t* weights;

  struct Locations {
    const scalar_t* locations;
    M2F_HOST_DEVICE acc_t loc_x(int64_t point, int64_t, int64_t) const {
      return static_cast<acc_t>(locations[2 * point]);
    }
    M2F_HOST_DEVICE acc_t loc_y(int64_t point, int64_t, int64_t) const {
      return static_cast<acc_t>(locations[2 * point + 1]);
    }
  };
  struct Head : Locations {
    const scalar_t* weights;
    M2F_HOST_DEVICE acc_t weight(int64_t point) const { return static_cast<acc_t>(weights[point]); }
  };
  M2F_HOST_DEVICE Locations head_locations(int64_t head_index, const Sizes& sz) const {
    return Locations{locations + 2 * head_index * sz.level_points()};
  }
  M2F_HOST_DEVICE Head head(int64_t head_index, const Sizes& sz) const {
    return Head{{head_locations(head_index, sz)}, weights + head_index * sz.level_points()};
  }
  // The head's L * P weights into out.
  M2F_HOST_DEVICE void head_weights(int64_t head_index, const Sizes& sz, acc_t* out) const {
    const int64_t level_points = sz.level_points();
    const scalar_t* head = weights + head_index * level_points;
    for (int64_t i = 0; i < level_points; ++i) out[i] = static_cast<acc_t>(head[i]);
  }
  static constexpr bool kSoftmaxWeights = false;
};

// Fused: reference_points (N, Q, L, 2) normalized, sampling_offsets (N, Q, M, L, P, 2) in pixels of
// the level, attention_logits (N, Q, M, L * P); location = reference + offset / (W, H), weight =
// softmax.
template <typename scalar_t, typename acc_t>
struct FusedSamples {
  const scalar_t* reference;
  const scalar_t* offsets;
  const scalar_t* logits;

  struct Locations {
    const scalar_t* reference;  // (L, 2) of this query
    const scalar_t* offsets;
    M2F_HOST_DEVICE acc_t loc_x(int64_t point, int64_t level, int64_t width) const {
      return fused_location<acc_t>(static_cast<acc_t>(reference[2 * level]),
                                   static_cast<acc_t>(offsets[2 * point]), width);
    }
    M2F_HOST_DEVICE acc_t loc_y(int64_t point, int64_t level, int64_t height) const {
      return fused_location<acc_t>(static_cast<acc_t>(reference[2 * level + 1]),
                                   static_cast<acc_t>(offsets[2 * point + 1]), height);
    }
  };
  struct Head : Locations {
    const scalar_t* logits;
    SoftmaxStats<acc_t> stats;
    M2F_HOST_DEVICE acc_t weight(int64_t point) const {
      return softmax_weight<acc_t>(stats, static_cast<acc_t>(logits[point]));
    }
  };
  M2F_HOST_DEVICE Locations head_locations(int64_t head_index, const Sizes& sz) const {
    const int64_t query = head_index / sz.num_heads;
    return Locations{reference + 2 * query * sz.num_levels,
                     offsets + 2 * head_index * sz.level_points()};
  }
  // Each weight() call takes an exp: for kernels that read a weight once or twice.
  M2F_HOST_DEVICE Head head(int64_t head_index, const Sizes& sz) const {
    const int64_t level_points = sz.level_points();
    const scalar_t* head_logits = logits + head_index * level_points;
    return Head{{head_locations(head_index, sz)},
                head_logits,
                softmax_stats<acc_t>(head_logits, static_cast<int>(level_points))};
  }
  // The head's L * P weights into out, one exp per logit; the same values as Head::weight.
  M2F_HOST_DEVICE void head_weights(int64_t head_index, const Sizes& sz, acc_t* out) const {
    const int64_t level_points = sz.level_points();
    const scalar_t* head_logits = logits + head_index * level_points;
    acc_t max = static_cast<acc_t>(head_logits[0]);
    for (int64_t i = 1; i < level_points; ++i) {
      const acc_t logit = static_cast<acc_t>(head_logits[i]);
      max = logit > max ? logit : max;
    }
    acc_t sum = 0;
    for (int64_t i = 0; i < level_points; ++i) {
      out[i] = exp_acc(static_cast<acc_t>(head_logits[i]) - max);
      sum += out[i];
    }
    for (int64_t i = 0; i < level_points; ++i) out[i] /= sum;
  }
  static constexpr bool kSoftmaxWeights = true;
};

// d loss / d logit of one head's softmax, in place: grad[i] = w[i] * (grad[i] - sum_j w[j] grad[j])
// from the weights w and d loss / d weight in grad.
template <typename acc_t>
M2F_HOST_DEVICE void softmax_backward(const acc_t* weights, int64_t count, acc_t* grad) {
  acc_t dot = 0;
  for (int64_t i = 0; i < count; ++i) dot += weights[i] * grad[i];
  for (int64_t i = 0; i < count; ++i) grad[i] = weights[i] * (grad[i] - dot);
}

// grad_reference (N, Q, L, 2) of one query (flat index over (n, q)): the pixel gradients in
// grad_offsets (N, Q, M, L, P, 2) summed over heads and points, times (W, H) (d pixel / d
// reference).
template <typename acc_t>
M2F_HOST_DEVICE void reference_backward(int64_t query, const Sizes& sz, const int64_t* shapes,
                                        const acc_t* grad_offsets, acc_t* grad_reference) {
  const int64_t level_points = sz.level_points();
  for (int64_t l = 0; l < sz.num_levels; ++l) {
    acc_t grad_x = 0;
    acc_t grad_y = 0;
    for (int64_t m = 0; m < sz.num_heads; ++m) {
      const int64_t first = (query * sz.num_heads + m) * level_points + l * sz.num_points;
      for (int64_t p = 0; p < sz.num_points; ++p) {
        grad_x += grad_offsets[2 * (first + p)];
        grad_y += grad_offsets[2 * (first + p) + 1];
      }
    }
    grad_reference[2 * (query * sz.num_levels + l)] =
        grad_x * static_cast<acc_t>(shapes[2 * l + 1]);
    grad_reference[2 * (query * sz.num_levels + l) + 1] =
        grad_y * static_cast<acc_t>(shapes[2 * l]);
  }
}

// Fused backward, last step for one query (flat index over (n, q)), after the sampling backward
// left d loss / d weight in grad_logits (N, Q, M, L * P) and d loss / d pixel in grad_offsets (N,
// Q, M, L, P, 2). Turns grad_logits into d loss / d logit in place (softmax_backward per head, the
// weights recomputed from the logits) and writes grad_reference (reference_backward).
template <typename scalar_t, typename acc_t>
M2F_HOST_DEVICE void finish_fused_backward(int64_t query, const Sizes& sz, const int64_t* shapes,
                                           const scalar_t* logits, const acc_t* grad_offsets,
                                           acc_t* grad_logits, acc_t* grad_reference) {
  const int64_t level_points = sz.level_points();
  for (int64_t m = 0; m < sz.num_heads; ++m) {
    const int64_t first = (query * sz.num_heads + m) * level_points;
    const SoftmaxStats<acc_t> stats =
        softmax_stats<acc_t>(logits + first, static_cast<int>(level_points));
    acc_t dot = 0;
    for (int64_t i = 0; i < level_points; ++i) {
      dot += softmax_weight<acc_t>(stats, static_cast<acc_t>(logits[first + i])) *
             grad_logits[first + i];
    }
    for (int64_t i = 0; i < level_points; ++i) {
      const acc_t weight = softmax_weight<acc_t>(stats, static_cast<acc_t>(logits[first + i]));
      grad_logits[first + i] = weight * (grad_logits[first + i] - dot);
    }
  }
  reference_backward<acc_t>(query, sz, shapes, grad_offsets, grad_reference);
}

}  // namespace msda
}  // namespace m2f
