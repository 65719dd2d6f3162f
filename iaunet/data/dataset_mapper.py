"""Dataset mapper: image reading (8/16-bit, gray/RGB), the thesis augmentations, instance targets
(thesis §4.2)."""

import copy
import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode

from .augmentations import RandomIntensity, RandomRotation
from .datasets.common import AMODAL_FIELD
from .datasets.stack_planes import PLANE_KEY, stack_plane
from .image_io import read_image, to_model_range
from .statistics import objects, resize_mode

logger = logging.getLogger(__name__)

# INPUT.MASK_KIND -> the annotation field a single-mask model learns (docs/amodal.md)
MASK_KINDS = {"visible": "segmentation", "amodal": AMODAL_FIELD}
# instance field of each annotation field: one mask per object, or both with MODEL.IAUNET.AMODAL
TARGET_FIELDS = {"segmentation": "gt_masks", AMODAL_FIELD: "gt_amodal_masks"}


def mask_fields(cfg) -> Tuple[str, ...]:
    """The annotation fields the targets are made from: the visible part (``segmentation``) and,
    with ``MODEL.IAUNET.AMODAL``, the whole outline; else the one ``INPUT.MASK_KIND`` names."""
    kind = cfg.INPUT.MASK_KIND
    if kind not in MASK_KINDS:
        raise ValueError(f"INPUT.MASK_KIND must be one of {sorted(MASK_KINDS)}, got {kind!r}")
    if cfg.MODEL.IAUNET.AMODAL:
        if kind != "visible":
            raise ValueError(
                "MODEL.IAUNET.AMODAL True learns both outlines: INPUT.MASK_KIND must stay "
                f"'visible', got {kind!r}"
            )
        return ("segmentation", AMODAL_FIELD)
    return (MASK_KINDS[kind],)


class _AtLeastOnePixel:
    """Mixin for resize augmentations: no side shrinks to 0 px. Very elongated images (e.g. 8 x 2000
    at IMAGE_SIZE 64) would otherwise round their short side to 0 and fail inside the
    interpolation."""

    def get_transform(self, image: np.ndarray) -> T.Transform:
        t = super().get_transform(image)
        if isinstance(t, T.ResizeTransform) and min(t.new_h, t.new_w) < 1:
            t = T.ResizeTransform(t.h, t.w, max(t.new_h, 1), max(t.new_w, 1), t.interp)
        return t


class ResizeShortestEdge(_AtLeastOnePixel, T.ResizeShortestEdge):
    """detectron2's ``ResizeShortestEdge`` whose output sides stay >= 1 px."""


class ResizeScale(_AtLeastOnePixel, T.ResizeScale):
    """detectron2's ``ResizeScale`` whose output sides stay >= 1 px."""


def scaled_size(size: Tuple[int, int], scale: float) -> Tuple[int, int]:
    """The (h, w) of an image of ``size`` resized by ``scale``: rounded, at least 1 px (training
    and prediction resize alike)."""
    h, w = size
    return max(1, round(h * scale)), max(1, round(w * scale))


class ScaleBy(T.Augmentation):
    """Resize by ``factor`` x U(``jitter``) (``INPUT.RESIZE_MODE "scale"``), sides at least 1 px."""

    def __init__(self, factor: float, jitter=(1.0, 1.0)):
        super().__init__()
        if factor <= 0:
            raise ValueError(f"INPUT.PIXEL_SCALE must be > 0 here, got {factor}")
        self.factor, self.jitter = float(factor), tuple(jitter)

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        f = self.factor * np.random.uniform(*self.jitter)
        return T.ResizeTransform(h, w, *scaled_size((h, w), f))


class Rot90Transform(T.Transform):
    """Rotation by ``k`` x 90 degrees counter-clockwise (exact: no interpolation, no cropping)."""

    def __init__(self, h: int, w: int, k: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(img, self.k))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        h, w = self.h, self.w
        for _ in range(self.k % 4):  # one step: (x, y) in an (h, w) image -> (y, w - x) in (w, h)
            x, y, h, w = y, w - x, w, h
        return np.stack([x, y], axis=1)


class RandomRotate90(T.Augmentation):
    """With probability ``prob``, rotate by 90, 180 or 270 degrees (chosen uniformly)."""

    def __init__(self, prob: float = 0.5):
        super().__init__()
        self.prob = prob

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        if np.random.rand() >= self.prob:
            return T.NoOpTransform()
        return Rot90Transform(h, w, int(np.random.randint(1, 4)))


