// The CPU kernels of masked attention, written once for a lane count kLanes and the tile shapes
// kScoreTile, kWeightedRowsTile and kTransposedWeightsTile: cpu.cpp includes this file once per
// instruction set, inside a namespace that defines them and a `#pragma GCC target` region, so that
// every function here (the lambdas given to at::parallel_for included) is compiled for it.
// No include guard, on purpose.

constexpr int64_t kKeyBlock = 128;

template <typename T>
struct LaneTypes;
template <>
struct LaneTypes<float> {
  typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
};
template <>
struct LaneTypes<double> {
  typedef double vec __attribute__((vector_size(kLanes * sizeof(double))));
};
template <typename T>
using lanes_t = typename LaneTypes<T>::vec;

template <typename T>
inline lanes_t<T> load_lanes(const T* p) {
  lanes_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store_lanes(T* p, lanes_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
inline lanes_t<T> splat(T value) {
  return lanes_t<T>{} + value;
}

// exp for float lanes: 2^n * polynomial of the remainder (relative error about 2e-7). Arguments are
// clamped to [-87, 88] (exp(-87) ~ 1.6e-38); callers zero blocked entries themselves.
inline lanes_t<float> exp_lanes(lanes_t<float> x) {
  using vec = lanes_t<float>;
  const vec low = splat(-87.0f), high = splat(88.0f);
  x = x < low ? low : x;
  x = x > high ? high : x;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
  const vec round_magic = splat(12582912.0f);
  const vec n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vec p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const LaneTypes<float>::ivec exponent_bits =
      (__builtin_convertvector(n, LaneTypes<float>::ivec) + 127) << 23;
  vec two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof(vec));
  return p * two_to_n;
}
inline lanes_t<double> exp_lanes(lanes_t<double> x) {
  for (int64_t l = 0; l < kLanes; ++l) x[l] = std::exp(x[l]);
  return x;
}
inline float exp_scalar(float x) { return exp_lanes(splat(x))[0]; }
inline double exp_scalar(double x) { return std::exp(x); }

// visible[j] = 1 if logits[j] >= threshold_logit or the row has no visible key, else 0. The lane
// comparison is logit_is_visible() for kLanes keys at a time (NaN compares false: blocked).
template <typename scalar_t, typename acc_t>
void logits_visibility(const scalar_t* logits, int64_t n, acc_t threshold_logit,
                       bool row_has_visible_key, acc_t* visible) {
  if (!row_has_visible_key) {
    std::fill(visible, visible + n, acc_t(1));
    return;
  }
  const lanes_t<acc_t> one = splat(acc_t(1)), zero{}, threshold = splat(threshold_logit);
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    lanes_t<acc_t> values;
    for (int64_t l = 0; l < kLanes; ++l) values[l] = static_cast<acc_t>(logits[j0 + l]);
    store_lanes(visible + j0, values >= threshold ? one : zero);
  }
  for (; j0 < n; ++j0) {
    visible[j0] = logit_is_visible<acc_t>(static_cast<acc_t>(logits[j0]), threshold_logit);
  }
}

// visible[j] = 1 if blocked[j] is false or the row has no visible key, else 0.
template <typename acc_t>
void bool_mask_visibility(const bool* blocked, int64_t n, bool row_has_visible_key,
                          acc_t* visible) {
  if (!row_has_visible_key) {
    std::fill(visible, visible + n, acc_t(1));
    return;
  }
  for (int64_t j = 0; j < n; ++j) visible[j] = bool_mask_is_visible(blocked[j]);
}

// Read-only view of the mask source plus the per-row flags of the fully-blocked-row rule.
template <typename scalar_t, typename acc_t>
struct MaskView {
  const scalar_t* logits;  // (B, Q, K), or null
  const bool* blocked;     // (B, Hm, Q, K), or null
  acc_t threshold_logit;
  Sizes sizes;
  std::vector<uint8_t> row_has_visible_key;  // (B, Hm, Q)

  int64_t row(int64_t b, int64_t h, int64_t i) const {
    const int64_t mask_head = sizes.mask_heads > 1 ? h : 0;
    return (b * sizes.mask_heads + mask_head) * sizes.queries + i;
  }

