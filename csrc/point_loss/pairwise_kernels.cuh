// pairwise_mask_cost's CUDA kernels and launch plan (Q predictions, T targets, P points). They use
// thread and block indices, shared memory and __syncthreads only, so that the tests also run them
// on the CPU (tests/cuda_emulation).
//
// The CE cost is (sum softplus(x) - x.t) / P (pairwise_ce_cost in sampling.h), so each pair needs
// two dot products, x.t and sigmoid(x).t. The points are split into consecutive ranges so that the
// few (query, target) tiles of a matcher call fill the GPU; the partial kernel writes each split's
// dot products and row sums, and the finalize kernel adds the splits in a fixed order.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "point_loss/sampling.h"

namespace m2f {
namespace point_loss {

// kPairTile x kPairTile pairs per block, kPairMicro x kPairMicro per thread.
constexpr int kPairTile = 32;
constexpr int kPairMicro = 4;
constexpr int kPairStride = kPairTile / kPairMicro;
constexpr int kPairThreads = kPairStride * kPairStride;
// Points per chunk staged in shared memory; a thread stages one point column of kPairStaged rows.
constexpr int kPairChunk = 32;
constexpr int kPairStaged = kPairTile * kPairChunk / kPairThreads;
constexpr int kPairStagedRowStep = kPairThreads / kPairChunk;
// A split is at least this many chunks long.
constexpr int64_t kPairMinSplitChunks = 4;
constexpr int kPairFinalizeThreads = 256;
// A finalize lane adds at least this many splits, or all of them.
constexpr int64_t kPairFinalizeSplitsPerLane = 4;
static_assert(kPairThreads == 2 * kPairTile,
              "one row sum per thread: kPairTile query rows, kPairTile target rows");
static_assert(kPairThreads % kPairChunk == 0, "each thread stages whole rows of one point column");

struct PairwisePlan {
  int64_t query_tiles;
  int64_t target_tiles;
  int64_t num_splits;
  int64_t points_per_split;  // a multiple of kPairChunk
  int finalize_lanes;        // threads that add one pair's splits: a power of two, at most 32
  int64_t finalize_blocks;
};

// Enough splits to give each of the `sm_count` multiprocessors about four partial blocks, each
// split at least kPairMinSplitChunks chunks long, and a finalize group for every pair of the most
// lanes (a power of two, up to a warp) that each add kPairFinalizeSplitsPerLane splits or more.
// num_queries, num_targets and num_points are positive.
inline PairwisePlan pairwise_plan(int64_t num_queries, int64_t num_targets, int64_t num_points,
                                  int64_t sm_count) {
  PairwisePlan plan;
  plan.query_tiles = (num_queries + kPairTile - 1) / kPairTile;
  plan.target_tiles = (num_targets + kPairTile - 1) / kPairTile;
  const int64_t tiles = plan.query_tiles * plan.target_tiles;
  const int64_t min_split_points = kPairMinSplitChunks * kPairChunk;
  const int64_t max_splits =
      std::max<int64_t>(1, (num_points + min_split_points - 1) / min_split_points);
  const int64_t wanted_splits = std::max<int64_t>(1, (4 * sm_count + tiles - 1) / tiles);
  const int64_t splits = std::min<int64_t>({max_splits, wanted_splits, 65535});
  const int64_t chunks = (num_points + kPairChunk - 1) / kPairChunk;
  plan.points_per_split = (chunks + splits - 1) / splits * kPairChunk;
  plan.num_splits = (num_points + plan.points_per_split - 1) / plan.points_per_split;
  const int64_t lanes_wanted =
      (plan.num_splits + kPairFinalizeSplitsPerLane - 1) / kPairFinalizeSplitsPerLane;
  plan.finalize_lanes = 1;
  while (plan.finalize_lanes < 32 && 2 * plan.finalize_lanes <= lanes_wanted)
    plan.finalize_lanes *= 2;
  const int64_t pairs_per_block = kPairFinalizeThreads / plan.finalize_lanes;
  const int64_t pairs = num_queries * num_targets;
  plan.finalize_blocks = std::max<int64_t>(
      1, std::min<int64_t>((pairs + pairs_per_block - 1) / pairs_per_block, int64_t(1) << 20));
  return plan;
}

// Block (query tile, target tile, point split) of kPairThreads threads. Each thread owns a
// kPairMicro x kPairMicro block of pairs: queries ty + kPairStride * i and targets
// tx + kPairStride * j, where ty = thread / kPairStride and tx = thread % kPairStride. Each chunk
// of kPairChunk points is staged in shared memory as [row][point], with one column of padding so
// that neither the staging nor the pair loop has bank conflicts; the raw values of the next chunk
// are loaded into registers while the current one is multiplied. Points past the split, queries
// past Q and targets past T are staged as zeros, which add nothing to a dot product that is kept.
// Writes the split's (x.t, sigmoid(x).t) per pair to partial_dots (S, Q, T, 2), its
// (sum softplus(x), sum sigmoid(x)) per query to partial_query_sums (S, Q, 2) from the first
// target tile, and its label sums to partial_target_sums (S, T) from the first query tile.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kPairThreads)
    pairwise_partial_kernel(const scalar_t* __restrict__ logits, const label_t* __restrict__ labels,
                            at::opmath_type<scalar_t>* __restrict__ partial_dots,
                            at::opmath_type<scalar_t>* __restrict__ partial_query_sums,
                            at::opmath_type<scalar_t>* __restrict__ partial_target_sums,
                            int64_t num_queries, int64_t num_targets, int64_t num_points,
                            int64_t points_per_split) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t logit_tile[kPairTile][kPairChunk + 1];
  __shared__ acc_t prob_tile[kPairTile][kPairChunk + 1];      // sigmoid(x)
  __shared__ acc_t softplus_tile[kPairTile][kPairChunk + 1];  // first target tile only
  __shared__ acc_t label_tile[kPairTile][kPairChunk + 1];
  const int thread = threadIdx.x;
  const int ty = thread / kPairStride, tx = thread % kPairStride;
  const int column = thread % kPairChunk, first_row = thread / kPairChunk;
  const int64_t query_base = static_cast<int64_t>(blockIdx.x) * kPairTile;
  const int64_t target_base = static_cast<int64_t>(blockIdx.y) * kPairTile;
  const int64_t split = blockIdx.z;
  const int64_t point_begin = split * points_per_split;
  const int64_t point_end = std::min(point_begin + points_per_split, num_points);
  const bool sums_queries = blockIdx.y == 0, sums_targets = blockIdx.x == 0;