def build_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """The base resize (``INPUT.RESIZE_MODE``): longest side ``INPUT.IMAGE_SIZE`` (thesis), or a
    resize by ``INPUT.PIXEL_SCALE``. Training adds scale jitter ``INPUT.SCALE_RANGE``, a free
    rotation (``INPUT.ROTATE``), a fixed ``IMAGE_SIZE`` crop (padded with the pixel mean),
    ``INPUT.FLIPS``, ``INPUT.ROTATE90`` and intensity jitter (``INPUT.INTENSITY_AUG``)."""
    size, mode = cfg.INPUT.IMAGE_SIZE, resize_mode(cfg)
    jitter = tuple(cfg.INPUT.SCALE_RANGE) if is_train else (1.0, 1.0)
    if mode == "scale":
        resize = ScaleBy(cfg.INPUT.PIXEL_SCALE, jitter)
    elif is_train:
        resize = ResizeScale(*jitter, target_height=size, target_width=size)
    else:  # short side -> size, then the long side capped: long side == size
        resize = ResizeShortestEdge(size, max_size=size)
    if not is_train:
        return [resize]
    # Pad with the mean so that padding normalizes to ~0, like the batch padding of the model.
    pad = float(np.mean(cfg.MODEL.PIXEL_MEAN))
    augs = [resize]
    if cfg.INPUT.ROTATE > 0:
        augs.append(RandomRotation(cfg.INPUT.ROTATE, pad))
    augs.append(T.FixedSizeCrop((size, size), pad=True, pad_value=pad, seg_pad_value=0))
    flips = {
        "horizontal": dict(horizontal=True, vertical=False),
        "vertical": dict(horizontal=False, vertical=True),
    }
    for f in cfg.INPUT.FLIPS:
        if f not in flips:
            raise ValueError(f"INPUT.FLIPS entries must be in {sorted(flips)}, got {f!r}")
        augs.append(T.RandomFlip(**flips[f]))
    if cfg.INPUT.ROTATE90 > 0:
        augs.append(RandomRotate90(cfg.INPUT.ROTATE90))
    if cfg.INPUT.INTENSITY_AUG > 0:
        augs.append(RandomIntensity(cfg.INPUT.INTENSITY_AUG))
    return augs


def polygons_to_rle(segmentation, height: int, width: int):
    """COCO polygons -> one RLE at the annotation's own size (RLE and other segmentations
    unchanged).

    Masks are rasterized where COCO evaluates them, then transformed as bitmaps (exact for flips and
    crops, nearest for resizes). Transforming the polygons first, as detectron2 does by default,
    shifts flipped targets by one pixel: pycocotools puts pixel centres at integer coordinates,
    detectron2's flips map x to W - x (pixel edges); a 1-px shift costs 12 % IoU on a cell 20 px
    across.
    """
    if not isinstance(segmentation, list):
        return segmentation
    polygons = [p for p in segmentation if len(p) >= 6]
    if not polygons:
        return mask_util.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return mask_util.merge(mask_util.frPyObjects(polygons, height, width))


def _box_meets(anno: Dict, transforms: T.TransformList, size: Tuple[int, int]) -> bool:
    """Whether ``anno``'s box, transformed (for a rotation: the box of its turned corners, which
    holds the turned outline), overlaps the (h, w) output image."""
    box = BoxMode.convert(anno["bbox"], anno["bbox_mode"], BoxMode.XYXY_ABS)
    x0, y0, x1, y1 = transforms.apply_box(np.array([box], dtype=np.float64))[0]
    return x1 > 0 and y1 > 0 and x0 < size[1] and y0 < size[0]