  // fill_visibility for every query row i of head h, written at visible + i * stride.
  void fill_visibility_block(int64_t b, int64_t h, int64_t key_begin, int64_t nk, int64_t stride,
                             acc_t* visible) const {
    for (int64_t i = 0; i < sizes.queries; ++i) {
      fill_visibility(row(b, h, i), key_begin, nk, visible + i * stride);
    }
  }

  // visible[j] = 1 or 0 for the keys key_begin + j (j < n) of a row, after the row rule.
  void fill_visibility(int64_t row_index, int64_t key_begin, int64_t n, acc_t* visible) const {
    const int64_t offset = row_index * sizes.keys + key_begin;
    const bool has_visible = row_has_visible_key[row_index] != 0;
    if (logits != nullptr) {
      logits_visibility(logits + offset, n, threshold_logit, has_visible, visible);
    } else {
      bool_mask_visibility(blocked + offset, n, has_visible, visible);
    }
  }
};

template <typename scalar_t, typename acc_t>
MaskView<scalar_t, acc_t> make_mask_view(const Sizes& sizes,
                                         const std::optional<at::Tensor>& mask_logits,
                                         const std::optional<at::Tensor>& attn_mask,
                                         double threshold_logit) {
  MaskView<scalar_t, acc_t> view{
      mask_logits.has_value() ? mask_logits->data_ptr<scalar_t>() : nullptr,
      attn_mask.has_value() ? attn_mask->data_ptr<bool>() : nullptr,
      static_cast<acc_t>(threshold_logit),
      sizes,
      {}};
  const int64_t num_rows = sizes.batch * sizes.mask_heads * sizes.queries;
  view.row_has_visible_key.assign(num_rows, 0);
  at::parallel_for(0, num_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t offset = r * sizes.keys;
      bool any_visible = false;
      if (view.logits != nullptr) {
        for (int64_t j = 0; j < sizes.keys && !any_visible; ++j) {
          any_visible = logit_is_visible<acc_t>(static_cast<acc_t>(view.logits[offset + j]),
                                                view.threshold_logit);
        }
      } else {
        for (int64_t j = 0; j < sizes.keys && !any_visible; ++j) {
          any_visible = bool_mask_is_visible(view.blocked[offset + j]);
        }
      }
      view.row_has_visible_key[r] = any_visible;
    }
  });
  return view;
}

// Converts rows [row_begin, row_begin + n) of a (rows, d) matrix to acc_t, row-major (n, d).
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* src, int64_t row_begin, int64_t n, int64_t d, acc_t* dst) {
  const scalar_t* base = src + row_begin * d;
  for (int64_t x = 0; x < n * d; ++x) dst[x] = static_cast<acc_t>(base[x]);
}

// Rows [row_begin, row_begin + n) of a (rows, d) matrix in acc_t: the input itself when it already
// is acc_t, else a converted copy in buffer.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t row_begin, int64_t n, int64_t d,
                         std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src + row_begin * d;
  } else {
    buffer.resize(n * d);
    load_rows(src, row_begin, n, d, buffer.data());
    return buffer.data();
  }
}

// Where the acc_t results for the rows from row_begin of a (rows, d) output go: the output itself
// when it is acc_t, else buffer (the caller converts).
template <typename scalar_t, typename acc_t>
acc_t* output_rows(scalar_t* dst, int64_t row_begin, int64_t d, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst + row_begin * d;
  } else {
    return buffer.data();
  }
}

#if defined(__GNUC__) && !defined(__clang__)
// One step of the kLanes x kLanes float transpose: rows i and i + kBlock (i & kBlock == 0) swap
// their off-diagonal kBlock x kBlock blocks. After the steps for kBlock = kLanes / 2, ..., 2, 1,
// row c holds what was column c.
template <int32_t kBlock>
M2F_CPU_INLINE void swap_off_diagonal_blocks(lanes_t<float>* rows) {
  LaneTypes<float>::ivec low_half, high_half;
  for (int32_t l = 0; l < kLanes; ++l) {
    // Shuffle indices below kLanes pick from the first operand, the others from the second.
    low_half[l] = (l & kBlock) == 0 ? l : kLanes + l - kBlock;
    high_half[l] = (l & kBlock) == 0 ? l + kBlock : kLanes + l;
  }
  for (int64_t i = 0; i < kLanes; ++i) {
    if ((i & kBlock) != 0) continue;
    const lanes_t<float> upper = rows[i], lower = rows[i + kBlock];
    rows[i] = __builtin_shuffle(upper, lower, low_half);
    rows[i + kBlock] = __builtin_shuffle(upper, lower, high_half);
  }
  if constexpr (kBlock > 1) swap_off_diagonal_blocks<kBlock / 2>(rows);
}
#endif

