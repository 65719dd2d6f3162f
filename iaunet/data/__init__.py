from . import datasets  # noqa: F401  (registers all datasets)
from .dataset_mapper import IAUNetDatasetMapper, build_augmentations
from .image_io import ImageReadError, read_image, to_model_range

__all__ = [
    "IAUNetDatasetMapper",
    "build_augmentations",
    "ImageReadError",
    "read_image",
    "to_model_range",
]
