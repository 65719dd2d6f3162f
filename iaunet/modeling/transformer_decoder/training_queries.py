"""Training-only queries that speed up convergence; at inference the decoder runs its N learnable
queries alone, so the inference graph, its parameters in use and its FLOPs do not change.

* :class:`QueryGroups` -- one-to-many assignment by groups (Group DETR, Chen et al. 2022): G - 1
  extra groups of N queries, each group matched one-to-one on its own, self-attention within a group
  only. Every object gets G positive queries per image instead of one.
* :class:`MaskDenoising` -- denoising queries (DN-DETR, Li et al. 2022; for masks as in MaskDINO,
  Li et al. 2023): per ground-truth object, a query built from a noised version of its box (content:
  the pixel embedding E averaged over the noised box plus a label embedding; position: a sine
  embedding of the noised box) must reconstruct the object's class and mask. The assignment is
  known, so these queries are excluded from the Hungarian matching and cannot be seen by the
  matching queries.

:func:`self_attention_mask` builds the (B, L, L) mask that keeps groups and denoising queries apart.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


class QueryGroups(nn.Module):
    """The G - 1 extra query groups of Group DETR (``MODEL.IAUNET.TRAIN.QUERY_GROUPS``)."""

    def __init__(self, num_groups: int, num_queries: int, hidden_dim: int):
        super().__init__()
        self.num_groups = num_groups
        self.queries = nn.Embedding((num_groups - 1) * num_queries, hidden_dim)
        self.query_pos = nn.Embedding((num_groups - 1) * num_queries, hidden_dim)


def _box_sine_embedding(
    boxes: torch.Tensor, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """(M, 4) normalized (cx, cy, w, h) -> (M, dim) sine embedding, dim / 4 channels per
    coordinate."""
    n = dim // 4
    freq = temperature ** (2 * (torch.arange(n, device=boxes.device) // 2) / n)
    x = boxes[:, :, None] * 2 * math.pi / freq  # (M, 4, n)
    emb = torch.stack([x[..., 0::2].sin(), x[..., 1::2].cos()], dim=3).flatten(2)
    return emb.flatten(1)


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(T, H, W) bool -> (T, 4) normalized (cx, cy, w, h) of the masks' boxes."""
    h, w = masks.shape[-2:]
    rows, cols = masks.any(2), masks.any(1)
    idx_y = torch.arange(h, device=masks.device)
    idx_x = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, idx_y, h).amin(1).float()
    y1 = torch.where(rows, idx_y, -1).amax(1).float() + 1
    x0 = torch.where(cols, idx_x, w).amin(1).float()
    x1 = torch.where(cols, idx_x, -1).amax(1).float() + 1
    return torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], 1)