class IAUNetDatasetMapper:
    """Maps a detectron2 dataset dict to ``{"image": (3, H, W) float32 0..255, "instances":
    Instances, ...}``.

    The image is read by :func:`read_image` (8/16-bit, float, gray/RGB) and brought to 0..255 by
    ``INPUT.INTENSITY_NORM``, in ``INPUT.FORMAT`` channel order. Annotations (polygons, rasterized
    first by :func:`polygons_to_rle`, or RLE) are transformed with the image by detectron2's
    ``transform_instance_annotations`` / ``annotations_to_instances(mask_format="bitmask")``;
    ``gt_boxes`` are the masks' boxes; instances that the crop empties, or that keep fewer than
    ``min_instance_area`` pixels, are dropped (``filter_empty_instances``).

    ``fields``: the annotation outlines the targets hold (:func:`mask_fields`): ``gt_masks`` from
    the first, ``gt_amodal_masks`` from ``amodal_segmentation`` when it is the second. An
    annotation without ``amodal_segmentation`` has no hidden part: its whole outline is its
    ``segmentation``.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[T.Augmentation],
        image_format: str = "RGB",
        intensity_norm: str = "percentile",
        percentiles=(0.5, 99.5),
        min_instance_area: int = 1,
        normalize_uint8: bool = False,
        fields: Tuple[str, ...] = ("segmentation",),
        channels: Sequence = (),
    ):
        self.is_train = is_train
        self.fields = tuple(fields)
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.intensity_norm = intensity_norm
        self.percentiles = tuple(percentiles)
        self.min_instance_area = min_instance_area
        self.normalize_uint8 = normalize_uint8
        self.channels = tuple(channels)
        mode = "train" if is_train else "test"
        logger.info(f"[IAUNetDatasetMapper] {mode} augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "intensity_norm": cfg.INPUT.INTENSITY_NORM,
            "percentiles": cfg.INPUT.PERCENTILES,
            "min_instance_area": cfg.INPUT.MIN_INSTANCE_AREA,
            "normalize_uint8": cfg.INPUT.NORMALIZE_8BIT,
            "fields": mask_fields(cfg),
            "channels": tuple(cfg.INPUT.CHANNELS),
        }

    def load_image(self, record: Dict) -> np.ndarray:
        """A dataset record's image -> float32 (H, W, 3) on the 0..255 scale, in ``INPUT.FORMAT``
        order, or (H, W, C): the ``INPUT.CHANNELS`` of the file, each with its own range; a plane
        of a stack is normalized with the stack's range."""
        file_name, norm = record["file_name"], (self.intensity_norm, self.percentiles)
        value_range = None
        if record.get(PLANE_KEY):
            image, value_range = stack_plane(
                file_name, record[PLANE_KEY], *norm, self.normalize_uint8, self.channels
            )
        else:
            image = read_image(file_name, channels=self.channels)
        return to_model_range(
            image,
            *norm,
            name=file_name,
            image_format=self.image_format,
            value_range=value_range,
            normalize_uint8=self.normalize_uint8,
            channels=len(self.channels),
        )

    @staticmethod
    def _with_box(anno: Dict, field: str, h: int, w: int) -> Dict:
        """The annotation with ``field``'s outline as its RLE ``segmentation`` and a box (the
        transforms need one; the masks' boxes replace it)."""
        a = dict(anno, segmentation=anno.get(field, anno["segmentation"]))
        a["segmentation"] = polygons_to_rle(a["segmentation"], h, w)
        if "bbox" not in a:
            a["bbox"] = mask_util.toBbox(a["segmentation"]).tolist()
            a["bbox_mode"] = BoxMode.XYWH_ABS
        return a

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image = self.load_image(dataset_dict)
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
        if image.ndim == 2:  # OpenCV drops the axis of a one-channel image (INPUT.CHANNELS)
            image = image[:, :, None]
        dataset_dict["image"] = torch.as_tensor(
            np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32
        )
        annos = objects(dataset_dict)
        dataset_dict.pop("annotations", None)
        if not self.is_train:
            return dataset_dict
        size = image.shape[:2]
        masks = {}
        try:
            per_field = {f: [self._with_box(a, f, h, w) for a in annos] for f in self.fields}
            # Only the objects whose transformed box meets the output (a crop holds a few of an
            # image's objects) have their masks warped: the others would come out empty and be
            # dropped by filter_empty_instances; most of the loader's time went to them.
            inside = [
                any(_box_meets(per_field[f][i], transforms, size) for f in self.fields)
                for i in range(len(annos))
            ]
            for field in self.fields:
                kind = [
                    utils.transform_instance_annotations(a, transforms, size)
                    for a, keep in zip(per_field[field], inside)
                    if keep
                ]
                masks[field] = utils.annotations_to_instances(kind, size, mask_format="bitmask")
        except (ValueError, TypeError, AssertionError) as e:
            raise ValueError(f"{file_name}: cannot use its annotations: {e}") from None
        instances = masks[self.fields[0]]
        if not instances.has("gt_masks"):  # no annotation at all
            instances.gt_masks = BitMasks(torch.zeros((0, *size), dtype=torch.bool))
        for field in self.fields[1:]:
            extra = masks[field]
            instances.set(
                TARGET_FIELDS[field],
                extra.gt_masks if extra.has("gt_masks") else BitMasks(instances.gt_masks.tensor),
            )
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        instances = utils.filter_empty_instances(instances)
        if self.min_instance_area > 1:
            keep = instances.gt_masks.tensor.flatten(1).sum(1) >= self.min_instance_area
            instances = instances[keep]
        dataset_dict["instances"] = instances
        return dataset_dict
