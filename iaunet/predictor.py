"""IAUNetPredictor: a numpy image of any dtype -> ``Instances``, whole-image or tiled (large images).

Whole image: the test transform of training (longest side ``INPUT.IMAGE_SIZE``), masks resized back.

Tiled (``predict_tiled``; automatic above ``TEST.AUTO_TILE_ABOVE``): the image is intensity-normalized
once, then cut into evenly spaced tiles of ``TEST.TILE_SIZE`` input pixels that overlap by at least
``TEST.TILE_OVERLAP``. Each tile is resized by ``TEST.TILE_SCALE`` only (1.0: native pixels, no resize,
no padding) and its masks come back at the tile's size. Stitching, in full-image coordinates:

1. A detection is *partial* when its mask comes within ``TOUCH_MARGIN`` px of an inner tile edge (an
   edge shared with a neighbour); otherwise it is *complete*: the tile saw the whole object.
2. Complete detections, by decreasing score: one is dropped when a kept detection of the same class
   from another tile has mask IoU > ``MATCH_THRESH`` (the same object seen whole by two tiles).
3. Partial detections are dropped when they match a kept complete detection of another tile: the
   overlap over the smaller of the two masks, each restricted to the other's tile window, > ``MATCH_THRESH``
   (the cut view of an object that a neighbour saw whole).
4. Partials left are objects no tile saw whole (larger than the overlap): pieces of different tiles that
   match in the same way are joined (mask union, best score) into one instance.

Masks are kept as tight bool crops (:class:`MaskCrops`), so memory follows the objects' area rather
than N x H x W; full-size masks are built only for the final instances, and only when asked.
"""

import logging
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from .checkpoint import AtomicCheckpointer
from .data.dataset_mapper import build_augmentations
from .data.image_io import to_model_range

logger = logging.getLogger(__name__)

TOUCH_MARGIN = 2  # px from an inner tile edge within which a mask counts as cut by the tile
MATCH_THRESH = (
    0.5  # IoU (complete pairs) / overlap over smaller (pairs with a cut view) of duplicates
)


class MaskCrops:
    """N instance masks of an (H, W) image stored as tight bool crops plus their top-left (y, x) corners.

    Supports what ``Instances`` needs (``len``, indexing, ``cat``) and converts to full-size bool
    masks, boxes and COCO RLE without ever holding N full-size masks.
    """

    def __init__(
        self,
        crops: Sequence[np.ndarray],
        offsets: Union[Sequence[Tuple[int, int]], np.ndarray],
        image_size: Tuple[int, int],
    ):
        self.crops = [np.asarray(c, dtype=bool) for c in crops]
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if len(self.crops) != len(self.offsets):
            raise ValueError(f"{len(self.crops)} crops but {len(self.offsets)} offsets")

    def __len__(self) -> int:
        return len(self.crops)

    def __iter__(self) -> Iterator[Tuple[int, int, np.ndarray]]:
        """Yields (y0, x0, crop) per instance."""
        for (y0, x0), crop in zip(self.offsets.tolist(), self.crops):
            yield y0, x0, crop

    def __getitem__(self, item) -> "MaskCrops":
        if isinstance(item, torch.Tensor):
            item = item.cpu().numpy()
        idx = np.arange(len(self))[[item] if isinstance(item, (int, np.integer)) else item]
        return MaskCrops([self.crops[i] for i in idx], self.offsets[idx], self.image_size)

    @staticmethod
    def cat(items: List["MaskCrops"]) -> "MaskCrops":
        crops = [c for m in items for c in m.crops]
        offsets = (
            np.concatenate([m.offsets for m in items]) if items else np.zeros((0, 2), np.int64)
        )
        return MaskCrops(crops, offsets, items[0].image_size)

    @classmethod
    def from_bitmasks(cls, masks: Union[torch.Tensor, np.ndarray]) -> "MaskCrops":
        """(N, H, W) bool masks -> tight crops (an empty mask becomes a 0x0 crop at (0, 0))."""
        masks = torch.as_tensor(masks).bool().cpu()
        rows, cols = masks.any(2).numpy(), masks.any(1).numpy()
        crops, offsets = [], []
        for i in range(masks.shape[0]):
            ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
            if len(ys) == 0:
                crops.append(np.zeros((0, 0), bool))
                offsets.append((0, 0))
                continue
            crops.append(masks[i, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1].numpy().copy())
            offsets.append((ys[0], xs[0]))
        return cls(crops, offsets, masks.shape[1:])

    def to_bitmasks(self) -> torch.Tensor:
        """(N, H, W) bool tensor."""
        out = torch.zeros((len(self), *self.image_size), dtype=torch.bool)
        for i, (y0, x0, crop) in enumerate(self):
            out[i, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = torch.from_numpy(crop)
        return out

    def get_bounding_boxes(self) -> Boxes:
        """Tight XYXY boxes (x2 = last column + 1), as ``BitMasks.get_bounding_boxes``."""
        boxes = np.zeros((len(self), 4), np.float32)
        for i, (y0, x0, crop) in enumerate(self):
            if crop.size:
                boxes[i] = (x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])
        return Boxes(torch.from_numpy(boxes))

    def to_rles(self) -> List[dict]:
        """COCO compressed RLE per instance (``counts`` as str), built from an (H, w) column strip each."""
        import pycocotools.mask as mask_util

        h, w = self.image_size
        rles = []
        for y0, x0, crop in self:
            if crop.size == 0:
                counts = [h * w]
            else:
                strip = np.zeros((h, crop.shape[1]), bool)
                strip[y0 : y0 + crop.shape[0]] = crop
                v = strip.ravel(order="F")  # COCO RLE runs go down the columns
                bounds = np.concatenate([[0], np.flatnonzero(v[1:] != v[:-1]) + 1, [v.size]])
                counts = ([0] if v[0] else []) + np.diff(bounds).tolist()
                counts[0] += x0 * h  # empty columns left of the strip
                tail = (w - x0 - crop.shape[1]) * h
                if len(counts) % 2:  # the last run is background
                    counts[-1] += tail
                elif tail:
                    counts.append(tail)
            rle = mask_util.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            rle["counts"] = rle["counts"].decode("ascii")
            rles.append(rle)
        return rles


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of the fewest tiles of size ``tile`` that cover ``[0, length)`` with neighbours
    sharing at least ``overlap`` px, spread evenly so that the last tile ends at the border (no padding)."""
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
class _Detection:
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


def _area_in(d: _Detection, rect: Tuple[int, int, int, int]) -> int:
    y0, x0 = max(d.y0, rect[0]) - d.y0, max(d.x0, rect[1]) - d.x0
    y1, x1 = min(d.box[2], rect[2]) - d.y0, min(d.box[3], rect[3]) - d.x0
    return int(d.crop[y0:y1, x0:x1].sum()) if y1 > y0 and x1 > x0 else 0


def _intersection(a: _Detection, b: _Detection) -> int:
    y0, x0 = max(a.y0, b.y0), max(a.x0, b.x0)
    y1, x1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if y1 <= y0 or x1 <= x0:
        return 0
    ca = a.crop[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
    cb = b.crop[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    return int(np.count_nonzero(ca & cb))


def _iou(a: _Detection, b: _Detection) -> float:
    inter = _intersection(a, b)
    return inter / max(a.area + b.area - inter, 1)


def _cut_overlap(a: _Detection, b: _Detection) -> float:
    """Overlap over the smaller mask, each mask restricted to the other's tile window (where both tiles
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


