"""Two-channel synthetic fluorescence scenes: a cytoplasm channel where cells fill round patches
with no visible border between them, and a nuclei channel with one nucleus per cell. The nuclei
channel is what tells touching cells apart (as a DAPI stain next to a cytoplasm stain does in
Cellpose's two-channel models); the cytoplasm channel is what gives each cell its outline. A model
that sees both channels (``INPUT.CHANNELS ("cyto", "nuclei")``) can do what neither channel alone
allows (``tools/benchmark_channels.py``).

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

    Cells (radius 8-11 px per scene) sit in 2-4 patches: a round patch of 1-6 cells, each pixel of
    the patch owned by the nearest cell centre (a Voronoi partition), so that neighbours share a
    straight border inside a convex outline. The cytoplasm of every cell has nearly the same
    brightness (+-3 %) under one smooth texture: a patch looks like one object there. Each nucleus
    is an ellipse around its cell's centre, inside its cell, of its own brightness."""
    rng = np.random.default_rng(seed)
    h, w = size
    radius = rng.uniform(8, 11)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = np.zeros((h, w), np.int32)
    centres: list = []
    for _ in range(int(rng.integers(2, 5))):
        patch = radius * rng.uniform(1.0, 2.6)
        cy, cx = rng.uniform(patch, h - patch), rng.uniform(patch, w - patch)
        points: list = []
        for _ in range(200):  # centres at least 1.6 radii apart, inside the patch
            a, d = rng.uniform(0, 2 * np.pi), (patch - 0.6 * radius) * np.sqrt(rng.uniform())
            y, x = cy + d * np.sin(a), cx + d * np.cos(a)
            if all(np.hypot(y - p, x - q) >= 1.6 * radius for p, q in points):
                points.append((y, x))
        free = labels == 0
        dist = np.stack([np.hypot(yy - y, xx - x) for y, x in points])
        inside = (np.hypot(yy - cy, xx - cx) < patch) & free & (dist.min(0) < 2.4 * radius)
        if inside.sum() < np.pi * radius**2 * 0.5 * len(points):
            continue  # a patch mostly on another: drop it
        owner = dist.argmin(0)
        for k in range(len(points)):
            cell = inside & (owner == k)
            if cell.sum() >= 0.3 * np.pi * radius**2:
                centres.append(points[k])
                labels[cell] = len(centres)
    texture = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 2)
    cyto = np.zeros((h, w), np.float32)
    nuclei = np.zeros((h, w), np.float32)
    for i, (y, x) in enumerate(centres):
        cell = labels == i + 1
        cyto[cell] = rng.uniform(0.97, 1.03)
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
