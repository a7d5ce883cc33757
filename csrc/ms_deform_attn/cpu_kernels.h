// The forward and backward loops of the deformable-attention CPU kernels: cpu.cpp includes this
// file once per x86-64 level, inside a namespace and a `#pragma GCC target` region, so that the
// loops over channels are vectorized for that level. No include guard, on purpose.

// output[n, q, m, :] = sum_{l, p} weight * bilinear(value[n, level l, m, :], location).
template <typename scalar_t, typename Samples>
void forward_kernel(const Sizes& sz, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const Samples& samples, scalar_t* output) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t level_points = sz.num_levels * sz.num_points;
  const int64_t grain = std::max<int64_t>(1, 256 / (sz.num_heads * level_points));
  at::parallel_for(0, sz.batch * sz.num_queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<accscalar_t> acc(sz.channels);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / sz.num_queries;
      for (int64_t m = 0; m < sz.num_heads; ++m) {
        const int64_t head_index = nq * sz.num_heads + m;
        const auto head = samples.head(head_index, sz);
        std::fill(acc.begin(), acc.end(), accscalar_t(0));
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
            const accscalar_t weight = head.weight(point);
            for (int k = 0; k < 4; ++k) {
              if (pt.corner[k] < 0) continue;
              const accscalar_t corner_weight = weight * pt.weight[k];
              const scalar_t* v = level_value + pt.corner[k] * sz.num_heads * sz.channels;
              accscalar_t* a = acc.data();
              for (int64_t d = 0; d < sz.channels; ++d) {
                a[d] += corner_weight * static_cast<accscalar_t>(v[d]);
              }
            }
          }
        }
        scalar_t* out = output + head_index * sz.channels;
        for (int64_t d = 0; d < sz.channels; ++d) out[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// Backward over (batch, head) tasks. For each sample it adds weight * corner weight * grad_out to
// the corners of grad_value (accumulation dtype, (N, S, M, D)) and stores d loss / d weight in
// grad_weight (N, Q, M, L, P) and d loss / d (x, y) in grad_xy (N, Q, M, L, P, 2): in pixels, or in
// normalized units (times (W, H)) when `normalized_xy`.
template <typename scalar_t, typename Samples>
void backward_kernel(const Sizes& sz, const scalar_t* grad_output, const scalar_t* value,
                     const int64_t* shapes, const int64_t* starts, const Samples& samples,
                     acc_t<scalar_t>* grad_value, acc_t<scalar_t>* grad_weight,
                     acc_t<scalar_t>* grad_xy, bool normalized_xy) {
  using accscalar_t = acc_t<scalar_t>;
  const int64_t level_points = sz.num_levels * sz.num_points;
  at::parallel_for(0, sz.batch * sz.num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<accscalar_t> go(sz.channels);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / sz.num_heads;
      const int64_t m = nm % sz.num_heads;
      for (int64_t q = 0; q < sz.num_queries; ++q) {
        const int64_t head_index = (n * sz.num_queries + q) * sz.num_heads + m;
        const auto head = samples.head(head_index, sz);
        accscalar_t* head_grad_weight = grad_weight + head_index * level_points;
        accscalar_t* head_grad_xy = grad_xy + 2 * head_index * level_points;
        const scalar_t* grad_out = grad_output + head_index * sz.channels;
        for (int64_t d = 0; d < sz.channels; ++d) go[d] = static_cast<accscalar_t>(grad_out[d]);
        int64_t point = 0;
        for (int64_t l = 0; l < sz.num_levels; ++l) {
          const int64_t height = shapes[2 * l];
          const int64_t width = shapes[2 * l + 1];
          const int64_t level_offset =
              ((n * sz.num_values + starts[l]) * sz.num_heads + m) * sz.channels;
          for (int64_t p = 0; p < sz.num_points; ++p, ++point) {
            const BilinearPoint<accscalar_t> pt = msda::bilinear_point<accscalar_t>(
                head.loc_x(point, l, width), head.loc_y(point, l, height), height, width);
            if (!pt.valid) continue;
            const accscalar_t weight = head.weight(point);
            accscalar_t corner_dot[4] = {0, 0, 0, 0};
            for (int k = 0; k < 4; ++k) {
              if (pt.corner[k] < 0) continue;
              const int64_t offset = level_offset + pt.corner[k] * sz.num_heads * sz.channels;
              const scalar_t* v = value + offset;
              accscalar_t* gv = grad_value + offset;
              const accscalar_t corner_weight = weight * pt.weight[k];
              const accscalar_t* g = go.data();
              // kLanes independent partial sums (a fixed order) let the compiler use SIMD.
              accscalar_t partial[kLanes] = {};
              int64_t d = 0;
              for (; d + kLanes <= sz.channels; d += kLanes) {
                for (int j = 0; j < kLanes; ++j) {
                  partial[j] += g[d + j] * static_cast<accscalar_t>(v[d + j]);
                  gv[d + j] += corner_weight * g[d + j];
                }
              }
              // The tail as two loops: together, GCC compiled a vector version (multiply, then add)
              // and a scalar one (fused multiply-add) and chose between them by where the buffers
              // lay in memory, so the same inputs could give gradients differing in the last bits.
              accscalar_t dot = 0;
              for (int64_t e = d; e < sz.channels; ++e)
                dot += g[e] * static_cast<accscalar_t>(v[e]);
              for (int64_t e = d; e < sz.channels; ++e) gv[e] += corner_weight * g[e];
              for (int j = 0; j < kLanes; ++j) dot += partial[j];
              corner_dot[k] = dot;
            }
            const msda::SampleGrad<accscalar_t> grad =
                msda::sample_grad<accscalar_t>(pt, corner_dot, weight);
            head_grad_weight[point] = grad.attention_weight;
            head_grad_xy[2 * point] = normalized_xy ? grad.x * width : grad.x;
            head_grad_xy[2 * point + 1] = normalized_xy ? grad.y * height : grad.y;
          }
        }
      }
    }
  });
}
