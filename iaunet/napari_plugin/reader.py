"""napari reader for ``iaunet-predict`` outputs: ``<stem>_masks.tif`` (one Labels layer per page)
and ``<stem>_labels.tif`` (one Labels layer; a z-stack's or time-lapse's is 3-D, with the voxel
size the file records as the layer's scale)."""

import os
from typing import Callable, List, Optional, Union

import numpy as np
import tifffile

from ..data.lazy_image import open_stack
from .layers import LayerData, page_layers

SUFFIXES = ("_masks.tif", "_labels.tif")


def read_iaunet_tiff(path: str) -> List[LayerData]:
    data = tifffile.imread(path)
    name = os.path.basename(path)[: -len(".tif")]
    if path.endswith("_masks.tif"):
        stem = name[: -len("_masks")]
        return page_layers(data.reshape(-1, *data.shape[-2:]), stem, {})
    meta = {"name": name}
    stack = open_stack(path, {}) if data.ndim == 3 else None
    if stack is not None and stack.voxel_size:
        size = stack.voxel_size if stack.axis == "z" else (1.0, *stack.voxel_size[1:])
        meta["scale"] = tuple(float(v) for v in size)
    return [(np.asarray(data), meta, "labels")]


def get_reader(path: Union[str, List[str]]) -> Optional[Callable]:
    """The reader for one ``_masks.tif`` / ``_labels.tif`` file (napari passes one path or a list);
    None for anything else, so that napari tries other readers."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(str(p).endswith(SUFFIXES) for p in paths):
        return None

    def read(path: Union[str, List[str]]) -> List[LayerData]:
        paths = [path] if isinstance(path, str) else list(path)
        return [layer for p in paths for layer in read_iaunet_tiff(str(p))]

    return read
