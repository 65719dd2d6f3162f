"""Evaluation beyond detectron2's COCOEvaluator: instance matching metrics (F1, PQ, counts) and
prediction/ground-truth pictures."""

from .matching import InstanceMatchingEvaluator
from .visualization import VisualizationHook, render_prediction_and_gt, visualize_predictions

__all__ = [
    "InstanceMatchingEvaluator",
    "VisualizationHook",
    "render_prediction_and_gt",
    "visualize_predictions",
]
