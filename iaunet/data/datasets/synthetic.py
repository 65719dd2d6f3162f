"""Deterministic synthetic microscopy scenes: the project's default, download-free dataset.

Each scene is a dark, unevenly lit field with textured cells (irregular blobs with a nucleus), some
touching and some overlapping (overlaps add up, as in brightfield/cytology images), blurred and
noisy. Annotations are full (overlapping) cell polygons in COCO JSON, and each cell is drawn on
exactly the pixels its polygon covers in the COCO convention (pixel (i, j) spans [j, j+1) x [i,
i+1)), the pixels pycocotools and detectron2 give its annotation. Written once under
``$DETECTRON2_DATASETS/synthetic_cells[16]/<split>/`` (default root ``./datasets``).

``synthetic_occluded_{train,val}`` (:func:`render_occluded_scene`, under
``synthetic_occluded/<split>/``) stack the cells in a depth order instead: a cell on top hides what
lies under it (mostly or fully: ``OCCLUSION_OPACITY``), and each annotation has both truths, its
visible part as ``segmentation`` (RLE: the whole cell minus the cells above it) and its whole
outline as ``amodal_segmentation`` (polygon), plus its ``depth`` (0 = bottom) (docs/amodal.md).

``synthetic_nuclei_{train,val}`` (:func:`render_nuclei_scene`, under ``synthetic_nuclei/<split>/``)
are fluorescent-nuclei-like fields instead: elongated, evenly filled nuclei of very different
brightness (some dim, some out of focus, a few small and bright as in mitosis), packed edge to edge
without overlapping, at a size and density drawn per scene. The starting model for your own images
(``configs/synthetic/iaunet_start.yaml``) trains on them next to the cells, so that it has seen more
than one kind of microscopy (docs/own_images.md, "Starting model").
"""

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import polygons_to_bitmask

from .common import AMODAL_FIELD, DATASET_FILES, datasets_root

logger = logging.getLogger(__name__)

# 2: cells drawn on their annotation's pixels. 1 drew them with OpenCV, half a pixel off and a
# pixel wider than their masks (IoU 0.82 for the smallest cells; flips mirrored the offset).
GENERATOR_VERSION = 2
# name -> (split seed, number of images, bit depth)
SPLITS = {
    "synthetic_cells_train": (0, 256, 8),
    "synthetic_cells_val": (1, 32, 8),
    "synthetic_cells16_train": (0, 256, 16),
    "synthetic_cells16_val": (1, 32, 16),
}
IMAGE_SIZE = (128, 128)
# The occluded scenes: name -> (split seed, number of images); 8-bit.
OCCLUDED_SPLITS = {"synthetic_occluded_train": (10, 256), "synthetic_occluded_val": (11, 32)}
OCCLUDED_VERSION = 1
# The nuclei fields: name -> (split seed, number of images); 8-bit.
NUCLEI_SPLITS = {"synthetic_nuclei_train": (20, 128), "synthetic_nuclei_val": (21, 32)}
NUCLEI_VERSION = 1
# At most this many nuclei per 128-px field: the quick model's 20 queries (above that, a scene would
# teach it to drop objects).
MAX_NUCLEI = 18
# How much of what lies under a cell it hides: 1 = fully (opaque cells), below 1 = mostly (a faint
# trace of the hidden part shows through).
OCCLUSION_OPACITY = 0.85
# Placement keeps at least this share of every cell visible and lets centres come this close
# (x the sum of the radii): deep overlaps, but no cell vanishes under others.
MIN_VISIBLE = 0.25
MIN_CENTRE_DISTANCE = 0.3
# Share of cells placed on top of a cell placed before (the rest anywhere in the field).
OVERLAP_SHARE = 0.5