  scalar_t next_logit[kPairStaged];
  label_t next_label[kPairStaged];
  auto load_chunk = [&](int64_t start) {
    const int64_t point = start + column;
#pragma unroll
    for (int i = 0; i < kPairStaged; ++i) {
      const int row = first_row + kPairStagedRowStep * i;
      const int64_t query = query_base + row, target = target_base + row;
      next_logit[i] = point < point_end && query < num_queries ? logits[query * num_points + point]
                                                               : scalar_t(0);
      next_label[i] = point < point_end && target < num_targets
                          ? labels[target * num_points + point]
                          : label_t(0);
    }
  };

  acc_t logit_dot[kPairMicro][kPairMicro] = {}, prob_dot[kPairMicro][kPairMicro] = {};
  // thread < kPairTile: query row `thread` (sigmoid, softplus); else target row thread - kPairTile.
  acc_t row_sum = 0, softplus_sum = 0;
  if (point_begin < point_end) load_chunk(point_begin);
  for (int64_t start = point_begin; start < point_end; start += kPairChunk) {
    const bool point_valid = start + column < point_end;
#pragma unroll
    for (int i = 0; i < kPairStaged; ++i) {
      const int row = first_row + kPairStagedRowStep * i;
      acc_t logit = 0, prob = 0, label = 0;
      if (point_valid && query_base + row < num_queries) {
        logit = static_cast<acc_t>(next_logit[i]);
        if (sums_queries) {
          const LogitTerms<acc_t> terms = logit_terms(logit);
          prob = terms.prob;
          softplus_tile[row][column] = softplus(logit, terms.log_term);
        } else {
          prob = sigmoid(logit);  // the same value as logit_terms' prob
        }
      } else if (sums_queries) {
        softplus_tile[row][column] = 0;
      }
      if (point_valid && target_base + row < num_targets) label = static_cast<acc_t>(next_label[i]);
      logit_tile[row][column] = logit;
      prob_tile[row][column] = prob;
      label_tile[row][column] = label;
    }
    __syncthreads();
    if (start + kPairChunk < point_end) load_chunk(start + kPairChunk);
    if (thread < kPairTile && sums_queries) {
#pragma unroll
      for (int k = 0; k < kPairChunk; ++k) {
        row_sum += prob_tile[thread][k];
        softplus_sum += softplus_tile[thread][k];
      }
    } else if (thread >= kPairTile && sums_targets) {
#pragma unroll
      for (int k = 0; k < kPairChunk; ++k) row_sum += label_tile[thread - kPairTile][k];
    }
#pragma unroll 4
    for (int k = 0; k < kPairChunk; ++k) {
      acc_t label[kPairMicro];
#pragma unroll
      for (int j = 0; j < kPairMicro; ++j) label[j] = label_tile[tx + kPairStride * j][k];
#pragma unroll
      for (int i = 0; i < kPairMicro; ++i) {
        const int row = ty + kPairStride * i;
        const acc_t logit = logit_tile[row][k], prob = prob_tile[row][k];
#pragma unroll
        for (int j = 0; j < kPairMicro; ++j) {
          logit_dot[i][j] += logit * label[j];
          prob_dot[i][j] += prob * label[j];
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kPairMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kPairMicro; ++j) {
      const int64_t query = query_base + ty + kPairStride * i;
      const int64_t target = target_base + tx + kPairStride * j;
      if (query < num_queries && target < num_targets) {
        acc_t* out = partial_dots + ((split * num_queries + query) * num_targets + target) * 2;
        out[0] = logit_dot[i][j];
        out[1] = prob_dot[i][j];
      }
    }
  }
  if (thread < kPairTile && sums_queries && query_base + thread < num_queries) {
    acc_t* out = partial_query_sums + (split * num_queries + query_base + thread) * 2;
    out[0] = softplus_sum;
    out[1] = row_sum;
  }
  const int target_row = thread - kPairTile;
  if (thread >= kPairTile && sums_targets && target_base + target_row < num_targets)
    partial_target_sums[split * num_targets + target_base + target_row] = row_sum;
}

// ce and dice (Q, T) from the partial kernel's outputs. A group of `lanes` threads of a warp (a
// power of two, at most 32: pairwise_plan) finalizes one pair: lane j adds splits j, j + lanes, ...
// in order, then the group adds its lanes' sums in a fixed butterfly, so the result does not depend
// on scheduling. The groups of a warp take consecutive pairs; a warp's lanes stay together through
// the shuffles, those past the last pair adding zeros.
template <typename acc_t>
__global__ void __launch_bounds__(kPairFinalizeThreads)
    pairwise_finalize_kernel(const acc_t* __restrict__ partial_dots,
                             const acc_t* __restrict__ partial_query_sums,
                             const acc_t* __restrict__ partial_target_sums, acc_t* __restrict__ ce,
                             acc_t* __restrict__ dice, int64_t num_queries, int64_t num_targets,
                             int64_t num_points, int64_t num_splits, int lanes) {
  const int64_t total = num_queries * num_targets;
  const int lane = threadIdx.x % lanes;
  const int64_t groups_per_block = kPairFinalizeThreads / lanes;
  const int64_t group_stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int64_t warp_first_group = static_cast<int64_t>(blockIdx.x) * groups_per_block +
                                   (threadIdx.x - threadIdx.x % 32) / lanes;
  // Every lane of a warp runs the same number of rounds: the loop bound is the warp's first pair.
  for (int64_t round_base = warp_first_group; round_base < total; round_base += group_stride) {
    const int64_t index = round_base + (threadIdx.x % 32) / lanes;
    const bool has_pair = index < total;
    const int64_t query = has_pair ? index / num_targets : 0;
    const int64_t target = has_pair ? index - query * num_targets : 0;
    acc_t sums[5] = {0, 0, 0, 0, 0};  // x.t, sigmoid(x).t, sum softplus(x), sum sigmoid(x), sum t
    for (int64_t split = lane; has_pair && split < num_splits; split += lanes) {
      const acc_t* dots = partial_dots + (split * total + index) * 2;
      const acc_t* query_sums = partial_query_sums + (split * num_queries + query) * 2;
      sums[0] += dots[0];
      sums[1] += dots[1];
      sums[2] += query_sums[0];
      sums[3] += query_sums[1];
      sums[4] += partial_target_sums[split * num_targets + target];
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int i = 0; i < 5; ++i) sums[i] += __shfl_xor_sync(0xffffffffu, sums[i], offset);
    }
    if (has_pair && lane == 0) {
      ce[index] = pairwise_ce_cost(sums[2], sums[0], num_points);
      dice[index] = pairwise_dice_cost(sums[1], sums[3], sums[4]);
    }
  }
}

// ce and dice (Q, T) in the accumulation type; partial_dots holds num_splits * Q * T * 2 values,
// partial_query_sums num_splits * Q * 2 and partial_target_sums num_splits * T. Needs Q, T, P > 0.
template <typename scalar_t, typename label_t, typename Launch>
void launch_pairwise_mask_cost(const Launch& launch, const PairwisePlan& plan,
                               const scalar_t* logits, const label_t* labels,
                               at::opmath_type<scalar_t>* partial_dots,
                               at::opmath_type<scalar_t>* partial_query_sums,
                               at::opmath_type<scalar_t>* partial_target_sums,
                               at::opmath_type<scalar_t>* ce, at::opmath_type<scalar_t>* dice,
                               int64_t num_queries, int64_t num_targets, int64_t num_points) {
  using acc_t = at::opmath_type<scalar_t>;
  const dim3 grid(static_cast<unsigned>(plan.query_tiles), static_cast<unsigned>(plan.target_tiles),
                  static_cast<unsigned>(plan.num_splits));
  launch(grid, kPairThreads, pairwise_partial_kernel<scalar_t, label_t>, logits, labels,
         partial_dots, partial_query_sums, partial_target_sums, num_queries, num_targets,
         num_points, plan.points_per_split);
  launch(static_cast<unsigned>(plan.finalize_blocks), kPairFinalizeThreads,
         pairwise_finalize_kernel<acc_t>, static_cast<const acc_t*>(partial_dots),
         static_cast<const acc_t*>(partial_query_sums),
         static_cast<const acc_t*>(partial_target_sums), ce, dice, num_queries, num_targets,
         num_points, plan.num_splits, plan.finalize_lanes);
}

}  // namespace point_loss
}  // namespace m2f
