"""Stacks of planes -- z-stacks and time-lapses -- predicted plane by plane: linking the instances
of neighbouring planes into objects, the stack's label image and its table.

Linking (``iaunet-predict --stitch-3d IOU`` for z, ``--link-t IOU`` for t; one mechanism, the axis
a parameter): the instances of plane k are matched one-to-one to the objects seen in plane k - 1
(or, with ``gap`` g, last seen at most g + 1 planes back) by mask IoU >= IOU, with the matching of
the evaluation (:func:`iaunet.evaluation.matching.match_pairs`: most pairs, then the highest total
IoU); a matched instance takes the object's id, the others start new objects. This is Cellpose's
``stitch_threshold`` (Stringer et al. 2021, "3D segmentation"), with one-to-one matching instead of
each mask taking its best overlap, so that a cell splitting in two keeps one id and the other half
starts a new object. Without linking every instance of every plane is its own object (ids
numbered plane after plane).

Outputs: ``<stem>_labels.tif``, the (N, H, W) label image with the file's axis (``ZYX`` / ``TYX``)
and pixel sizes, an ImageJ hyperstack (an OME-TIFF above 65,535 ids); ``<stem>_objects.csv``: a
z-stack gives one row per object (voxels, µm³ when the file declares its voxel size, z-range,
3-D centroid in pixels, mean score), a time-lapse one row per object per frame (frame, id, area,
centroid, score).
"""

import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import tifffile
from skimage.measure import regionprops

from ..evaluation.matching import match_pairs
from ..structures import MaskCrops
from .masks import UINT16_MAX, label_dtype, label_image

STACK_AXES = {"z": "ZYX", "t": "TYX"}
Z_COLUMNS = [
    "id", "class", "score", "planes", "z_first", "z_last", "volume_voxels", "volume_um3",
    "centroid_z", "centroid_y", "centroid_x",
]  # fmt: skip
T_COLUMNS = ["frame", "id", "class", "score", "area", "centroid_y", "centroid_x"]


def link_planes(planes: Sequence[MaskCrops], iou: float, gap: int = 0) -> List[np.ndarray]:
    """The object id (1..K, in order of first appearance) of every instance of every plane,
    linked across planes by mask IoU >= ``iou`` (module docstring); ``gap``: planes an object may
    be missing from and keep its id."""
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"the linking IoU must be in (0, 1], got {iou}")
    if gap < 0:
        raise ValueError(f"the gap must be >= 0 planes, got {gap}")
    last: Dict[int, Tuple[int, dict]] = {}  # object id -> (plane last seen, its mask there)
    ids, next_id = [], 1
    for k, masks in enumerate(planes):
        rles = masks.to_rles()
        plane_ids = np.zeros(len(rles), np.int64)
        recent = [obj for obj, (seen, _) in last.items() if k - seen <= gap + 1]
        if recent and rles:
            previous = [last[obj][1] for obj in recent]
            overlap = np.asarray(mask_util.iou(previous, rles, [0] * len(rles))).reshape(
                len(recent), len(rles)
            )
            matched, instances = match_pairs(overlap, iou)
            plane_ids[instances] = np.asarray(recent)[matched]
        for i in np.flatnonzero(plane_ids == 0):
            plane_ids[i], next_id = next_id, next_id + 1
        for i, obj in enumerate(plane_ids):
            last[int(obj)] = (k, rles[i])
        ids.append(plane_ids)
    return ids


def plane_ids(planes: Sequence[MaskCrops]) -> List[np.ndarray]:
    """Unlinked ids: every instance its own object, numbered plane after plane."""
    counts = np.cumsum([0] + [len(m) for m in planes])
    return [np.arange(counts[k], counts[k + 1]) + 1 for k in range(len(planes))]


def stack_labels(planes: Sequence[MaskCrops], ids: Sequence[np.ndarray]) -> np.ndarray:
    """(N, H, W) label image: plane k shows its instances (overlaps to the higher score, as a
    2-D label image) with their object ids."""
    top = max((int(i.max()) for i in ids if len(i)), default=0)
    h, w = planes[0].image_size
    out = np.zeros((len(planes), h, w), label_dtype(top))
    for k, (masks, obj) in enumerate(zip(planes, ids)):
        lut = np.concatenate([[0], obj]).astype(out.dtype)
        out[k] = lut[label_image(masks, h, w)]
    return out


