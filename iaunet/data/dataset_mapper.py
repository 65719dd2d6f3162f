"""Dataset mapper: image reading (8/16-bit, gray/RGB), the thesis augmentations, instance targets (thesis §4.2)."""

import copy
import logging
from typing import Dict, List

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances, polygons_to_bitmask

from .image_io import read_image, to_model_range

logger = logging.getLogger(__name__)


class _AtLeastOnePixel:
    """Mixin for resize augmentations: no side shrinks to 0 px. Very elongated images (e.g. 8 x 2000 at
    IMAGE_SIZE 64) would otherwise round their short side to 0 and fail inside the interpolation."""

    def get_transform(self, image: np.ndarray) -> T.Transform:
        t = super().get_transform(image)
        if isinstance(t, T.ResizeTransform) and min(t.new_h, t.new_w) < 1:
            t = T.ResizeTransform(t.h, t.w, max(t.new_h, 1), max(t.new_w, 1), t.interp)
        return t


class ResizeShortestEdge(_AtLeastOnePixel, T.ResizeShortestEdge):
    """detectron2's ``ResizeShortestEdge`` whose output sides stay >= 1 px."""


class ResizeScale(_AtLeastOnePixel, T.ResizeScale):
    """detectron2's ``ResizeScale`` whose output sides stay >= 1 px."""


def build_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """Train: longest side IMAGE_SIZE x U(SCALE_RANGE) -> fixed IMAGE_SIZE crop (padded) -> flips.
    Test: longest side IMAGE_SIZE."""
    size = cfg.INPUT.IMAGE_SIZE
    if not is_train:
        return [
            ResizeShortestEdge(size, max_size=size)
        ]  # short side -> size, then long side capped: long == size
    lo, hi = cfg.INPUT.SCALE_RANGE
    augs = [
        ResizeScale(min_scale=lo, max_scale=hi, target_height=size, target_width=size),
        # Pad with the mean so that padding normalizes to ~0, like the batch padding of the model.
        T.FixedSizeCrop(
            (size, size), pad=True, pad_value=float(np.mean(cfg.MODEL.PIXEL_MEAN)), seg_pad_value=0
        ),
    ]
    flips = {
        "horizontal": dict(horizontal=True, vertical=False),
        "vertical": dict(horizontal=False, vertical=True),
    }
    for f in cfg.INPUT.FLIPS:
        if f not in flips:
            raise ValueError(f"INPUT.FLIPS entries must be in {sorted(flips)}, got {f!r}")
        augs.append(T.RandomFlip(**flips[f]))
    return augs


def annotation_to_mask(ann: Dict, height: int, width: int) -> np.ndarray:
    """A COCO-style annotation's "segmentation" (polygons or RLE) -> (H, W) uint8 mask."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polys = [np.asarray(p, dtype=np.float64) for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=np.uint8)
        return polygons_to_bitmask(polys, height, width).astype(np.uint8)
    if isinstance(seg, dict):
        if isinstance(seg.get("counts"), list):
            seg = mask_util.frPyObjects(seg, *seg["size"])
        mask = mask_util.decode(seg)
        if mask.shape != (height, width):
            raise ValueError(
                f"RLE of size {mask.shape} does not match the image size {(height, width)}"
            )
        return mask
    if isinstance(seg, np.ndarray) and seg.ndim == 2:
        return seg.astype(np.uint8)
    raise ValueError(f"unsupported segmentation format {type(seg).__name__}")


class IAUNetDatasetMapper:
    """Maps a detectron2 dataset dict to ``{"image": (3, H, W) float32 0..255, "instances": Instances, ...}``.

    Instances carry ``gt_masks`` (BitMasks), ``gt_classes`` and ``gt_boxes``; instances whose mask has
    fewer than ``min_instance_area`` pixels after the crop are dropped.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[T.Augmentation],
        intensity_norm: str = "percentile",
        percentiles=(0.5, 99.5),
        min_instance_area: int = 1,
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.intensity_norm = intensity_norm
        self.percentiles = tuple(percentiles)
        self.min_instance_area = min_instance_area
        logger.info(
            f"[IAUNetDatasetMapper] {'train' if is_train else 'test'} augmentations: {augmentations}"
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_augmentations(cfg, is_train),
            "intensity_norm": cfg.INPUT.INTENSITY_NORM,
            "percentiles": cfg.INPUT.PERCENTILES,
            "min_instance_area": cfg.INPUT.MIN_INSTANCE_AREA,
        }

    def load_image(self, file_name: str) -> np.ndarray:
        """File -> float32 (H, W, 3) on the 0..255 scale."""
        return to_model_range(
            read_image(file_name), self.intensity_norm, self.percentiles, name=file_name
        )

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image = self.load_image(file_name)
        h, w = image.shape[:2]
        expected = (dataset_dict.get("height", h), dataset_dict.get("width", w))
        if expected != (h, w):
            raise ValueError(
                f"{file_name}: image is {h}x{w} but its annotation says {expected[0]}x{expected[1]}"
            )
        dataset_dict["height"], dataset_dict["width"] = h, w

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(
            np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32
        )

        annos = [a for a in dataset_dict.pop("annotations", []) if not a.get("iscrowd", 0)]
        if not self.is_train:
            return dataset_dict
        masks, classes = [], []
        for ann in annos:
            try:
                mask = annotation_to_mask(ann, h, w)
            except ValueError as e:
                raise ValueError(f"{file_name}: annotation {ann.get('id', '?')}: {e}") from None
            mask = transforms.apply_segmentation(mask)
            if mask.sum() >= self.min_instance_area:
                masks.append(mask)
                classes.append(ann["category_id"])
        out_h, out_w = image.shape[:2]
        instances = Instances((out_h, out_w))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        if masks:
            instances.gt_masks = BitMasks(
                torch.from_numpy(np.ascontiguousarray(np.stack(masks))).bool()
            )
        else:
            instances.gt_masks = BitMasks(torch.zeros((0, out_h, out_w), dtype=torch.bool))
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = instances
        return dataset_dict
