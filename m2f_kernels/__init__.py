"""Fused kernels for Mask2Former: multi-scale deformable attention, masked cross-attention and point-sampled
mask losses, each with CUDA, Triton, C++ CPU and PyTorch backends behind one torch.library op."""

from ._backend import available_backends, cpu_isa
from .ops.masked_attention import masked_attention
from .ops.ms_deform_attn import MSDeformAttnFunction, ms_deform_attn
from .ops.ms_deform_attn_fused import ms_deform_attn_fused
from .ops.pairwise_mask_cost import pairwise_mask_cost
from .ops.point_mask_loss import point_mask_loss
from .ops.point_sample import point_sample
from .ops.sample_uncertain_points import sample_uncertain_points

__version__ = "0.1.0"

__all__ = [
    "MSDeformAttnFunction",
    "available_backends",
    "cpu_isa",
    "masked_attention",
    "ms_deform_attn",
    "ms_deform_attn_fused",
    "pairwise_mask_cost",
    "point_mask_loss",
    "point_sample",
    "sample_uncertain_points",
]
