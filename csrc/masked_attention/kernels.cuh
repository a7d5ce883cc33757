// Masked cross-attention's CUDA kernels (float32, float16, bfloat16; float32 accumulation) and the
// launch sequences of the forward and backward passes, written against a `launch(grid, block,
// kernel, args...)` callable: cuda.cu launches on a stream, tests/cuda_emulation runs the same
// kernels and sequences on the CPU. The kernels use thread and block indices, shared memory,
// __syncthreads and __any_sync only.
//
// The mask is read per (query, key) from mask_logits (B, Q, K) (visible iff logit >=
// threshold_logit, NaN blocked) or from the bool attn_mask (B, Hm, Q, K) (True = blocked); no
// per-head mask is built. Fully-blocked-row rule: a cheap first pass (row_flags_kernel, one warp
// per mask row, stopping at the first visible key) stores one "row has a visible key" flag per mask
// row, shared by the heads when Hm == 1; the attention kernels then treat every key of a
// flagged-empty row as visible.
//
// Forward: one thread per query row, blocks of kQueryTile queries times one key split. K and V
// tiles and the tile's visibility are staged in shared memory; the online softmax state lives in
// registers. With several key splits (the small-Q / large-K decoder shape), each block writes its
// partial (max, sum, acc) and combine_kernel merges the splits in split order. Backward: delta =
// rowsum(dO * O); dq: one thread per query row over a key split, partials summed in split order by
// reduce_splits_kernel; dk and dv: one thread per key looping over all queries. Nothing uses
// atomics, so the backward is deterministic whatever `deterministic` says.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/math.h"
#include "masked_attention/attention.h"

namespace m2f {
namespace masked_attention {

constexpr int kQueryTile = 64;   // threads (queries) per block of the forward and dq kernels
constexpr int kKeyTile = 32;     // keys staged in shared memory per step of those kernels
constexpr int kKeyThreads = 64;  // threads (keys) per block of the dk/dv kernel
constexpr int kQueryStage = 16;  // queries staged in shared memory per step of the dk/dv kernel
constexpr int kRowsPerFlagBlock = 8;
// Row length of the shared visibility tile: the 4 padding bytes put the 32 keys that one warp
// stores for a query in 32 different banks.
constexpr int kVisibleRowLength = kQueryTile + 4;

M2F_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Mask source plus the row flags; all accessors take a mask row index (b * Hm + hm) * Q + i.
template <typename scalar_t>
struct MaskSource {
  const scalar_t* logits;  // (B, Q, K) or null
  const bool* blocked;     // (B, Hm, Q, K) or null
  const uint8_t* row_has_visible_key;
  float threshold_logit;
  int64_t mask_heads, queries, keys;

  __device__ __forceinline__ int64_t row(int64_t b, int64_t h, int64_t i) const {
    return (b * mask_heads + (mask_heads > 1 ? h : 0)) * queries + i;
  }
  __device__ __forceinline__ bool mask_visible(int64_t row_index, int64_t key) const {
    const int64_t offset = row_index * keys + key;
    return logits != nullptr
               ? logit_is_visible<float>(static_cast<float>(logits[offset]), threshold_logit)
               : bool_mask_is_visible(blocked[offset]);
  }
  __device__ __forceinline__ bool visible(int64_t row_index, int64_t key) const {
    return key_is_visible(mask_visible(row_index, key), row_has_visible_key[row_index] != 0);
  }
};

template <typename scalar_t>
__global__ void row_flags_kernel(MaskSource<scalar_t> mask, int64_t num_rows, uint8_t* flags) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerFlagBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= num_rows) return;  // uniform per warp
  for (int64_t base = 0; base < mask.keys; base += 32) {
    const int64_t key = base + lane;
    const bool visible = key < mask.keys && mask.mask_visible(row, key);
    if (__any_sync(0xffffffffu, visible)) {
      if (lane == 0) flags[row] = 1;
      return;
    }
  }
  if (lane == 0) flags[row] = 0;
}