// Converts rows [row_begin, row_begin + n) of a (rows, d) matrix to acc_t, transposed (d, stride).
template <typename scalar_t, typename acc_t>
void load_rows_transposed(const scalar_t* src, int64_t row_begin, int64_t n, int64_t d,
                          int64_t stride, acc_t* dst) {
  const scalar_t* base = src + row_begin * d;
  int64_t j0 = 0;
#if defined(__GNUC__) && !defined(__clang__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    // Whole kLanes x kLanes tiles go through registers; the rest is copied one value at a time.
    for (; j0 + kLanes <= n && d >= kLanes; j0 += kLanes) {
      int64_t c0 = 0;
      for (; c0 + kLanes <= d; c0 += kLanes) {
        lanes_t<float> tile[kLanes];
        for (int64_t i = 0; i < kLanes; ++i) tile[i] = load_lanes(base + (j0 + i) * d + c0);
        swap_off_diagonal_blocks<kLanes / 2>(tile);
        for (int64_t i = 0; i < kLanes; ++i) store_lanes(dst + (c0 + i) * stride + j0, tile[i]);
      }
      for (int64_t c = c0; c < d; ++c) {
        for (int64_t j = j0; j < j0 + kLanes; ++j) dst[c * stride + j] = base[j * d + c];
      }
    }
  }
#endif
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t j = j0; j < n; ++j) dst[c * stride + j] = static_cast<acc_t>(base[j * d + c]);
  }
}

// The three matrix products below share one register tile: kRows output rows of kVectors lane
// vectors each, every loaded vector feeding kRows multiply-adds (the shapes per instruction set are
// set by cpu.cpp). Every output is one sum in k order, so the tiling does not change any result.
//
// out[r * out_stride + x] (+)= sum_k coeffs[r * row_stride + k * k_stride] * vectors[k *
// vector_stride + x] for r < kRows and x < kVectors * kLanes.
template <int64_t kRows, int64_t kVectors, bool kAccumulate, typename acc_t>
M2F_CPU_INLINE void multiply_add_tile(const acc_t* coeffs, int64_t row_stride, int64_t k_stride,
                                      const acc_t* vectors, int64_t vector_stride, int64_t count,
                                      acc_t* out, int64_t out_stride) {
  lanes_t<acc_t> sums[kRows][kVectors] = {};
  if constexpr (kAccumulate) {
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < kVectors; ++v)
        sums[r][v] = load_lanes(out + r * out_stride + v * kLanes);
    }
  }
  for (int64_t k = 0; k < count; ++k) {
    lanes_t<acc_t> row[kVectors];
    for (int64_t v = 0; v < kVectors; ++v)
      row[v] = load_lanes(vectors + k * vector_stride + v * kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const acc_t coeff = coeffs[r * row_stride + k * k_stride];
      for (int64_t v = 0; v < kVectors; ++v) sums[r][v] += coeff * row[v];
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t v = 0; v < kVectors; ++v)
      store_lanes(out + r * out_stride + v * kLanes, sums[r][v]);
  }
}

// multiply_add_tile over columns x < width: whole tiles, then single lane vectors, then one
// column at a time.
template <int64_t kRows, int64_t kVectors, bool kAccumulate, typename acc_t>
M2F_CPU_INLINE void multiply_add_rows(const acc_t* coeffs, int64_t row_stride, int64_t k_stride,
                                      const acc_t* vectors, int64_t vector_stride, int64_t count,
                                      int64_t width, acc_t* out, int64_t out_stride) {
  int64_t x = 0;
  for (; x + kVectors * kLanes <= width; x += kVectors * kLanes) {
    multiply_add_tile<kRows, kVectors, kAccumulate>(coeffs, row_stride, k_stride, vectors + x,
                                                    vector_stride, count, out + x, out_stride);
  }
  for (; x + kLanes <= width; x += kLanes) {
    multiply_add_tile<kRows, 1, kAccumulate>(coeffs, row_stride, k_stride, vectors + x,
                                             vector_stride, count, out + x, out_stride);
  }
  for (; x < width; ++x) {
    for (int64_t r = 0; r < kRows; ++r) {
      acc_t sum = kAccumulate ? out[r * out_stride + x] : acc_t(0);
      for (int64_t k = 0; k < count; ++k) {
        sum += coeffs[r * row_stride + k * k_stride] * vectors[k * vector_stride + x];
      }
      out[r * out_stride + x] = sum;
    }
  }
}

