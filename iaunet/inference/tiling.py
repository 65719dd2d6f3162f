"""Tiled prediction of large images: tile geometry and stitching of the tiles' detections.

The image is cut into evenly spaced tiles that overlap by at least the tile overlap (set it larger
than the objects, so that every object lies whole in some tile). Stitching, in full-image
coordinates:

1. A detection is *cut* (``partial``) when its mask touches an inner edge of its tile: that tile saw
   only part of the object. An object no larger than the overlap is seen whole by at least one tile.
2. Detections are taken uncut ones first, each group by decreasing score: of an object's whole views
   the most confident wins, and a cut view is kept only where no tile saw the object whole. One is
   dropped when it matches an already kept detection of the same class from another tile: overlap
   over the smaller of the two masks, each restricted to the other's tile window, above
   ``MATCH_THRESH``. (Preferring the view nearest a tile's centre instead let a low-scoring view,
   later removed by the user's score threshold, suppress a confident one: F1 90.9 against 94.3 on
   the 1024² mosaics of ``tools/benchmark_predictions.py``, docs/performance.md.)
3. An object larger than the overlap is cut in every tile: when the kept detection touches an inner
   edge of its tile (within ``TOUCH_MARGIN`` px) and a dropped match from the next tile reaches
   beyond it, the two are joined (mask union) instead.

Detections of one tile are never compared with each other: duplicate suppression within a tile is
the model's (``MODEL.IAUNET.TEST.NMS``).

Whole outlines (``MODEL.IAUNET.AMODAL``) travel with their detections: a detection is cut when its
whole outline touches an inner tile edge (the whole outline contains the visible part), views are
matched on their visible parts, and joined pieces join both masks.
"""

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from detectron2.structures import Instances

from ..structures import MaskCrops, box_hits

logger = logging.getLogger(__name__)

TOUCH_MARGIN = 2  # px from an inner tile edge within which a mask counts as cut by the tile
# IoU (complete pairs) / overlap over smaller (pairs with a cut view) of duplicates
MATCH_THRESH = 0.5


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of the fewest tiles of size ``tile`` that cover ``[0, length)`` with neighbours
    sharing at least ``overlap`` px, spread evenly so that the last tile ends at the border (no
    padding)."""
    if not 0 <= overlap < tile:
        raise ValueError(
            f"tile overlap (TEST.TILE_OVERLAP, --tile-overlap) must be in [0, tile size {tile}), "
            f"got {overlap}"
        )
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@dataclass
class Detection:
    """One tile detection in full-image coordinates; ``window`` is the tile's (y0, x0, y1, x1)."""

    tile: int
    window: Tuple[int, int, int, int]
    y0: int
    x0: int
    crop: np.ndarray
    score: float
    label: int
    partial: bool  # touches an inner edge of its tile: the tile may have cut it
    index: int = 0  # position among its tile's detections: (tile, index) names it in the image
    whole: Optional[Tuple[int, int, np.ndarray]] = None  # (y0, x0, crop) of the whole outline

    def __post_init__(self):
        self.area = int(np.count_nonzero(self.crop))

    @property
    def box(self) -> Tuple[int, int, int, int]:
        return self.y0, self.x0, self.y0 + self.crop.shape[0], self.x0 + self.crop.shape[1]


def _area_in(d: Detection, rect: Tuple[int, int, int, int]) -> int:
    y0, x0 = max(d.y0, rect[0]) - d.y0, max(d.x0, rect[1]) - d.x0
    y1, x1 = min(d.box[2], rect[2]) - d.y0, min(d.box[3], rect[3]) - d.x0
    return int(d.crop[y0:y1, x0:x1].sum()) if y1 > y0 and x1 > x0 else 0