class MaskDenoising(nn.Module):
    """Denoising queries from the targets (``MODEL.IAUNET.TRAIN.DENOISING``).

    Each object is repeated in up to ``groups`` denoising groups (fewer when an image has many
    objects: at most ``max_queries`` denoising queries per image), each with its own noise: the box
    centre moves by up to ``box_noise / 2`` of the box size, its sides scale by 1 +- ``box_noise``;
    with ``label_noise`` probability the label is replaced by a random class.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        mask_dim: int,
        groups: int = 5,
        max_queries: int = 100,
        box_noise: float = 0.4,
        label_noise: float = 0.2,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.groups, self.max_queries = groups, max_queries
        self.box_noise, self.label_noise = box_noise, label_noise
        self.label_embed = nn.Embedding(num_classes, hidden_dim)
        self.content_proj = nn.Linear(mask_dim, hidden_dim)
        self.pos_proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(
        self, targets: List[Dict[str, torch.Tensor]], mask_features: torch.Tensor
    ) -> Optional[Dict]:
        """
        Args:
            targets: per image "labels" (T,) and "masks" (T, H, W) at the padded input size.
            mask_features: E, (B, C, h, w) at 1/MASK_STRIDE.
        Returns:
            None without any object, else "queries" (B, M, D), "query_pos" (B, M, D), "valid"
            (B, M) bool (padding queries of images with fewer objects are not valid), "group" (B, M)
            denoising group of each query, "indices": per image (query indices, target indices).
        """
        b, _, h, w = mask_features.shape
        per_image = []
        for t in targets:
            n = len(t["labels"])
            reps = min(self.groups, self.max_queries // n) if n else 0
            per_image.append((n, max(reps, 1) if n else 0))
        m = max(n * r for n, r in per_image)
        if m == 0:
            return None
        d = self.content_proj.out_features
        device = mask_features.device
        queries = mask_features.new_zeros((b, m, d))
        query_pos = mask_features.new_zeros((b, m, d))
        valid = torch.zeros((b, m), dtype=torch.bool, device=device)
        group = torch.full((b, m), -1, dtype=torch.long, device=device)
        indices = []
        for i, (t, (n, reps)) in enumerate(zip(targets, per_image)):
            if n == 0:
                indices.append((torch.zeros(0, dtype=torch.long),) * 2)
                continue
            boxes = _mask_boxes(t["masks"].bool()).repeat(reps, 1)  # (n * reps, 4), group-major
            labels = t["labels"].repeat(reps)
            noised = self._noise_boxes(boxes)
            if self.label_noise > 0 and self.num_classes > 1:
                flip = torch.rand(len(labels), device=device) < self.label_noise
                random = torch.randint_like(labels, self.num_classes)
                labels = torch.where(flip, random, labels)
            k = n * reps
            pooled = self._pool(mask_features[i], noised)  # (k, C)
            queries[i, :k] = self.content_proj(pooled) + self.label_embed(labels)
            query_pos[i, :k] = self.pos_proj(_box_sine_embedding(noised, d))
            valid[i, :k] = True
            group[i, :k] = torch.arange(reps, device=device).repeat_interleave(n)
            indices.append((torch.arange(k), torch.arange(n).repeat(reps)))
        return {
            "queries": queries,
            "query_pos": query_pos,
            "valid": valid,
            "group": group,
            "indices": indices,
        }

    def _noise_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(M, 4) cx, cy, w, h -> noised and clamped to the image."""
        wh = boxes[:, 2:]
        shift = (torch.rand_like(wh) * 2 - 1) * self.box_noise / 2 * wh
        scale = 1 + (torch.rand_like(wh) * 2 - 1) * self.box_noise
        return torch.cat([(boxes[:, :2] + shift).clamp(0, 1), (wh * scale).clamp(1e-3, 1)], 1)

    @staticmethod
    def _pool(features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Mean of features (C, h, w) inside each normalized box (M, 4) -> (M, C); the box's centre
        pixel when the box covers no pixel centre."""
        c, h, w = features.shape
        ys = (torch.arange(h, device=features.device) + 0.5) / h
        xs = (torch.arange(w, device=features.device) + 0.5) / w
        cx, cy, bw, bh = boxes.unbind(1)
        inside_y = (ys[None] - cy[:, None]).abs() <= bh[:, None] / 2  # (M, h)
        inside_x = (xs[None] - cx[:, None]).abs() <= bw[:, None] / 2  # (M, w)
        region = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1).float()  # (M, h*w)
        centre = (cy * h).long().clamp(0, h - 1) * w + (cx * w).long().clamp(0, w - 1)
        empty = region.sum(1) == 0
        region[empty, centre[empty]] = 1.0
        region = region / region.sum(1, keepdim=True)
        return region @ features.flatten(1).t()


def self_attention_mask(
    batch: int,
    num_queries: int,
    num_groups: int,
    denoising: Optional[Dict],
    num_heads: int,
) -> Tuple[torch.Tensor, int]:
    """(B * heads, L, L) bool mask (True = may not attend) for the decoder's self-attention over
    [G groups of N matching queries, M denoising queries]; returns it and L.

    A matching query sees its own group only; a denoising query sees the matching queries of group 0
    (as in DN-DETR: the denoising task may use them, never the reverse) and its own denoising group;
    padding denoising queries see only themselves."""
    n = num_queries
    group = torch.arange(num_groups).repeat_interleave(n)[None].expand(batch, -1)  # (B, G*N)
    is_dn = torch.zeros_like(group, dtype=torch.bool)
    valid = torch.ones_like(is_dn)
    if denoising is not None:
        dn_group = denoising["group"].cpu()
        group = torch.cat([group, dn_group], 1)
        is_dn = torch.cat([is_dn, torch.ones_like(dn_group, dtype=torch.bool)], 1)
        valid = torch.cat([valid, denoising["valid"].cpu()], 1)
    length = group.shape[1]
    same_kind = is_dn[:, :, None] == is_dn[:, None, :]
    allowed = same_kind & (group[:, :, None] == group[:, None, :])
    # denoising queries may look at group 0 of the matching queries
    allowed |= is_dn[:, :, None] & ~is_dn[:, None, :] & (group[:, None, :] == 0)
    allowed &= valid[:, :, None] & valid[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)[None]  # nobody attends to nothing
    mask = ~allowed
    return mask.repeat_interleave(num_heads, dim=0), length
