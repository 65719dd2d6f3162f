"""Deterministic synthetic microscopy scenes: the project's default, download-free dataset.

Each scene is a dark, unevenly lit field with textured cells (irregular blobs with a nucleus), some
touching and some overlapping (overlaps add up, as in brightfield/cytology images), blurred and
noisy. Annotations are full (overlapping) cell polygons in COCO JSON, and each cell is drawn on
exactly the pixels its polygon covers in the COCO convention (pixel (i, j) spans [j, j+1) x [i,
i+1)), the pixels pycocotools and detectron2 give its annotation. Written once under
``$DETECTRON2_DATASETS/synthetic_cells[16]/<split>/`` (default root ``./datasets``).
"""

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, List, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import polygons_to_bitmask

from .common import DATASET_FILES, datasets_root

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


def _blob_polygon(
    rng: np.random.Generator, cx: float, cy: float, radius: float, n: int = 32
) -> np.ndarray:
    """Closed irregular blob around (cx, cy): an ellipse whose radius is modulated by low
    harmonics."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    aspect = rng.uniform(0.6, 1.0)
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


def render_scene(
    seed: int, size: Tuple[int, int] = IMAGE_SIZE
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Render one scene. Returns a float image in [0, 1] of ``size`` (H, W) and the cell polygons
    (P, 2 in x, y; clipped to the image and rounded to 0.01 px, as annotated); each cell is drawn
    on ``polygons_to_bitmask([poly.ravel()], H, W)``, the pixels of its annotation."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-1, 1, 2)
    illumination = (
        1.0
        + 0.25 * (gx * (xx / w - 0.5) + gy * (yy / h - 0.5))
        + 0.05 * _smooth_noise(rng, (h, w), 16)
    )
    image = 0.08 + 0.03 * _smooth_noise(rng, (h, w), 4)
    polygons: List[np.ndarray] = []
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
        texture = 1.0 + 0.15 * _smooth_noise(rng, (h, w), 1.5)
        cell = mask.astype(np.float32) * rng.uniform(0.25, 0.45) * texture
        # The bright membrane is the cell's own outermost pixels.
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
        image += cell + 0.15 * edge + 0.2 * (nucleus & mask)
        polygons.append(poly)
    image = cv2.GaussianBlur(image * illumination, (0, 0), rng.uniform(0.5, 1.2))
    image = image + rng.normal(0, 0.02, image.shape)
    return np.clip(image, 0, 1).astype(np.float32), polygons


def _write_split(out_dir: str, seed: int, num_images: int, bit_depth: int) -> None:
    images, annotations = [], []
    ext = ".png" if bit_depth == 8 else ".tif"
    os.makedirs(os.path.join(out_dir, "images"))
    for i in range(num_images):
        image, polygons = render_scene(seed * 1_000_003 + i)
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
        for poly in polygons:
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "segmentation": [poly.flatten().tolist()],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(cv2.contourArea(poly.astype(np.float32))),
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cell"}],
        "info": {"generator_version": GENERATOR_VERSION, "seed": seed, "bit_depth": bit_depth},
    }
    with open(os.path.join(out_dir, "annotations.json"), "w") as f:
        json.dump(coco, f)


def split_dir(name: str) -> str:
    """The folder of split ``name``, relative to the datasets root."""
    base = "synthetic_cells" if SPLITS[name][2] == 8 else "synthetic_cells16"
    return os.path.join(base, name.rsplit("_", 1)[1])


def ensure_split(root: str, name: str) -> str:
    """Generate split ``name`` under ``root`` unless an up-to-date copy exists; returns its folder.

    The split is written to a temporary folder and renamed into place, so concurrent processes (DDP
    workers) and interrupted runs never see a half-written dataset.
    """
    seed, num_images, bit_depth = SPLITS[name]
    out_dir = os.path.join(root, split_dir(name))
    json_file = os.path.join(out_dir, "annotations.json")
    if os.path.isfile(json_file):
        with open(json_file) as f:
            info = json.load(f).get("info", {})
        if info.get("generator_version") == GENERATOR_VERSION and info.get("seed") == seed:
            return out_dir
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    logger.info(f"Generating {name} ({num_images} images, {bit_depth}-bit) under {out_dir}")
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=os.path.dirname(out_dir))
    try:
        _write_split(os.path.join(tmp, "split"), seed, num_images, bit_depth)
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
        os.path.join(out_dir, "annotations.json"), os.path.join(out_dir, "images"), name
    )


def register_all_synthetic() -> None:
    for name in SPLITS:
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda name=name: load_synthetic(name))
        DATASET_FILES[name] = (os.path.join(split_dir(name), "annotations.json"),)
        MetadataCatalog.get(name).set(thing_classes=["cell"], evaluator_type="coco", synthetic=True)


register_all_synthetic()
