"""IAUNetPredictor: a numpy image of any dtype -> ``Instances``, whole-image or tiled (large
images).

Whole image: the test transform of training (longest side ``INPUT.IMAGE_SIZE``), masks resized back.
Tiled (``predict_tiled``; automatic above ``TEST.AUTO_TILE_ABOVE``): the image is
intensity-normalized
once, cut into tiles (:mod:`iaunet.inference.tiling`), each resized by ``TEST.TILE_SCALE`` only, and
the tiles' detections stitched. Masks are kept as tight bool crops (:class:`MaskCrops`), so memory
follows the objects' area rather than N x H x W; full-size masks are built only when asked.
"""

import logging
from typing import List, Optional, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

from ..checkpoint import AtomicCheckpointer
from ..data.dataset_mapper import build_augmentations
from ..data.image_io import to_model_range
from .mask_crops import MaskCrops
from .tiling import TOUCH_MARGIN, Detection, stitch_detections, tile_starts

logger = logging.getLogger(__name__)


class IAUNetPredictor:
    """Like detectron2's ``DefaultPredictor``: builds the model from ``cfg``, loads
    ``cfg.MODEL.WEIGHTS``
    and runs single images in eval mode under ``torch.inference_mode``.

    Input: a numpy image as read by :func:`iaunet.data.read_image` -- (H, W) or (H, W, 1|3|4),
    RGB(A)
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
        """Tiled prediction (module doc). ``tile``/``overlap`` in input pixels; default
        ``TEST.TILE_SIZE``
        (0: ``INPUT.IMAGE_SIZE / TEST.TILE_SCALE``) and ``TEST.TILE_OVERLAP``."""
        img = to_model_range(image, self.intensity_norm, self.percentiles)
        overlap = self.tile_overlap if overlap is None else overlap
        return self._predict_tiled(img, tile or self.tile_size, overlap, full_masks)

    def _predict_tiled(
        self, img: np.ndarray, tile: int, overlap: int, full_masks: bool
    ) -> Instances:
        h, w = img.shape[:2]
        ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        dets: List[Detection] = []
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
                dets.append(Detection(t, window, ty + cy, tx + cx, crop, score, label, partial))
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
        """One (h, w, 3) tile on the 0..255 scale, resized by ``TEST.TILE_SCALE`` only -> Instances
        of (h, w)."""
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