def _blob_polygon(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    n: int = 32,
    aspect: Tuple[float, float] = (0.6, 1.0),
) -> np.ndarray:
    """Closed irregular blob around (cx, cy): an ellipse (minor/major axis drawn from ``aspect``)
    whose radius is modulated by low harmonics."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    aspect = rng.uniform(*aspect)
    angle = rng.uniform(0, np.pi)
    r = np.ones_like(t)
    for k in (2, 3, 4):
        r += rng.uniform(0, 0.08) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    x, y = radius * r * np.cos(t), radius * aspect * r * np.sin(t)
    xr = x * np.cos(angle) - y * np.sin(angle) + cx
    yr = x * np.sin(angle) + y * np.cos(angle) + cy
    return np.stack([xr, yr], 1)


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], sigma: float) -> np.ndarray:
    n = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return n / (n.std() + 1e-6)


def _field(rng: np.random.Generator, size: Tuple[int, int]):
    """A scene's pixel grid (yy, xx), its uneven illumination (a gradient and slow noise) and its
    background (dim, textured), drawn from ``rng`` in this order. Returns (yy, xx, illumination,
    background)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-1, 1, 2)
    illumination = (
        1.0
        + 0.25 * (gx * (xx / w - 0.5) + gy * (yy / h - 0.5))
        + 0.05 * _smooth_noise(rng, (h, w), 16)
    )
    return yy, xx, illumination, 0.08 + 0.03 * _smooth_noise(rng, (h, w), 4)


def _scene_layers(seed: int, size: Tuple[int, int]):
    """A scene before it is composed: (rng, illumination, background, cell polygons, each cell's
    own signal), drawn from ``seed`` in the order :func:`render_scene` always drew them."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx, illumination, background = _field(rng, size)
    polygons: List[np.ndarray] = []
    contents: List[np.ndarray] = []
    centers: List[Tuple[float, float, float]] = []
    for _ in range(rng.integers(4, 13)):
        radius = rng.uniform(6, 16)
        for _attempt in range(20):
            cx, cy = (
                rng.uniform(radius * 0.5, w - radius * 0.5),
                rng.uniform(radius * 0.5, h - radius * 0.5),
            )
            # Allow touching and moderate overlap, not cells hidden inside others.
            if all(np.hypot(cx - ox, cy - oy) > 0.6 * (radius + orad) for ox, oy, orad in centers):
                break
        else:
            continue
        centers.append((cx, cy, radius))
        poly = np.clip(_blob_polygon(rng, cx, cy, radius), 0, [w, h]).round(2)
        mask = polygons_to_bitmask([poly.ravel()], h, w).astype(np.uint8)
        if mask.sum() < 12:
            continue
        contents.append(_cell_content(rng, mask, cx, cy, radius))
        polygons.append(poly)
    return rng, illumination, background, polygons, contents


def render_scene(
    seed: int, size: Tuple[int, int] = IMAGE_SIZE
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Render one scene. Returns a float image in [0, 1] of ``size`` (H, W) and the cell polygons
    (P, 2 in x, y; clipped to the image and rounded to 0.01 px, as annotated); each cell is drawn
    on ``polygons_to_bitmask([poly.ravel()], H, W)``, the pixels of its annotation."""
    rng, illumination, image, polygons, contents = _scene_layers(seed, size)
    for content in contents:
        image += content  # in place: float32, as it always was
    image = cv2.GaussianBlur(image * illumination, (0, 0), rng.uniform(0.5, 1.2))
    image = image + rng.normal(0, 0.02, image.shape)
    return np.clip(image, 0, 1).astype(np.float32), polygons


def render_scene_stack(
    seed: int,
    planes: int = 9,
    span: Tuple[int, int] = (3, 5),
    size: Tuple[int, int] = IMAGE_SIZE,
) -> Tuple[np.ndarray, List[np.ndarray], List[Tuple[int, int]]]:
    """A z-stack of the scene of ``seed``: each cell in ``span`` (min, max) consecutive planes,
    absent from the others (the scene's background there); noise drawn per plane. Returns the
    (planes, H, W) float stack in [0, 1], the cell polygons and each cell's (first, last) plane."""
    rng, illumination, background, polygons, contents = _scene_layers(seed, size)
    sigma = rng.uniform(0.5, 1.2)
    ranges = []
    for _ in polygons:
        n = int(rng.integers(span[0], span[1] + 1))
        first = int(rng.integers(0, planes - n + 1))
        ranges.append((first, first + n - 1))
    stack = np.empty((planes, *size), np.float32)
    for k in range(planes):
        image = background.copy()
        for content in (c for c, (a, b) in zip(contents, ranges) if a <= k <= b):
            image += content
        image = cv2.GaussianBlur(image * illumination, (0, 0), sigma)
        stack[k] = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    return stack, polygons, ranges


