"""Boxes as (M, 4) int arrays y0, x0, y1, x1 (exclusive), the layout of tiles, blocks and mask
crops."""

from typing import Tuple

import numpy as np


def box_hits(boxes: np.ndarray, box: Tuple[int, int, int, int]) -> np.ndarray:
    """Indices of the (M, 4) y0, x0, y1, x1 ``boxes`` that intersect ``box``."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    hit = (
        (boxes[:, 0] < box[2])
        & (boxes[:, 2] > box[0])
        & (boxes[:, 1] < box[3])
        & (boxes[:, 3] > box[1])
    )
    return np.flatnonzero(hit)
