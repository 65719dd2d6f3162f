"""Per-object tables: ``<stem>_objects.csv`` per image and ``objects.csv`` for the run.

One row per instance, measured on its full (overlap-preserving) mask with scikit-image's
``regionprops``; intensities are read from the image as stored (original dtype values, before any
normalization). Columns:

=====================  ==========================================================================
``id``                 instance id (1..N by decreasing score; the id in every other output)
``roi_name``           the ROI's name in ``_rois.zip`` (``0001_s0.93``)
``class``, ``score``   class name and confidence
``area``               mask pixels
``centroid_x/_y``      centroid, pixels (x = column; pixel centres at integers)
``bbox_x/_y``,         bounding box: first column / row, width, height (pixels; COCO and ImageJ
``bbox_width/_height`` convention)
``perimeter``          ``regionprops`` perimeter (4-connected boundary, diagonal steps sqrt 2)
``mean_intensity``,    over the mask, per channel for colour images (``_r``, ``_g``, ``_b``, ``_a``;
``max_intensity``      ``_c<k>`` for other channel counts)
``overlap_px``         pixels of this instance that belong to at least one other instance
``overlap_ids``        ids of the instances it overlaps, ``;``-separated
``overlap_px_per_id``  pixels shared with each of them, same order
=====================  ==========================================================================

The run table adds ``image`` (the input file) and ``image_id`` (its id in ``images.json``) first.

A model that predicts whole outlines next to visible parts (``MODEL.IAUNET.AMODAL``, docs/amodal.md)
is measured on the whole outlines, with four more columns (:func:`amodal_rows`):

=====================  ==========================================================================
``area_visible``       pixels of the visible part
``area_whole``         pixels of the whole outline
``hidden_fraction``    1 - area_visible / area_whole
``on_top_ids``         ids of the instances whose visible part covers this one's hidden part
=====================  ==========================================================================
"""

import csv
import io
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from skimage.measure import regionprops

from ..structures import MaskCrops, box_hits
from .masks import Overlaps, instance_overlaps
from .rois import roi_name

BASE_COLUMNS = [
    "id",
    "roi_name",
    "class",
    "score",
    "area",
    "centroid_x",
    "centroid_y",
    "bbox_x",
    "bbox_y",
    "bbox_width",
    "bbox_height",
    "perimeter",
]
OVERLAP_COLUMNS = ["overlap_px", "overlap_ids", "overlap_px_per_id"]
AMODAL_COLUMNS = ["area_visible", "area_whole", "hidden_fraction", "on_top_ids"]
RUN_COLUMNS = ["image", "image_id"]
Crop = Tuple[int, int, np.ndarray]  # (y0, x0, mask crop) of one instance


def _channel_names(image: np.ndarray) -> List[str]:
    """Column suffixes: none for gray, r/g/b(/a) for RGB(A), c<k> otherwise."""
    if image.ndim == 2:
        return [""]
    n = image.shape[2]
    names = ["r", "g", "b", "a"][:n] if n in (3, 4) else [f"c{k}" for k in range(n)]
    return [f"_{s}" for s in names]


def intensity_columns(image: np.ndarray) -> List[str]:
    suffixes = _channel_names(image)
    return [f"mean_intensity{s}" for s in suffixes] + [f"max_intensity{s}" for s in suffixes]


def _value(x, dtype: np.dtype):
    """A max intensity in the image's own type (int for integer images)."""
    return int(x) if np.issubdtype(dtype, np.integer) else round(float(x), 6)


def class_name(label: int, class_names: Sequence[str]) -> str:
    """The name of class ``label`` in tables, ROI sets and COCO files: the dataset's
    ``thing_classes``, or ``class_<label>`` beyond them."""
    return class_names[label] if label < len(class_names) else f"class_{label}"


