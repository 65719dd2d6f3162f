"""Two-channel synthetic fluorescence scenes: a cytoplasm channel where cells touch in clusters with
no visible border between them, and a nuclei channel with one nucleus per cell. The nuclei channel
is what tells touching cells apart (as a DAPI stain next to a cytoplasm stain does in Cellpose's
two-channel models); the cytoplasm channel is what gives each cell its outline. A model that sees
both channels (``INPUT.CHANNELS ("cyto", "nuclei")``) can do what neither channel alone allows
(``tools/benchmark_channels.py``).

Scenes are written as OME-TIFF ``CYX`` files with their channel names and ``<stem>_labels.tif``
label images: the folder layout ``folder:PATH`` datasets and ``iaunet-predict`` read.
"""

import os
from typing import Tuple

import cv2
import numpy as np

from ...utils.atomic import atomic_write

CHANNEL_NAMES = ("cyto", "nuclei")


def render_two_channel_scene(
    seed: int, size: Tuple[int, int] = (128, 128)
) -> Tuple[np.ndarray, np.ndarray]:
    """((2, H, W) uint16 image: cytoplasm, nuclei; (H, W) int32 labels) of scene ``seed``.

    Cells are clusters of 2-5 touching cells of one radius (9-13 px) per scene, each pixel owned
    by the nearest cell centre (a Voronoi partition of the discs): neighbours share a straight
    border. The cytoplasm of every cell has nearly the same brightness (+-7 %) under one smooth
    texture, so the border between touching cells is not visible; each nucleus is an ellipse
    around its cell's centre, inside its cell, of its own brightness."""
    rng = np.random.default_rng(seed)
    h, w = size
    radius = rng.uniform(9, 13)
    centres = []
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
        for j in range(int(rng.integers(2, 6))):
            d, a = (rng.uniform(1.35, 1.6) * radius * np.sqrt(j) if j else 0.0), rng.uniform(0, 7)
            y, x = cy + d * np.sin(a), cx + d * np.cos(a)
            near = any(np.hypot(y - p, x - q) < 1.3 * radius for p, q in centres)
            if 0 <= y < h and 0 <= x < w and not near:
                centres.append((y, x))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.stack([np.hypot(yy - y, xx - x) for y, x in centres])
    wobble = 1 + 0.12 * cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 4)
    owner, inside = dist.argmin(0), dist.min(0) < radius * wobble
    labels = np.where(inside, owner + 1, 0).astype(np.int32)
    texture = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 2)
    cyto = np.zeros((h, w), np.float32)
    nuclei = np.zeros((h, w), np.float32)
    for i, (y, x) in enumerate(centres):
        cell = labels == i + 1
        cyto[cell] = rng.uniform(0.93, 1.07)
        ry, rx = radius * rng.uniform(0.3, 0.45, size=2)
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        u, v = (xx - x) * c + (yy - y) * s, -(xx - x) * s + (yy - y) * c
        nuclei[cell & ((u / rx) ** 2 + (v / ry) ** 2 <= 1)] = rng.uniform(0.4, 1.0)
    cyto = cv2.GaussianBlur(cyto * (1 + 0.15 * texture), (0, 0), 1.2)
    nuclei = cv2.GaussianBlur(nuclei, (0, 0), 1.0)
    image = np.stack([0.08 + cyto, 0.05 + nuclei]) * np.array([3000.0, 1200.0])[:, None, None]
    image += rng.normal(0, 40.0, image.shape)
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def write_two_channel_folder(folder: str, seed: int, count: int, size=(128, 128)) -> None:
    """``count`` scenes (seeds ``seed`` ...) as ``scene_NNN.tif`` (OME-TIFF ``CYX``, channels
    named :data:`CHANNEL_NAMES`) and ``scene_NNN_labels.tif`` in ``folder``."""
    import tifffile

    os.makedirs(folder, exist_ok=True)
    meta = {"axes": "CYX", "Channel": {"Name": list(CHANNEL_NAMES)}}
    for k in range(count):
        image, labels = render_two_channel_scene(seed + k, size)
        stem = os.path.join(folder, f"scene_{k:03d}")
        atomic_write(f"{stem}.tif", lambda f: tifffile.imwrite(f, image, ome=True, metadata=meta))
        atomic_write(f"{stem}_labels.tif", lambda f: tifffile.imwrite(f, labels))
