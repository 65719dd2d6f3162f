"""Training on z-stacks and time-lapses: a folder's TIFF stack (z or t axis, as ``iaunet-predict``
reads it) with a label stack of the same planes (``<stem>_labels.tif``, ``(N, H, W)``) is one
training image per plane, each with its plane's labels. Planes without objects are kept at
:data:`EMPTY_PLANE_RATIO` per plane with objects (evenly spread through the stack) as pictures of
background (training uses them while ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is False). A plane is
read with the stack's intensity range, as ``iaunet-predict`` normalizes the planes of a stack
(:func:`stack_plane`)."""

import functools
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..annotations_io import DatasetError, Instance, pages_instances, read_label_pages
from ..image_io import intensity_range, read_image, read_tiff

EMPTY_PLANE_RATIO = 0.25  # planes without objects kept per plane with objects
PLANE_KEY = "plane"  # a dataset record's (axis, index) in its stack


def plane_entries(
    image_path: str, ann_path: str, size: Tuple[int, int], axis: str, planes: int
) -> List[Tuple[Dict, List[Instance]]]:
    """(image record fields, instances) of every kept plane of the stack ``image_path`` (planes of
    ``size``) and its label stack ``ann_path``; a DatasetError naming the files when the label
    stack is not one label image per plane."""
    if not ann_path.lower().endswith((".tif", ".tiff")) or "|" in ann_path:
        raise DatasetError(
            f"{ann_path}: a stack ({image_path}, {planes} {axis} planes) needs a label stack "
            f"<stem>_labels.tif of {planes} planes"
        )
    pages = read_label_pages(ann_path)
    if pages.shape != (planes, *size):
        raise DatasetError(
            f"{ann_path}: labels of shape {pages.shape} for a stack of {planes} {axis} planes of "
            f"{size[0]}x{size[1]} ({image_path}); expected one label plane per image plane"
        )
    found = [pages_instances(page[None]) for page in pages]
    full = [k for k in range(planes) if found[k]]
    empty = [k for k in range(planes) if not found[k]]
    keep = math.ceil(EMPTY_PLANE_RATIO * len(full))
    empty = [empty[round(i)] for i in np.linspace(0, len(empty) - 1, min(keep, len(empty)))]
    return [({PLANE_KEY: [axis, k]}, found[k]) for k in sorted(full + empty)]


@functools.lru_cache(maxsize=64)
def _stack_range(path: str, rule: str, percentiles: tuple, normalize_uint8: bool, shape: tuple):
    array, _ = read_tiff(path)
    whole = array.reshape(-1, *shape[1:])  # the planes one under another
    return intensity_range(whole, rule, percentiles, path, normalize_uint8)


@functools.lru_cache(maxsize=64)
def _stack_channel_range(
    path: str, axis: str, channels: tuple, rule: str, percentiles: tuple, normalize_uint8: bool
):
    from ..lazy_image import open_stack

    planes = open_stack(path, {"channels": channels}).length
    whole = np.concatenate([read_image(path, (axis, k), channels) for k in range(planes)])
    return intensity_range(whole, rule, percentiles, path, normalize_uint8, len(channels))


def stack_plane(
    path: str, plane, rule: str, percentiles, normalize_uint8: bool, channels: Sequence = ()
):
    """(plane ``plane`` = (axis, index) of the stack ``path``, the stack's intensity range for
    ``to_model_range``, computed once per file); with ``channels`` (``INPUT.CHANNELS``) those
    channels of the plane, (H, W, C), and their ranges through the stack."""
    axis, k = plane[0], int(plane[1])
    image = read_image(path, plane=(axis, k), channels=channels)
    if channels:
        norm = (rule, tuple(percentiles), bool(normalize_uint8))
        return image, _stack_channel_range(path, axis, tuple(channels), *norm)
    rng = _stack_range(path, rule, tuple(percentiles), bool(normalize_uint8), image.shape)
    return image, rng