// multiply_add_rows for every output row r < num_rows, kTile.rows at a time.
template <int64_t kTileRows, int64_t kTileVectors, bool kAccumulate, typename acc_t>
void multiply_add(const acc_t* coeffs, int64_t num_rows, int64_t row_stride, int64_t k_stride,
                  const acc_t* vectors, int64_t vector_stride, int64_t count, int64_t width,
                  acc_t* out, int64_t out_stride) {
  int64_t r = 0;
  for (; r + kTileRows <= num_rows; r += kTileRows) {
    multiply_add_rows<kTileRows, kTileVectors, kAccumulate>(
        coeffs + r * row_stride, row_stride, k_stride, vectors, vector_stride, count, width,
        out + r * out_stride, out_stride);
  }
  for (; r < num_rows; ++r) {
    multiply_add_rows<1, kTileVectors, kAccumulate>(coeffs + r * row_stride, row_stride, k_stride,
                                                    vectors, vector_stride, count, width,
                                                    out + r * out_stride, out_stride);
  }
}

// out[i * stride + j] = sum_c rows[i * d + c] * columns[c * stride + j] for i < num_rows, j < n.
template <typename acc_t>
void rows_times_columns(const acc_t* rows, int64_t num_rows, const acc_t* columns, int64_t n,
                        int64_t d, int64_t stride, acc_t* out) {
  multiply_add<kScoreTile.rows, kScoreTile.vectors, false>(rows, num_rows, d, 1, columns, stride, d,
                                                           n, out, stride);
}

// out[i * d + c] (+)= sum_j weights[i * stride + j] * b[j * d + c] for i < num_rows, j < n: added
// to out if accumulate, else written.
template <typename acc_t>
void weighted_rows(const acc_t* weights, int64_t num_rows, int64_t n, int64_t stride,
                   const acc_t* b, int64_t d, bool accumulate, acc_t* out) {
  if (accumulate) {
    multiply_add<kWeightedRowsTile.rows, kWeightedRowsTile.vectors, true>(weights, num_rows, stride,
                                                                          1, b, d, n, d, out, d);
  } else {
    multiply_add<kWeightedRowsTile.rows, kWeightedRowsTile.vectors, false>(
        weights, num_rows, stride, 1, b, d, n, d, out, d);
  }
}

// out[j * d + c] = sum_i weights[i * stride + j] * a[i * d + c] for i < num_rows, j < n.
template <typename acc_t>
void weighted_rows_transposed(const acc_t* weights, int64_t num_rows, int64_t n, int64_t stride,
                              const acc_t* a, int64_t d, acc_t* out) {
  multiply_add<kTransposedWeightsTile.rows, kTransposedWeightsTile.vectors, false>(
      weights, n, 1, stride, a, d, num_rows, d, out, d);
}

// scores[j] *= scale for j < n. The softmax subtracts a rounded scaled score (the row max, or the
// lse made from it) from every scaled score; with the products stored first the compiler cannot
// fuse product and subtraction into an FMA, which would leave the product's rounding error where 0
// belongs, beyond exp's range once |score * scale| nears 2^31.
template <typename acc_t>
void scale_row(acc_t* scores, int64_t n, acc_t scale) {
  for (int64_t j = 0; j < n; ++j) scores[j] *= scale;
}