// Stages keys [tile, tile + kKeyTile) of K and V (zeros past key_end) and the visibility of those
// keys for the block's kQueryTile queries (false past the end of either).
template <typename scalar_t, int D>
__device__ __forceinline__ void stage_key_tile(
    const scalar_t* k, const scalar_t* v, const MaskSource<scalar_t>& mask, int64_t b, int64_t h,
    int64_t bh, int64_t query0, int64_t queries, int64_t keys, int64_t tile, int64_t key_end,
    float (*k_tile)[D], float (*v_tile)[D], bool (*visible_tile)[kVisibleRowLength]) {
  for (int idx = threadIdx.x; idx < kKeyTile * D; idx += kQueryTile) {
    const int j = idx / D, c = idx % D;
    const int64_t key = tile + j;
    const bool in_range = key < key_end;
    const int64_t offset = (bh * keys + key) * D + c;
    k_tile[j][c] = in_range ? static_cast<float>(k[offset]) : 0.0f;
    v_tile[j][c] = in_range ? static_cast<float>(v[offset]) : 0.0f;
  }
  for (int idx = threadIdx.x; idx < kKeyTile * kQueryTile; idx += kQueryTile) {
    const int qi = idx / kKeyTile, j = idx % kKeyTile;
    const int64_t query = query0 + qi, key = tile + j;
    visible_tile[j][qi] =
        query < queries && key < key_end && mask.visible(mask.row(b, h, query), key);
  }
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kQueryTile)
    forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                   const scalar_t* __restrict__ v, MaskSource<scalar_t> mask, int64_t heads,
                   int64_t queries, int64_t keys, int64_t keys_per_split, float scale,
                   scalar_t* __restrict__ out, float* __restrict__ lse,
                   float* __restrict__ partial_max, float* __restrict__ partial_sum,
                   float* __restrict__ partial_acc) {
  __shared__ float k_tile[kKeyTile][D];
  __shared__ float v_tile[kKeyTile][D];
  __shared__ bool visible_tile[kKeyTile][kVisibleRowLength];

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / heads, h = bh % heads;
  const int64_t query0 = static_cast<int64_t>(blockIdx.y) * kQueryTile;
  const int split = blockIdx.z, num_splits = gridDim.z;
  const int t = threadIdx.x;
  const int64_t i = query0 + t;
  const bool query_valid = i < queries;
  const int64_t row = bh * queries + i;
  const int64_t key_begin = split * keys_per_split;
  const int64_t key_end = key_begin + keys_per_split < keys ? key_begin + keys_per_split : keys;

  float q_row[D], acc[D];
#pragma unroll
  for (int c = 0; c < D; ++c) {
    q_row[c] = query_valid ? static_cast<float>(q[row * D + c]) : 0.0f;
    acc[c] = 0.0f;
  }
  float row_max = negative_infinity<float>(), row_sum = 0.0f;

  for (int64_t tile = key_begin; tile < key_end; tile += kKeyTile) {
    stage_key_tile<scalar_t, D>(k, v, mask, b, h, bh, query0, queries, keys, tile, key_end, k_tile,
                                v_tile, visible_tile);
    __syncthreads();
    float scores[kKeyTile];
    float tile_max = negative_infinity<float>();
#pragma unroll
    for (int j = 0; j < kKeyTile; ++j) {
      float dot = 0.0f;
#pragma unroll
      for (int c = 0; c < D; ++c) dot += q_row[c] * k_tile[j][c];
      scores[j] = visible_tile[j][t] ? unfused_product(dot, scale) : negative_infinity<float>();
      tile_max = fmaxf(tile_max, scores[j]);
    }
    const float new_max = fmaxf(row_max, tile_max);
    if (new_max != negative_infinity<float>()) {
      const float alpha = rescale_factor(row_max, new_max);
      row_sum *= alpha;
#pragma unroll
      for (int c = 0; c < D; ++c) acc[c] *= alpha;
#pragma unroll
      for (int j = 0; j < kKeyTile; ++j) {
        const float weight = softmax_weight(scores[j], new_max);
        row_sum += weight;
#pragma unroll
        for (int c = 0; c < D; ++c) acc[c] += weight * v_tile[j][c];
      }
      row_max = new_max;
    }
    __syncthreads();
  }
  if (!query_valid) return;
  if (num_splits == 1) {
#pragma unroll
    for (int c = 0; c < D; ++c) out[row * D + c] = static_cast<scalar_t>(acc[c] / row_sum);
    lse[row] = log_sum_exp(row_max, row_sum);
  } else {
    const int64_t partial_row = split * (gridDim.x * queries) + row;
    partial_max[partial_row] = row_max;
    partial_sum[partial_row] = row_sum;
#pragma unroll
    for (int c = 0; c < D; ++c) partial_acc[partial_row * D + c] = acc[c];
  }
}

