"""Test-time augmentation of a query-based model: the flips and 90-degree rotations of an image
(``MODEL.IAUNET.TEST.TTA``), their outputs merged query by query before post-processing.

Microscopy has no up: a model should find the same objects in a rotated or mirrored image, and
averaging its predictions over these views smooths the mask outlines and lowers the scores of
detections that only some views make (Cellpose's ``augment`` option averages its flows over
flipped tiles). The views are exact on the padded input: its sides are multiples of the
mask stride, so a flip or rotation of the image is the same flip or rotation of the mask logits.

A query-based model has no fixed pixel-to-output map to invert, so the views' outputs are
aligned first: the queries of each view are matched one-to-one to the queries of the identity view
(Hungarian matching on the soft IoU of their mask probabilities, in the identity view's frame;
scipy), then the class probabilities and mask probabilities of matched queries are averaged. The
merged output has the model's own form ((Q, K+1) class logits, (Q, h, w) mask logits), so every
later step (maskness, NMS, thresholds, tiling, amodal outlines) is unchanged. An object that a view
misses is averaged with that view's "no object" query: its score falls in proportion.
"""

from typing import Callable, Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment

# (number of 90-degree rotations, horizontal flip first) of each view; the identity first
VIEWS = {
    "none": [(0, False)],
    "flip": [(0, False), (0, True), (2, True), (2, False)],  # identity, h, v, h + v flips
    "dihedral": [(k, f) for f in (False, True) for k in range(4)],  # the 8 symmetries of a square
}
_EPS = 1e-6


def apply_view(x: torch.Tensor, view: Tuple[int, bool]) -> torch.Tensor:
    """``x`` (..., H, W) seen in ``view``: flipped left-right first, then rotated k x 90 degrees."""
    k, flip = view
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def invert_view(x: torch.Tensor, view: Tuple[int, bool]) -> torch.Tensor:
    """The inverse of :func:`apply_view`: a map of the view back in the image's frame."""
    k, flip = view
    if k:
        x = torch.rot90(x, -k, dims=(-2, -1))
    return x.flip(-1) if flip else x


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Q, h, w) and (P, h, w) mask probabilities -> (Q, P) soft IoU."""
    a, b = a.flatten(1), b.flatten(1)
    inter = a @ b.T
    return inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter).clamp(min=_EPS)


def align_queries(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Index (Q,) into ``other``'s queries matched to each of ``reference``'s: the one-to-one
    assignment of largest total soft IoU of their (Q, h, w) mask probabilities."""
    iou = soft_iou(reference.float(), other.float()).cpu().numpy()
    rows, cols = linear_sum_assignment(-iou)
    index = torch.empty(len(rows), dtype=torch.long)
    index[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return index.to(reference.device)


def merge_views(outputs: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Merge the outputs of the views (each already in the image's frame; the identity first):
    per image, each view's queries aligned to the identity's (:func:`align_queries` on the visible
    masks), then class and mask probabilities averaged. Returns the model's output form:
    "pred_logits" (B, Q, K+1) as log-probabilities, "pred_masks" (and "pred_amodal_masks") (B, Q,
    h, w) as logits."""
    mask_keys = [k for k in ("pred_masks", "pred_amodal_masks") if k in outputs[0]]
    ref = outputs[0]["pred_masks"].sigmoid()
    sums = {"pred_logits": torch.zeros_like(outputs[0]["pred_logits"], dtype=torch.float32)}
    sums.update({k: torch.zeros_like(ref, dtype=torch.float32) for k in mask_keys})
    for v, out in enumerate(outputs):
        probs = out["pred_masks"].sigmoid()
        for b in range(ref.shape[0]):
            # the identity view is the reference: its queries are their own match
            same = torch.arange(ref.shape[1], device=ref.device)
            idx = align_queries(ref[b], probs[b]) if v else same
            sums["pred_logits"][b] += out["pred_logits"][b, idx].float().softmax(-1)
            for k in mask_keys:
                sums[k][b] += out[k][b, idx].float().sigmoid()
    n = len(outputs)
    merged = {"pred_logits": (sums["pred_logits"] / n).clamp(min=_EPS).log()}
    for k in mask_keys:
        merged[k] = torch.logit((sums[k] / n).clamp(_EPS, 1 - _EPS))
    return merged


def predict_views(
    network: Callable[[torch.Tensor], Dict[str, torch.Tensor]], images: torch.Tensor, mode: str
) -> Dict[str, torch.Tensor]:
    """``network`` ((B, C, H, W) -> outputs) run on every view of ``mode`` (:data:`VIEWS`) of the
    padded ``images``, its mask maps brought back to the images' frame and merged
    (:func:`merge_views`). One forward call per view: memory as without augmentation."""
    if mode not in VIEWS:
        raise ValueError(f"MODEL.IAUNET.TEST.TTA must be one of {tuple(VIEWS)}, got {mode!r}")
    if mode == "none":
        return network(images)
    outputs = []
    for view in VIEWS[mode]:
        out = network(apply_view(images, view))
        outputs.append(
            {k: invert_view(v, view) if k != "pred_logits" else v for k, v in out.items()
             if k in ("pred_logits", "pred_masks", "pred_amodal_masks")}
        )  # fmt: skip
    return merge_views(outputs)
