"""Evaluation helpers beyond detectron2's COCOEvaluator: qualitative prediction/ground-truth
images."""

from .visualization import VisualizationHook, render_prediction_and_gt, visualize_predictions

__all__ = ["VisualizationHook", "render_prediction_and_gt", "visualize_predictions"]
