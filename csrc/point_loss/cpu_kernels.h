// The vectorized CPU loops of point_mask_loss and pairwise_mask_cost, written once for a lane count
// kVectorLanes: cpu.cpp includes this file once per x86-64 level, inside a namespace that defines
// it and a `#pragma GCC target` region, so that every function here is compiled for that level.
// No include guard, on purpose.

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
// whichever the calling clone targets): exp by range reduction and a degree-7
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

// Samples the logits and targets of points [begin, begin + count) of one mask (count <= kChunk),
// one point at a time.
template <typename acc_t, typename scalar_t, typename target_t>
M2F_CPU_INLINE void sample_points(const scalar_t* logit_plane, int64_t height, int64_t width,
                                  const target_t* target_plane, int64_t target_height,
                                  int64_t target_width, const acc_t* mask_coords,
                                  int64_t num_points, int64_t begin, int64_t count, acc_t* logits,
                                  acc_t* targets) {
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

// Whether a plane is sampled kVectorLanes points at a time: the lanes hold 32-bit indices, and
// clamp their corners into the plane, which an empty plane does not have.
M2F_CPU_INLINE bool fits_lanes(int64_t height, int64_t width) {
  return height > 0 && width > 0 && height * width <= 0x7fffffff;
}

#if defined(__GNUC__)
M2F_CPU_INLINE IntVector int_splat(int32_t value) { return IntVector{} + value; }

// The floor cells of kVectorLanes points of a plane (height * width < 2^31), as bilinear_cell and
// read_corners define them: the flat indices of the cells' corner rows and columns, clamped into
// the plane, masks (all ones) of the corners inside the plane of the points that contribute, and
// the fractions.
struct CellLanes {
  IntVector row0, row1, col0, col1;  // row offsets (row * width) and columns
  IntVector in00, in01, in10, in11;  // (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)
  FloatVector lx, ly;
};

M2F_CPU_INLINE CellLanes cell_lanes(FloatVector loc_x, FloatVector loc_y, int64_t height,
                                    int64_t width) {
  const FloatVector w = splat(static_cast<float>(width)), h = splat(static_cast<float>(height));
  const FloatVector x = unfused_product(loc_x, w) - splat(0.5f);
  const FloatVector y = unfused_product(loc_y, h) - splat(0.5f);
  // NaN fails every comparison; the other lanes get x = y = 0 so that the conversions are exact.
  const IntVector valid = (x > splat(-1.0f)) & (x < w) & (y > splat(-1.0f)) & (y < h);
  const FloatVector xs = blend(valid, x, splat(0.0f)), ys = blend(valid, y, splat(0.0f));
  IntVector x0 = __builtin_convertvector(xs, IntVector),
            y0 = __builtin_convertvector(ys, IntVector);
  x0 += __builtin_convertvector(x0, FloatVector) > xs;  // floor: truncation, one down if negative
  y0 += __builtin_convertvector(y0, FloatVector) > ys;
  const IntVector zero = int_splat(0), last_col = int_splat(static_cast<int32_t>(width - 1)),
                  last_row = int_splat(static_cast<int32_t>(height - 1));
  const IntVector x1 = x0 + 1, y1 = y0 + 1;
  const IntVector x0_in = valid & (x0 >= zero), x1_in = valid & (x1 <= last_col);
  const IntVector y0_in = y0 >= zero, y1_in = y1 <= last_row;
  CellLanes cell;
  cell.row0 = (y0_in ? y0 : zero) * static_cast<int32_t>(width);
  cell.row1 = (y1_in ? y1 : last_row) * static_cast<int32_t>(width);
  cell.col0 = x0_in ? x0 : zero;
  cell.col1 = x1_in ? x1 : last_col;
  cell.in00 = y0_in & x0_in;
  cell.in01 = y0_in & x1_in;
  cell.in10 = y1_in & x0_in;
  cell.in11 = y1_in & x1_in;
  cell.lx = xs - __builtin_convertvector(x0, FloatVector);
  cell.ly = ys - __builtin_convertvector(y0, FloatVector);
  return cell;
}

template <typename value_t>
M2F_CPU_INLINE void prefetch_cells(const value_t* plane, const CellLanes& cell) {
  for (int64_t l = 0; l < kVectorLanes; ++l) {
    __builtin_prefetch(plane + cell.row0[l] + cell.col0[l]);
    __builtin_prefetch(plane + cell.row1[l] + cell.col0[l]);
  }
}

// sample_plane of kVectorLanes points: the corners are read one lane at a time.
template <typename value_t>
M2F_CPU_INLINE FloatVector sample_cells(const value_t* plane, const CellLanes& cell) {
  FloatVector v00, v01, v10, v11;
  for (int64_t l = 0; l < kVectorLanes; ++l) {
    v00[l] = static_cast<float>(plane[cell.row0[l] + cell.col0[l]]);
    v01[l] = static_cast<float>(plane[cell.row0[l] + cell.col1[l]]);
    v10[l] = static_cast<float>(plane[cell.row1[l] + cell.col0[l]]);
    v11[l] = static_cast<float>(plane[cell.row1[l] + cell.col1[l]]);
  }
  const FloatVector zero = splat(0.0f);
  v00 = blend(cell.in00, v00, zero);
  v01 = blend(cell.in01, v01, zero);
  v10 = blend(cell.in10, v10, zero);
  v11 = blend(cell.in11, v11, zero);
  const FloatVector hx = splat(1.0f) - cell.lx, hy = splat(1.0f) - cell.ly;
  return hy * (hx * v00 + cell.lx * v01) + cell.ly * (hx * v10 + cell.lx * v11);
}

// The (x, y) coords of kVectorLanes points, interleaved at coords, as two vectors.
M2F_CPU_INLINE void load_coord_lanes(const float* coords, FloatVector* x, FloatVector* y) {
  FloatVector first, second;
  std::memcpy(&first, coords, sizeof(first));
  std::memcpy(&second, coords + kVectorLanes, sizeof(second));
  IntVector even, odd;
  for (int32_t l = 0; l < kVectorLanes; ++l) {
    even[l] = 2 * l;
    odd[l] = 2 * l + 1;
  }
  *x = __builtin_shuffle(first, second, even);
  *y = __builtin_shuffle(first, second, odd);
}
#endif

#if defined(__GNUC__)
// The logit plane's cells of a chunk's lane groups, as sample_chunk finds them: mask_loss_grad
// hands them to scatter_chunk, which adds the gradients at the same cells.
struct ChunkCells {
  CellLanes groups[kChunk / kVectorLanes];
  int64_t points = 0;  // points [0, points) of the chunk have their cells in groups
};
#else
struct ChunkCells {
  int64_t points = 0;
};
#endif

// sample_points, kVectorLanes points at a time where the planes allow 32-bit indices (float). With
// logit_cells, records the logit plane's cells of the points sampled in lanes.
template <typename acc_t, typename scalar_t, typename target_t>
M2F_CPU_INLINE void sample_chunk(const scalar_t* logit_plane, int64_t height, int64_t width,
                                 const target_t* target_plane, int64_t target_height,
                                 int64_t target_width, const acc_t* mask_coords, int64_t num_points,
                                 int64_t begin, int64_t count, acc_t* logits, acc_t* targets,
                                 ChunkCells* logit_cells = nullptr) {
  int64_t i = 0;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fits_lanes(height, width) && fits_lanes(target_height, target_width)) {
      for (; i + kVectorLanes <= count; i += kVectorLanes) {
        const int64_t p = begin + i;
        FloatVector x, y;
        if (p + 2 * kVectorLanes <= num_points) {  // the target cells of the next points
          load_coord_lanes(mask_coords + 2 * (p + kVectorLanes), &x, &y);
          prefetch_cells(target_plane, cell_lanes(x, y, target_height, target_width));
        }
        load_coord_lanes(mask_coords + 2 * p, &x, &y);
        const CellLanes cell = cell_lanes(x, y, height, width);
        if (logit_cells != nullptr) logit_cells->groups[i / kVectorLanes] = cell;
        const FloatVector logit = sample_cells(logit_plane, cell);
        const FloatVector target =
            sample_cells(target_plane, cell_lanes(x, y, target_height, target_width));
        std::memcpy(logits + i, &logit, sizeof(logit));
        std::memcpy(targets + i, &target, sizeof(target));
      }
    }
  }
