"""Drop-in nn.Modules built on the m2f_kernels ops."""

from .ms_deform_attn import MSDeformAttn

__all__ = ["MSDeformAttn"]
