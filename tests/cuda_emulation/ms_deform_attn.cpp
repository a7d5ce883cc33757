// Multi-scale deformable attention's CUDA kernels and launch sequences
// (csrc/ms_deform_attn/kernels.cuh) run on the CPU through cuda_emulation.h, as the plain and fused
// CUDA ops run them on a GPU; the deterministic mode's stable sort, done with ATen on a GPU, is
// std::stable_sort here. One C entry point per op, pass and dtype; tests/ops/
// test_cuda_kernels_on_cpu.py calls them through ctypes with contiguous tensors, the gradients
// zeroed and in the accumulation type.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "cuda_emulation.h"
#include "ms_deform_attn/kernels.cuh"

namespace {

using namespace m2f::msda;

// sizes: N, S, M, D, L, P, Q.
Sizes to_sizes(const int64_t* sizes) {
  return Sizes{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6]};
}

template <typename scalar_t, typename key_t, typename Samples>
void deterministic_grad_value(const Sizes& sz, const scalar_t* grad_output, const int64_t* shapes,
                              const int64_t* starts, const Samples& samples,
                              m2f::acc_t<scalar_t>* grad_value) {
  const int64_t contributions = 4 * sz.batch * sz.num_queries * sz.num_heads * sz.level_points();
  const int64_t num_rows = sz.batch * sz.num_values * sz.num_heads;
  // An entry the kernel does not write adds NaN to row 0.
  std::vector<key_t> destination(contributions, 0);
  std::vector<m2f::acc_t<scalar_t>> coefficient(
      contributions, std::numeric_limits<m2f::acc_t<scalar_t>>::quiet_NaN());
  launch_contributions<scalar_t>(cuda_emulation::Launch{}, sz, shapes, starts, samples,
                                 destination.data(), coefficient.data());
  std::vector<int64_t> order(contributions);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return destination[a] < destination[b]; });
  std::vector<int64_t> row_begin(num_rows + 1);
  for (int64_t row = 0; row <= num_rows; ++row) {
    row_begin[row] = std::partition_point(order.begin(), order.end(),
                                          [&](int64_t e) { return destination[e] < row; }) -
                     order.begin();
  }
  launch_gather_grad_value(cuda_emulation::Launch{}, sz, grad_output, order.data(),
                           coefficient.data(), row_begin.data(), grad_value);
}

template <typename scalar_t, typename Samples>
void backward(const Sizes& sz, bool deterministic, bool normalized_xy, const scalar_t* grad_output,
              const scalar_t* value, const int64_t* shapes, const int64_t* starts,
              const Samples& samples, m2f::acc_t<scalar_t>* grad_value,
              m2f::acc_t<scalar_t>* grad_weight, m2f::acc_t<scalar_t>* grad_xy) {
  launch_backward(cuda_emulation::Launch{}, sz, grad_output, value, shapes, starts, samples,
                  normalized_xy, deterministic ? nullptr : grad_value, grad_weight, grad_xy);
  if (!deterministic) return;
  if (sz.batch * sz.num_values * sz.num_heads < std::numeric_limits<int32_t>::max()) {
    deterministic_grad_value<scalar_t, int32_t>(sz, grad_output, shapes, starts, samples,
                                                grad_value);
  } else {
    deterministic_grad_value<scalar_t, int64_t>(sz, grad_output, shapes, starts, samples,
                                                grad_value);
  }
}

template <typename scalar_t>
PlainSamples<scalar_t, m2f::acc_t<scalar_t>> plain_samples(const void* locations,
                                                           const void* weights) {
  return {static_cast<const scalar_t*>(locations), static_cast<const scalar_t*>(weights)};
}

template <typename scalar_t>
FusedSamples<scalar_t, m2f::acc_t<scalar_t>> fused_samples(const void* reference,
                                                           const void* offsets,
                                                           const void* logits) {
  return {static_cast<const scalar_t*>(reference), static_cast<const scalar_t*>(offsets),
          static_cast<const scalar_t*>(logits)};
}

template <typename scalar_t>
void plain_forward(const int64_t* sizes, const void* value, const int64_t* shapes,
                   const int64_t* starts, const void* locations, const void* weights,
                   void* output) {
  launch_forward(cuda_emulation::Launch{}, to_sizes(sizes), static_cast<const scalar_t*>(value),
                 shapes, starts, plain_samples<scalar_t>(locations, weights),
                 static_cast<scalar_t*>(output));
}

