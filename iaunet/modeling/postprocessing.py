"""Inference post-processing of IAUNet (thesis §3.5.3 and §4.2), in three steps shared by the eager
model and the exported graph (docs/deploy.md):

1. :func:`topk_predictions` -- fixed-size, tensors only (exportable): class probabilities (softmax
   over K+1, "no object" dropped) times maskness, top-k over queries x classes, duplicate
   suppression (``MODEL.IAUNET.TEST.NMS``), at 1/4 resolution with the padding removed.
2. :func:`select_detections` -- the data-dependent step: scores above the threshold, by decreasing
   score.
3. :func:`upsample_masks` -- mask logits to the input size (:func:`masks_at_input_size`,
   exportable), then to the output size, binarized; with ``MODEL.IAUNET.TEST.ONE_PIECE`` each
   mask cut to its largest connected piece (:func:`largest_pieces`); with
   ``MODEL.IAUNET.TEST.MIN_AREA`` masks smaller than that fraction of an object of the trained size
   dropped.

:func:`instances_from_topk` runs steps 2 and 3. The exported graph (:mod:`iaunet.deploy.export`)
is the network, step 1 and :func:`masks_at_input_size`; the predictor's exported-model backends
finish with :func:`instances_from_topk` (``stride=1``). The settings are one
:class:`PostProcessing`, built from the config.

Duplicate suppression: a query-based model trained with one-to-one matching should not need NMS, but
short schedules leave near-identical copies of one object (docs/performance.md, "Duplicates").
``"mask"`` is hard NMS on mask IoU in Fast-NMS form (YOLACT, Bolya et al. 2019): a detection is
dropped when a higher-scoring one of the same class overlaps it by more than ``NMS_THRESH``.
``"matrix"`` is Matrix NMS (SOLOv2, Wang et al. 2020): scores decay with the overlap instead
(Gaussian kernel, ``NMS_SIGMA``).
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

NMS_MODES = ("none", "mask", "matrix")
NMS_OVERLAPS = ("iou", "ios")
MASKNESS_MODES = ("mask", "image")


@dataclass(frozen=True)
class PostProcessing:
    """The settings of inference post-processing, one object built from the config
    (:meth:`from_config`) and shared by the eager model, its exported graph and the exported-model
    backends. The mask stride is not a setting: it belongs to the mask logits (the model's
    ``mask_stride``; 1 for the exported graph's output) and is passed with them."""

    detections_per_image: int  # TEST.DETECTIONS_PER_IMAGE: top-k over queries x classes
    score_thresh: float  # MODEL.IAUNET.TEST.SCORE_THRESH: detections kept score above it
    mask_thresh: float  # MODEL.IAUNET.TEST.MASK_THRESH: binarization of mask probabilities
    maskness: str  # MODEL.IAUNET.TEST.MASKNESS: "mask" | "image" (eq. 17)
    nms: str  # MODEL.IAUNET.TEST.NMS: duplicate suppression "none" | "mask" | "matrix"
    nms_thresh: float  # MODEL.IAUNET.TEST.NMS_THRESH: overlap above which "mask" NMS drops
    nms_sigma: float  # MODEL.IAUNET.TEST.NMS_SIGMA: Gaussian decay of "matrix" NMS
    nms_overlap: str  # MODEL.IAUNET.TEST.NMS_OVERLAP: "iou" | "ios"
    one_piece: bool = False  # MODEL.IAUNET.TEST.ONE_PIECE: keep each mask's largest piece
    # MODEL.IAUNET.TEST.MIN_AREA x a disc of INPUT.OBJECT_DIAMETER: fewest model px of a kept mask
    min_area: float = 0.0

    def __post_init__(self):
        for key, value, modes in (
            ("MASKNESS", self.maskness, MASKNESS_MODES),
            ("NMS", self.nms, NMS_MODES),
            ("NMS_OVERLAP", self.nms_overlap, NMS_OVERLAPS),
        ):
            if value not in modes:
                raise ValueError(f"MODEL.IAUNET.TEST.{key} must be one of {modes}, got {value!r}")

    @classmethod
    def from_config(cls, cfg) -> "PostProcessing":
        t = cfg.MODEL.IAUNET.TEST
        if t.MIN_AREA < 0 or (t.MIN_AREA > 0 and cfg.INPUT.OBJECT_DIAMETER <= 0):
            raise ValueError(
                f"MODEL.IAUNET.TEST.MIN_AREA {t.MIN_AREA} is a fraction of the area of an object "
                f"of INPUT.OBJECT_DIAMETER ({cfg.INPUT.OBJECT_DIAMETER} model px): it needs a "
                "diameter > 0 and a fraction >= 0"
            )
        return cls(
            detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            score_thresh=t.SCORE_THRESH,
            mask_thresh=t.MASK_THRESH,
            maskness=t.MASKNESS,
            nms=t.NMS,
            nms_thresh=t.NMS_THRESH,
            nms_sigma=t.NMS_SIGMA,
            nms_overlap=t.NMS_OVERLAP,
            one_piece=t.ONE_PIECE,
            min_area=t.MIN_AREA * math.pi / 4 * cfg.INPUT.OBJECT_DIAMETER**2,
        )


def mask_overlap(binary: torch.Tensor, kind: str = "iou") -> torch.Tensor:
    """(..., N, h, w) bool -> (..., N, N) IoU, or ``kind="ios"``: intersection over the smaller mask
    (1 when one mask lies inside the other, e.g. a nucleus-only mask inside its cell's)."""
    m = binary.flatten(-2).float()
    inter = m @ m.transpose(-1, -2)
    area = m.sum(-1)
    if kind == "ios":
        return inter / torch.minimum(area[..., :, None], area[..., None, :]).clamp(min=1)
    return inter / (area[..., :, None] + area[..., None, :] - inter).clamp(min=1)


def suppress_duplicates(
    scores: torch.Tensor,
    labels: torch.Tensor,
    binary: torch.Tensor,
    mode: str,
    thresh: float = 0.5,
    sigma: float = 2.0,
    overlap: str = "iou",
) -> torch.Tensor:
    """New scores (..., N) of detections sorted by decreasing ``scores``: 0 where suppressed
    (``"mask"``), decayed (``"matrix"``) or unchanged (``"none"``). ``binary``: (..., N, h, w)."""
    if mode == "none" or (not torch.jit.is_tracing() and scores.shape[-1] == 0):
        return scores
    same = labels[..., :, None] == labels[..., None, :]
    iou = (mask_overlap(binary, overlap) * same).triu(diagonal=1)  # [i, j]: i scores higher than j
    if mode == "mask":
        return torch.where(iou.amax(-2) > thresh, torch.zeros_like(scores), scores)
    # Matrix NMS: decay_j = min_i exp(-sigma iou_ij^2) / exp(-sigma max_iou_i^2), max_iou_i being
    # how much i itself is overlapped by higher-scoring ones (Gaussian kernel).
    compensate = iou.amax(-2)[..., :, None]
    decay = torch.exp(-sigma * (iou**2 - compensate**2)).amin(-2)
    return scores * decay


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for every b: x (B, N, ...), index (B, M) -> (B, M, ...).

    A gather on the flattened (B * N) rows: one ONNX ``Gather`` for any batch size, without the
    (B, M, h, w) index tensor that ``torch.gather`` would need for mask rows.
    """
    offset = torch.arange(x.shape[0], device=x.device)[:, None] * x.shape[1]
    return x.flatten(0, 1)[index + offset]


def topk_predictions(
    logits: torch.Tensor,
    masks: torch.Tensor,
    image_size: Tuple[int, int],
    post: PostProcessing,
    *,
    num_classes: int,
    k: int,
    stride: int,
    amodal_masks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Step 1, for one image or a batch (the leading B dimension is optional).

    Tensors only and no data-dependent shapes, so that it traces into the exported graph
    (:mod:`iaunet.deploy.export`) for any batch and image size.

    Args:
        logits: ([B,] Q, K+1) class logits; masks: ([B,] Q, h, w) mask logits at 1/``stride`` of
            the padded input.
        image_size: (H, W) of the input before padding.
        post: maskness, mask threshold and duplicate suppression.
        k: detections kept (at most Q x K).
        amodal_masks: ([B,] Q, h, w) whole-outline logits of the same queries
            (``MODEL.IAUNET.AMODAL``); ``masks`` are then their visible parts, kept inside the
            whole outline as min(visible, whole) logits (any threshold: visible <= whole pixel by
            pixel, and the bilinear resizes after, with their non-negative weights, keep it).
    Returns:
        scores ([B,] k) sorted decreasingly, labels ([B,] k), mask logits ([B,] k, h, w) (still
        padded), and with ``amodal_masks`` their rows of the same detections ([B,] k, h, w).
    """
    if logits.dim() == 2:  # one image
        out = topk_predictions(
            logits[None],
            masks[None],
            image_size,
            post,
            num_classes=num_classes,
            k=k,
            stride=stride,
            amodal_masks=None if amodal_masks is None else amodal_masks[None],
        )
        return tuple(t[0] for t in out)
    logits, masks = logits.float(), masks.float()
    if amodal_masks is not None:
        amodal_masks = amodal_masks.float()
        masks = torch.minimum(masks, amodal_masks)
    probs = logits.softmax(-1)[..., :num_classes].flatten(-2)  # (B, Q*K), query-major
    if not torch.jit.is_tracing():  # traced: the caller passes k <= Q x K (a traced size
        k = min(k, probs.shape[-1])  # would become a constant here, with a TracerWarning)
    scores, idx = probs.topk(k, sorted=False)
    labels, query = idx % num_classes, idx // num_classes
    # Padding removed at the mask stride: ceil(H / stride), written with non-negative operands (the
    # ONNX exporter turns // into a division that truncates towards 0).
    hs, ws = (image_size[0] + stride - 1) // stride, (image_size[1] + stride - 1) // stride
    prob = gather_rows(masks, query)[..., :hs, :ws].sigmoid()
    binary = prob > post.mask_thresh
    if post.maskness == "mask":
        inside = (prob * binary).flatten(-2).sum(-1) / binary.flatten(-2).sum(-1).clamp(min=1)
        scores = scores * inside
    else:  # eq. (17): mean over the whole image
        scores = scores * prob.flatten(-2).mean(-1)
    order = scores.argsort(dim=-1, descending=True)
    scores, labels, query = (t.gather(-1, order) for t in (scores, labels, query))
    if post.nms != "none":
        binary = gather_rows(binary, order)
    scores = suppress_duplicates(
        scores, labels, binary, post.nms, post.nms_thresh, post.nms_sigma, post.nms_overlap
    )
    order = scores.argsort(dim=-1, descending=True)  # Matrix NMS may reorder
    scores, labels, query = (t.gather(-1, order) for t in (scores, labels, query))
    if amodal_masks is not None:
        return scores, labels, gather_rows(masks, query), gather_rows(amodal_masks, query)
    return scores, labels, gather_rows(masks, query)


def select_detections(scores: torch.Tensor, score_thresh: float) -> torch.Tensor:
    """Step 2: indices of the detections scoring above ``score_thresh`` (``scores`` are sorted).

    The one data-dependent step: the exported graph stops before it (docs/deploy.md)."""
    return torch.nonzero(scores > score_thresh).flatten()


def is_prefix(index: torch.Tensor) -> bool:
    """Whether ``index`` is 0, 1, ..., N-1."""
    return bool((index == torch.arange(len(index), device=index.device)).all())


def masks_at_input_size(
    mask_logits: torch.Tensor, image_size: Tuple[int, int], stride: int
) -> torch.Tensor:
    """Step 3a (exportable): ([B,] M, h, w) mask logits at 1/``stride`` of the padded input ->
    ([B,] M, H, W) logits at the input size (upsampled, padding removed)."""
    x = mask_logits if mask_logits.dim() == 4 else mask_logits[None]
    if stride != 1:
        x = F.interpolate(x, scale_factor=stride, mode="bilinear", align_corners=False)
    x = x[..., : image_size[0], : image_size[1]]
    return x if mask_logits.dim() == 4 else x[0]


def logit_threshold(mask_thresh: float) -> float:
    """The mask-logit threshold equivalent to ``sigmoid(logit) > mask_thresh``."""
    if not 0 < mask_thresh < 1:
        return -math.inf if mask_thresh <= 0 else math.inf
    return math.log(mask_thresh / (1 - mask_thresh))


def upsample_masks(
    mask_logits: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    mask_thresh: float,
    stride: int,
    chunk: int = 32,
) -> torch.Tensor:
    """Step 3: (M, h, w) logits at 1/``stride`` of the padded input -> (M, H0, W0) bool: at the
    input size (:func:`masks_at_input_size`; ``image_size``), resized to ``output_size``,
    binarized; ``chunk`` masks at a time to bound memory. ``stride=1``: the logits are already at
    the input size (the exported graph's output)."""
    out = torch.zeros(
        (mask_logits.shape[0], *output_size), dtype=torch.bool, device=mask_logits.device
    )
    h, w = image_size
    # sigmoid(x) > t as x > logit(t): no pass of exp over (M, H0, W0) floats. Identical except
    # for logits within float32 rounding of the threshold (|x| < 1e-7 for t = 0.5).
    thresh = logit_threshold(mask_thresh)
    for s in range(0, mask_logits.shape[0], chunk):
        m = masks_at_input_size(mask_logits[s : s + chunk], image_size, stride)
        if (h, w) != tuple(output_size):  # a same-size bilinear resize is the identity: skip it
            m = F.interpolate(m[None], size=output_size, mode="bilinear", align_corners=False)[0]
        torch.gt(m, thresh, out=out[s : s + chunk])  # straight into `out`: no temporary
    return out


def masks_to_boxes(masks: torch.Tensor) -> Boxes:
    """(N, H, W) bool -> ``Boxes`` (x0, y0, x1, y1) of the set pixels, zeros for empty masks:
    ``BitMasks.get_bounding_boxes`` without its per-mask loop and bool ``any`` passes (the same
    boxes; ~15x faster for 100 masks of 512²), on the masks' device."""
    n, h, w = masks.shape
    # A bool -> uint8 view costs nothing; the tracer (fvcore FLOP count) cannot record dtype views.
    u8 = masks.to(torch.uint8) if torch.jit.is_tracing() else masks.view(torch.uint8)
    cols, rows = u8.amax(1), u8.amax(2)  # (N, W), (N, H): any pixel in that column / row
    x0, y0 = cols.argmax(1), rows.argmax(1)  # the first set column / row
    x1, y1 = w - cols.flip(1).argmax(1), h - rows.flip(1).argmax(1)  # one past the last
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return Boxes(boxes * cols.amax(1, keepdim=True).float() if n else boxes)


def instances_from_topk(
    scores: torch.Tensor,
    labels: torch.Tensor,
    mask_logits: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    post: PostProcessing,
    *,
    stride: int,
    amodal_mask_logits: Optional[torch.Tensor] = None,
) -> Instances:
    """Steps 2 and 3 on step 1's output for one image (the eager model and the exported-model
    backends of the predictor share them; ``post``: the score and mask thresholds):
    ``Instances`` of ``output_size`` with pred_masks (bool), scores, pred_classes and pred_boxes,
    by decreasing score; with ``amodal_mask_logits`` also pred_amodal_masks (bool), the whole
    outlines (pred_masks are then the visible parts, inside them)."""
    keep = select_detections(scores, post.score_thresh)
    # Sorted scores keep the first N: a slice, not a copy of N full-size masks (stride 1).
    rows = slice(0, len(keep)) if is_prefix(keep) else keep
    result = Instances(tuple(output_size))
    result.pred_masks = upsample_masks(
        mask_logits[rows], image_size, output_size, post.mask_thresh, stride
    )
    if amodal_mask_logits is not None:
        result.pred_amodal_masks = upsample_masks(
            amodal_mask_logits[rows], image_size, output_size, post.mask_thresh, stride
        )
    if post.one_piece:  # on the whole outlines when there are any: visible parts may be split
        if amodal_mask_logits is not None:
            result.pred_amodal_masks = largest_pieces(result.pred_amodal_masks)
            result.pred_masks &= result.pred_amodal_masks
        else:
            result.pred_masks = largest_pieces(result.pred_masks)
    result.scores = scores[keep]
    result.pred_classes = labels[keep]
    if post.min_area > 0:  # model px -> output px; whole outlines when there are any
        outline = result.pred_amodal_masks if amodal_mask_logits is not None else result.pred_masks
        px = post.min_area * output_size[0] * output_size[1] / (image_size[0] * image_size[1])
        result = result[outline.flatten(1).sum(1) >= px]
    result.pred_boxes = masks_to_boxes(result.pred_masks)
    return result


def largest_pieces(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> each mask's largest 8-connected piece (``MODEL.IAUNET.TEST.ONE_PIECE``;
    the first in scan order on a tie); the others, specks or a neighbour the mask reached into, are
    dropped. Labelled within each mask's box (scipy), on the CPU; returned on ``masks``' device."""
    from scipy import ndimage

    out = masks.clone()
    boxes = masks_to_boxes(masks).tensor.long().tolist()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        crop = masks[i, y0:y1, x0:x1].cpu().numpy()
        pieces, n = ndimage.label(crop, structure=np.ones((3, 3), dtype=bool))
        if n > 1:
            largest = 1 + int(np.bincount(pieces.ravel())[1:].argmax())
            out[i, y0:y1, x0:x1] = torch.from_numpy(pieces == largest).to(masks.device)
    return out