def _cell_content(
    rng: np.random.Generator, mask: np.ndarray, cx: float, cy: float, radius: float
) -> np.ndarray:
    """A cell's own signal on its ``mask`` (H, W uint8): textured body, bright membrane (its
    outermost pixels), nucleus."""
    h, w = mask.shape
    texture = 1.0 + 0.15 * _smooth_noise(rng, (h, w), 1.5)
    cell = mask.astype(np.float32) * rng.uniform(0.25, 0.45) * texture
    edge = (mask - cv2.erode(mask, np.ones((3, 3), np.uint8))).astype(np.float32)
    nucleus = np.zeros((h, w), np.uint8)
    ncx, ncy = cx + rng.uniform(-0.2, 0.2) * radius, cy + rng.uniform(-0.2, 0.2) * radius
    cv2.ellipse(
        nucleus,
        (int(ncx), int(ncy)),
        (max(2, int(radius * 0.35)), max(2, int(radius * 0.28))),
        rng.uniform(0, 180),
        0,
        360,
        1,
        -1,
    )
    return cell + 0.15 * edge + 0.2 * (nucleus & mask)


def render_nuclei_scene(
    seed: int, size: Tuple[int, int] = IMAGE_SIZE
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Render one fluorescent-nuclei-like field. Returns a float image in [0, 1] of ``size`` (H, W)
    and the nucleus polygons (P, 2 in x, y, as annotated), which do not overlap: each nucleus is
    drawn on ``polygons_to_bitmask([poly.ravel()], H, W)``; no pixel belongs to two of them."""
    rng = np.random.default_rng(seed)
    h, w = size
    _, _, illumination, background = _field(rng, size)
    image = background * rng.uniform(0.5, 1.5)
    typical = rng.uniform(6, 13)  # this field's nucleus radius
    coverage = rng.uniform(0.15, 0.5)  # its density: share of the field covered
    wanted = min(MAX_NUCLEI, max(3, int(coverage * h * w / (np.pi * typical**2 * 0.75))))
    occupied = np.zeros((h, w), bool)
    polygons: List[np.ndarray] = []
    for _ in range(wanted):
        mitotic = rng.uniform() < 0.05  # small, condensed, bright
        radius = typical * (rng.uniform(0.45, 0.6) if mitotic else rng.uniform(0.75, 1.3))
        for _attempt in range(30):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            poly = np.clip(_blob_polygon(rng, cx, cy, radius, aspect=(0.45, 0.95)), 0, [w, h])
            poly = poly.round(2)
            mask = polygons_to_bitmask([poly.ravel()], h, w)
            # packed edge to edge (dilated by one pixel: touching, never sharing a pixel)
            grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            if mask.sum() >= 12 and not (grown & occupied).any():
                break
        else:
            continue
        occupied |= mask
        # evenly filled, slightly brighter inside, fine chromatin texture; brightness varies a lot
        # between nuclei (log-uniform), as do their focus and the mitotic ones' brightness
        brightness = (
            rng.uniform(0.5, 0.9) if mitotic else np.exp(rng.uniform(np.log(0.06), np.log(0.6)))
        )
        inner = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
        profile = 0.8 + 0.2 * np.minimum(inner / max(1.0, 0.5 * radius), 1.0)
        texture = 1.0 + rng.uniform(0.05, 0.2) * _smooth_noise(rng, (h, w), rng.uniform(0.8, 2.0))
        nucleus = mask * brightness * profile * texture
        if rng.uniform() < 0.3:  # out of focus: its own blur, fading its edge
            nucleus = cv2.GaussianBlur(nucleus.astype(np.float32), (0, 0), rng.uniform(0.8, 2.0))
        image = image + nucleus
        polygons.append(poly)
    image = cv2.GaussianBlur(
        (image * illumination).astype(np.float32), (0, 0), rng.uniform(0.5, 1.2)
    )
    image = image + rng.normal(0, rng.uniform(0.005, 0.03), image.shape)
    return np.clip(image, 0, 1).astype(np.float32), polygons


def render_occluded_scene(
    seed: int, size: Tuple[int, int] = IMAGE_SIZE, opacity: float = OCCLUSION_OPACITY
) -> Tuple[np.ndarray, List[np.ndarray], List[np.ndarray]]:
    """Render one scene of cells stacked in depth order (first = bottom).

    Returns a float image in [0, 1] of ``size`` (H, W), the whole-cell polygons (P, 2 in x, y,
    as annotated) and the visible masks (H, W bool): each whole mask,
    ``polygons_to_bitmask([poly.ravel()], H, W)``, minus the whole masks of the cells above it. A
    cell on top replaces ``opacity`` of what lies under it by its own content."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx, illumination, background = _field(rng, size)
    image = background.copy()
    polygons: List[np.ndarray] = []
    whole: List[np.ndarray] = []
    centres: List[Tuple[float, float, float]] = []
    for _ in range(rng.integers(4, 13)):
        radius = rng.uniform(6, 16)
        for _attempt in range(20):
            if centres and rng.uniform() < OVERLAP_SHARE:  # on top of a cell placed before
                ox, oy, orad = centres[rng.integers(len(centres))]
                angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 0.9) * (radius + orad)
                cx, cy = ox + dist * np.cos(angle), oy + dist * np.sin(angle)
            else:
                cx = rng.uniform(radius * 0.5, w - radius * 0.5)
                cy = rng.uniform(radius * 0.5, h - radius * 0.5)
            poly = np.clip(_blob_polygon(rng, cx, cy, radius), 0, [w, h]).round(2)
            mask = polygons_to_bitmask([poly.ravel()], h, w)
            if mask.sum() < 12:
                continue
            centres_ok = all(
                np.hypot(cx - ox, cy - oy) > MIN_CENTRE_DISTANCE * (radius + orad)
                for ox, oy, orad in centres
            )
            # every cell below keeps MIN_VISIBLE of itself once this one lies on top
            visible_ok = all(
                (m & ~mask & ~_above(whole, i)).sum() >= MIN_VISIBLE * m.sum()
                for i, m in enumerate(whole)
            )
            if centres_ok and visible_ok:
                break
        else:
            continue
        content = _cell_content(rng, mask.astype(np.uint8), cx, cy, radius)
        image = np.where(mask, (1 - opacity) * image + opacity * background + content, image)
        polygons.append(poly)
        whole.append(mask)
        centres.append((cx, cy, radius))
    image = cv2.GaussianBlur(image * illumination, (0, 0), rng.uniform(0.5, 1.2))
    image = image + rng.normal(0, 0.02, image.shape)
    visible = [m & ~_above(whole, i) for i, m in enumerate(whole)]
    return np.clip(image, 0, 1).astype(np.float32), polygons, visible