// One thread per output element: merges the split partials of its row in split order.
template <typename scalar_t>
__global__ void combine_kernel(const float* __restrict__ partial_max,
                               const float* __restrict__ partial_sum,
                               const float* __restrict__ partial_acc, int num_splits,
                               int64_t num_rows, int head_dim, scalar_t* __restrict__ out,
                               float* __restrict__ lse) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_rows * head_dim) return;
  const int64_t row = idx / head_dim;
  const int c = idx % head_dim;
  float row_max = negative_infinity<float>();
  for (int s = 0; s < num_splits; ++s) row_max = fmaxf(row_max, partial_max[s * num_rows + row]);
  float row_sum = 0.0f, value = 0.0f;
  for (int s = 0; s < num_splits; ++s) {
    const int64_t partial_row = s * num_rows + row;
    const float factor = rescale_factor(partial_max[partial_row], row_max);
    row_sum += partial_sum[partial_row] * factor;
    value += partial_acc[partial_row * head_dim + c] * factor;
  }
  out[idx] = static_cast<scalar_t>(value / row_sum);
  if (c == 0) lse[row] = log_sum_exp(row_max, row_sum);
}

template <typename scalar_t>
__global__ void delta_kernel(const scalar_t* __restrict__ grad_out,
                             const scalar_t* __restrict__ out, int64_t num_rows, int head_dim,
                             float* __restrict__ delta) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  float sum = 0.0f;
  for (int c = 0; c < head_dim; ++c) {
    sum += static_cast<float>(grad_out[row * head_dim + c]) *
           static_cast<float>(out[row * head_dim + c]);
  }
  delta[row] = sum;
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kQueryTile)
    backward_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                       const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out,
                       const float* __restrict__ lse, const float* __restrict__ delta,
                       MaskSource<scalar_t> mask, int64_t heads, int64_t queries, int64_t keys,
                       int64_t keys_per_split, float scale, scalar_t* __restrict__ grad_q,
                       float* __restrict__ partial_grad_q) {
  __shared__ float k_tile[kKeyTile][D];
  __shared__ float v_tile[kKeyTile][D];
  __shared__ bool visible_tile[kKeyTile][kVisibleRowLength];

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / heads, h = bh % heads;
  const int64_t query0 = static_cast<int64_t>(blockIdx.y) * kQueryTile;
  const int split = blockIdx.z, num_splits = gridDim.z;
  const int t = threadIdx.x;
  const int64_t i = query0 + t;
  const bool query_valid = i < queries;
  const int64_t row = bh * queries + i;
  const int64_t key_begin = split * keys_per_split;
  const int64_t key_end = key_begin + keys_per_split < keys ? key_begin + keys_per_split : keys;

  float q_row[D], grad_out_row[D], grad_q_row[D];
#pragma unroll
  for (int c = 0; c < D; ++c) {
    q_row[c] = query_valid ? static_cast<float>(q[row * D + c]) : 0.0f;
    grad_out_row[c] = query_valid ? static_cast<float>(grad_out[row * D + c]) : 0.0f;
    grad_q_row[c] = 0.0f;
  }
  const float row_lse = query_valid ? lse[row] : 0.0f;
  const float row_delta = query_valid ? delta[row] : 0.0f;

  for (int64_t tile = key_begin; tile < key_end; tile += kKeyTile) {
    stage_key_tile<scalar_t, D>(k, v, mask, b, h, bh, query0, queries, keys, tile, key_end, k_tile,
                                v_tile, visible_tile);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kKeyTile; ++j) {
      if (!visible_tile[j][t]) continue;
      float score = 0.0f, grad_prob = 0.0f;
#pragma unroll
      for (int c = 0; c < D; ++c) {
        score += q_row[c] * k_tile[j][c];
        grad_prob += grad_out_row[c] * v_tile[j][c];
      }
      const float prob = probability_from_lse(unfused_product(score, scale), row_lse);
      const float grad_score = score_gradient(prob, grad_prob, row_delta);
#pragma unroll
      for (int c = 0; c < D; ++c) grad_q_row[c] += grad_score * k_tile[j][c];
    }
    __syncthreads();
  }
  if (!query_valid) return;
  if (num_splits == 1) {
#pragma unroll
    for (int c = 0; c < D; ++c) grad_q[row * D + c] = static_cast<scalar_t>(grad_q_row[c] * scale);
  } else {
    const int64_t partial_row = split * (gridDim.x * queries) + row;
#pragma unroll
    for (int c = 0; c < D; ++c) partial_grad_q[partial_row * D + c] = grad_q_row[c] * scale;
  }
}

