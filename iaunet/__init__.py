"""IAUNet (Instance-Aware U-Net) for detectron2.

Importing this package registers the ``IAUNet`` meta-architecture, the Swin backbone and the
datasets.
"""

import os
import sys
import warnings

from .version import __version__  # noqa: F401 (the package face)

# fvcore (imported by detectron2) calls torch.jit.script at import time, which recent torch
# deprecates with a FutureWarning printed before the output of every command. Only that known
# warning, and only while this package imports detectron2/fvcore, is silenced.
JIT_SCRIPT_WARNING = r"`torch\.jit\.script` is deprecated"

DETECTRON2_MISSING = (
    "IAUNet needs detectron2, which is not on PyPI. Install it from source first, e.g.\n"
    "  python -m pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html), then\n"
    "  python -m pip install -e ."
)


def _running_self_check() -> bool:
    """True under ``iaunet-check`` / ``python -m iaunet.check``, which report a missing detectron2
    themselves (with the fix) instead of failing at ``import iaunet``."""
    argv = list(getattr(sys, "orig_argv", []))  # Python >= 3.10: the interpreter's own argv
    for i, arg in enumerate(argv):
        if arg == "-m" and argv[i + 1 : i + 2] == ["iaunet.check"] or arg == "-miaunet.check":
            return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]).startswith("iaunet-check")


try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess by tests/test_check.py
    DETECTRON2_IMPORT_ERROR = e
    if not _running_self_check():
        raise ImportError(f"{DETECTRON2_MISSING}\nOriginal error: {e}") from e
else:
    DETECTRON2_IMPORT_ERROR = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_SCRIPT_WARNING, category=FutureWarning)
        from . import (
            data,  # noqa: F401  (registers datasets and the dataset mapper)
            modeling,  # noqa: F401  (registers backbones)
        )
        from .config import add_iaunet_config
        from .iaunet_model import IAUNet

    __all__ = ["add_iaunet_config", "IAUNet", "train"]


def __getattr__(name: str):
    """``iaunet.train`` (:func:`iaunet.engine.train_call.train`), imported on first use: the
    training engine is not loaded by ``import iaunet``."""
    if name == "train":
        from .engine.train_call import train

        return train
    raise AttributeError(f"module 'iaunet' has no attribute {name!r}")
