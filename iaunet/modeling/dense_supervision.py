"""Dense auxiliary supervision of the pixel embedding E (a training aid, beyond the thesis).

IAUNet's pixel decoder learns only through the masks of matched queries (thesis §3.6): on a handful
of images that is a few dozen masks per step, and every pixel outside them is "background" only by
omission. A linear probe on E (a 1x1 convolution, :class:`DenseHead`) predicts for every pixel

* foreground: inside any object;
* centre-ness: the distance to the object's border, divided by the object's largest such distance
  (1 at the centre, falling to 0 at the border and outside; StarDist's object probability,
  Cellpose's notion of an object as a basin around a centre),

and :func:`dense_loss` scores both with BCE. Since a query's mask is a linear function of E
(``mask_embed(q) . E``), a direction of E that separates objects from background and centres from
borders is what every query's mask is built from. The probe is not used at inference: outputs,
exports and FLOPs are those of the model without it (``MODEL.IAUNET.DENSE_WEIGHT 0`` builds no
probe at all).
"""

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class DenseHead(nn.Module):
    """1x1 convolution E (B, D, h, w) -> (B, 2, h, w) logits: foreground, centre-ness."""

    def __init__(self, mask_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(mask_dim, 2, 1)

    def forward(self, mask_features: torch.Tensor) -> torch.Tensor:
        return self.proj(mask_features)


def _centreness(masks: torch.Tensor, steps: int) -> torch.Tensor:
    """(T, h, w) binary masks -> inner distance (erosions survived, up to ``steps``) / its max per
    mask."""
    dist = torch.zeros_like(masks)
    m = masks
    for _ in range(steps):
        dist = dist + m
        m = -F.max_pool2d(-m[:, None], 3, 1, 1)[:, 0]  # erosion by a 3x3 square
        if not bool(m.any()):
            break
    peak = dist.flatten(1).amax(1).clamp(min=1)[:, None, None]
    return dist / peak


def dense_targets(
    gt_masks: torch.Tensor, counts: Sequence[int], size: Tuple[int, int], steps: int = 16
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image foreground and centre-ness targets at the probe's resolution.

    Args:
        gt_masks: (T, H, W) float, the batch's gt masks image after image.
        counts: objects per image (sums to T).
        size: (h, w) of the probe's output (H / stride, W / stride).
        steps: erosions counted at (h, w): objects up to ~2 x steps px across there.
    Returns:
        foreground (B, h, w) in [0, 1] (the share of each probe pixel covered), centre-ness
        (B, h, w) in [0, 1] (the largest over the objects).
    """
    small = F.adaptive_avg_pool2d(gt_masks[:, None], size)[:, 0] if len(gt_masks) else None
    fg, centre = [], []
    start = 0
    for n in counts:
        if n == 0 or small is None:
            fg.append(gt_masks.new_zeros(size))
            centre.append(gt_masks.new_zeros(size))
            continue
        part = small[start : start + n]
        start += n
        fg.append(part.amax(0).clamp(max=1))
        centre.append(_centreness((part > 0.5).float(), steps).amax(0))
    return torch.stack(fg), torch.stack(centre)


def dense_loss(logits: torch.Tensor, gt_masks: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Mean over pixels of BCE(foreground) + BCE(centre-ness). logits: (B, 2, h, w)."""
    fg, centre = dense_targets(gt_masks, counts, tuple(logits.shape[-2:]))
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(
        logits[:, 0], fg
    ) + F.binary_cross_entropy_with_logits(logits[:, 1], centre)
