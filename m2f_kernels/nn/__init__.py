"""Drop-in nn.Modules built on the m2f_kernels ops."""

from .masked_multihead_attention import MaskedMultiheadAttention, masked_multihead_attention
from .ms_deform_attn import MSDeformAttn

__all__ = ["MSDeformAttn", "MaskedMultiheadAttention", "masked_multihead_attention"]
