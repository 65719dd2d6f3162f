"""Mask images of ``iaunet-predict``: the flattened label image and the overlap-preserving pages.

IAUNet predicts every instance's full mask, so instances may overlap (thesis: overlapping cells are
the point of a query-based model). A single label image cannot hold overlaps: ``_labels.tif``
gives each pixel to the higher score. ``_masks.tif`` keeps them: a stack of label pages, where
overlapping instances are on different pages (a greedy colouring of the overlap graph), and
instance id k is k on its page. Ids are 1..N in decreasing score everywhere (labels, pages, ROIs,
tables, COCO results).
"""

import io
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tifffile

from ..structures import MaskCrops

logger = logging.getLogger(__name__)

UINT16_MAX = int(np.iinfo(np.uint16).max)


def label_dtype(num_instances: int) -> np.dtype:
    """uint16 while the ids fit (what ImageJ/Fiji read as 16-bit), uint32 above 65,535."""
    return np.dtype(np.uint16 if num_instances <= UINT16_MAX else np.uint32)


def label_image(masks: MaskCrops, height: int, width: int) -> np.ndarray:
    """Masks (``MaskCrops``, sorted by decreasing score) -> (H, W) ids 1..N; overlaps go to the
    higher score."""
    labels = np.zeros((height, width), label_dtype(len(masks)))
    items = list(masks)
    for i in range(len(items) - 1, -1, -1):  # lowest score first, so higher scores overwrite
        y0, x0, crop = items[i]
        labels[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]][crop] = i + 1
    return labels


@dataclass
class Overlaps:
    """Pixels shared between instances (0-based indices).

    pairs: {(i, j): shared pixels} for i < j with at least one shared pixel.
    covered: (N,) pixels of each instance that belong to at least one other instance.
    """

    pairs: Dict[Tuple[int, int], int]
    covered: np.ndarray

    def neighbours(self) -> List[List[Tuple[int, int]]]:
        """Per instance: (other index, shared pixels) of the instances it overlaps, by index."""
        out: List[List[Tuple[int, int]]] = [[] for _ in range(len(self.covered))]
        for (i, j), n in sorted(self.pairs.items()):
            out[i].append((j, n))
            out[j].append((i, n))
        return [sorted(x) for x in out]


def _boxes(masks: MaskCrops) -> np.ndarray:
    """(N, 4) int boxes y0, x0, y1, x1 (exclusive); an empty mask gets an empty box."""
    boxes = np.zeros((len(masks), 4), np.int64)
    for i, (y0, x0, crop) in enumerate(masks):
        boxes[i] = (y0, x0, y0 + crop.shape[0], x0 + crop.shape[1])
    return boxes


def instance_overlaps(masks: MaskCrops) -> Overlaps:
    """Shared pixels of every pair of instances whose boxes intersect, computed on the crops (memory
    follows the objects, not N x image size)."""
    boxes = _boxes(masks)
    crops = [c for _, _, c in masks]
    pairs: Dict[Tuple[int, int], int] = {}
    coverage = [None] * len(crops)  # per instance: how many others cover each of its pixels
    for i in range(len(crops)):
        b = boxes[i + 1 :]
        hit = (
            (b[:, 0] < boxes[i, 2])
            & (b[:, 2] > boxes[i, 0])
            & (b[:, 1] < boxes[i, 3])
            & (b[:, 3] > boxes[i, 1])
        )
        for j in np.flatnonzero(hit) + i + 1:
            y0, x0 = np.maximum(boxes[i, :2], boxes[j, :2])
            y1, x1 = np.minimum(boxes[i, 2:], boxes[j, 2:])
            a = crops[i][y0 - boxes[i, 0] : y1 - boxes[i, 0], x0 - boxes[i, 1] : x1 - boxes[i, 1]]
            b_ = crops[j][y0 - boxes[j, 0] : y1 - boxes[j, 0], x0 - boxes[j, 1] : x1 - boxes[j, 1]]
            shared = a & b_
            n = int(shared.sum())
            if not n:
                continue
            pairs[(i, int(j))] = n
            for k, (oy, ox) in ((i, boxes[i, :2]), (int(j), boxes[j, :2])):
                if coverage[k] is None:
                    coverage[k] = np.zeros(crops[k].shape, bool)
                coverage[k][y0 - oy : y1 - oy, x0 - ox : x1 - ox] |= shared
    covered = np.array([0 if c is None else int(c.sum()) for c in coverage], np.int64)
    return Overlaps(pairs, covered)


def assign_pages(num_instances: int, pairs: Sequence[Tuple[int, int]]) -> np.ndarray:
    """Greedy colouring of the overlap graph in id order (decreasing score): each instance goes to
    the first page that holds none of the instances it overlaps. Returns (N,) 0-based pages."""
    neighbours: List[List[int]] = [[] for _ in range(num_instances)]
    for i, j in pairs:
        neighbours[i].append(j)
        neighbours[j].append(i)
    pages = np.full(num_instances, -1, np.int64)
    for i in range(num_instances):
        used = {pages[j] for j in neighbours[i] if pages[j] >= 0}
        page = 0
        while page in used:
            page += 1
        pages[i] = page
    return pages


def mask_pages(
    masks: MaskCrops, height: int, width: int, overlaps: Optional[Overlaps] = None
) -> np.ndarray:
    """(P, H, W) label pages (P >= 1): instance k (1-based id) is drawn with value k on page
    ``assign_pages(...)[k - 1]``; no two overlapping instances share a page, so every instance keeps
    all its pixels."""
    overlaps = overlaps if overlaps is not None else instance_overlaps(masks)
    pages = assign_pages(len(masks), list(overlaps.pairs))
    num_pages = int(pages.max()) + 1 if len(pages) else 1
    out = np.zeros((num_pages, height, width), label_dtype(len(masks)))
    for i, (y0, x0, crop) in enumerate(masks):
        out[pages[i], y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]][crop] = i + 1
    return out


def tiff_bytes(array: np.ndarray) -> bytes:
    """A zlib-compressed TIFF of ``array`` (the label image)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, compression="zlib")
    return buf.getvalue()


def pages_tiff_bytes(pages: np.ndarray) -> bytes:
    """The (P, H, W) pages as an ImageJ hyperstack (one slice per page, axes ZYX, slice labels
    "page k"), which Fiji opens as a 16-bit stack and napari as labels (through this package's
    napari reader). Above 65,535 instances ImageJ has no integer type for the ids: a plain
    multi-page uint32 TIFF is written instead."""
    buf = io.BytesIO()
    if pages.dtype == np.uint16:
        tifffile.imwrite(
            buf,
            pages,
            imagej=True,
            compression="zlib",
            metadata={
                "axes": "ZYX",
                "Labels": [f"page {p + 1}" for p in range(len(pages))],
                "Info": "IAUNet instance masks: instance id k on one page; overlapping instances "
                "on different pages",
            },
        )
    else:
        logger.warning(
            f"{pages.max()} instances do not fit in 16 bits: _masks.tif is a uint32 TIFF, which "
            "ImageJ cannot open as labels"
        )
        tifffile.imwrite(buf, pages, compression="zlib", metadata={"axes": "ZYX"})
    return buf.getvalue()