#endif
  if (logit_cells != nullptr) logit_cells->points = i;
  sample_points(logit_plane, height, width, target_plane, target_height, target_width, mask_coords,
                num_points, begin + i, count - i, logits + i, targets + i);
}

// point_sample's forward for points [begin, end) of one batch entry: the (channels, height, width)
// input at coords (num_points, 2), written at output[c * num_points + p]; kVectorLanes points'
// cells at a time where the planes allow it.
template <typename scalar_t, typename acc_t>
void point_sample_points(const scalar_t* input, int64_t channels, int64_t height, int64_t width,
                         const acc_t* coords, int64_t num_points, int64_t begin, int64_t end,
                         scalar_t* output) {
  int64_t p = begin;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fits_lanes(height, width)) {
      for (; p + kVectorLanes <= end; p += kVectorLanes) {
        FloatVector x, y;
        load_coord_lanes(coords + 2 * p, &x, &y);
        const CellLanes cell = cell_lanes(x, y, height, width);
        for (int64_t c = 0; c < channels; ++c) {
          const FloatVector values = sample_cells(input + c * height * width, cell);
          for (int64_t l = 0; l < kVectorLanes; ++l) {
            output[c * num_points + p + l] = static_cast<scalar_t>(values[l]);
          }
        }
      }
    }
  }