// values[j] = exp(values[j] - shift) where visible[j] != 0, else 0, for j < n; returns the sum.
// Blocked keys are dropped by selection, not by multiplying with 0: a blocked key's score may be
// NaN or overflow the exponential.
template <typename acc_t>
acc_t exp_visible(acc_t* values, const acc_t* visible, int64_t n, acc_t shift) {
  const lanes_t<acc_t> zero{};
  lanes_t<acc_t> lane_sums{};
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    const lanes_t<acc_t> e = exp_lanes(load_lanes(values + j0) - shift);
    const lanes_t<acc_t> kept = load_lanes(visible + j0) != zero ? e : zero;
    store_lanes(values + j0, kept);
    lane_sums += kept;
  }
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lane_sums[l];
  for (; j0 < n; ++j0) {
    values[j0] = visible[j0] != acc_t(0) ? exp_scalar(values[j0] - shift) : acc_t(0);
    sum += values[j0];
  }
  return sum;
}

// For one row of the backward: probs[j] = P = exp(probs[j] - lse) from the scaled score, 0 for
// a blocked key (selected, as in exp_visible), and grad_scores[j] = scale * score_gradient(P, dP =
// grad_scores[j], delta), the gradient of the raw score: 0 for a blocked key.
template <typename acc_t>
void probabilities_and_score_gradients(acc_t* probs, acc_t* grad_scores, const acc_t* visible,
                                       int64_t n, acc_t scale, acc_t lse, acc_t delta) {
  const lanes_t<acc_t> zero{};
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    const auto keep = load_lanes(visible + j0) != zero;
    const lanes_t<acc_t> p = keep ? exp_lanes(load_lanes(probs + j0) - lse) : zero;
    store_lanes(probs + j0, p);
    store_lanes(grad_scores + j0, keep ? p * (load_lanes(grad_scores + j0) - delta) * scale : zero);
  }
  for (; j0 < n; ++j0) {
    const bool keep = visible[j0] != acc_t(0);
    probs[j0] = keep ? exp_scalar(probs[j0] - lse) : acc_t(0);
    grad_scores[j0] = keep ? score_gradient(probs[j0], grad_scores[j0], delta) * scale : acc_t(0);
  }
}

// Largest visible score of a row, -inf if none.
template <typename acc_t>
acc_t visible_max(const acc_t* scores, const acc_t* visible, int64_t n) {
  const lanes_t<acc_t> blocked = splat(negative_infinity<acc_t>());
  const lanes_t<acc_t> zero{};
  lanes_t<acc_t> lane_max = blocked;
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    const lanes_t<acc_t> candidate =
        load_lanes(visible + j0) != zero ? load_lanes(scores + j0) : blocked;
    lane_max = lane_max < candidate ? candidate : lane_max;
  }
  acc_t result = negative_infinity<acc_t>();
  for (int64_t l = 0; l < kLanes; ++l) result = std::max(result, lane_max[l]);
  for (; j0 < n; ++j0) {
    if (visible[j0] != acc_t(0)) result = std::max(result, scores[j0]);
  }
  return result;
}

