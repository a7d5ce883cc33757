// The forward and backward loops of the deformable-attention CPU kernels: cpu.cpp includes this
// file once per x86-64 level, inside a namespace and a `#pragma GCC target` region, so that the
// loops over channels are vectorized for that level. No include guard, on purpose.

// A head's channels are walked in SIMD vectors of kVectorBytes (cpu.cpp defines it per level).
// Heads of kRegisterChannels channels (Mask2Former's and Deformable DETR's: 256 / 8) keep their
// forward sum and their output gradient in registers; other channel counts use the loops over
// memory below.
constexpr int64_t kRegisterChannels = 32;

template <typename T, int64_t kBytes>
struct Lanes {
  typedef T type __attribute__((vector_size(kBytes)));
};

template <typename T>
struct ChannelVector {
  typedef typename Lanes<T, kVectorBytes>::type type;
  static constexpr int64_t kLength = kVectorBytes / sizeof(T);
  static constexpr int64_t kCount = kRegisterChannels / kLength;  // vectors per head
};
template <typename T>
using channel_vec_t = typename ChannelVector<T>::type;

// kLength channels from p, converted to acc_t.
template <typename acc_t, typename scalar_t>
M2F_CPU_INLINE channel_vec_t<acc_t> load_channels(const scalar_t* p) {
  channel_vec_t<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int64_t i = 0; i < ChannelVector<acc_t>::kLength; ++i) v[i] = static_cast<acc_t>(p[i]);
  }
  return v;
}

template <typename acc_t>
M2F_CPU_INLINE void store_channels(acc_t* p, channel_vec_t<acc_t> v) {
  std::memcpy(p, &v, sizeof(v));
}

// The sum of v's lanes, pairwise in a fixed order: upper half onto lower half until one is left.
template <typename acc_t, int64_t kBytes = kVectorBytes>
M2F_CPU_INLINE acc_t sum_channels(typename Lanes<acc_t, kBytes>::type v) {
  if constexpr (kBytes == sizeof(acc_t)) {
    return v[0];
  } else {
    typename Lanes<acc_t, kBytes / 2>::type low, high;
    std::memcpy(&low, &v, sizeof(low));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
    return sum_channels<acc_t, kBytes / 2>(low + high);
  }
}

// The weighted sum of one head's samples, in registers (kRegisterChannels channels).
template <typename acc_t>
struct RegisterSum {
  using Vector = ChannelVector<acc_t>;
  channel_vec_t<acc_t> sum[Vector::kCount] = {};

  template <typename scalar_t>
  M2F_CPU_INLINE void add(acc_t weight, const scalar_t* v) {
#pragma GCC unroll 16
    for (int64_t i = 0; i < Vector::kCount; ++i) {
      sum[i] += weight * load_channels<acc_t>(v + i * Vector::kLength);
    }
  }
  template <typename scalar_t>
  M2F_CPU_INLINE void store(scalar_t* out) const {
#pragma GCC unroll 16
    for (int64_t i = 0; i < Vector::kCount; ++i) {
      for (int64_t j = 0; j < Vector::kLength; ++j) {
        out[i * Vector::kLength + j] = static_cast<scalar_t>(sum[i][j]);
      }
    }
  }
};

// The same for any channel count, in a buffer of `channels` values.
template <typename acc_t>
struct MemorySum {
  acc_t* sum;
  int64_t channels;

  MemorySum(acc_t* buffer, int64_t channels) : sum(buffer), channels(channels) {
    std::fill(sum, sum + channels, acc_t(0));
  }
  template <typename scalar_t>
  M2F_CPU_INLINE void add(acc_t weight, const scalar_t* v) {
    for (int64_t d = 0; d < channels; ++d) sum[d] += weight * static_cast<acc_t>(v[d]);
  }
  template <typename scalar_t>
  M2F_CPU_INLINE void store(scalar_t* out) const {
    for (int64_t d = 0; d < channels; ++d) out[d] = static_cast<scalar_t>(sum[d]);
  }
};

// One head's output gradient g, in registers (kRegisterChannels channels).
template <typename acc_t>
struct RegisterGrad {
  using Vector = ChannelVector<acc_t>;
  channel_vec_t<acc_t> g[Vector::kCount];

  template <typename scalar_t>
  M2F_CPU_INLINE void load(const scalar_t* grad_out) {
#pragma GCC unroll 16
    for (int64_t i = 0; i < Vector::kCount; ++i) {
      g[i] = load_channels<acc_t>(grad_out + i * Vector::kLength);
    }
  }
  // grad_v += weight * g; returns sum(g * v).
  template <typename scalar_t>
  M2F_CPU_INLINE acc_t scatter_and_dot(acc_t weight, const scalar_t* v, acc_t* grad_v) const {
    channel_vec_t<acc_t> dot = {};
#pragma GCC unroll 16
    for (int64_t i = 0; i < Vector::kCount; ++i) {
      dot += g[i] * load_channels<acc_t>(v + i * Vector::kLength);
      acc_t* gv = grad_v + i * Vector::kLength;
      store_channels<acc_t>(gv, load_channels<acc_t>(gv) + weight * g[i]);
    }
    return sum_channels<acc_t>(dot);
  }
};

