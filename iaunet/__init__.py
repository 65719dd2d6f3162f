"""IAUNet (Instance-Aware U-Net) for detectron2.

Importing this package registers the ``IAUNet`` meta-architecture, the Swin backbone and the
datasets.
"""

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "IAUNet needs detectron2, which is not on PyPI. Install it from source first, e.g.\n"
        "  python -m pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
        "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html), then\n"
        "  python -m pip install -e .\n"
        f"Original error: {e}"
    ) from e

from . import (
    data,  # noqa: F401  (registers datasets and the dataset mapper)
    modeling,  # noqa: F401  (registers backbones)
)
from .config import add_iaunet_config
from .iaunet_model import IAUNet

__all__ = ["add_iaunet_config", "IAUNet"]
__version__ = "0.2.0"
