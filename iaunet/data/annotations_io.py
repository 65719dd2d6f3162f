"""Reading per-image instance annotations: label images, multi-page masks TIFFs, ImageJ ROI sets.

Each reader returns the instances of one image as COCO RLEs (pycocotools, compressed ``counts``
as str so that they can be written to JSON), with their boxes (XYWH, pixel extents) and areas:

* **label image** (TIFF or PNG, ``<stem>_labels.tif``): one integer id per instance, 0 background.
  An id is one instance even when its pixels are not connected. Integer dtypes (8/16/32-bit) and
  bool; a float image (Fiji saves 32-bit label images) is accepted when every value is a whole
  number. Negative ids, fractional values, ids above 65535 (uint16, the range of the label images
  Fiji, napari and ``iaunet-predict`` write) and colour (RGB) images are errors naming the file.
* **masks TIFF** (``<stem>_masks.tif``, what ``iaunet-predict`` writes to keep overlaps): pages of
  label images of the image's size; an instance is an id on a page (ids restarting on every page
  are fine too), so two overlapping instances simply sit on different pages. A one-page masks
  TIFF is a label image (Cellpose's ``_masks.tif``).
* **ImageJ/Fiji ROI set** (``<stem>_rois.zip`` or a single ``.roi``, read with ``roifile``):
  polygon, freehand, traced, rectangle and oval ROIs and composite ROIs (rings filled even-odd, so
  holes stay holes). Coordinates follow ImageJ: integer coordinates are pixel *corners*, pixel
  (x, y) covers [x, x+1) x [y, y+1) and belongs to the ROI when its centre (x + 0.5, y + 0.5) is
  inside, which is how Fiji's "Labels to ROIs" outlines round-trip to the same mask. Line, point
  and angle ROIs carry no area and are skipped with a warning naming them; a ROI's slice/channel
  position is ignored (every ROI belongs to the image).

**Whole outlines and visible parts** (:func:`read_whole_and_visible`, docs/amodal.md): a masks
TIFF (``<stem>_masks.tif``, overlapping whole outlines) together with a label image
(``<stem>_labels.tif``, the visible parts, one cell per pixel) give each instance both: its visible
part is the label that covers most of its whole outline, and must lie inside it.

Every error is a :class:`DatasetError` (a ``ConfigError``: the command-line tools end with its
one line) whose message starts with the file at fault.
"""

import logging
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from matplotlib.path import Path

from ..config import ConfigError, one_line
from .image_io import read_tiff

logger = logging.getLogger(__name__)

MAX_ID = 65535  # uint16
LABEL_EXTENSIONS = (".tif", ".tiff", ".png")
AREA_ROI_TYPES = ("POLYGON", "FREEHAND", "TRACED", "RECT", "OVAL")


class DatasetError(ConfigError):
    """A dataset named in the config (``DATASETS.TRAIN`` / ``TEST``) that cannot be used; the
    message names the file at fault."""


Instance = Dict  # {"segmentation": RLE (str counts), "bbox": [x, y, w, h], "area": int}


def instance_from_pixels(ys: np.ndarray, xs: np.ndarray, height: int, width: int) -> Instance:
    """The instance made of pixels (ys[i], xs[i]) of an (height, width) image, without building a
    full-size mask: COCO RLE counts run down the columns (index x * height + y), so the runs come
    from the sorted flat indices. Cost O(pixels of the instance), not O(image)."""
    idx = np.unique(xs.astype(np.int64) * height + ys.astype(np.int64))
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([idx[:1], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], idx[-1:]]) + 1
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[0:-1:2] = starts - np.concatenate([[0], ends[:-1]])  # background before each run
    counts[1::2] = ends - starts
    counts[-1] = height * width - ends[-1]  # trailing background: counts sum to H x W
    counts = counts[:-1] if counts[-1] == 0 else counts  # as pycocotools' encode writes it
    rle = mask_util.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
    return {"segmentation": rle, "bbox": [float(v) for v in bbox], "area": int(len(idx))}