def _intersection(a: Detection, b: Detection) -> int:
    y0, x0 = max(a.y0, b.y0), max(a.x0, b.x0)
    y1, x1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if y1 <= y0 or x1 <= x0:
        return 0
    ca = a.crop[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
    cb = b.crop[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    return int(np.count_nonzero(ca & cb))


def _cut_overlap(a: Detection, b: Detection) -> float:
    """Overlap over the smaller mask, each mask restricted to the other's tile window (where both
    tiles looked), so that a cut view and a whole view of one object score ~1."""
    smaller = min(_area_in(a, b.window), _area_in(b, a.window))
    return _intersection(a, b) / smaller if smaller else 0.0


def stitch_detections(dets: List[Detection]) -> List[Detection]:
    """One detection per object from the detections of all tiles (module docstring)."""
    order = sorted(dets, key=lambda d: (d.partial, *rank_key(d)))
    kept: List[Detection] = []
    boxes = np.zeros((len(order), 4), np.int64)
    joined = 0
    for d in order:
        hits = [
            (overlap, i)
            for i in box_hits(boxes[: len(kept)], d.box)
            if kept[i].tile != d.tile
            and kept[i].label == d.label
            and (overlap := _cut_overlap(kept[i], d)) > MATCH_THRESH
        ]
        if not hits:
            boxes[len(kept)] = d.box
            kept.append(d)
            continue
        i = max(hits)[1]
        # an object larger than the overlap
        if kept[i].partial and _reaches_beyond(d, kept[i].window):
            kept[i] = _join([kept[i], d])
            boxes[i] = kept[i].box
            joined += 1
    if joined:
        logger.info(
            f"{joined} object(s) larger than the tile overlap were joined from pieces of several "
            "tiles (a larger tile overlap gives them whole)"
        )
    return sorted(kept, key=rank_key)


def rank_key(d: Detection) -> Tuple[float, int, int]:
    """Decreasing score; ties by tile and position, so that the order (and which of two equally
    confident overlapping masks owns the shared pixels) does not depend on the input order."""
    return -d.score, d.tile, d.index


def _reaches_beyond(d: Detection, window: Tuple[int, int, int, int]) -> bool:
    """Whether ``d``'s mask has pixels outside ``window``."""
    return _area_in(d, window) < d.area


def _union(parts: List[Tuple[int, int, np.ndarray]]) -> Tuple[int, int, np.ndarray]:
    """The union of (y0, x0, crop) masks as one (y0, x0, crop)."""
    y0, x0 = min(p[0] for p in parts), min(p[1] for p in parts)
    y1 = max(p[0] + p[2].shape[0] for p in parts)
    x1 = max(p[1] + p[2].shape[1] for p in parts)
    crop = np.zeros((y1 - y0, x1 - x0), bool)
    for py, px, c in parts:
        crop[py - y0 : py - y0 + c.shape[0], px - x0 : px - x0 + c.shape[1]] |= c
    return int(y0), int(x0), crop


def _join(pieces: List[Detection]) -> Detection:
    y0, x0, crop = _union([(p.y0, p.x0, p.crop) for p in pieces])
    wholes = [p.whole for p in pieces if p.whole is not None]
    first = pieces[0]
    score = max(p.score for p in pieces)
    return Detection(
        first.tile, first.window, y0, x0, crop, score, first.label, True, first.index,
        _union(wholes) if wholes else None,
    )  # fmt: skip


def tile_windows(height: int, width: int, tile: int, overlap: int) -> List[Tuple[int, ...]]:
    """(y0, x0, y1, x1) of the tiles covering an image, row by row (``tile_starts`` per axis)."""
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    return [(y, x, min(y + tile, height), min(x + tile, width)) for y in ys for x in xs]


def tile_detections(
    tile: int,
    window: Tuple[int, int, int, int],
    image_size: Tuple[int, int],
    instances: Instances,
) -> List[Detection]:
    """A tile's ``Instances`` (masks at the tile's size, and whole outlines when it has
    ``pred_amodal_masks``) as Detections in full-image coordinates; a detection whose mask (whole
    outline) comes within ``TOUCH_MARGIN`` px of an inner tile edge is partial (cut)."""
    (ty, tx, y1, x1), (h, w) = window, image_size
    th, tw = y1 - ty, x1 - tx

    def crops_of(field: str):
        crops = instances.get(field)
        return crops if isinstance(crops, MaskCrops) else MaskCrops.from_bitmasks(crops)

    crops = crops_of("pred_masks")
    wholes = crops_of("pred_amodal_masks") if instances.has("pred_amodal_masks") else None
    dets = []
    for index, ((cy, cx, crop), score, label) in enumerate(
        zip(crops, instances.scores.tolist(), instances.pred_classes.tolist())
    ):
        if crop.size == 0:
            continue
        whole = None
        if wholes is not None:
            whole = (*(int(v) for v in wholes.offsets[index]), wholes.crops[index])
        ey, ex, extent = whole if whole is not None and whole[2].size else (cy, cx, crop)
        partial = (
            (ty > 0 and ey < TOUCH_MARGIN)
            or (tx > 0 and ex < TOUCH_MARGIN)
            or (y1 < h and ey + extent.shape[0] > th - TOUCH_MARGIN)
            or (x1 < w and ex + extent.shape[1] > tw - TOUCH_MARGIN)
        )
        if whole is not None:
            whole = (ty + int(whole[0]), tx + int(whole[1]), whole[2])
        dets.append(
            Detection(tile, window, ty + cy, tx + cx, crop, score, label, partial, index, whole)
        )
    return dets


def detections_to_instances(
    dets: List[Detection], image_size: Tuple[int, int], full_masks: bool = True
) -> Instances:
    """Stitched detections -> ``Instances`` of the whole image (masks as MaskCrops or full-size;
    ``pred_amodal_masks`` too when the detections carry whole outlines)."""
    result = Instances(image_size)
    masks = MaskCrops([d.crop for d in dets], [(d.y0, d.x0) for d in dets], image_size)
    result.pred_masks = masks.to_bitmasks() if full_masks else masks
    result.scores = torch.tensor([d.score for d in dets], dtype=torch.float32)
    result.pred_classes = torch.tensor([d.label for d in dets], dtype=torch.int64)
    result.pred_boxes = masks.get_bounding_boxes()
    if dets and dets[0].whole is not None:
        wholes = MaskCrops([d.whole[2] for d in dets], [d.whole[:2] for d in dets], image_size)
        result.pred_amodal_masks = wholes.to_bitmasks() if full_masks else wholes
    return result