// The same for any channel count, g in a buffer of `channels` values.
template <typename acc_t>
struct MemoryGrad {
  acc_t* g;
  int64_t channels;

  template <typename scalar_t>
  M2F_CPU_INLINE void load(const scalar_t* grad_out) {
    for (int64_t d = 0; d < channels; ++d) g[d] = static_cast<acc_t>(grad_out[d]);
  }
  template <typename scalar_t>
  M2F_CPU_INLINE acc_t scatter_and_dot(acc_t weight, const scalar_t* v, acc_t* grad_v) const {
    // kLanes independent partial sums (a fixed order) let the compiler use SIMD.
    acc_t partial[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= channels; d += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        partial[j] += g[d + j] * static_cast<acc_t>(v[d + j]);
        grad_v[d + j] += weight * g[d + j];
      }
    }
    // The tail as two loops: together, GCC compiled a vector version (multiply, then add) and a
    // scalar one (fused multiply-add) and chose between them by where the buffers lay in memory,
    // so the same inputs could give gradients differing in the last bits.
    acc_t dot = 0;
    for (int64_t e = d; e < channels; ++e) dot += g[e] * static_cast<acc_t>(v[e]);
    for (int64_t e = d; e < channels; ++e) grad_v[e] += weight * g[e];
    for (int j = 0; j < kLanes; ++j) dot += partial[j];
    return dot;
  }
};

// output[n, q, m, :] = sum_{l, p} weight * bilinear(value[n, level l, m, :], location).
// make_sum(buffer) gives a head's zeroed RegisterSum or MemorySum.
template <typename scalar_t, typename Samples, typename MakeSum>
void forward_loops(const Sizes& sz, const scalar_t* value, const int64_t* shapes,
                   const int64_t* starts, const Samples& samples, scalar_t* output,
                   const MakeSum& make_sum) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t level_points = sz.num_levels * sz.num_points;
  const int64_t grain = std::max<int64_t>(1, 256 / (sz.num_heads * level_points));
  at::parallel_for(0, sz.batch * sz.num_queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<accscalar_t> buffer(sz.channels);
    std::vector<accscalar_t> weights(level_points);
    // The head's corners inside the image: value rows and weights (bilinear times attention).
    std::vector<const scalar_t*> corner_rows(4 * level_points);
    std::vector<accscalar_t> corner_weights(4 * level_points);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / sz.num_queries;
      for (int64_t m = 0; m < sz.num_heads; ++m) {
        const int64_t head_index = nq * sz.num_heads + m;
        const auto head = samples.head_locations(head_index, sz);
        samples.head_weights(head_index, sz, weights.data());
        int64_t corners = 0;
        int64_t point = 0;
        for (int64_t l = 0; l < sz.num_levels; ++l) {
          const int64_t height = shapes[2 * l];
          const int64_t width = shapes[2 * l + 1];
          const scalar_t* level_value =
              value + ((n * sz.num_values + starts[l]) * sz.num_heads + m) * sz.channels;
          for (int64_t p = 0; p < sz.num_points; ++p, ++point) {
            const BilinearPoint<accscalar_t> pt = msda::bilinear_point<accscalar_t>(
                head.loc_x(point, l, width), head.loc_y(point, l, height), height, width);
            if (!pt.valid) continue;
            for (int k = 0; k < 4; ++k) {
              if (pt.corner[k] < 0) continue;
              corner_rows[corners] = level_value + pt.corner[k] * sz.num_heads * sz.channels;
              corner_weights[corners] = weights[point] * pt.weight[k];
              ++corners;
            }
          }
        }
        // Gathered in a loop of their own, the rows' loads overlap.
        auto sum = make_sum(buffer.data());
        for (int64_t c = 0; c < corners; ++c) sum.add(corner_weights[c], corner_rows[c]);
        sum.store(output + head_index * sz.channels);
      }
    }
  });
}

template <typename scalar_t, typename Samples>
void forward_kernel(const Sizes& sz, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const Samples& samples, scalar_t* output) {
  using accscalar_t = acc_t<scalar_t>;
  if (sz.channels == kRegisterChannels) {
    forward_loops(sz, value, shapes, starts, samples, output,
                  [](accscalar_t*) { return RegisterSum<accscalar_t>{}; });
  } else {
    forward_loops(sz, value, shapes, starts, samples, output,
                  [&](accscalar_t* buffer) { return MemorySum<accscalar_t>(buffer, sz.channels); });
  }
}