def _check_ids(path: str, pages: np.ndarray) -> np.ndarray:
    """Integer (P, H, W) ids from a label array of any numeric dtype, or a DatasetError."""
    if pages.dtype == np.bool_:
        return pages.astype(np.uint8)
    if not np.issubdtype(pages.dtype, np.number) or np.issubdtype(pages.dtype, np.complexfloating):
        raise DatasetError(f"{path}: label image of dtype {pages.dtype}; expected integer ids")
    if np.issubdtype(pages.dtype, np.floating):
        if not np.isfinite(pages).all():
            raise DatasetError(f"{path}: label image contains NaN or infinite values")
        frac = pages[pages != np.round(pages)]
        if frac.size:
            raise DatasetError(
                f"{path}: float label image with fractional values (e.g. {float(frac[0]):g}); "
                "expected whole-number instance ids (0 = background), not a probability map or "
                "an intensity image"
            )
    lo, hi = (pages.min(), pages.max()) if pages.size else (0, 0)
    if lo < 0:
        raise DatasetError(f"{path}: negative ids (min {lo:g}); expected ids >= 0 (0 = background)")
    if hi > MAX_ID:
        raise DatasetError(
            f"{path}: ids up to {hi:g} exceed {MAX_ID} (uint16); relabel the instances 1..N (e.g. "
            "skimage.segmentation.relabel_sequential) and save as 16-bit"
        )
    return pages.astype(np.uint16 if hi > 255 else np.uint8)


