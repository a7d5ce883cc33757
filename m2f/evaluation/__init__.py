"""Evaluation: panoptic quality, COCO instance AP (pycocotools), Cityscapes instance AP (cityscapesscripts),
semantic mIoU, result tables."""

from m2f.evaluation.cityscapes_instance import CityscapesInstanceEvaluator
from m2f.evaluation.instance import InstanceEvaluator
from m2f.evaluation.panoptic import (
    PanopticEvaluator,
    PQStats,
    evaluate_panoptic_files,
    image_pq_stats,
    summarize_pq,
)
from m2f.evaluation.semantic import SemanticEvaluator
from m2f.evaluation.table import format_table, write_results

__all__ = [
    "CityscapesInstanceEvaluator",
    "InstanceEvaluator",
    "PQStats",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "evaluate_panoptic_files",
    "format_table",
    "image_pq_stats",
    "summarize_pq",
    "write_results",
]