@dataclass
class StackInfo:
    """What the stack's outputs say about its file: the axis ("z" or "t"), the (z, y, x) voxel
    size and its unit where declared, the frame interval (s)."""

    axis: str
    voxel_size: Optional[Tuple[float, float, float]] = None
    unit: str = ""
    interval: Optional[float] = None


def stack_tiff_bytes(labels: np.ndarray, info: StackInfo) -> bytes:
    """The (N, H, W) label image as an ImageJ hyperstack with the stack's axis, pixel size and
    z spacing or frame interval (Fiji and napari read them); above 65,535 ids (uint32, which
    ImageJ cannot hold) an OME-TIFF with the same axes and physical sizes."""
    axes = STACK_AXES[info.axis]
    buf = io.BytesIO()
    size = info.voxel_size
    if int(labels.max(initial=0)) <= UINT16_MAX:  # ImageJ: 16-bit ids
        meta = {"axes": axes}
        if size:
            meta["unit"] = "micron" if info.unit in ("µm", "um", "micron") else info.unit
            if info.axis == "z":
                meta["spacing"] = size[0]
        if info.axis == "t" and info.interval:
            meta["finterval"] = info.interval
        resolution = (1.0 / size[2], 1.0 / size[1]) if size else None
        tifffile.imwrite(
            buf, labels.astype(np.uint16), imagej=True, compression="zlib",
            resolution=resolution, metadata=meta,
        )  # fmt: skip
        return buf.getvalue()
    meta = {"axes": axes}
    if size:
        meta.update(PhysicalSizeX=size[2], PhysicalSizeY=size[1])
        if info.axis == "z":
            meta["PhysicalSizeZ"] = size[0]
    tifffile.imwrite(buf, labels, ome=True, compression="zlib", metadata=meta)
    return buf.getvalue()


def stack_rows(
    labels: np.ndarray,
    scores: Sequence[np.ndarray],
    ids: Sequence[np.ndarray],
    classes: Sequence[Sequence[str]],
    info: StackInfo,
) -> List[Dict]:
    """The stack's table (module docstring; columns :data:`Z_COLUMNS` / :data:`T_COLUMNS`) from its
    label image and each plane's instance scores, object ids and class names. A score is the mean
    over the instances of the object (z) or the instance's own (t)."""
    if info.axis == "t":
        rows = []
        for k, plane in enumerate(labels):
            score = {int(o): (float(s), c) for o, s, c in zip(ids[k], scores[k], classes[k])}
            for region in regionprops(plane):
                s, c = score[region.label]
                cy, cx = region.centroid
                rows.append(
                    {"frame": k, "id": region.label, "class": c, "score": round(s, 4),
                     "area": int(region.area), "centroid_y": round(cy, 3),
                     "centroid_x": round(cx, 3)}
                )  # fmt: skip
        return rows
    per_object: Dict[int, List[float]] = {}
    names: Dict[int, str] = {}
    for obj, s, c in zip(np.concatenate(ids), np.concatenate(scores), sum(map(list, classes), [])):
        per_object.setdefault(int(obj), []).append(float(s))
        names.setdefault(int(obj), c)
    voxel = float(np.prod(info.voxel_size)) if info.voxel_size and info.unit == "µm" else None
    rows = []
    for region in regionprops(labels):
        z0, _, _, z1, _, _ = region.bbox
        cz, cy, cx = region.centroid
        rows.append(
            {"id": region.label, "class": names[region.label],
             "score": round(float(np.mean(per_object[region.label])), 4),
             "planes": int(np.unique(region.coords[:, 0]).size),
             "z_first": z0, "z_last": z1 - 1, "volume_voxels": int(region.area),
             "volume_um3": round(region.area * voxel, 4) if voxel else "",
             "centroid_z": round(cz, 3), "centroid_y": round(cy, 3), "centroid_x": round(cx, 3)}
        )  # fmt: skip
    return rows