def object_rows(
    masks: MaskCrops,
    scores: Sequence[float],
    class_names: Sequence[str],
    image: np.ndarray,
    overlaps: Optional[Overlaps] = None,
) -> List[Dict]:
    """One dict per instance (columns of the module docstring). ``image``: (H, W) or (H, W, C), as
    read from the file, at the masks' size."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.shape[:2] != tuple(masks.image_size):
        raise ValueError(f"image size {image.shape[:2]} differs from the masks' {masks.image_size}")
    overlaps = overlaps if overlaps is not None else instance_overlaps(masks)
    neighbours = overlaps.neighbours()
    suffixes = _channel_names(image)
    rows = []
    for i, (y0, x0, crop) in enumerate(masks):
        row = {
            "id": i + 1,
            "roi_name": roi_name(i + 1, float(scores[i])),
            "class": class_names[i],
            "score": round(float(scores[i]), 4),
            "area": int(crop.sum()),
        }
        if row["area"]:
            sub = image[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
            region = regionprops(crop.astype(np.uint8), intensity_image=sub)[0]
            cy, cx = region.centroid
            r0, c0, r1, c1 = region.bbox
            mean = np.atleast_1d(region.intensity_mean)
            peak = np.atleast_1d(region.intensity_max)
            row.update(
                centroid_x=round(cx + x0, 3),
                centroid_y=round(cy + y0, 3),
                bbox_x=c0 + x0,
                bbox_y=r0 + y0,
                bbox_width=c1 - c0,
                bbox_height=r1 - r0,
                perimeter=round(float(region.perimeter), 3),
            )
            for s, m, p in zip(suffixes, mean, peak):
                row[f"mean_intensity{s}"] = round(float(m), 4)
                row[f"max_intensity{s}"] = _value(p, image.dtype)
        row["overlap_px"] = int(overlaps.covered[i])
        row["overlap_ids"] = ";".join(str(j + 1) for j, _ in neighbours[i])
        row["overlap_px_per_id"] = ";".join(str(n) for _, n in neighbours[i])
        rows.append(row)
    return rows


def csv_bytes(rows: Sequence[Dict], columns: Sequence[str]) -> bytes:
    """CSV (comma-separated, header line, UTF-8); missing values are empty cells."""
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def table_columns(image: np.ndarray, amodal: bool = False) -> List[str]:
    """The columns of one image's table (``amodal``: with :data:`AMODAL_COLUMNS`)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    extra = AMODAL_COLUMNS if amodal else []
    return BASE_COLUMNS + intensity_columns(image) + OVERLAP_COLUMNS + extra


def _in_box(crop: np.ndarray, offset, box) -> np.ndarray:
    """``crop`` (at ``offset`` (y, x) in the image) cut or padded to ``box`` (y0, x0, y1, x1)."""
    out = np.zeros((box[2] - box[0], box[3] - box[1]), bool)
    y0, x0 = max(offset[0], box[0]), max(offset[1], box[1])
    y1 = min(offset[0] + crop.shape[0], box[2])
    x1 = min(offset[1] + crop.shape[1], box[3])
    if y1 > y0 and x1 > x0:
        out[y0 - box[0] : y1 - box[0], x0 - box[1] : x1 - box[1]] = crop[
            y0 - offset[0] : y1 - offset[0], x0 - offset[1] : x1 - offset[1]
        ]
    return out


def amodal_rows(
    visible: Sequence[Crop],
    whole: Sequence[Crop],
    ids: Optional[Sequence[int]] = None,
    count: Optional[int] = None,
) -> List[Dict]:
    """The :data:`AMODAL_COLUMNS` of each instance from its visible part and whole outline (same
    order; (y0, x0, crop) each, e.g. :class:`MaskCrops`). The hidden part is the whole outline minus
    the visible part; the instances on top are those whose visible part covers some of it.
    ``ids``: the instances' ids (default 1..N); rows for the first ``count`` instances (default
    all), the others being only candidates for on top (the neighbours of a block's objects)."""
    if len(visible) != len(whole):
        raise ValueError(f"{len(visible)} visible masks but {len(whole)} whole outlines")
    wholes, visibles = list(whole), list(visible)
    ids = list(range(1, len(visibles) + 1)) if ids is None else list(ids)
    boxes = np.array(
        [(y, x, y + c.shape[0], x + c.shape[1]) for y, x, c in visibles], np.int64
    ).reshape(-1, 4)
    rows = []
    for i, (y0, x0, crop) in enumerate(wholes[: len(wholes) if count is None else count]):
        box = (y0, x0, y0 + crop.shape[0], x0 + crop.shape[1])
        vy, vx, vcrop = visibles[i]
        hidden = crop & ~_in_box(vcrop, (vy, vx), box)
        on_top = [
            ids[j]
            for j in (box_hits(boxes, box).tolist() if hidden.any() else [])
            if j != i and (hidden & _in_box(visibles[j][2], visibles[j][:2], box)).any()
        ]
        area_whole, area_visible = int(crop.sum()), int(vcrop.sum())
        rows.append(
            {
                "area_visible": area_visible,
                "area_whole": area_whole,
                "hidden_fraction": round(1 - area_visible / area_whole, 4) if area_whole else 0.0,
                "on_top_ids": ";".join(map(str, on_top)),
            }
        )
    return rows