// Tasks are (batch, chunk of kKeyChunk keys) with all heads and queries inside, so K and V are read
// once and a mask block shared by the heads is tested once. Each task keeps the online-softmax
// state (max, sum, acc) of its chunk; the chunks are merged in chunk order. Chunks do not depend on
// the thread count.
constexpr int64_t kKeyChunk = 4 * kKeyBlock;

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& mask_logits,
                    const std::optional<at::Tensor>& attn_mask, double threshold_logit,
                    double scale_value, const Sizes& s, at::Tensor& out, at::Tensor& lse) {
  using acc = acc_t<scalar_t>;
  const auto mask = make_mask_view<scalar_t, acc>(s, mask_logits, attn_mask, threshold_logit);
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* k_data = k.data_ptr<scalar_t>();
  const scalar_t* v_data = v.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  float* lse_data = lse.data_ptr<float>();
  const acc scale = static_cast<acc>(scale_value);
  const int64_t d = s.head_dim, heads = s.heads, nq = s.queries;
  const int64_t rows_per_batch = heads * nq, num_rows = s.batch * rows_per_batch;
  const int64_t num_chunks = (s.keys + kKeyChunk - 1) / kKeyChunk;
  const bool mask_shared_by_heads = s.mask_heads == 1;
  // Per chunk and row (b, h, i): running max, running sum and the unnormalized output (d values).
  std::vector<acc> chunk_max(num_chunks * num_rows), chunk_sum(num_chunks * num_rows);
  std::vector<acc> chunk_acc(num_chunks * num_rows * d);

  at::parallel_for(0, s.batch * num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> q_rows(rows_per_batch * d), k_transposed(d * kKeyBlock), v_block;
    std::vector<acc> weights(nq * kKeyBlock), visible(nq * kKeyBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_chunks, chunk = task % num_chunks;
      const int64_t chunk_end = std::min(s.keys, (chunk + 1) * kKeyChunk);
      const int64_t state0 = chunk * num_rows + b * rows_per_batch;
      acc* row_max = chunk_max.data() + state0;
      acc* row_sum = chunk_sum.data() + state0;
      acc* row_acc = chunk_acc.data() + state0 * d;
      std::fill(row_max, row_max + rows_per_batch, negative_infinity<acc>());
      std::fill(row_sum, row_sum + rows_per_batch, acc(0));
      std::fill(row_acc, row_acc + rows_per_batch * d, acc(0));
      load_rows(q_data, b * rows_per_batch, rows_per_batch, d, q_rows.data());

      for (int64_t key_begin = chunk * kKeyChunk; key_begin < chunk_end; key_begin += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, chunk_end - key_begin);
        for (int64_t h = 0; h < heads; ++h) {
          if (h == 0 || !mask_shared_by_heads) {
            mask.fill_visibility_block(b, h, key_begin, nk, kKeyBlock, visible.data());
          }
          const int64_t kv_row0 = (b * heads + h) * s.keys + key_begin;
          load_rows_transposed(k_data, kv_row0, nk, d, kKeyBlock, k_transposed.data());
          const acc* v_rows = rows_as_acc(v_data, kv_row0, nk, d, v_block);
          // weights holds the raw scores, then the scaled scores, then the unnormalized weights.
          rows_times_columns(q_rows.data() + h * nq * d, nq, k_transposed.data(), nk, d, kKeyBlock,
                             weights.data());
          for (int64_t i = 0; i < nq; ++i) {
            acc* row_weights = weights.data() + i * kKeyBlock;
            const acc* row_visible = visible.data() + i * kKeyBlock;
            const int64_t state = h * nq + i;
            scale_row(row_weights, nk, scale);
            const acc new_max = std::max(row_max[state], visible_max(row_weights, row_visible, nk));
            if (new_max == negative_infinity<acc>()) {
              std::fill(row_weights, row_weights + nk, acc(0));
              continue;
            }
            const acc alpha = rescale_factor(row_max[state], new_max);
            if (alpha != acc(1)) {
              for (int64_t c = 0; c < d; ++c) row_acc[state * d + c] *= alpha;
            }
            row_sum[state] =
                row_sum[state] * alpha + exp_visible(row_weights, row_visible, nk, new_max);
            row_max[state] = new_max;
          }
          weighted_rows(weights.data(), nq, nk, kKeyBlock, v_rows, d, /*accumulate=*/true,
                        row_acc + h * nq * d);
        }
      }
    }
  });

  at::parallel_for(0, num_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> merged(d);
    for (int64_t row = begin; row < end; ++row) {
      acc merged_max = negative_infinity<acc>();
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        merged_max = std::max(merged_max, chunk_max[chunk * num_rows + row]);
      }
      acc merged_sum = 0;
      std::fill(merged.begin(), merged.end(), acc(0));
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        const int64_t state = chunk * num_rows + row;
        const acc factor = rescale_factor(chunk_max[state], merged_max);
        merged_sum += chunk_sum[state] * factor;
        for (int64_t c = 0; c < d; ++c) merged[c] += chunk_acc[state * d + c] * factor;
      }
      for (int64_t c = 0; c < d; ++c) {
        out_data[row * d + c] = static_cast<scalar_t>(merged[c] / merged_sum);
      }
      lse_data[row] = static_cast<float>(log_sum_exp(merged_max, merged_sum));
    }
  });
}

