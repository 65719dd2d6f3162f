from . import backbone  # noqa: F401  (registers D2SwinTransformer)
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .pixel_decoder import UNetPixelDecoder
from .transformer_decoder import QueryDecoder

__all__ = ["SetCriterion", "HungarianMatcher", "UNetPixelDecoder", "QueryDecoder"]
