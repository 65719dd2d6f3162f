"""Writers of prediction outputs (docs/predict.md); every file goes through
``iaunet.utils.atomic``."""

from .images import label_image, png_bytes, render_overlay, tiff_bytes

__all__ = ["label_image", "png_bytes", "render_overlay", "tiff_bytes"]