def _above(masks: List[np.ndarray], i: int) -> np.ndarray:
    """The union of ``masks[i + 1:]`` (the cells above cell i), (H, W) bool."""
    out = np.zeros_like(masks[i])
    for m in masks[i + 1 :]:
        out |= m
    return out


def _write_split(out_dir: str, seed: int, num_images: int, bit_depth: int, kind: str) -> None:
    images, annotations = [], []
    ext = ".png" if bit_depth == 8 else ".tif"
    os.makedirs(os.path.join(out_dir, "images"))
    for i in range(num_images):
        if kind == "occluded":
            image, polygons, visible = render_occluded_scene(seed * 1_000_003 + i)
        else:
            render = render_nuclei_scene if kind == "nuclei" else render_scene
            (image, polygons), visible = render(seed * 1_000_003 + i), None
        name = f"cell_{i:04d}{ext}"
        path = os.path.join(out_dir, "images", name)
        if bit_depth == 8:
            cv2.imwrite(path, np.round(image * 255).astype(np.uint8))
        else:
            import tifffile

            # 16-bit camera-like range: offset and a gain that varies per image.
            gain = 20000 + 20000 * ((i * 7919) % 97) / 97
            tifffile.imwrite(path, np.round(500 + image * gain).astype(np.uint16))
        h, w = image.shape
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for depth, poly in enumerate(polygons):
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            ann = {
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": 1,
                "segmentation": [poly.flatten().tolist()],
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(cv2.contourArea(poly.astype(np.float32))),
                "iscrowd": 0,
            }
            if visible is not None:  # visible part = segmentation, whole cell = amodal
                rle = mask_util.encode(np.asfortranarray(visible[depth].astype(np.uint8)))
                ann["amodal_segmentation"] = ann["segmentation"]
                ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                ann["bbox"] = mask_util.toBbox(rle).tolist()
                ann["area"] = float(mask_util.area(rle))
                ann["depth"] = depth
            annotations.append(ann)
    info = {"generator_version": VERSIONS[kind], "seed": seed, "bit_depth": bit_depth}
    if kind == "occluded":
        info["occlusion_opacity"] = OCCLUSION_OPACITY
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cell"}],
        "info": info,
    }
    with open(os.path.join(out_dir, "annotations.json"), "w") as f:
        json.dump(coco, f)


