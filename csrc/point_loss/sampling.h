// Per-point math of the point-sampled mask losses, shared by the CPU and CUDA kernels.
//
// Coordinates are normalized (x, y) in [0, 1] and follow the bilinear convention of
// common/bilinear.h (align_corners=False, a point outside -1 < x < W, -1 < y < H contributes
// nothing, corners outside the image read 0, gradients use the floor cell).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/bilinear.h"

namespace m2f {
namespace point_loss {

// The floor cell of a point and its fractional offsets inside the cell.
template <typename acc_t>
using BilinearPoint = BilinearCell<acc_t>;

template <typename acc_t>
M2F_HOST_DEVICE BilinearPoint<acc_t> locate_point(acc_t coord_x, acc_t coord_y, int64_t height,
                                                  int64_t width) {
  return bilinear_cell<acc_t>(coord_x, coord_y, height, width);
}

// The four corner values of the floor cell, 0 outside the plane (row-major, height x width).
template <typename acc_t>
struct CornerValues {
  acc_t v00;  // (y0, x0)
  acc_t v01;  // (y0, x0 + 1)
  acc_t v10;  // (y0 + 1, x0)
  acc_t v11;  // (y0 + 1, x0 + 1)
};

template <typename acc_t, typename value_t>
M2F_HOST_DEVICE CornerValues<acc_t> read_corners(const value_t* plane, int64_t height,
                                                 int64_t width, const BilinearPoint<acc_t>& point) {
  CornerValues<acc_t> corners{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  const int64_t x1 = point.x0 + 1;
  const int64_t y1 = point.y0 + 1;
  const bool x0_in = point.x0 >= 0;
  const bool x1_in = x1 < width;
  if (point.y0 >= 0) {
    const value_t* row = plane + point.y0 * width;
    if (x0_in) corners.v00 = static_cast<acc_t>(row[point.x0]);
    if (x1_in) corners.v01 = static_cast<acc_t>(row[x1]);
  }
  if (y1 < height) {
    const value_t* row = plane + y1 * width;
    if (x0_in) corners.v10 = static_cast<acc_t>(row[point.x0]);
    if (x1_in) corners.v11 = static_cast<acc_t>(row[x1]);
  }
  return corners;
}

template <typename acc_t>
M2F_HOST_DEVICE acc_t interpolate(const CornerValues<acc_t>& c, const BilinearPoint<acc_t>& point) {
  const acc_t hx = acc_t(1) - point.lx;
  const acc_t hy = acc_t(1) - point.ly;
  return hy * (hx * c.v00 + point.lx * c.v01) + point.ly * (hx * c.v10 + point.lx * c.v11);
}

// Bilinear sample of a plane at a point; 0 for a point that does not contribute.
template <typename acc_t, typename value_t>
M2F_HOST_DEVICE acc_t sample_plane(const value_t* plane, int64_t height, int64_t width,
                                   const BilinearPoint<acc_t>& point) {
  if (!point.valid) return acc_t(0);
  return interpolate(read_corners<acc_t>(plane, height, width, point), point);
}

// d(sample) / d(normalized coordinate), written to grad_x and grad_y (0 for a point that does not
// contribute).
template <typename acc_t, typename value_t>
M2F_HOST_DEVICE void sample_plane_coord_grad(const value_t* plane, int64_t height, int64_t width,
                                             const BilinearPoint<acc_t>& point, acc_t* grad_x,
                                             acc_t* grad_y) {
  if (!point.valid) {
    *grad_x = acc_t(0);
    *grad_y = acc_t(0);
    return;
  }
  const CornerValues<acc_t> c = read_corners<acc_t>(plane, height, width, point);
  const acc_t hx = acc_t(1) - point.lx;
  const acc_t hy = acc_t(1) - point.ly;
  *grad_x = (hy * (c.v01 - c.v00) + point.ly * (c.v11 - c.v10)) * static_cast<acc_t>(width);
  *grad_y = (hx * (c.v10 - c.v00) + point.lx * (c.v11 - c.v01)) * static_cast<acc_t>(height);
}

// Calls add(index, weight) for each corner of the point's floor cell that lies inside the plane,
// with its flat index and bilinear weight, in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1);
// never for a point that does not contribute. No arrays: on a GPU everything stays in registers.
template <typename acc_t, typename Add>
M2F_HOST_DEVICE void for_each_corner(int64_t height, int64_t width,
                                     const BilinearPoint<acc_t>& point, Add&& add) {
  if (!point.valid) return;
  const acc_t hx = acc_t(1) - point.lx;
  const acc_t hy = acc_t(1) - point.ly;
  const int64_t x1 = point.x0 + 1;
  const int64_t y1 = point.y0 + 1;
  const bool x0_in = point.x0 >= 0;
  const bool x1_in = x1 < width;
  if (point.y0 >= 0) {
    if (x0_in) add(point.y0 * width + point.x0, hy * hx);
    if (x1_in) add(point.y0 * width + x1, hy * point.lx);
  }
  if (y1 < height) {
    if (x0_in) add(y1 * width + point.x0, point.ly * hx);
    if (x1_in) add(y1 * width + x1, point.ly * point.lx);
  }
}

// The corners of for_each_corner as a list, for the CPU kernels.
template <typename acc_t>
struct CornerWeights {
  int64_t index[4];
  acc_t weight[4];
  int count;
};

template <typename acc_t>
M2F_HOST_DEVICE CornerWeights<acc_t> corner_weights(int64_t height, int64_t width,
                                                    const BilinearPoint<acc_t>& point) {
  CornerWeights<acc_t> out{{0, 0, 0, 0}, {acc_t(0), acc_t(0), acc_t(0), acc_t(0)}, 0};
  for_each_corner(height, width, point, [&](int64_t index, acc_t weight) {
    out.index[out.count] = index;
    out.weight[out.count++] = weight;
  });
  return out;
}

// sigmoid(x) and the shared term log(1 + exp(-|x|)) of softplus(x) = max(x, 0) + log_term and
// softplus(-x) = max(-x, 0) + log_term, from a single exp.
template <typename acc_t>
struct LogitTerms {
  acc_t prob;
  acc_t log_term;
};

template <typename acc_t>
M2F_HOST_DEVICE LogitTerms<acc_t> logit_terms(acc_t logit) {
  const acc_t decay = exp_acc(logit > acc_t(0) ? -logit : logit);  // exp(-|x|), in (0, 1]
  const acc_t inv = acc_t(1) / (acc_t(1) + decay);
  return {logit >= acc_t(0) ? inv : decay * inv, log1p_acc(decay)};
}

template <typename acc_t>
M2F_HOST_DEVICE acc_t sigmoid(acc_t logit) {
  const acc_t decay = exp_acc(logit > acc_t(0) ? -logit : logit);
  const acc_t inv = acc_t(1) / (acc_t(1) + decay);
  return logit >= acc_t(0) ? inv : decay * inv;
}

// log(1 + exp(logit)) from logit_terms.
template <typename acc_t>
M2F_HOST_DEVICE acc_t softplus(acc_t logit, acc_t log_term) {
  return (logit > acc_t(0) ? logit : acc_t(0)) + log_term;
}

// Binary cross-entropy with logits: softplus(logit) - logit * target.
template <typename acc_t>
M2F_HOST_DEVICE acc_t sigmoid_ce(acc_t logit, acc_t log_term, acc_t target) {
  return softplus(logit, log_term) - logit * target;
}

// Dice loss of one mask from its sums over points: 1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) +
// 1).
template <typename acc_t>
M2F_HOST_DEVICE acc_t dice_loss(acc_t sum_pt, acc_t sum_p, acc_t sum_t) {
  return acc_t(1) - (acc_t(2) * sum_pt + acc_t(1)) / (sum_p + sum_t + acc_t(1));
}

// Per-mask constants of the loss gradient with respect to one sampled logit:
// d(loss)/d(logit) = ce_scale * (p - t) + (dice_t * t + dice_c) * p * (1 - p).
template <typename acc_t>
struct PointLossGradScales {
  acc_t ce_scale;
  acc_t dice_t;
  acc_t dice_c;
};

template <typename acc_t>
M2F_HOST_DEVICE PointLossGradScales<acc_t> point_loss_grad_scales(acc_t grad_ce, acc_t grad_dice,
                                                                  int64_t num_points, acc_t sum_pt,
                                                                  acc_t sum_p, acc_t sum_t) {
  const acc_t numerator = acc_t(2) * sum_pt + acc_t(1);
  const acc_t denominator = sum_p + sum_t + acc_t(1);
  // d(dice)/d(p_i) = -(2 t_i * denominator - numerator) / denominator^2
  const acc_t inv_denominator = acc_t(1) / denominator;
  PointLossGradScales<acc_t> scales;
  scales.ce_scale = grad_ce / static_cast<acc_t>(num_points);
  scales.dice_t = -acc_t(2) * grad_dice * inv_denominator;
  scales.dice_c = grad_dice * numerator * inv_denominator * inv_denominator;
  return scales;
}

// d(loss)/d(logit) at a point with probability p = sigmoid(logit) and target t.
template <typename acc_t>
M2F_HOST_DEVICE acc_t point_loss_grad(const PointLossGradScales<acc_t>& scales, acc_t prob,
                                      acc_t target) {
  return scales.ce_scale * (prob - target) +
         (scales.dice_t * target + scales.dice_c) * prob * (acc_t(1) - prob);
}

// Matcher costs of one (prediction, target) pair from sums over the P points. The CE is the sum of
// sigmoid_ce over the points: softplus(x) summed once per prediction, minus one dot product,
// ce = (sum softplus(x) - x.t) / P. Mask2Former's form, softplus(-x).t + softplus(x).(1 - t), is
// the same sum (softplus(-x) - softplus(x) = -x) in three dot products. The two sums cancel where
// the prediction is confidently right: there the float32 cost is exact to a few 1e-6 (at |x| up to
// 20) rather than relatively. It is kept at 0 or above, like every BCE; NaN stays NaN.
template <typename acc_t>
M2F_HOST_DEVICE acc_t pairwise_ce_cost(acc_t softplus_sum, acc_t logit_target_dot,
                                       int64_t num_points) {
  const acc_t ce = (softplus_sum - logit_target_dot) / static_cast<acc_t>(num_points);
  return ce < acc_t(0) ? acc_t(0) : ce;
}

// dice = 1 - (2 sigmoid(x) . t + 1) / (sum sigmoid(x) + sum t + 1).
template <typename acc_t>
M2F_HOST_DEVICE acc_t pairwise_dice_cost(acc_t prob_target_dot, acc_t prob_sum, acc_t target_sum) {
  return dice_loss(prob_target_dot, prob_sum, target_sum);
}

}  // namespace point_loss
}  // namespace m2f