template <typename scalar_t>
void plain_backward(const int64_t* sizes, int deterministic, const void* grad_output,
                    const void* value, const int64_t* shapes, const int64_t* starts,
                    const void* locations, const void* weights, void* grad_value,
                    void* grad_locations, void* grad_weights) {
  using acc = m2f::acc_t<scalar_t>;
  backward(to_sizes(sizes), deterministic != 0, /*normalized_xy=*/true,
           static_cast<const scalar_t*>(grad_output), static_cast<const scalar_t*>(value), shapes,
           starts, plain_samples<scalar_t>(locations, weights), static_cast<acc*>(grad_value),
           static_cast<acc*>(grad_weights), static_cast<acc*>(grad_locations));
}

template <typename scalar_t>
void fused_forward(const int64_t* sizes, const void* value, const int64_t* shapes,
                   const int64_t* starts, const void* reference, const void* offsets,
                   const void* logits, void* output) {
  launch_forward(cuda_emulation::Launch{}, to_sizes(sizes), static_cast<const scalar_t*>(value),
                 shapes, starts, fused_samples<scalar_t>(reference, offsets, logits),
                 static_cast<scalar_t*>(output));
}

// As fused_cuda.cu: grad_logits holds d loss / d weight until launch_finish_backward.
template <typename scalar_t>
void fused_backward(const int64_t* sizes, int deterministic, const void* grad_output,
                    const void* value, const int64_t* shapes, const int64_t* starts,
                    const void* reference, const void* offsets, const void* logits,
                    void* grad_value, void* grad_reference, void* grad_offsets, void* grad_logits) {
  using acc = m2f::acc_t<scalar_t>;
  const Sizes sz = to_sizes(sizes);
  backward(sz, deterministic != 0, /*normalized_xy=*/false,
           static_cast<const scalar_t*>(grad_output), static_cast<const scalar_t*>(value), shapes,
           starts, fused_samples<scalar_t>(reference, offsets, logits),
           static_cast<acc*>(grad_value), static_cast<acc*>(grad_logits),
           static_cast<acc*>(grad_offsets));
  launch_finish_backward(cuda_emulation::Launch{}, sz, shapes, static_cast<const scalar_t*>(logits),
                         static_cast<const acc*>(grad_offsets), static_cast<acc*>(grad_logits),
                         static_cast<acc*>(grad_reference));
}

}  // namespace

#define M2F_MSDA_ENTRIES(name, scalar_t)                                                          \
  extern "C" void ms_deform_attn_forward_##name(                                                  \
      const int64_t* sizes, const void* value, const int64_t* shapes, const int64_t* starts,      \
      const void* locations, const void* weights, void* output) {                                 \
    plain_forward<scalar_t>(sizes, value, shapes, starts, locations, weights, output);            \
  }                                                                                               \
  extern "C" void ms_deform_attn_backward_##name(                                                 \
      const int64_t* sizes, int deterministic, const void* grad_output, const void* value,        \
      const int64_t* shapes, const int64_t* starts, const void* locations, const void* weights,   \
      void* grad_value, void* grad_locations, void* grad_weights) {                               \
    plain_backward<scalar_t>(sizes, deterministic, grad_output, value, shapes, starts, locations, \
                             weights, grad_value, grad_locations, grad_weights);                  \
  }                                                                                               \
  extern "C" void ms_deform_attn_fused_forward_##name(                                            \
      const int64_t* sizes, const void* value, const int64_t* shapes, const int64_t* starts,      \
      const void* reference, const void* offsets, const void* logits, void* output) {             \
    fused_forward<scalar_t>(sizes, value, shapes, starts, reference, offsets, logits, output);    \
  }                                                                                               \
  extern "C" void ms_deform_attn_fused_backward_##name(                                           \
      const int64_t* sizes, int deterministic, const void* grad_output, const void* value,        \
      const int64_t* shapes, const int64_t* starts, const void* reference, const void* offsets,   \
      const void* logits, void* grad_value, void* grad_reference, void* grad_offsets,             \
      void* grad_logits) {                                                                        \
    fused_backward<scalar_t>(sizes, deterministic, grad_output, value, shapes, starts, reference, \
                             offsets, logits, grad_value, grad_reference, grad_offsets,           \
                             grad_logits);                                                        \
  }

M2F_MSDA_ENTRIES(float, float)
M2F_MSDA_ENTRIES(double, double)
M2F_MSDA_ENTRIES(half, c10::Half)
M2F_MSDA_ENTRIES(bfloat16, c10::BFloat16)
