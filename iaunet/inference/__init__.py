from ..structures import MaskCrops
from .predictor import IAUNetPredictor

__all__ = ["IAUNetPredictor", "MaskCrops"]