// out[x] = sum over splits s (in order) of partial[s * count + x].
template <typename scalar_t>
__global__ void reduce_splits_kernel(const float* __restrict__ partial, int num_splits,
                                     int64_t count, scalar_t* __restrict__ out) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= count) return;
  float sum = 0.0f;
  for (int s = 0; s < num_splits; ++s) sum += partial[s * count + x];
  out[x] = static_cast<scalar_t>(sum);
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kKeyThreads)
    backward_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                         const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out,
                         const float* __restrict__ lse, const float* __restrict__ delta,
                         MaskSource<scalar_t> mask, int64_t heads, int64_t queries, int64_t keys,
                         float scale, scalar_t* __restrict__ grad_k,
                         scalar_t* __restrict__ grad_v) {
  // Each thread reads its own key row; the +1 padding spreads the rows over the banks.
  __shared__ float k_rows[kKeyThreads][D + 1];
  __shared__ float v_rows[kKeyThreads][D + 1];
  __shared__ float q_tile[kQueryStage][D];
  __shared__ float grad_out_tile[kQueryStage][D];
  __shared__ float lse_tile[kQueryStage];
  __shared__ float delta_tile[kQueryStage];

  // One flat grid dimension: blocks are (batch * head, key tile), key tiles innermost.
  const int64_t key_tiles = ceil_div(keys, kKeyThreads);
  const int64_t bh = blockIdx.x / key_tiles;
  const int64_t b = bh / heads, h = bh % heads;
  const int64_t key0 = (blockIdx.x % key_tiles) * kKeyThreads;
  const int t = threadIdx.x;
  const int64_t key = key0 + t;
  const bool key_valid = key < keys;

  for (int idx = t; idx < kKeyThreads * D; idx += kKeyThreads) {
    const int r = idx / D, c = idx % D;
    const bool in_range = key0 + r < keys;
    const int64_t offset = (bh * keys + key0 + r) * D + c;
    k_rows[r][c] = in_range ? static_cast<float>(k[offset]) : 0.0f;
    v_rows[r][c] = in_range ? static_cast<float>(v[offset]) : 0.0f;
  }
  float grad_k_row[D], grad_v_row[D];
#pragma unroll
  for (int c = 0; c < D; ++c) {
    grad_k_row[c] = 0.0f;
    grad_v_row[c] = 0.0f;
  }

  for (int64_t query0 = 0; query0 < queries; query0 += kQueryStage) {
    const int staged =
        queries - query0 < kQueryStage ? static_cast<int>(queries - query0) : kQueryStage;
    __syncthreads();  // the previous stage is consumed (and the key rows are stored)
    for (int idx = t; idx < staged * D; idx += kKeyThreads) {
      const int r = idx / D, c = idx % D;
      const int64_t offset = (bh * queries + query0 + r) * D + c;
      q_tile[r][c] = static_cast<float>(q[offset]);
      grad_out_tile[r][c] = static_cast<float>(grad_out[offset]);
    }
    if (t < staged) {
      lse_tile[t] = lse[bh * queries + query0 + t];
      delta_tile[t] = delta[bh * queries + query0 + t];
    }
    __syncthreads();
    if (!key_valid) continue;
    for (int r = 0; r < staged; ++r) {
      if (!mask.visible(mask.row(b, h, query0 + r), key)) continue;
      float score = 0.0f, grad_prob = 0.0f;
#pragma unroll
      for (int c = 0; c < D; ++c) {
        score += k_rows[t][c] * q_tile[r][c];
        grad_prob += v_rows[t][c] * grad_out_tile[r][c];
      }
      const float prob = probability_from_lse(unfused_product(score, scale), lse_tile[r]);
      const float grad_score = score_gradient(prob, grad_prob, delta_tile[r]);
#pragma unroll
      for (int c = 0; c < D; ++c) {
        grad_v_row[c] += prob * grad_out_tile[r][c];
        grad_k_row[c] += grad_score * q_tile[r][c];
      }
    }
  }
  if (!key_valid) return;
  const int64_t offset = (bh * keys + key) * D;
#pragma unroll
  for (int c = 0; c < D; ++c) {
    grad_k[offset + c] = static_cast<scalar_t>(grad_k_row[c] * scale);
    grad_v[offset + c] = static_cast<scalar_t>(grad_v_row[c]);
  }
}

