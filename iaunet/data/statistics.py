"""Statistics of a training set that size the input pipeline and travel with the model.

``dataset_statistics`` reads detectron2 dataset dicts (no image is opened): image sizes, objects per
image, object diameters. ``resolve_data_keys`` fills the data-dependent config keys from them:

* ``INPUT.PIXEL_SCALE``: the resize factor from an image's pixels to the pixels the model sees. With
  ``INPUT.RESIZE_MODE "longest_side"`` (the thesis protocol: longest side -> ``INPUT.IMAGE_SIZE``)
  it is recorded, the median over the training images; with ``"scale"`` it is the resize itself,
  chosen so that objects are ``INPUT.OBJECT_DIAMETER`` pixels across.
* ``INPUT.OBJECT_DIAMETER``: the median object diameter as the model sees it (model pixels).

Both end up in the config saved with every checkpoint, so that ``IAUNetPredictor`` resizes any image
to the pixel scale the model was trained at (docs/predict.md, "Scale").

An object's diameter is that of the disc of the same area, taken from its box as ``sqrt(w h)``
(exact for ellipses; COCO annotations in detectron2's dicts keep boxes, not areas).
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
from detectron2.config import CfgNode
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)

RESIZE_MODES = ("longest_side", "scale")


def resize_mode(cfg: CfgNode) -> str:
    """``INPUT.RESIZE_MODE``, checked: "longest_side" (thesis) or "scale"."""
    mode = cfg.INPUT.RESIZE_MODE
    if mode not in RESIZE_MODES:
        raise ValueError(f"INPUT.RESIZE_MODE must be one of {RESIZE_MODES}, got {mode!r}")
    return mode


def objects(record: Dict) -> List[Dict]:
    """The annotations of a detectron2 dataset dict that are objects: crowd regions (``iscrowd``)
    are neither learned, counted nor matched."""
    return [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]


@dataclass
class DatasetStatistics:
    num_images: int
    num_objects: int
    median_image_size: float  # longest side, pixels
    median_objects: float  # per image
    max_objects: int  # in one image
    max_objects_file: str  # the image with the most objects
    median_diameter: float  # object diameter, image pixels

    def summary(self) -> str:
        return (
            f"{self.num_images} images, {self.num_objects} objects: {self.median_objects:g} per "
            "image "
            f"(median), at most {self.max_objects} ({self.max_objects_file}); median longest side "
            f"{self.median_image_size:g} px, median object diameter {self.median_diameter:.1f} px"
        )


def object_diameters(annotations: Sequence[Dict]) -> List[float]:
    """Equivalent diameters ``sqrt(w h)`` of the annotations' boxes (any detectron2 box mode)."""
    out = []
    for a in annotations:
        x0, y0, x1, y1 = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
        out.append(float(np.sqrt(max(x1 - x0, 0) * max(y1 - y0, 0))))
    return out


def dataset_statistics(dicts: Sequence[Dict]) -> DatasetStatistics:
    """Statistics of detectron2 dataset dicts (non-crowd annotations; images need height/width)."""
    if not dicts:
        raise ValueError("the training set is empty")
    counts, sizes, diameters = [], [], []
    for d in dicts:
        annos = objects(d)
        counts.append(len(annos))
        sizes.append(max(d["height"], d["width"]))
        diameters += object_diameters(annos)
    i = int(np.argmax(counts))
    return DatasetStatistics(
        num_images=len(dicts),
        num_objects=int(sum(counts)),
        median_image_size=float(np.median(sizes)),
        median_objects=float(np.median(counts)),
        max_objects=int(counts[i]),
        max_objects_file=str(dicts[i].get("file_name", f"image {i}")),
        median_diameter=float(np.median(diameters)) if diameters else float("nan"),
    )


def longest_side_scales(dicts: Sequence[Dict], image_size: int) -> np.ndarray:
    """The test transform's factor ``image_size / longest side`` of each image."""
    return np.array([image_size / max(d["height"], d["width"]) for d in dicts], dtype=np.float64)


def resolve_data_keys(cfg: CfgNode, dicts: Sequence[Dict]) -> DatasetStatistics:
    """Fill ``INPUT.PIXEL_SCALE`` and ``INPUT.OBJECT_DIAMETER`` where they are 0 (auto), in
    place."""
    stats = dataset_statistics(dicts)
    if resize_mode(cfg) == "longest_side":
        scales = longest_side_scales(dicts, cfg.INPUT.IMAGE_SIZE)
        if cfg.INPUT.PIXEL_SCALE <= 0:
            cfg.INPUT.PIXEL_SCALE = round(float(np.median(scales)), 4)
        if cfg.INPUT.OBJECT_DIAMETER <= 0 and stats.num_objects:
            per_object = [
                dia * s for d, s in zip(dicts, scales) for dia in object_diameters(objects(d))
            ]
            cfg.INPUT.OBJECT_DIAMETER = round(float(np.median(per_object)), 2)
    else:
        if cfg.INPUT.OBJECT_DIAMETER <= 0:
            raise ValueError(
                'INPUT.RESIZE_MODE "scale" needs INPUT.OBJECT_DIAMETER > 0 (model pixels)'
            )
        if cfg.INPUT.PIXEL_SCALE <= 0:
            if not stats.num_objects:
                raise ValueError(
                    "INPUT.PIXEL_SCALE 0 (auto) needs annotated objects in the training set"
                )
            cfg.INPUT.PIXEL_SCALE = round(cfg.INPUT.OBJECT_DIAMETER / stats.median_diameter, 4)
    return stats
