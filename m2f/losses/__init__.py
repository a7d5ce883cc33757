"""Mask2Former losses: Hungarian matcher and set criterion on point-sampled masks."""

from .criterion import Criterion, build_criterion
from .matcher import HungarianMatcher

__all__ = ["Criterion", "HungarianMatcher", "build_criterion"]
