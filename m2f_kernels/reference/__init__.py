"""Plain-PyTorch implementations of every op: the readable specification and the test oracle.

They run on any device and dtype (float64 included) and are differentiated by autograd.
"""

from .masked_attention import masked_attention, threshold_to_logit
from .ms_deform_attn import ms_deform_attn
from .ms_deform_attn_fused import ms_deform_attn_fused
from .pairwise_mask_cost import pairwise_mask_cost
from .point_mask_loss import point_mask_loss, point_mask_loss_per_mask
from .point_sample import point_sample

__all__ = [
    "masked_attention",
    "ms_deform_attn",
    "ms_deform_attn_fused",
    "pairwise_mask_cost",
    "point_mask_loss",
    "point_mask_loss_per_mask",
    "point_sample",
    "threshold_to_logit",
]