#endif
  for (; p < end; ++p) {
    const BilinearPoint<acc_t> point =
        locate_point<acc_t>(coords[2 * p], coords[2 * p + 1], height, width);
    for (int64_t c = 0; c < channels; ++c) {
      output[c * num_points + p] = static_cast<scalar_t>(
          sample_plane<acc_t>(input + c * height * width, height, width, point));
    }
  }
}

// Adds grads[i] times the bilinear weights of point begin + i (i < count) to grad_plane (height,
// width), point by point and corner by corner in corner_weights' order: the points that
// sample_chunk sampled in lanes at the cells it recorded (cells), the others one at a time.
template <typename acc_t>
M2F_CPU_INLINE void scatter_chunk(const acc_t* mask_coords, int64_t height, int64_t width,
                                  int64_t begin, int64_t count, const acc_t* grads,
                                  const ChunkCells& cells, acc_t* grad_plane) {
  int64_t i = 0;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; i < cells.points; i += kVectorLanes) {
      const CellLanes& cell = cells.groups[i / kVectorLanes];
      FloatVector grad;
      std::memcpy(&grad, grads + i, sizeof(grad));
      const FloatVector hx = splat(1.0f) - cell.lx, hy = splat(1.0f) - cell.ly;
      const FloatVector g00 = grad * (hy * hx), g01 = grad * (hy * cell.lx),
                        g10 = grad * (cell.ly * hx), g11 = grad * (cell.ly * cell.lx);
      for (int64_t l = 0; l < kVectorLanes; ++l) {
        if (cell.in00[l]) grad_plane[cell.row0[l] + cell.col0[l]] += g00[l];
        if (cell.in01[l]) grad_plane[cell.row0[l] + cell.col1[l]] += g01[l];
        if (cell.in10[l]) grad_plane[cell.row1[l] + cell.col0[l]] += g10[l];
        if (cell.in11[l]) grad_plane[cell.row1[l] + cell.col1[l]] += g11[l];
      }
    }
  }
#endif
  for (; i < count; ++i) {
    const int64_t p = begin + i;
    const BilinearPoint<acc_t> point =
        locate_point<acc_t>(mask_coords[2 * p], mask_coords[2 * p + 1], height, width);
    const CornerWeights<acc_t> corners = corner_weights(height, width, point);
    for (int k = 0; k < corners.count; ++k)
      grad_plane[corners.index[k]] += grads[i] * corners.weight[k];
  }
}

