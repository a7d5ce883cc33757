// Schemas of the kernel ops. Kernels are registered per dispatch key in csrc/<op>/cpu.cpp (CPU) and
// csrc/<op>/*.cu (CUDA). The Python package defines the public ops (m2f_kernels::ms_deform_attn,
// ...) in the same namespace, so this is a fragment rather than the namespace's only definition.
#include <torch/library.h>

#include <string>

#include "common/cpu_isa.h"

namespace {

// The x86-64 level the CPU kernels run at now (m2f::cpu_isa()).
std::string cpu_isa_name() {
  switch (m2f::cpu_isa()) {
    case m2f::CpuIsa::kAvx512:
      return "avx512";
    case m2f::CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(m2f_kernels, m) {
  m.def("_cpu_isa() -> str", &cpu_isa_name);
  m.def(
      "_ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "_ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, "
      "bool deterministic) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_ms_deform_attn_fused_forward(Tensor value, Tensor spatial_shapes, Tensor "
      "level_start_index, "
      "Tensor reference_points, Tensor sampling_offsets, Tensor attention_logits) -> Tensor");
  m.def(
      "_ms_deform_attn_fused_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor reference_points, Tensor sampling_offsets, "
      "Tensor attention_logits, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_masked_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask_logits, "
      "Tensor? attn_mask, float threshold_logit, float scale) -> (Tensor, Tensor)");
  m.def(
      "_masked_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? mask_logits, Tensor? attn_mask, float threshold_logit, float scale, "
      "bool deterministic) -> (Tensor, Tensor, Tensor)");
  m.def("_point_sample_forward(Tensor input, Tensor coords) -> Tensor");
  m.def(
      "_point_sample_backward(Tensor grad_output, Tensor input, Tensor coords, bool deterministic) "
      "-> (Tensor, Tensor)");
  m.def(
      "_point_mask_loss_forward(Tensor mask_logits, Tensor target_masks, Tensor coords) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_point_mask_loss_backward(Tensor grad_ce, Tensor grad_dice, Tensor mask_logits, "
      "Tensor target_masks, Tensor coords, Tensor dice_sums, bool deterministic) -> Tensor");
  m.def(
      "_pairwise_mask_cost(Tensor pred_point_logits, Tensor target_point_labels) "
      "-> (Tensor, Tensor)");
}