// Backward over (batch, head) tasks. For each sample it adds weight * corner weight * grad_out to
// the corners of grad_value (accumulation dtype, (N, S, M, D)) and stores d loss / d weight in
// grad_weight (N, Q, M, L, P) and d loss / d (x, y) in grad_xy (N, Q, M, L, P, 2): in pixels, or in
// normalized units (times (W, H)) when `normalized_xy`. Fused samples (softmax weights) get
// d loss / d logit in grad_weight instead. make_grad(buffer) gives a RegisterGrad or a
// MemoryGrad.
template <typename scalar_t, typename Samples, typename MakeGrad>
void backward_loops(const Sizes& sz, const scalar_t* grad_output, const scalar_t* value,
                    const int64_t* shapes, const int64_t* starts, const Samples& samples,
                    acc_t<scalar_t>* grad_value, acc_t<scalar_t>* grad_weight,
                    acc_t<scalar_t>* grad_xy, bool normalized_xy, const MakeGrad& make_grad) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t level_points = sz.num_levels * sz.num_points;
  at::parallel_for(0, sz.batch * sz.num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<accscalar_t> buffer(sz.channels);
    std::vector<accscalar_t> weights(level_points);
    std::vector<BilinearPoint<accscalar_t>> points(level_points);
    // The head's corners inside the image: offsets into value and grad_value, weights (bilinear
    // times attention) and where their dot products go in corner_dots (4 per point, 0 outside).
    std::vector<int64_t> corner_offsets(4 * level_points);
    std::vector<accscalar_t> corner_weights(4 * level_points);
    std::vector<int64_t> corner_slots(4 * level_points);
    std::vector<accscalar_t> corner_dots(4 * level_points);
    auto go = make_grad(buffer.data());
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / sz.num_heads;
      const int64_t m = nm % sz.num_heads;
      for (int64_t q = 0; q < sz.num_queries; ++q) {
        const int64_t head_index = (n * sz.num_queries + q) * sz.num_heads + m;
        const auto head = samples.head_locations(head_index, sz);
        samples.head_weights(head_index, sz, weights.data());
        int64_t corners = 0;
        int64_t point = 0;
        for (int64_t l = 0; l < sz.num_levels; ++l) {
          const int64_t height = shapes[2 * l];
          const int64_t width = shapes[2 * l + 1];
          const int64_t level_offset =
              ((n * sz.num_values + starts[l]) * sz.num_heads + m) * sz.channels;
          for (int64_t p = 0; p < sz.num_points; ++p, ++point) {
            const BilinearPoint<accscalar_t>& pt = points[point] =
                msda::bilinear_point<accscalar_t>(head.loc_x(point, l, width),
                                                  head.loc_y(point, l, height), height, width);
            for (int k = 0; k < 4; ++k) {
              corner_dots[4 * point + k] = 0;
              if (!pt.valid || pt.corner[k] < 0) continue;
              corner_offsets[corners] = level_offset + pt.corner[k] * sz.num_heads * sz.channels;
              corner_weights[corners] = weights[point] * pt.weight[k];
              corner_slots[corners] = 4 * point + k;
              ++corners;
            }
          }
        }
        // Gathered in a loop of their own, the rows' loads overlap.
        go.load(grad_output + head_index * sz.channels);
        for (int64_t c = 0; c < corners; ++c) {
          const int64_t offset = corner_offsets[c];
          corner_dots[corner_slots[c]] =
              go.scatter_and_dot(corner_weights[c], value + offset, grad_value + offset);
        }
        accscalar_t* head_grad_weight = grad_weight + head_index * level_points;
        accscalar_t* head_grad_xy = grad_xy + 2 * head_index * level_points;
        for (point = 0; point < level_points; ++point) {
          if (!points[point].valid) continue;
          const msda::SampleGrad<accscalar_t> grad = msda::sample_grad<accscalar_t>(
              points[point], corner_dots.data() + 4 * point, weights[point]);
          const int64_t l = point / sz.num_points;
          head_grad_weight[point] = grad.attention_weight;
          head_grad_xy[2 * point] = normalized_xy ? grad.x * shapes[2 * l + 1] : grad.x;
          head_grad_xy[2 * point + 1] = normalized_xy ? grad.y * shapes[2 * l] : grad.y;
        }
        if constexpr (Samples::kSoftmaxWeights) {
          msda::softmax_backward(weights.data(), level_points, head_grad_weight);
        }
      }
    }
  });
}

template <typename scalar_t, typename Samples>
void backward_kernel(const Sizes& sz, const scalar_t* grad_output, const scalar_t* value,
                     const int64_t* shapes, const int64_t* starts, const Samples& samples,
                     acc_t<scalar_t>* grad_value, acc_t<scalar_t>* grad_weight,
                     acc_t<scalar_t>* grad_xy, bool normalized_xy) {
  using accscalar_t = acc_t<scalar_t>;
  if (sz.channels == kRegisterChannels) {
    backward_loops(sz, grad_output, value, shapes, starts, samples, grad_value, grad_weight,
                   grad_xy, normalized_xy,
                   [](accscalar_t*) { return RegisterGrad<accscalar_t>{}; });
  } else {
    backward_loops(sz, grad_output, value, shapes, starts, samples, grad_value, grad_weight,
                   grad_xy, normalized_xy, [&](accscalar_t* buffer) {
                     return MemoryGrad<accscalar_t>{buffer, sz.channels};
                   });
  }
}
