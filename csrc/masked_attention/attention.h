// Masked attention math shared by the C++ CPU kernel and the CUDA kernels.
//
// The mask is never materialized per head: a key is tested per (query, key) from the mask source.
//   - mask_logits (B, Q, K): key visible iff logit >= threshold_logit (a NaN logit fails the
//     comparison, so it is blocked).
//   - attn_mask (B, Hm, Q, K) bool, True = blocked.
// Mask2Former rule: a row (query) with no visible key attends to all keys. Every backend decides
// this in a cheap first pass over the row's mask (shared by the heads when Hm == 1) that yields one
// "row has a visible key" flag per row; the attention passes then use key_is_visible() below.
//
// Online softmax: a row keeps (running max m, running sum l, accumulator acc). A block of scores
// with maximum m_blk updates them as m' = max(m, m_blk), l' = l * exp(m - m') + sum exp(s - m'),
// and acc' = acc * exp(m - m') + sum exp(s - m') v. Split-K partials (m_i, l_i, acc_i) merge the
// same way.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/math.h"

namespace m2f {
namespace masked_attention {

// The sizes of one call: q (B, H, Q, d), k and v (B, H, K, d), Hm mask heads.
struct Sizes {
  int64_t batch, heads, queries, keys, head_dim, mask_heads;
};

template <typename acc_t>
M2F_HOST_DEVICE acc_t negative_infinity() {
  return -static_cast<acc_t>(INFINITY);
}

// Mask test for the logits source; comparing in acc_t keeps every input dtype exact.
template <typename acc_t>
M2F_HOST_DEVICE bool logit_is_visible(acc_t logit, acc_t threshold_logit) {
  return logit >= threshold_logit;
}

// Mask test for the bool source (True = blocked).
M2F_HOST_DEVICE bool bool_mask_is_visible(bool blocked) { return !blocked; }

// The Mask2Former rule applied on top of the mask test.
M2F_HOST_DEVICE bool key_is_visible(bool mask_visible, bool row_has_visible_key) {
  return mask_visible || !row_has_visible_key;
}

// Factor that moves a sum taken relative to old_max onto new_max (0 when nothing was summed yet).
template <typename acc_t>
M2F_HOST_DEVICE acc_t rescale_factor(acc_t old_max, acc_t new_max) {
  return old_max == negative_infinity<acc_t>() ? acc_t(0) : exp_acc(old_max - new_max);
}

// Unnormalized softmax weight of one score relative to the running max (0 for a blocked score).
template <typename acc_t>
M2F_HOST_DEVICE acc_t softmax_weight(acc_t score, acc_t row_max) {
  return score == negative_infinity<acc_t>() ? acc_t(0) : exp_acc(score - row_max);
}

// log(sum exp(scores)) from the online state; -inf for an empty row (cannot happen after the row
// rule).
template <typename acc_t>
M2F_HOST_DEVICE acc_t log_sum_exp(acc_t row_max, acc_t row_sum) {
  return row_sum > acc_t(0) ? row_max + log_acc(row_sum) : negative_infinity<acc_t>();
}

// Normalized probability recomputed in the backward from the forward's log-sum-exp.
template <typename acc_t>
M2F_HOST_DEVICE acc_t probability_from_lse(acc_t scaled_score, acc_t lse) {
  return exp_acc(scaled_score - lse);
}

// Gradient of the scaled score: dS = P * (dP - delta), delta = sum_c dO[c] * O[c] of the row.
template <typename acc_t>
M2F_HOST_DEVICE acc_t score_gradient(acc_t probability, acc_t grad_probability, acc_t delta) {
  return probability * (grad_probability - delta);
}

}  // namespace masked_attention
}  // namespace m2f