// row_lse[i] = log(sum_j exp(scaled score)) over the visible keys of each of the Q rows of head (b,
// h), in acc_t. Scratch: k_transposed (d, kKeyBlock), scores (Q, kKeyBlock), visible (kKeyBlock).
template <typename scalar_t, typename acc_t>
void recompute_row_lse(const MaskView<scalar_t, acc_t>& mask, int64_t b, int64_t h,
                       const acc_t* q_rows, const scalar_t* k_head, const Sizes& s, acc_t scale,
                       acc_t* k_transposed, acc_t* scores, acc_t* visible, acc_t* row_lse) {
  const int64_t d = s.head_dim, nq = s.queries;
  std::vector<acc_t> row_max(nq, negative_infinity<acc_t>()), row_sum(nq, acc_t(0));
  for (int64_t key_begin = 0; key_begin < s.keys; key_begin += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, s.keys - key_begin);
    load_rows_transposed(k_head, key_begin, nk, d, kKeyBlock, k_transposed);
    rows_times_columns(q_rows, nq, k_transposed, nk, d, kKeyBlock, scores);
    for (int64_t i = 0; i < nq; ++i) {
      acc_t* row_scores = scores + i * kKeyBlock;
      mask.fill_visibility(mask.row(b, h, i), key_begin, nk, visible);
      scale_row(row_scores, nk, scale);
      const acc_t new_max = std::max(row_max[i], visible_max(row_scores, visible, nk));
      if (new_max == negative_infinity<acc_t>()) continue;
      const acc_t alpha = rescale_factor(row_max[i], new_max);
      row_sum[i] = row_sum[i] * alpha + exp_visible(row_scores, visible, nk, new_max);
      row_max[i] = new_max;
    }
  }
  for (int64_t i = 0; i < nq; ++i) row_lse[i] = log_sum_exp(row_max[i], row_sum[i]);
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     const std::optional<at::Tensor>& mask_logits,
                     const std::optional<at::Tensor>& attn_mask, double threshold_logit,
                     double scale_value, const Sizes& s, at::Tensor& grad_q, at::Tensor& grad_k,
                     at::Tensor& grad_v) {
  using acc = acc_t<scalar_t>;
  const auto mask = make_mask_view<scalar_t, acc>(s, mask_logits, attn_mask, threshold_logit);
  const scalar_t* grad_out_data = grad_out.data_ptr<scalar_t>();
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* k_data = k.data_ptr<scalar_t>();
  const scalar_t* v_data = v.data_ptr<scalar_t>();
  const scalar_t* out_data = out.data_ptr<scalar_t>();
  const float* lse_data = lse.data_ptr<float>();
  scalar_t* grad_q_data = grad_q.data_ptr<scalar_t>();
  scalar_t* grad_k_data = grad_k.data_ptr<scalar_t>();
  scalar_t* grad_v_data = grad_v.data_ptr<scalar_t>();
  const acc scale = static_cast<acc>(scale_value);
  const int64_t d = s.head_dim, nq = s.queries, heads = s.heads;
  const int64_t num_rows = s.batch * heads * nq;
  const bool mask_shared_by_heads = s.mask_heads == 1;

  // Per row: delta = sum_c dO * O, and the lse (recomputed in float64 for float64 inputs, where the
  // float32 lse would cap the gradients at float32 precision).
  std::vector<acc> row_delta(num_rows), row_lse(num_rows);
  at::parallel_for(0, num_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc delta = 0;
      for (int64_t c = 0; c < d; ++c) {
        delta +=
            static_cast<acc>(grad_out_data[row * d + c]) * static_cast<acc>(out_data[row * d + c]);
      }
      row_delta[row] = delta;
      row_lse[row] = static_cast<acc>(lse_data[row]);
    }
  });
  if constexpr (std::is_same_v<acc, double>) {
    at::parallel_for(0, s.batch * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> q_rows(nq * d), k_transposed(d * kKeyBlock), scores(nq * kKeyBlock);
      std::vector<acc> visible(kKeyBlock);
      for (int64_t bh = begin; bh < end; ++bh) {
        load_rows(q_data, bh * nq, nq, d, q_rows.data());
        recompute_row_lse(mask, bh / heads, bh % heads, q_rows.data(), k_data + bh * s.keys * d, s,
                          scale, k_transposed.data(), scores.data(), visible.data(),
                          row_lse.data() + bh * nq);
      }
    });
  }

  // Tasks as in the forward: each owns dk and dv of its keys and writes its share of dq to its own
  // slice of grad_q_partial; the slices are summed in chunk order.
  const int64_t num_chunks = (s.keys + kKeyChunk - 1) / kKeyChunk;
  // Not zeroed: the first key block of each chunk writes its slice.
  std::unique_ptr<acc[]> grad_q_partial(new acc[num_chunks * num_rows * d]);
  at::parallel_for(0, s.batch * num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> q_buffer, grad_out_buffer, k_buffer;
    std::vector<acc> k_transposed(d * kKeyBlock), v_transposed(d * kKeyBlock);
    std::vector<acc> grad_k_buffer(kKeyBlock * d), grad_v_buffer(kKeyBlock * d);
    std::vector<acc> probs(nq * kKeyBlock), grad_scores(nq * kKeyBlock), visible(nq * kKeyBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_chunks, chunk = task % num_chunks;
      const int64_t chunk_end = std::min(s.keys, (chunk + 1) * kKeyChunk);
      const acc* q_rows = rows_as_acc(q_data, b * heads * nq, heads * nq, d, q_buffer);
      const acc* grad_out_rows =
          rows_as_acc(grad_out_data, b * heads * nq, heads * nq, d, grad_out_buffer);
      for (int64_t key_begin = chunk * kKeyChunk; key_begin < chunk_end; key_begin += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, chunk_end - key_begin);
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t bh = b * heads + h;
          if (h == 0 || !mask_shared_by_heads) {
            mask.fill_visibility_block(b, h, key_begin, nk, kKeyBlock, visible.data());
          }
          const acc* q_head = q_rows + h * nq * d;
          const acc* grad_out_head = grad_out_rows + h * nq * d;
          const int64_t kv_row0 = bh * s.keys + key_begin;
          const acc* k_rows = rows_as_acc(k_data, kv_row0, nk, d, k_buffer);
          load_rows_transposed(k_data, kv_row0, nk, d, kKeyBlock, k_transposed.data());
          load_rows_transposed(v_data, kv_row0, nk, d, kKeyBlock, v_transposed.data());
          // acc_t gradients are written in place; other dtypes go through acc_t buffers.
          acc* grad_k_rows = output_rows(grad_k_data, kv_row0, d, grad_k_buffer);
          acc* grad_v_rows = output_rows(grad_v_data, kv_row0, d, grad_v_buffer);
          // probs holds the raw scores S = Q K^T, then the scaled scores, then P; grad_scores holds
          // dP = dO V^T first, then the gradients of the raw scores.
          rows_times_columns(q_head, nq, k_transposed.data(), nk, d, kKeyBlock, probs.data());
          rows_times_columns(grad_out_head, nq, v_transposed.data(), nk, d, kKeyBlock,
                             grad_scores.data());
          for (int64_t i = 0; i < nq; ++i) {
            scale_row(probs.data() + i * kKeyBlock, nk, scale);
            probabilities_and_score_gradients(probs.data() + i * kKeyBlock,
                                              grad_scores.data() + i * kKeyBlock,
                                              visible.data() + i * kKeyBlock, nk, scale,
                                              row_lse[bh * nq + i], row_delta[bh * nq + i]);
          }
          weighted_rows_transposed(probs.data(), nq, nk, kKeyBlock, grad_out_head, d, grad_v_rows);
          weighted_rows_transposed(grad_scores.data(), nq, nk, kKeyBlock, q_head, d, grad_k_rows);
          weighted_rows(grad_scores.data(), nq, nk, kKeyBlock, k_rows, d,
                        /*accumulate=*/key_begin != chunk * kKeyChunk,
                        grad_q_partial.get() + (chunk * num_rows + bh * nq) * d);
          if constexpr (!std::is_same_v<scalar_t, acc>) {
            for (int64_t x = 0; x < nk * d; ++x) {
              grad_k_data[kv_row0 * d + x] = static_cast<scalar_t>(grad_k_rows[x]);
              grad_v_data[kv_row0 * d + x] = static_cast<scalar_t>(grad_v_rows[x]);
            }
          }
        }
      }
    }
  });
  at::parallel_for(0, num_rows * d, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      acc sum = 0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk)
        sum += grad_q_partial[chunk * num_rows * d + x];
      grad_q_data[x] = static_cast<scalar_t>(sum);
    }
  });
}