template <typename acc_t, typename scalar_t, typename target_t>
MaskLossSums mask_loss_sums(const MaskPoints<acc_t, scalar_t, target_t>& mask) {
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
void mask_loss_grad(const MaskPoints<acc_t, scalar_t, target_t>& mask,
                    const PointLossGradScales<acc_t>& scales, acc_t* grad_plane) {
  alignas(64) acc_t logits[kChunk] = {}, targets[kChunk] = {}, probs[kChunk], grads[kChunk];
  ChunkCells cells;
  for (int64_t begin = 0; begin < mask.num_points; begin += kChunk) {
    const int64_t count = std::min(kChunk, mask.num_points - begin);
    sample_chunk(mask.logits, mask.height, mask.width, mask.targets, mask.target_height,
                 mask.target_width, mask.coords, mask.num_points, begin, count, logits, targets,
                 &cells);
    logit_terms_chunk(logits, probs, static_cast<acc_t*>(nullptr), count);
    for (int64_t i = 0; i < count; ++i) grads[i] = point_loss_grad(scales, probs[i], targets[i]);
    scatter_chunk(mask.coords, mask.height, mask.width, begin, count, grads, cells, grad_plane);
  }
}

// Independent partial sums per pairwise dot product: one vector register of floats (lets the
// compiler vectorize them and keeps a target's two dot products in two registers).
constexpr int64_t kDotLanes = kVectorLanes;
// Targets whose dot products share one pass over a chunk of a query's terms.
constexpr int64_t kTargetBlock = 4;

// Partial sums of one (query, target) pair: logit . t and prob . t, each in kDotLanes lanes.
template <typename acc_t>
struct PairwiseDots {
  acc_t logit[kDotLanes];
  acc_t prob[kDotLanes];
};

// Adds points [0, count) of a chunk to the dots of kTargets targets (rows of `targets`, stride
// num_points, already offset to the chunk). Full groups of kDotLanes points go to their lanes, the
// rest to the first lanes.
template <int64_t kTargets, typename acc_t>
M2F_CPU_INLINE void accumulate_dots_block(const acc_t* logits, const acc_t* probs,
                                          const acc_t* targets, int64_t num_points, int64_t count,
                                          PairwiseDots<acc_t>* dots) {
  acc_t logit_dot[kTargets][kDotLanes], prob_dot[kTargets][kDotLanes];
  for (int64_t t = 0; t < kTargets; ++t) {
    for (int64_t lane = 0; lane < kDotLanes; ++lane) {
      logit_dot[t][lane] = dots[t].logit[lane];
      prob_dot[t][lane] = dots[t].prob[lane];
    }
  }
  int64_t p = 0;
#if defined(__GNUC__)
  // One kDotLanes-wide vector per dot product and target, spelled out: left to itself, GCC
  // vectorizes the loop over p instead of the lanes.
  typedef acc_t Lanes __attribute__((vector_size(sizeof(acc_t) * kDotLanes)));
  Lanes logit_lanes[kTargets], prob_lanes[kTargets];
  std::memcpy(logit_lanes, logit_dot, sizeof(logit_lanes));
  std::memcpy(prob_lanes, prob_dot, sizeof(prob_lanes));
  for (; p + kDotLanes <= count; p += kDotLanes) {
    Lanes logit, prob;
    std::memcpy(&logit, logits + p, sizeof(Lanes));
    std::memcpy(&prob, probs + p, sizeof(Lanes));
    for (int64_t t = 0; t < kTargets; ++t) {
      Lanes label;
      std::memcpy(&label, targets + t * num_points + p, sizeof(Lanes));
      logit_lanes[t] += logit * label;
      prob_lanes[t] += prob * label;
    }
  }
  std::memcpy(logit_dot, logit_lanes, sizeof(logit_lanes));
  std::memcpy(prob_dot, prob_lanes, sizeof(prob_lanes));
#else
  for (; p + kDotLanes <= count; p += kDotLanes) {
    for (int64_t t = 0; t < kTargets; ++t) {
      const acc_t* target = targets + t * num_points + p;
      for (int64_t lane = 0; lane < kDotLanes; ++lane) {
        const acc_t label = target[lane];
        logit_dot[t][lane] += logits[p + lane] * label;
        prob_dot[t][lane] += probs[p + lane] * label;
      }
    }
  }
#endif
  for (int64_t t = 0; t < kTargets; ++t) {
    const acc_t* target = targets + t * num_points;
    for (int64_t q = p, lane = 0; q < count; ++q, ++lane) {
      logit_dot[t][lane] += logits[q] * target[q];
      prob_dot[t][lane] += probs[q] * target[q];
    }
    for (int64_t lane = 0; lane < kDotLanes; ++lane) {
      dots[t].logit[lane] = logit_dot[t][lane];
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
// time: the chunk's softplus(x) and sigmoid(x) (from logit_terms_chunk) go into the row's sums, and
// x and sigmoid(x) into the dot products with every target while they are in L1 (pairwise_ce_cost
// has the CE from these). `dots` holds num_targets entries.
template <typename acc_t>
void pairwise_query_costs(const acc_t* logits, const acc_t* targets, const acc_t* target_sums,
                          int64_t num_targets, int64_t num_points, PairwiseDots<acc_t>* dots,
                          acc_t* ce, acc_t* dice) {
  std::memset(static_cast<void*>(dots), 0, num_targets * sizeof(PairwiseDots<acc_t>));
  alignas(64) acc_t chunk[kChunk] = {}, probs[kChunk], softplus_terms[kChunk];
  acc_t softplus_lanes[kDotLanes] = {}, prob_lanes[kDotLanes] = {};
  for (int64_t begin = 0; begin < num_points; begin += kChunk) {
    const int64_t count = std::min(kChunk, num_points - begin);
    std::memcpy(chunk, logits + begin, count * sizeof(acc_t));
    logit_terms_chunk(chunk, probs, softplus_terms, count);  // log(1 + exp(-|x|)) first
    // A loop of its own, which GCC vectorizes (inside the lane sums below it did not).
    for (int64_t i = 0; i < count; ++i) softplus_terms[i] = softplus(chunk[i], softplus_terms[i]);
    for (int64_t i = 0; i < count; ++i) {
      softplus_lanes[i % kDotLanes] += softplus_terms[i];
      prob_lanes[i % kDotLanes] += probs[i];
    }
    const acc_t* chunk_targets = targets + begin;
    int64_t t = 0;
    for (; t + kTargetBlock <= num_targets; t += kTargetBlock) {
      accumulate_dots_block<kTargetBlock>(chunk, probs, chunk_targets + t * num_points, num_points,
                                          count, dots + t);
    }
    for (; t < num_targets; ++t) {
      accumulate_dots_block<1>(chunk, probs, chunk_targets + t * num_points, num_points, count,
                               dots + t);
    }
  }
  const sum_t softplus_sum = sum_lanes(softplus_lanes), prob_sum = sum_lanes(prob_lanes);
  for (int64_t t = 0; t < num_targets; ++t) {
    ce[t] = static_cast<acc_t>(
        pairwise_ce_cost<sum_t>(softplus_sum, sum_lanes(dots[t].logit), num_points));
    dice[t] = static_cast<acc_t>(pairwise_dice_cost<sum_t>(sum_lanes(dots[t].prob), prob_sum,
                                                           static_cast<sum_t>(target_sums[t])));
  }
}

// The costs of query rows [begin, end) of `logits` (Q, P) against every target: rows of ce and dice
// (Q, T).
template <typename acc_t>
void pairwise_rows(const acc_t* logits, const acc_t* targets, const acc_t* target_sums,
                   int64_t num_targets, int64_t num_points, int64_t begin, int64_t end, acc_t* ce,
                   acc_t* dice) {
  std::vector<PairwiseDots<acc_t>> dots(num_targets);
  for (int64_t q = begin; q < end; ++q) {
    pairwise_query_costs(logits + q * num_points, targets, target_sums, num_targets, num_points,
                         dots.data(), ce + q * num_targets, dice + q * num_targets);
  }
}