def read_label_pages(path: str) -> np.ndarray:
    """(P, H, W) integer ids of a label image (P = 1) or a multi-page masks TIFF."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: label file not found")
    try:
        if path.lower().endswith((".tif", ".tiff")):
            array, axes = read_tiff(path)
            # Samples last (YXS) is a colour image; samples first (SYX) is what tifffile makes of
            # a 3- or 4-page stack written without photometric="minisblack": pages.
            colour = axes.endswith("S") and array.shape[-1] > 1
        else:
            array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            if array is None:
                raise ValueError("not an image or an unsupported/corrupt file")
            colour = array.ndim == 3 and array.shape[2] > 1
    except DatasetError:
        raise
    except Exception as e:  # tifffile/cv2 raise many types for corrupt files
        raise DatasetError(f"{path}: cannot read the label image: {one_line(e)}") from None
    if colour:
        raise DatasetError(
            f"{path}: colour image of shape {array.shape}; a label image holds one instance id "
            "per pixel (8/16-bit gray, 0 = background)"
        )
    if array.ndim < 2 or array.size == 0:
        raise DatasetError(f"{path}: label image of shape {array.shape}")
    return _check_ids(path, array.reshape(-1, *array.shape[-2:]))


def read_label_file(path: str, image_size: Tuple[int, int]) -> List[Instance]:
    """Instances of a label image or masks TIFF (see the module docstring) for an image of
    ``image_size`` (H, W); a DatasetError when the sizes differ."""
    pages = read_label_pages(path)
    h, w = image_size
    if pages.shape[1:] != (h, w):
        raise DatasetError(
            f"{path}: labels of size {pages.shape[1]}x{pages.shape[2]} (HxW) but the image is "
            f"{h}x{w}"
        )
    return pages_instances(pages)


def pages_instances(pages: np.ndarray) -> List[Instance]:
    """The instances of (P, H, W) label pages: one per id per page."""
    instances = []
    h, w = pages.shape[1:]
    for page in pages:
        # Column-major nonzero: flat indices x * H + y ascend, as instance_from_pixels wants.
        xs, ys = np.nonzero(page.T)
        if not len(xs):
            continue
        ids = page[ys, xs]
        order = np.argsort(ids, kind="stable")
        ids, ys, xs = ids[order], ys[order], xs[order]
        cuts = np.flatnonzero(np.diff(ids)) + 1
        for y, x in zip(np.split(ys, cuts), np.split(xs, cuts)):
            instances.append(instance_from_pixels(y, x, h, w))
    return instances


def _rings_to_pixels(rings: List[np.ndarray], height: int, width: int):
    """Pixels whose centres lie inside the rings (x, y in pixel-corner coordinates), rings combined
    even-odd; (ys, xs) or None when no pixel is covered."""
    allpts = np.concatenate(rings)
    x0, y0 = max(int(np.floor(allpts[:, 0].min())), 0), max(int(np.floor(allpts[:, 1].min())), 0)
    x1 = min(int(np.ceil(allpts[:, 0].max())), width)
    y1 = min(int(np.ceil(allpts[:, 1].max())), height)
    if x1 <= x0 or y1 <= y0:
        return None
    gy, gx = np.mgrid[y0:y1, x0:x1]
    centres = np.stack([gx.ravel() + 0.5, gy.ravel() + 0.5], axis=1)
    inside = np.zeros(len(centres), dtype=bool)
    for ring in rings:
        if len(ring) >= 3:
            inside ^= Path(ring).contains_points(centres)
    if not inside.any():
        return None
    return gy.ravel()[inside], gx.ravel()[inside]


def read_roi_file(path: str, image_size: Tuple[int, int]) -> List[Instance]:
    """Instances of an ImageJ ROI set (``.zip``) or a single ``.roi`` for an image of ``image_size``
    (H, W); see the module docstring for the conventions."""
    import roifile

    if not os.path.isfile(path):
        raise DatasetError(f"{path}: ROI file not found")
    try:
        rois = roifile.roiread(path)
    except Exception as e:  # not a zip, not ImageJ ROIs, truncated
        raise DatasetError(f"{path}: cannot read ImageJ ROIs: {one_line(e)}") from None
    rois = rois if isinstance(rois, list) else [rois]
    h, w = image_size
    instances, skipped, outside = [], [], []
    for i, roi in enumerate(rois):
        name = roi.name or f"#{i + 1}"
        kind = roi.roitype.name
        try:
            if roi.multi_coordinates is not None:  # composite ROI (ShapeRoi): holes, parts
                rings = [np.asarray(c, dtype=np.float64) for c in roi.coordinates(multi=True)]
            elif kind in AREA_ROI_TYPES:
                rings = [np.asarray(roi.coordinates(), dtype=np.float64)]
            else:
                skipped.append(f"{name} ({kind.lower()})")
                continue
        except Exception as e:
            raise DatasetError(
                f"{path}: ROI {name}: cannot read its outline: {one_line(e)}"
            ) from None
        rings = [r for r in rings if r.ndim == 2 and len(r) >= 3]
        pixels = _rings_to_pixels(rings, h, w) if rings else None
        if pixels is None:
            outside.append(name)
            continue
        instances.append(instance_from_pixels(pixels[0], pixels[1], h, w))
    if skipped:
        logger.warning(
            f"{path}: skipped ROIs without an area (lines, points): {', '.join(skipped)}"
        )
    if outside:
        logger.warning(
            f"{path}: skipped ROIs that cover no pixel of the {h}x{w} image (outside it, or "
            f"degenerate): {', '.join(outside)}"
        )
    return instances


def _read_sized(path: str, image_size: Tuple[int, int]) -> np.ndarray:
    pages = read_label_pages(path)
    if pages.shape[1:] != tuple(image_size):
        raise DatasetError(
            f"{path}: labels of size {pages.shape[1]}x{pages.shape[2]} (HxW) but the image is "
            f"{image_size[0]}x{image_size[1]}"
        )
    return pages


def _instance(mask: np.ndarray) -> Instance:
    xs, ys = np.nonzero(mask.T)  # column-major, as instance_from_pixels wants
    return instance_from_pixels(ys, xs, *mask.shape)


def read_whole_and_visible(
    masks_path: str, labels_path: str, image_size: Tuple[int, int]
) -> List[Instance]:
    """Instances with ``segmentation`` = visible part (from the label image ``labels_path``) and
    ``amodal_segmentation`` = whole outline (from the masks TIFF ``masks_path``); box and area are
    the visible part's. A whole outline that no label covers (a cell hidden entirely) is skipped
    with a warning; a label matched to two whole outlines, or reaching outside its own, is a
    DatasetError."""
    whole_pages = _read_sized(masks_path, image_size)
    labels = _read_sized(labels_path, image_size)
    if labels.shape[0] != 1:
        raise DatasetError(
            f"{labels_path}: {labels.shape[0]} pages; visible parts are one label image"
        )
    labels = labels[0]
    instances, used = [], {}
    for page in whole_pages:
        for k in np.unique(page[page > 0]):
            whole = page == k
            ids, counts = np.unique(labels[whole], return_counts=True)
            counts, ids = counts[ids > 0], ids[ids > 0]
            if not len(ids):
                logger.warning(f"{masks_path}: instance {k} has no visible part in {labels_path}")
                continue
            v = int(ids[np.argmax(counts)])
            if v in used:
                raise DatasetError(
                    f"{labels_path}: label {v} is the visible part of two whole outlines of "
                    f"{masks_path} (ids {used[v]} and {k})"
                )
            used[v] = int(k)
            visible = labels == v
            if (visible & ~whole).any():
                raise DatasetError(
                    f"{labels_path}: label {v} reaches outside its whole outline (id {k} of "
                    f"{masks_path}); a visible part lies inside its cell"
                )
            inst = _instance(visible)
            inst["amodal_segmentation"] = _instance(whole)["segmentation"]
            instances.append(inst)
    return instances


def read_annotation_file(path: str, image_size: Tuple[int, int]) -> List[Instance]:
    """Dispatch on the file name: ``.zip`` / ``.roi`` -> ROIs, TIFF/PNG -> label pages."""
    if path.lower().endswith((".zip", ".roi")):
        return read_roi_file(path, image_size)
    if path.lower().endswith(LABEL_EXTENSIONS):
        return read_label_file(path, image_size)
    raise DatasetError(f"{path}: unknown annotation format (expected {LABEL_EXTENSIONS}, .zip)")
