"""Annotated folders as users make them (Fiji, napari, COCO tools), written by the tests.

Objects are random convex polygons with vertices in ImageJ's pixel-corner coordinates; their
masks are the pixels whose centres lie inside, computed with OpenCV's ``pointPolygonTest`` (not
the code under test). Some pairs of objects overlap, so that overlap-preserving formats can be
told apart from flattened ones.
"""

import json
import os
from typing import List, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
import roifile
import tifffile


def polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    """A convex 10-gon (10, 2) x, y around (cx, cy), radius r +- 20 %."""
    t = np.sort(rng.uniform(0, 2 * np.pi, 10))
    rad = r * rng.uniform(0.8, 1.2, 10)
    pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1)
    hull = cv2.convexHull(pts.astype(np.float32))[:, 0]
    return hull.astype(np.float64)


def rasterize(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """bool (h, w): pixels whose centre (x + 0.5, y + 0.5) is strictly inside ``poly``."""
    mask = np.zeros((h, w), bool)
    contour = poly.astype(np.float32).reshape(-1, 1, 2)
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int)
    for y in range(max(y0, 0), min(y1, h)):
        for x in range(max(x0, 0), min(x1, w)):
            mask[y, x] = cv2.pointPolygonTest(contour, (x + 0.5, y + 0.5), False) > 0
    return mask


def scene(seed: int, size: Tuple[int, int] = (96, 96), n: int = 6):
    """A 16-bit image with ``n`` objects (the last two overlap) -> (image, polygons, masks)."""
    rng = np.random.default_rng(seed)
    h, w = size
    polys = []
    for i in range(n):
        if i == n - 1:  # overlaps the previous object
            cx, cy = polys[-1].mean(0) + rng.uniform(4, 6, 2)
        else:
            cx, cy = rng.uniform(12, w - 12), rng.uniform(12, h - 12)
        polys.append(polygon(rng, cx, cy, rng.uniform(6, 9)))
    masks = [rasterize(p, h, w) for p in polys]
    image = 300 + rng.normal(0, 20, (h, w))
    for m in masks:
        image += 1500 * m
    return np.clip(image, 0, 65535).astype(np.uint16), polys, masks


def label_image(masks: List[np.ndarray]) -> np.ndarray:
    """Flattened uint16 label image (a later object overwrites an earlier one)."""
    lab = np.zeros(masks[0].shape, np.uint16)
    for i, m in enumerate(masks, 1):
        lab[m] = i
    return lab


def masks_pages(masks: List[np.ndarray]) -> np.ndarray:
    """(P, H, W) uint16: each object keeps its id on the first page where it overlaps nothing."""
    pages: List[np.ndarray] = []
    for i, m in enumerate(masks, 1):
        for page in pages:
            if not page[m].any():
                page[m] = i
                break
        else:
            pages.append(np.where(m, i, 0).astype(np.uint16))
    return np.stack(pages)


def write_rois(path: str, polys: List[np.ndarray]) -> None:
    rois = [roifile.ImagejRoi.frompoints(p, name=f"cell{i}") for i, p in enumerate(polys, 1)]
    roifile.roiwrite(path, rois, mode="w")


def write_folder(root: str, kind: str, seeds, size=(96, 96)) -> List[List[np.ndarray]]:
    """Write images and annotations of ``kind`` ("labels" | "masks" | "rois" | "subfolders" |
    "coco") to ``root``; returns the objects' masks per image (what the reader must give back)."""
    os.makedirs(root, exist_ok=True)
    expected, coco = (
        [],
        {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]},
    )
    image_dir = os.path.join(root, "images") if kind == "subfolders" else root
    os.makedirs(image_dir, exist_ok=True)
    for k, seed in enumerate(seeds):
        image, polys, masks = scene(seed, size)
        stem = f"img{k:02d}"
        tifffile.imwrite(os.path.join(image_dir, f"{stem}.tif"), image)
        if kind == "labels":
            lab = label_image(masks)
            tifffile.imwrite(os.path.join(root, f"{stem}_labels.tif"), lab)
            masks = [lab == i for i in range(1, len(masks) + 1)]
            masks = [m for m in masks if m.any()]
        elif kind == "masks":
            tifffile.imwrite(os.path.join(root, f"{stem}_masks.tif"), masks_pages(masks))
        elif kind == "rois":
            write_rois(os.path.join(root, f"{stem}_rois.zip"), polys)
        elif kind == "subfolders":
            os.makedirs(os.path.join(root, "masks"), exist_ok=True)
            # the image's own name in masks/ (a PNG for the first image: any label format)
            name = f"{stem}.png" if k == 0 else f"{stem}.tif"
            cv2.imwrite(os.path.join(root, "masks", name), label_image(masks))
            masks = [label_image(masks) == i for i in range(1, len(masks) + 1)]
            masks = [m for m in masks if m.any()]
        elif kind == "coco":
            coco["images"].append(
                {"id": k + 1, "file_name": f"{stem}.tif", "height": size[0], "width": size[1]}
            )
            for m in masks:
                rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": k + 1,
                        "category_id": 1,
                        "segmentation": dict(rle, counts=rle["counts"].decode()),
                        "bbox": mask_util.toBbox(rle).tolist(),
                        "area": float(mask_util.area(rle)),
                        "iscrowd": 0,
                    }
                )
        else:
            raise ValueError(kind)
        expected.append(masks)
    if kind == "coco":
        with open(os.path.join(root, "annotations.json"), "w") as f:
            json.dump(coco, f)
    return expected
