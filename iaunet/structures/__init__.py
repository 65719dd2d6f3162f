"""The ground floor of shared structures: what prediction (:mod:`iaunet.inference`), the writers
(:mod:`iaunet.outputs`) and evaluation exchange. Imports only numpy, torch, pycocotools and
detectron2's structures; nothing of the package above it."""

from .boxes import box_hits
from .mask_crops import MaskCrops

__all__ = ["MaskCrops", "box_hits"]