def stitch_detections(dets: List[_Detection]) -> List[_Detection]:
    """Remove duplicates across tiles and join the pieces of objects that no tile saw whole (module doc)."""
    complete = sorted((d for d in dets if not d.partial), key=lambda d: -d.score)
    kept: List[_Detection] = []
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
            f"{joined} object(s) larger than the tile overlap were joined from pieces of several tiles"
        )
    return sorted(kept + [_join(g) for g in groups.values()], key=lambda d: -d.score)


def _join(pieces: List[_Detection]) -> _Detection:
    if len(pieces) == 1:
        return pieces[0]
    boxes = np.array([p.box for p in pieces])
    y0, x0 = boxes[:, :2].min(0)
    y1, x1 = boxes[:, 2:].max(0)
    crop = np.zeros((y1 - y0, x1 - x0), bool)
    for p in pieces:
        crop[p.y0 - y0 : p.box[2] - y0, p.x0 - x0 : p.box[3] - x0] |= p.crop
    best = max(pieces, key=lambda p: p.score)
    return _Detection(best.tile, best.window, int(y0), int(x0), crop, best.score, best.label, True)


class IAUNetPredictor:
    """Like detectron2's ``DefaultPredictor``: builds the model from ``cfg``, loads ``cfg.MODEL.WEIGHTS``
    and runs single images in eval mode under ``torch.inference_mode``.

    Input: a numpy image as read by :func:`iaunet.data.read_image` -- (H, W) or (H, W, 1|3|4), RGB(A)
    order, any numeric dtype -- normalized with ``INPUT.INTENSITY_NORM`` / ``INPUT.PERCENTILES``.
    Output: ``Instances`` of the original (H, W) on the CPU, sorted by decreasing score, with
    ``pred_masks`` (bool (N, H, W), or :class:`MaskCrops` with ``full_masks=False``), ``scores``,
    ``pred_classes`` and ``pred_boxes``.

    Example::

        predictor = IAUNetPredictor(cfg)
        instances = predictor(read_image("cells.tif"))
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        self.metadata = (
            MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else None
        )
        AtomicCheckpointer(self.model).load(
            cfg.MODEL.WEIGHTS
        )  # names the file when it is no checkpoint
        self.resize = T.AugmentationList(build_augmentations(cfg, is_train=False))
        self.intensity_norm = cfg.INPUT.INTENSITY_NORM
        self.percentiles = tuple(cfg.INPUT.PERCENTILES)
        self.tile_scale = float(cfg.TEST.TILE_SCALE)
        if self.tile_scale <= 0:
            raise ValueError(f"TEST.TILE_SCALE must be > 0, got {self.tile_scale}")
        self.tile_size = int(cfg.TEST.TILE_SIZE) or round(cfg.INPUT.IMAGE_SIZE / self.tile_scale)
        self.tile_overlap = int(cfg.TEST.TILE_OVERLAP)
        self.auto_tile_above = int(cfg.TEST.AUTO_TILE_ABOVE)

    def __call__(self, image: np.ndarray) -> Instances:
        """Predict one image; tiled when its longest side exceeds ``TEST.AUTO_TILE_ABOVE``."""
        return self.predict(image)

    def should_tile(self, image_size: Tuple[int, int]) -> bool:
        return self.auto_tile_above > 0 and max(image_size) > self.auto_tile_above

    def predict(
        self, image: np.ndarray, tiled: Optional[bool] = None, full_masks: bool = True
    ) -> Instances:
        """``tiled`` None: automatic (:meth:`should_tile`). ``full_masks`` False: ``pred_masks`` are
        :class:`MaskCrops` (for images too large for N full-size masks)."""
        img = to_model_range(image, self.intensity_norm, self.percentiles)
        if tiled or (tiled is None and self.should_tile(img.shape[:2])):
            return self._predict_tiled(img, self.tile_size, self.tile_overlap, full_masks)
        aug_input = T.AugInput(img)
        self.resize(aug_input)  # longest side INPUT.IMAGE_SIZE, as at evaluation
        result = self._run_model(aug_input.image, img.shape[:2])
        if not full_masks:
            result.pred_masks = MaskCrops.from_bitmasks(result.pred_masks)
        return result

    def predict_tiled(
        self,
        image: np.ndarray,
        tile: Optional[int] = None,
        overlap: Optional[int] = None,
        full_masks: bool = True,
    ) -> Instances:
        """Tiled prediction (module doc). ``tile``/``overlap`` in input pixels; default ``TEST.TILE_SIZE``
        (0: ``INPUT.IMAGE_SIZE / TEST.TILE_SCALE``) and ``TEST.TILE_OVERLAP``."""
        img = to_model_range(image, self.intensity_norm, self.percentiles)
        overlap = self.tile_overlap if overlap is None else overlap
        return self._predict_tiled(img, tile or self.tile_size, overlap, full_masks)

    def _predict_tiled(
        self, img: np.ndarray, tile: int, overlap: int, full_masks: bool
    ) -> Instances:
        h, w = img.shape[:2]
        ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        dets: List[_Detection] = []
        for t, (ty, tx) in enumerate((y, x) for y in ys for x in xs):
            window = (ty, tx, min(ty + tile, h), min(tx + tile, w))
            th, tw = window[2] - ty, window[3] - tx
            inst = self._predict_tile(img[ty : window[2], tx : window[3]])
            crops = MaskCrops.from_bitmasks(inst.pred_masks)
            for (cy, cx, crop), score, label in zip(
                crops, inst.scores.tolist(), inst.pred_classes.tolist()
            ):
                if crop.size == 0:
                    continue
                partial = (
                    (ty > 0 and cy < TOUCH_MARGIN)
                    or (tx > 0 and cx < TOUCH_MARGIN)
                    or (window[2] < h and cy + crop.shape[0] > th - TOUCH_MARGIN)
                    or (window[3] < w and cx + crop.shape[1] > tw - TOUCH_MARGIN)
                )
                dets.append(_Detection(t, window, ty + cy, tx + cx, crop, score, label, partial))
        kept = stitch_detections(dets)
        logger.debug(
            f"tiled {h}x{w}: {len(ys) * len(xs)} tiles, {len(dets)} detections, {len(kept)} kept"
        )

        result = Instances((h, w))
        masks = MaskCrops([d.crop for d in kept], [(d.y0, d.x0) for d in kept], (h, w))
        result.pred_masks = masks.to_bitmasks() if full_masks else masks
        result.scores = torch.tensor([d.score for d in kept], dtype=torch.float32)
        result.pred_classes = torch.tensor([d.label for d in kept], dtype=torch.int64)
        result.pred_boxes = masks.get_bounding_boxes()
        return result

    def _predict_tile(self, tile: np.ndarray) -> Instances:
        """One (h, w, 3) tile on the 0..255 scale, resized by ``TEST.TILE_SCALE`` only -> Instances of (h, w)."""
        h, w = tile.shape[:2]
        tile = np.ascontiguousarray(tile)
        if self.tile_scale != 1.0:
            size = (max(1, round(h * self.tile_scale)), max(1, round(w * self.tile_scale)))
            tile = T.ResizeTransform(h, w, *size).apply_image(tile)
        return self._run_model(tile, (h, w))

    def _run_model(self, image: np.ndarray, out_size: Tuple[int, int]) -> Instances:
        """(h, w, 3) float image on the 0..255 scale -> CPU Instances resized to ``out_size``."""
        tensor = torch.as_tensor(
            np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32
        )
        with torch.inference_mode():
            out = self.model([{"image": tensor, "height": out_size[0], "width": out_size[1]}])[0][
                "instances"
            ]
        return out.to("cpu")
