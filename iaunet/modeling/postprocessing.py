"""Inference post-processing of IAUNet (thesis §3.5.3 and §4.2), in three steps shared by the eager
model and the exported graph (docs/deploy.md):

1. :func:`topk_predictions` -- fixed-size, tensors only (exportable): class probabilities (softmax
   over K+1, "no object" dropped) times maskness, top-k over queries x classes, duplicate
   suppression (``MODEL.IAUNET.TEST.NMS``), at 1/4 resolution with the padding removed.
2. :func:`select_detections` -- the data-dependent step: scores above the threshold, by decreasing
   score.
3. :func:`upsample_masks` -- mask logits to the output size, binarized.

Duplicate suppression: a query-based model trained with one-to-one matching should not need NMS, but
short schedules leave near-identical copies of one object (docs/performance.md, "Duplicates").
``"mask"`` is hard NMS on mask IoU in Fast-NMS form (YOLACT, Bolya et al. 2019): a detection is
dropped when a higher-scoring one of the same class overlaps it by more than ``NMS_THRESH``.
``"matrix"`` is Matrix NMS (SOLOv2, Wang et al. 2020): scores decay with the overlap instead
(Gaussian kernel, ``NMS_SIGMA``).
"""

from typing import Tuple

import torch
import torch.nn.functional as F

NMS_MODES = ("none", "mask", "matrix")
NMS_OVERLAPS = ("iou", "ios")
MASKNESS_MODES = ("mask", "image")


def mask_overlap(binary: torch.Tensor, kind: str = "iou") -> torch.Tensor:
    """(N, h, w) bool -> (N, N) IoU, or ``kind="ios"``: intersection over the smaller mask (1 when
    one mask lies inside the other, e.g. a nucleus-only mask inside its cell's)."""
    m = binary.flatten(1).float()
    inter = m @ m.t()
    area = m.sum(1)
    if kind == "ios":
        return inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1)
    return inter / (area[:, None] + area[None, :] - inter).clamp(min=1)


def suppress_duplicates(
    scores: torch.Tensor,
    labels: torch.Tensor,
    binary: torch.Tensor,
    mode: str,
    thresh: float = 0.5,
    sigma: float = 2.0,
    overlap: str = "iou",
) -> torch.Tensor:
    """New scores (N,) of detections sorted by decreasing ``scores``: 0 where suppressed
    (``"mask"``), decayed (``"matrix"``) or unchanged (``"none"``)."""
    if mode == "none" or scores.numel() == 0:
        return scores
    same = labels[:, None] == labels[None, :]
    iou = (mask_overlap(binary, overlap) * same).triu(diagonal=1)  # [i, j]: i scores higher than j
    if mode == "mask":
        return torch.where(iou.amax(0) > thresh, torch.zeros_like(scores), scores)
    # Matrix NMS: decay_j = min_i exp(-sigma iou_ij^2) / exp(-sigma max_iou_i^2), max_iou_i being
    # how
    # much i itself is overlapped by higher-scoring ones (Gaussian kernel).
    compensate = iou.amax(0)[:, None]
    decay = torch.exp(-sigma * (iou**2 - compensate**2)).amin(0)
    return scores * decay


def topk_predictions(
    logits: torch.Tensor,
    masks: torch.Tensor,
    image_size: Tuple[int, int],
    *,
    num_classes: int,
    k: int,
    mask_thresh: float = 0.5,
    maskness: str = "mask",
    nms: str = "none",
    nms_thresh: float = 0.5,
    nms_sigma: float = 2.0,
    nms_overlap: str = "iou",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1 for one image.

    Args:
        logits: (Q, K+1) class logits; masks: (Q, h, w) mask logits at 1/4 of the padded input.
        image_size: (H, W) of the input before padding.
        k: detections kept (at most Q x K).
    Returns:
        scores (k,) sorted decreasingly, labels (k,), mask logits (k, h, w) (still padded).
    """
    logits, masks = logits.float(), masks.float()
    probs = logits.softmax(-1)[:, :num_classes].flatten()  # (Q*K), query-major
    k = min(k, probs.numel())
    scores, idx = probs.topk(k, sorted=False)
    labels, query = idx % num_classes, idx // num_classes
    h4, w4 = -(-image_size[0] // 4), -(-image_size[1] // 4)  # padding removed at the mask stride
    mask_logits = masks[query]
    prob = mask_logits[:, :h4, :w4].sigmoid()
    binary = prob > mask_thresh
    if maskness == "mask":
        inside = (prob * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
        scores = scores * inside
    else:  # eq. (17): mean over the whole image
        scores = scores * prob.flatten(1).mean(1)
    order = scores.argsort(descending=True)
    scores, labels, mask_logits, binary = (
        scores[order],
        labels[order],
        mask_logits[order],
        binary[order],
    )
    scores = suppress_duplicates(scores, labels, binary, nms, nms_thresh, nms_sigma, nms_overlap)
    order = scores.argsort(descending=True)  # Matrix NMS may reorder
    return scores[order], labels[order], mask_logits[order]


def select_detections(scores: torch.Tensor, score_thresh: float) -> torch.Tensor:
    """Step 2: indices of the detections scoring above ``score_thresh`` (``scores`` are sorted)."""
    return torch.nonzero(scores > score_thresh).flatten()


def upsample_masks(
    mask_logits: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    mask_thresh: float = 0.5,
    chunk: int = 32,
) -> torch.Tensor:
    """Step 3: (M, h, w) logits at 1/4 of the padded input -> (M, H0, W0) bool: upsampled x4,
    padding removed (``image_size``), resized to ``output_size``; ``chunk`` masks at a time to bound
    memory."""
    out = torch.zeros(
        (mask_logits.shape[0], *output_size), dtype=torch.bool, device=mask_logits.device
    )
    h, w = image_size
    for s in range(0, mask_logits.shape[0], chunk):
        m = F.interpolate(mask_logits[None, s : s + chunk], scale_factor=4, mode="bilinear")
        m = m[:, :, :h, :w]
        if (h, w) != tuple(output_size):  # a same-size bilinear resize is the identity: skip it
            m = F.interpolate(m, size=output_size, mode="bilinear", align_corners=False)
        # In place and straight into `out`: each pass over (chunk, H0, W0) floats costs.
        torch.gt(m[0].sigmoid_(), mask_thresh, out=out[s : s + chunk])
    return out