// The grid of one call: the key splits give every multiprocessor a few blocks of the forward and dq
// kernels, with at least four key tiles per split; keys_per_split is a multiple of kKeyTile.
struct AttentionPlan {
  int64_t num_rows;   // B * H * Q
  int64_t mask_rows;  // B * Hm * Q, one flag each
  int64_t query_tiles;
  int64_t keys_per_split;
  int64_t num_splits;
};

inline AttentionPlan attention_plan(const Sizes& s, int64_t multiprocessors) {
  AttentionPlan plan;
  plan.num_rows = s.batch * s.heads * s.queries;
  plan.mask_rows = s.batch * s.mask_heads * s.queries;
  plan.query_tiles = ceil_div(s.queries, kQueryTile);
  const int64_t blocks = s.batch * s.heads * plan.query_tiles;
  const int64_t wanted = ceil_div(4 * multiprocessors, blocks);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, ceil_div(s.keys, 4 * kKeyTile)));
  plan.keys_per_split = ceil_div(ceil_div(s.keys, splits), kKeyTile) * kKeyTile;
  plan.num_splits = ceil_div(s.keys, plan.keys_per_split);
  return plan;
}

template <typename F>
void dispatch_head_dim(int64_t head_dim, F&& body) {
  switch (head_dim) {
    case 16:
      body(std::integral_constant<int, 16>{});
      break;
    case 32:
      body(std::integral_constant<int, 32>{});
      break;
    default:
      body(std::integral_constant<int, 64>{});
      break;
  }
}

