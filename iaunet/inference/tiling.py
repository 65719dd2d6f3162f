"""Tiled prediction of large images: tile geometry and stitching of the tiles' detections.

The image is cut into evenly spaced tiles of ``TEST.TILE_SIZE`` input pixels that overlap by at
least
``TEST.TILE_OVERLAP``. Stitching, in full-image coordinates:

1. A detection is *partial* when its mask comes within ``TOUCH_MARGIN`` px of an inner tile edge (an
   edge shared with a neighbour); otherwise it is *complete*: the tile saw the whole object.
2. Complete detections, by decreasing score: one is dropped when a kept detection of the same class
   from another tile has mask IoU > ``MATCH_THRESH`` (the same object seen whole by two tiles).
3. Partial detections are dropped when they match a kept complete detection of another tile: the
   overlap over the smaller of the two masks, each restricted to the other's tile window, >
   ``MATCH_THRESH``
   (the cut view of an object that a neighbour saw whole).
4. Partials left are objects no tile saw whole (larger than the overlap): pieces of different tiles
   that
   match in the same way are joined (mask union, best score) into one instance.
"""

import logging
import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from detectron2.structures import Instances

from .mask_crops import MaskCrops

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
    partial: bool

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


def _iou(a: Detection, b: Detection) -> float:
    inter = _intersection(a, b)
    return inter / max(a.area + b.area - inter, 1)


def _cut_overlap(a: Detection, b: Detection) -> float:
    """Overlap over the smaller mask, each mask restricted to the other's tile window (where both
    tiles
    looked), so that a cut view and a whole view of one object score ~1."""
    smaller = min(_area_in(a, b.window), _area_in(b, a.window))
    return _intersection(a, b) / smaller if smaller else 0.0


def _box_hits(boxes: np.ndarray, box: Tuple[int, int, int, int]) -> np.ndarray:
    """Indices of the (M, 4) y0, x0, y1, x1 ``boxes`` that intersect ``box``."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    hit = (
        (boxes[:, 0] < box[2])
        & (boxes[:, 2] > box[0])
        & (boxes[:, 1] < box[3])
        & (boxes[:, 3] > box[1])
    )
    return np.flatnonzero(hit)


def stitch_detections(dets: List[Detection]) -> List[Detection]:
    """Remove duplicates across tiles and join the pieces of objects that no tile saw whole (module
    doc)."""
    complete = sorted((d for d in dets if not d.partial), key=lambda d: -d.score)
    kept: List[Detection] = []
    kept_boxes = np.zeros((len(complete), 4), np.int64)
    for d in complete:
        dup = any(
            k.tile != d.tile and k.label == d.label and _iou(k, d) > MATCH_THRESH
            for k in (kept[i] for i in _box_hits(kept_boxes[: len(kept)], d.box))
        )
        if not dup:
            kept_boxes[len(kept)] = d.box
            kept.append(d)
    kept_boxes = kept_boxes[: len(kept)]

    partial = []
    for p in sorted((d for d in dets if d.partial), key=lambda d: -d.score):
        if not any(
            kept[i].tile != p.tile
            and kept[i].label == p.label
            and _cut_overlap(kept[i], p) > MATCH_THRESH
            for i in _box_hits(kept_boxes, p.box)
        ):
            partial.append(p)

    # Union-find over the remaining pieces: same object seen cut by several tiles.
    parent = list(range(len(partial)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    boxes = np.array([p.box for p in partial], np.int64).reshape(-1, 4)
    for i, p in enumerate(partial):
        for j in _box_hits(boxes, p.box):
            q = partial[j]
            if (
                j > i
                and q.tile != p.tile
                and q.label == p.label
                and _cut_overlap(p, q) > MATCH_THRESH
            ):
                parent[root(j)] = root(i)
    groups = {}
    for i in range(len(partial)):
        groups.setdefault(root(i), []).append(partial[i])
    joined = sum(len(g) > 1 for g in groups.values())
    if joined:
        logger.info(
            f"{joined} object(s) larger than the tile overlap were joined from pieces of several "
            "tiles"
        )
    return sorted(kept + [_join(g) for g in groups.values()], key=lambda d: -d.score)


def _join(pieces: List[Detection]) -> Detection:
    if len(pieces) == 1:
        return pieces[0]
    boxes = np.array([p.box for p in pieces])
    y0, x0 = boxes[:, :2].min(0)
    y1, x1 = boxes[:, 2:].max(0)
    crop = np.zeros((y1 - y0, x1 - x0), bool)
    for p in pieces:
        crop[p.y0 - y0 : p.box[2] - y0, p.x0 - x0 : p.box[3] - x0] |= p.crop
    best = max(pieces, key=lambda p: p.score)
    return Detection(best.tile, best.window, int(y0), int(x0), crop, best.score, best.label, True)


def tile_windows(
    height: int, width: int, tile: int, overlap: int
) -> List[Tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) of the tiles covering an image, row by row (:func:`tile_starts` per
    axis)."""
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    return [(y, x, min(y + tile, height), min(x + tile, width)) for y in ys for x in xs]


def tile_detections(
    index: int, window: Tuple[int, int, int, int], image_size: Tuple[int, int], instances: Instances
) -> List[Detection]:
    """A tile's ``Instances`` (masks at the tile's size) as Detections in full-image coordinates; a
    detection within ``TOUCH_MARGIN`` px of an inner tile edge is partial."""
    (ty, tx, y1, x1), (h, w) = window, image_size
    th, tw = y1 - ty, x1 - tx
    crops = instances.pred_masks
    if not isinstance(crops, MaskCrops):
        crops = MaskCrops.from_bitmasks(crops)
    dets = []
    for (cy, cx, crop), score, label in zip(
        crops, instances.scores.tolist(), instances.pred_classes.tolist()
    ):
        if crop.size == 0:
            continue
        partial = (
            (ty > 0 and cy < TOUCH_MARGIN)
            or (tx > 0 and cx < TOUCH_MARGIN)
            or (y1 < h and cy + crop.shape[0] > th - TOUCH_MARGIN)
            or (x1 < w and cx + crop.shape[1] > tw - TOUCH_MARGIN)
        )
        dets.append(Detection(index, window, ty + cy, tx + cx, crop, score, label, partial))
    return dets


def detections_to_instances(
    dets: List[Detection], image_size: Tuple[int, int], full_masks: bool = True
) -> Instances:
    """Stitched detections -> ``Instances`` of the whole image (masks as MaskCrops or full-size)."""
    result = Instances(image_size)
    masks = MaskCrops([d.crop for d in dets], [(d.y0, d.x0) for d in dets], image_size)
    result.pred_masks = masks.to_bitmasks() if full_masks else masks
    result.scores = torch.tensor([d.score for d in dets], dtype=torch.float32)
    result.pred_classes = torch.tensor([d.label for d in dets], dtype=torch.int64)
    result.pred_boxes = masks.get_bounding_boxes()
    return result
