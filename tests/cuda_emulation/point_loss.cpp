// point_sample's and point_mask_loss's CUDA kernels and launch sequences
// (csrc/point_loss/kernels.cuh) run on the CPU through cuda_emulation.h, as the CUDA ops run them
// on a GPU. One C entry point per pass and type combination; tests/ops/test_cuda_kernels_on_cpu.py
// calls them through ctypes with contiguous tensors, the image gradients zeroed and in the
// accumulation type.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cuda_emulation.h"
#include "point_loss/kernels.cuh"

namespace {

using namespace m2f::point_loss;

// sizes: N, C, H, W, P.
template <typename scalar_t, typename coord_t>
void point_sample_forward(const int64_t* sizes, const void* input, const void* coords,
                          void* output) {
  launch_point_sample_forward(cuda_emulation::Launch{}, static_cast<const scalar_t*>(input),
                              static_cast<const coord_t*>(coords), static_cast<scalar_t*>(output),
                              sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]);
}

template <typename scalar_t, typename coord_t>
void point_sample_backward(const int64_t* sizes, int deterministic, const void* grad_output,
                           const void* input, const void* coords, void* grad_input,
                           void* grad_coords) {
  using acc_t = at::opmath_type<scalar_t>;
  launch_point_sample_backward(
      cuda_emulation::Launch{}, deterministic != 0, static_cast<const acc_t*>(grad_output),
      static_cast<const scalar_t*>(input), static_cast<const coord_t*>(coords),
      static_cast<acc_t*>(grad_input), static_cast<coord_t*>(grad_coords), sizes[0], sizes[1],
      sizes[2], sizes[3], sizes[4]);
}

// sizes: N, H, W, Ht, Wt, P.
template <typename scalar_t, typename target_t, typename coord_t>
void point_mask_loss_forward(const int64_t* sizes, const void* logits, const void* targets,
                             const void* coords, void* ce, void* dice, void* dice_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  // NaN where the partial kernel does not write: a loss that reads such an element is NaN.
  std::vector<acc_t> partial_sums(sizes[0] * loss_splits(sizes[5]) * 4,
                                  std::numeric_limits<acc_t>::quiet_NaN());
  launch_point_mask_loss_forward(
      cuda_emulation::Launch{}, static_cast<const scalar_t*>(logits),
      static_cast<const target_t*>(targets), static_cast<const coord_t*>(coords),
      partial_sums.data(), static_cast<acc_t*>(ce), static_cast<acc_t*>(dice),
      static_cast<acc_t*>(dice_sums), sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5]);
}

template <typename scalar_t, typename target_t, typename coord_t>
void point_mask_loss_backward(const int64_t* sizes, int deterministic, const void* grad_ce,
                              const void* grad_dice, const void* logits, const void* targets,
                              const void* coords, const void* dice_sums, void* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const PointLossGradSource<scalar_t, target_t, coord_t> source{
      static_cast<const acc_t*>(grad_ce),
      static_cast<const acc_t*>(grad_dice),
      static_cast<const scalar_t*>(logits),
      static_cast<const target_t*>(targets),
      static_cast<const coord_t*>(coords),
      static_cast<const acc_t*>(dice_sums),
      sizes[1],
      sizes[2],
      sizes[3],
      sizes[4],
      sizes[5]};
  launch_point_mask_loss_backward(cuda_emulation::Launch{}, deterministic != 0, source,
                                  static_cast<acc_t*>(grad), sizes[0]);
}

}  // namespace

#define M2F_POINT_SAMPLE_ENTRIES(name, scalar_t, coord_t)                                      \
  extern "C" void point_sample_forward_##name(const int64_t* sizes, const void* input,         \
                                              const void* coords, void* output) {              \
    point_sample_forward<scalar_t, coord_t>(sizes, input, coords, output);                     \
  }                                                                                            \
  extern "C" void point_sample_backward_##name(                                                \
      const int64_t* sizes, int deterministic, const void* grad_output, const void* input,     \
      const void* coords, void* grad_input, void* grad_coords) {                               \
    point_sample_backward<scalar_t, coord_t>(sizes, deterministic, grad_output, input, coords, \
                                             grad_input, grad_coords);                         \
  }

#define M2F_POINT_LOSS_ENTRIES(name, scalar_t, target_t, coord_t)                                  \
  extern "C" void point_mask_loss_forward_##name(const int64_t* sizes, const void* logits,         \
                                                 const void* targets, const void* coords,          \
                                                 void* ce, void* dice, void* dice_sums) {          \
    point_mask_loss_forward<scalar_t, target_t, coord_t>(sizes, logits, targets, coords, ce, dice, \
                                                         dice_sums);                               \
  }                                                                                                \
  extern "C" void point_mask_loss_backward_##name(                                                 \
      const int64_t* sizes, int deterministic, const void* grad_ce, const void* grad_dice,         \
      const void* logits, const void* targets, const void* coords, const void* dice_sums,          \
      void* grad) {                                                                                \
    point_mask_loss_backward<scalar_t, target_t, coord_t>(                                         \
        sizes, deterministic, grad_ce, grad_dice, logits, targets, coords, dice_sums, grad);       \
  }

// <image>_<coords>
M2F_POINT_SAMPLE_ENTRIES(float_float, float, float)
M2F_POINT_SAMPLE_ENTRIES(double_double, double, double)
M2F_POINT_SAMPLE_ENTRIES(half_float, c10::Half, float)
M2F_POINT_SAMPLE_ENTRIES(half_half, c10::Half, c10::Half)
M2F_POINT_SAMPLE_ENTRIES(bfloat16_float, c10::BFloat16, float)
M2F_POINT_SAMPLE_ENTRIES(bfloat16_bfloat16, c10::BFloat16, c10::BFloat16)
// <logits>_<targets>_<coords>
M2F_POINT_LOSS_ENTRIES(float_uint8_float, float, uint8_t, float)
M2F_POINT_LOSS_ENTRIES(float_float_float, float, float, float)
M2F_POINT_LOSS_ENTRIES(double_uint8_double, double, uint8_t, double)
M2F_POINT_LOSS_ENTRIES(double_double_double, double, double, double)
M2F_POINT_LOSS_ENTRIES(half_uint8_half, c10::Half, uint8_t, c10::Half)
M2F_POINT_LOSS_ENTRIES(half_half_half, c10::Half, c10::Half, c10::Half)
M2F_POINT_LOSS_ENTRIES(half_float_half, c10::Half, float, c10::Half)
M2F_POINT_LOSS_ENTRIES(bfloat16_uint8_bfloat16, c10::BFloat16, uint8_t, c10::BFloat16)
M2F_POINT_LOSS_ENTRIES(bfloat16_bfloat16_bfloat16, c10::BFloat16, c10::BFloat16, c10::BFloat16)
M2F_POINT_LOSS_ENTRIES(bfloat16_float_bfloat16, c10::BFloat16, float, c10::BFloat16)