// Runs the row-flag pass into `flags` (plan.mask_rows bytes) and returns the mask source reading
// them. Exactly one of mask_logits and blocked is non-null.
template <typename scalar_t, typename Launch>
MaskSource<scalar_t> launch_row_flags(const Launch& launch, const Sizes& s,
                                      const AttentionPlan& plan, const scalar_t* mask_logits,
                                      const bool* blocked, float threshold_logit, uint8_t* flags) {
  MaskSource<scalar_t> mask{mask_logits,  blocked,   nullptr, threshold_logit,
                            s.mask_heads, s.queries, s.keys};
  launch(ceil_div(plan.mask_rows, kRowsPerFlagBlock), kRowsPerFlagBlock * 32,
         row_flags_kernel<scalar_t>, mask, plan.mask_rows, flags);
  mask.row_has_visible_key = flags;
  return mask;
}

// out (B, H, Q, D) and lse (B, H, Q). With plan.num_splits > 1, partial_max and partial_sum hold
// num_splits * num_rows floats and partial_acc num_splits * num_rows * D; otherwise they are
// unused.
template <typename scalar_t, typename Launch>
void launch_forward(const Launch& launch, const Sizes& s, const AttentionPlan& plan,
                    const scalar_t* q, const scalar_t* k, const scalar_t* v,
                    const MaskSource<scalar_t>& mask, float scale, scalar_t* out, float* lse,
                    float* partial_max, float* partial_sum, float* partial_acc) {
  const dim3 grid(s.batch * s.heads, plan.query_tiles, plan.num_splits);
  dispatch_head_dim(s.head_dim, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    launch(grid, kQueryTile, forward_kernel<scalar_t, D>, q, k, v, mask, s.heads, s.queries, s.keys,
           plan.keys_per_split, scale, out, lse, partial_max, partial_sum, partial_acc);
  });
  if (plan.num_splits > 1) {
    const int64_t elements = plan.num_rows * s.head_dim;
    launch(ceil_div(elements, 256), 256, combine_kernel<scalar_t>,
           static_cast<const float*>(partial_max), static_cast<const float*>(partial_sum),
           static_cast<const float*>(partial_acc), static_cast<int>(plan.num_splits), plan.num_rows,
           static_cast<int>(s.head_dim), out, lse);
  }
}

// grad_q, grad_k and grad_v in q's layout; delta holds num_rows floats and, with
// plan.num_splits > 1, partial_grad_q num_splits * num_rows * D.
template <typename scalar_t, typename Launch>
void launch_backward(const Launch& launch, const Sizes& s, const AttentionPlan& plan,
                     const scalar_t* grad_out, const scalar_t* q, const scalar_t* k,
                     const scalar_t* v, const scalar_t* out, const float* lse,
                     const MaskSource<scalar_t>& mask, float scale, float* delta,
                     float* partial_grad_q, scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v) {
  launch(ceil_div(plan.num_rows, 256), 256, delta_kernel<scalar_t>, grad_out, out, plan.num_rows,
         static_cast<int>(s.head_dim), delta);
  dispatch_head_dim(s.head_dim, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    const dim3 dq_grid(s.batch * s.heads, plan.query_tiles, plan.num_splits);
    launch(dq_grid, kQueryTile, backward_dq_kernel<scalar_t, D>, q, k, v, grad_out, lse,
           static_cast<const float*>(delta), mask, s.heads, s.queries, s.keys, plan.keys_per_split,
           scale, grad_q, partial_grad_q);
    const int64_t dkdv_blocks = s.batch * s.heads * ceil_div(s.keys, kKeyThreads);
    launch(dkdv_blocks, kKeyThreads, backward_dkdv_kernel<scalar_t, D>, q, k, v, grad_out, lse,
           static_cast<const float*>(delta), mask, s.heads, s.queries, s.keys, scale, grad_k,
           grad_v);
  });
  if (plan.num_splits > 1) {
    const int64_t count = plan.num_rows * s.head_dim;
    launch(ceil_div(count, 256), 256, reduce_splits_kernel<scalar_t>,
           static_cast<const float*>(partial_grad_q), static_cast<int>(plan.num_splits), count,
           grad_q);
  }
}

}  // namespace masked_attention
}  // namespace m2f
