"""Augmentations that mix training samples: mosaics (YOLOv4, Bochkovskiy et al. 2020, "Mosaic data
augmentation"), a sample made of four mapped crops laid out 2 x 2 and cut at a random offset; and
copy-paste (Ghiasi et al., CVPR 2021, "Simple Copy-Paste is a Strong Data Augmentation Method for
Instance Segmentation"), objects of one mapped crop pasted onto another.

A model trained on whole scenes sees an image's content start at the image border only; a tile of
a large image (``iaunet.inference.tiling``) starts anywhere, with objects and backgrounds of other
regions next to each other. Mosaics show both: objects cut at any position, and the meeting of
unrelated content (different backgrounds, objects cut by a seam) inside one crop.

``INPUT.MOSAIC`` is the probability that a sample is a mosaic (0 = off, the thesis pipeline). The
four crops are each mapped by :class:`~iaunet.data.dataset_mapper.IAUNetDatasetMapper` (resize,
jitter, ``INPUT.IMAGE_SIZE`` crop, flips, rotations) and the mosaic keeps the crop size, so a
batch and the cost of an iteration do not change.

``INPUT.COPY_PASTE`` is the probability that a sample (a mosaic or not) gets objects of another
mapped crop pasted on it: each of that crop's objects with probability 1/2, its pixels copied where
its mask is (no blending: Ghiasi et al. found none needed). The objects under a pasted one lose the
covered pixels (dropped below ``INPUT.MIN_INSTANCE_AREA``); their whole outlines
(``MODEL.IAUNET.AMODAL``) stay, so pasting makes occlusions with known whole outlines. For a
handful of annotated images it shows each object in new neighbourhoods, on other backgrounds and
overlapping others. With whole outlines, an object picked for pasting brings the objects that hide
part of it (:func:`with_occluders`): its hidden part lies under them in the new crop too, as its
annotation says.
"""

import logging
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from detectron2.structures import BitMasks, Instances

logger = logging.getLogger(__name__)

MASK_FIELDS = ("gt_masks", "gt_amodal_masks")  # the instance mask fields a mosaic carries


