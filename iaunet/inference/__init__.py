from .mask_crops import MaskCrops
from .predictor import IAUNetPredictor

__all__ = ["IAUNetPredictor", "MaskCrops"]
