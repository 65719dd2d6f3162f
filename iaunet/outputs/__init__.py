"""Writers of prediction outputs, one module per format (docs/predict.md); every file goes through
``iaunet.utils.atomic``. :mod:`.writer` writes an image's requested outputs."""

from .masks import label_image, mask_pages, pages_tiff_bytes, tiff_bytes
from .overlay import png_bytes, render_overlay

__all__ = [
    "label_image",
    "mask_pages",
    "pages_tiff_bytes",
    "png_bytes",
    "render_overlay",
    "tiff_bytes",
]
