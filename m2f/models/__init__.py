"""Mask2Former model: backbone, pixel decoder, transformer decoder and post-processing."""

from .mask2former import Mask2Former, build_model

__all__ = ["Mask2Former", "build_model"]