def combine_mosaic(parts: Sequence[Dict], offset_y: int, offset_x: int, min_area: int = 1) -> Dict:
    """Four mapped training samples of one size (H, W) -> one of the same size.

    The parts fill a (2H, 2W) canvas row by row (top-left, top-right, bottom-left, bottom-right);
    the sample is its window ``[offset_y, offset_y + H) x [offset_x, offset_x + W)``, offsets in
    ``[0, H]`` / ``[0, W]``. Instances keep their visible part; those with fewer than ``min_area``
    pixels there are dropped. The first part's other keys (file name, image id, ...) are kept.
    """
    if len(parts) != 4:
        raise ValueError(f"a mosaic needs 4 samples, got {len(parts)}")
    h, w = parts[0]["image"].shape[-2:]
    for p in parts:
        if tuple(p["image"].shape[-2:]) != (h, w):
            raise ValueError(
                f"mosaic samples must share one size (the INPUT.IMAGE_SIZE crop): {p['file_name']} "
                f"is {tuple(p['image'].shape[-2:])}, {parts[0]['file_name']} is {(h, w)}"
            )
    if not (0 <= offset_y <= h and 0 <= offset_x <= w):
        raise ValueError(f"mosaic offset ({offset_y}, {offset_x}) outside [0, {h}] x [0, {w}]")
    image = torch.empty_like(parts[0]["image"])
    # gt_masks, and the whole outlines too when the targets have them (MODEL.IAUNET.AMODAL)
    fields = [f for f in MASK_FIELDS if parts[0]["instances"].has(f)]
    masks: Dict[str, List[torch.Tensor]] = {f: [] for f in fields}
    classes: List[torch.Tensor] = []
    for q, part in enumerate(parts):
        # the part's rectangle on the canvas, in the window's coordinates
        top, left = (q // 2) * h - offset_y, (q % 2) * w - offset_x
        y0, y1 = max(top, 0), min(top + h, h)
        x0, x1 = max(left, 0), min(left + w, w)
        if y1 <= y0 or x1 <= x0:
            continue
        src = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        image[:, y0:y1, x0:x1] = part["image"][(slice(None), *src)]
        inst = part["instances"]
        for f in fields:
            m = torch.zeros((len(inst), h, w), dtype=torch.bool)
            m[:, y0:y1, x0:x1] = inst.get(f).tensor[(slice(None), *src)]
            masks[f].append(m)
        classes.append(inst.gt_classes)
    gt_masks = {f: torch.cat(masks[f]) for f in fields}
    gt_classes = torch.cat(classes)
    keep = gt_masks["gt_masks"].flatten(1).sum(1) >= max(min_area, 1)
    instances = Instances((h, w))
    for f in fields:
        instances.set(f, BitMasks(gt_masks[f][keep]))
    instances.gt_classes = gt_classes[keep]
    instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
    out = dict(parts[0])
    out["image"], out["instances"] = image, instances
    out["mosaic_of"] = [p["file_name"] for p in parts]
    return out


def paste_objects(target: Dict, source: Dict, pick: Sequence[bool], min_area: int = 1) -> Dict:
    """The objects of mapped sample ``source`` whose ``pick`` is True pasted on mapped sample
    ``target`` (same size): their pixels replace the target's where their masks are, the target's
    objects lose those pixels (their whole outlines stay), and target objects left with fewer than
    ``min_area`` pixels are dropped. Pasted objects come last, in ``source``'s order."""
    if tuple(source["image"].shape) != tuple(target["image"].shape):
        raise ValueError(
            f"copy-paste samples must share one size (the INPUT.IMAGE_SIZE crop): "
            f"{source['file_name']} is {tuple(source['image'].shape)}, {target['file_name']} is "
            f"{tuple(target['image'].shape)}"
        )
    src, dst = source["instances"], target["instances"]
    pick = torch.as_tensor(np.asarray(pick, dtype=bool).reshape(-1))
    if len(pick) != len(src):
        raise ValueError(f"{len(pick)} picks for {len(src)} objects of {source['file_name']}")
    fields = [f for f in MASK_FIELDS if dst.has(f)]
    if any(not src.has(f) for f in fields):
        raise ValueError(f"{source['file_name']} has no {fields} to paste on {target['file_name']}")
    pasted = src.gt_masks.tensor[pick]
    cover = pasted.any(0)
    image = torch.where(cover, source["image"], target["image"])
    visible = dst.gt_masks.tensor & ~cover
    keep = visible.flatten(1).sum(1) >= max(min_area, 1)
    masks = {"gt_masks": torch.cat([visible[keep], pasted])}
    for f in fields[1:]:  # whole outlines: the target's stay whole under the pasted objects
        masks[f] = torch.cat([dst.get(f).tensor[keep], src.get(f).tensor[pick]])
    instances = Instances(dst.image_size)
    for f in fields:
        instances.set(f, BitMasks(masks[f]))
    instances.gt_classes = torch.cat([dst.gt_classes[keep], src.gt_classes[pick]])
    instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
    out = dict(target)
    out["image"], out["instances"] = image, instances
    out["pasted_from"] = source["file_name"]
    return out


def with_occluders(instances: Instances, pick: Sequence[bool]) -> np.ndarray:
    """``pick`` (one bool per object of ``instances``) grown by the objects that hide part of a
    picked one, and theirs in turn: an object's hidden part (its whole outline,
    ``gt_amodal_masks``, minus its visible part, ``gt_masks``) lies under the visible parts of the
    objects above it. Without whole outlines nothing is hidden and ``pick`` is returned as is."""
    pick = np.asarray(pick, dtype=bool).reshape(-1).copy()
    if not instances.has("gt_amodal_masks") or not pick.any():
        return pick
    visible = instances.gt_masks.tensor.flatten(1).float()
    hidden = (instances.gt_amodal_masks.tensor & ~instances.gt_masks.tensor).flatten(1).float()
    hides = ((hidden @ visible.T) > 0).numpy()  # [i, j]: j's visible part covers part of i
    while True:
        grown = pick | hides[pick].any(0)
        if (grown == pick).all():
            return pick
        pick = grown


class MixingMapper:
    """Wraps a training mapper. With probability ``mosaic`` a sample is the mosaic
    (:func:`combine_mosaic`) of the mapped dict and three others drawn at random from ``dataset``
    (any indexable of dataset dicts, e.g. detectron2's ``DatasetFromList``); then, with probability
    ``copy_paste``, objects of another mapped crop are pasted on it (:func:`paste_objects`), each
    with probability 1/2 and with the objects that hide part of it (:func:`with_occluders`)."""

    def __init__(
        self,
        mapper: Callable[[Dict], Dict],
        dataset,
        mosaic: float,
        copy_paste: float = 0.0,
        min_area: int = 1,
    ):
        for key, prob in (("INPUT.MOSAIC", mosaic), ("INPUT.COPY_PASTE", copy_paste)):
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"{key} is a probability in [0, 1], got {prob}")
        self.mapper, self.dataset, self.min_area = mapper, dataset, min_area
        self.mosaic, self.copy_paste = mosaic, copy_paste
        logger.info(
            f"[MixingMapper] mosaics of 4 training crops with probability {mosaic}, objects of "
            f"another crop pasted with probability {copy_paste}"
        )

    def _other(self) -> Dict:
        return self.mapper(self.dataset[int(np.random.randint(len(self.dataset)))])

    def __call__(self, dataset_dict: Dict) -> Dict:
        out = self.mapper(dataset_dict)
        # np.random: detectron2 seeds it per data-loader worker, as for the other augmentations
        if np.random.rand() < self.mosaic:
            others = [self._other() for _ in range(3)]
            h, w = out["image"].shape[-2:]
            oy, ox = int(np.random.randint(h + 1)), int(np.random.randint(w + 1))
            out = combine_mosaic([out, *others], oy, ox, self.min_area)
        if np.random.rand() < self.copy_paste:
            source = self._other()
            pick = np.random.rand(len(source["instances"])) < 0.5
            pick = with_occluders(source["instances"], pick)
            out = paste_objects(out, source, pick, self.min_area)
        return out