# scene kind -> (generator version, folder under the datasets root)
VERSIONS = {"cells": GENERATOR_VERSION, "occluded": OCCLUDED_VERSION, "nuclei": NUCLEI_VERSION}


def _spec(name: str) -> Tuple[int, int, int, str]:
    """(seed, number of images, bit depth, scene kind) of split ``name``."""
    if name in OCCLUDED_SPLITS:
        return (*OCCLUDED_SPLITS[name], 8, "occluded")
    if name in NUCLEI_SPLITS:
        return (*NUCLEI_SPLITS[name], 8, "nuclei")
    return (*SPLITS[name], "cells")


def split_dir(name: str) -> str:
    """The folder of split ``name``, relative to the datasets root."""
    _, _, bit_depth, kind = _spec(name)
    base = (
        f"synthetic_cells{'' if bit_depth == 8 else 16}" if kind == "cells" else f"synthetic_{kind}"
    )
    return os.path.join(base, name.rsplit("_", 1)[1])


def ensure_split(root: str, name: str) -> str:
    """Generate split ``name`` under ``root`` unless an up-to-date copy exists; returns its folder.

    The split is written to a temporary folder and renamed into place, so concurrent processes (DDP
    workers) and interrupted runs never see a half-written dataset.
    """
    seed, num_images, bit_depth, kind = _spec(name)
    version = VERSIONS[kind]
    out_dir = os.path.join(root, split_dir(name))
    json_file = os.path.join(out_dir, "annotations.json")
    if os.path.isfile(json_file):
        with open(json_file) as f:
            info = json.load(f).get("info", {})
        if info.get("generator_version") == version and info.get("seed") == seed:
            return out_dir
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    logger.info(f"Generating {name} ({num_images} images, {bit_depth}-bit) under {out_dir}")
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=os.path.dirname(out_dir))
    try:
        _write_split(os.path.join(tmp, "split"), seed, num_images, bit_depth, kind)
        try:
            os.rename(os.path.join(tmp, "split"), out_dir)
        except OSError:
            if not os.path.isfile(json_file):  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_synthetic(name: str) -> List[Dict]:
    out_dir = ensure_split(datasets_root(), name)
    return load_coco_json(
        os.path.join(out_dir, "annotations.json"),
        os.path.join(out_dir, "images"),
        name,
        extra_annotation_keys=[AMODAL_FIELD, "depth"],
    )


def register_all_synthetic() -> None:
    for name in (*SPLITS, *OCCLUDED_SPLITS, *NUCLEI_SPLITS):
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda name=name: load_synthetic(name))
        DATASET_FILES[name] = (os.path.join(split_dir(name), "annotations.json"),)
        # one class ("cell") for every kind: the quick config trains on cells and nuclei together
        MetadataCatalog.get(name).set(thing_classes=["cell"], evaluator_type="coco", synthetic=True)


register_all_synthetic()
