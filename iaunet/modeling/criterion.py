"""Set criterion: CE over K+1 classes, sigmoid BCE and Dice on matched masks, deep supervision
(thesis §3.6). With whole outlines predicted too (``MODEL.IAUNET.AMODAL``), the mask losses are
taken for each kind of mask (visible part, whole outline) of the same matched pairs."""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils.comm import get_world_size
from torch import nn

from .dense_supervision import dense_loss
from .mask_losses import bce_loss, dice_loss, upsampled_mask_losses
from .matcher import HungarianMatcher, mask_kinds

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def _global_mean_denominator(value: torch.Tensor, min_total: float = 0.0) -> torch.Tensor:
    """Sum ``value`` over all workers, clamp the sum to ``min_total`` and divide by the world size,
    so that DDP's gradient averaging yields exactly the gradient of (global sum / global count),
    whatever the per-worker split. The clamp applies to the global count (clamping the per-worker
    share instead would change the loss scale when there are fewer targets than workers)."""
    value = value.detach().clone()
    world_size = get_world_size()
    if world_size > 1:
        torch.distributed.all_reduce(value)
    return value.clamp(min=min_total) / world_size


def _uncertainty(logits: torch.Tensor) -> torch.Tensor:
    return -torch.abs(logits)


class SetCriterion(nn.Module):
    """Matches predictions to targets and returns the weighted losses, one set per decoder block."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 1.0,
        mask_weight: float = 5.0,
        dice_weight: float = 2.0,
        no_object_weight: float = 0.1,
        point_sampling: bool = False,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        dense_weight: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.weights.update(loss_mask_amodal=mask_weight, loss_dice_amodal=dice_weight)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)
        self.point_sampling = point_sampling
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.dense_weight = dense_weight

    def loss_labels(
        self, logits: torch.Tensor, labels: List[torch.Tensor], indices: Indices
    ) -> torch.Tensor:
        """Weighted CE over all B*Q queries, normalized by the global sum of class weights.
        logits (B, Q, K+1); labels: per image (T_b,) int64; unmatched queries target "no object"."""
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = labels[b][tgt]
        ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, reduction="none")
        w = self.empty_weight[target_classes]
        return (ce * w).sum() / _global_mean_denominator(w.sum())

    def loss_masks(
        self,
        masks: torch.Tensor,
        gt_masks: torch.Tensor,
        target_offsets: Sequence[int],
        indices: Indices,
        num_masks: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """BCE and Dice of matched masks, each divided by ``num_masks``.

        Args:
            masks: (B, Q, h, w) predicted mask logits at 1/MASK_STRIDE of the padded input.
            gt_masks: (T, H, W) float, the gt masks of the whole batch concatenated image after
                image.
            target_offsets: first row of each image's targets in ``gt_masks``.
            indices: per image, (query indices, target indices within the image).
        """
        src = torch.cat([masks[b, s.to(masks.device)] for b, (s, _) in enumerate(indices)])
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            return zero, zero
        rows = torch.cat(
            [t.to(gt_masks.device) + target_offsets[b] for b, (_, t) in enumerate(indices)]
        )
        if not self.point_sampling:
            bce, dice = upsampled_mask_losses(src, gt_masks, rows)
            return bce / num_masks, dice / num_masks
        tgt = gt_masks[rows]
        src = src[:, None].float()
        with torch.no_grad():
            points = get_uncertain_point_coords_with_randomness(
                src,
                _uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            tgt = point_sample(tgt[:, None], points, align_corners=False)[:, 0]
        src = point_sample(src, points, align_corners=False)[:, 0]
        return bce_loss(src, tgt) / num_masks, dice_loss(src, tgt) / num_masks

    def get_losses(
        self,
        outputs: Dict,
        labels: List[torch.Tensor],
        gt_masks: Dict[str, torch.Tensor],
        target_offsets: Sequence[int],
        indices: Indices,
        num_masks: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Weighted loss_ce / loss_mask / loss_dice of one decoder output for the given matching,
        and loss_mask_amodal / loss_dice_amodal when it predicts whole outlines too. ``gt_masks``:
        target key ("masks", "amodal_masks") -> (T, H, W) of the batch (:meth:`loss_masks`)."""
        raw = {"loss_ce": self.loss_labels(outputs["pred_logits"], labels, indices)}
        for pred_key, target_key, suffix in mask_kinds(outputs):
            loss_mask, loss_dice = self.loss_masks(
                outputs[pred_key], gt_masks[target_key], target_offsets, indices, num_masks
            )
            raw["loss_mask" + suffix], raw["loss_dice" + suffix] = loss_mask, loss_dice
        return {k: v * self.weights[k] for k, v in raw.items()}

    def forward(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K+1), "pred_masks" (B, Q, h, w), "aux_outputs" (list
                of the same).
            targets: per image, "labels" (T,) int64 and "masks" (T, H, W) of the padded image
                (and "amodal_masks" (T, H, W) when the outputs have "pred_amodal_masks").
        Returns:
            weighted losses: loss_ce, loss_mask, loss_dice (and loss_{mask,dice}_amodal), and the
            same with suffix _{i} per auxiliary output.
        """
        sizes = {tuple(t["masks"].shape[-2:]) for t in targets}
        if len(sizes) != 1:
            raise ValueError(
                f"target masks must all have the padded batch size, got sizes {sorted(sizes)}"
            )
        # One float copy of all gt masks of the batch, shared by the matcher and the losses of every
        # decoder output, instead of a conversion and a gather per output and image.
        keys = [t for _, t, _ in mask_kinds(outputs)]
        gt_masks = {k: torch.cat([t[k] for t in targets]).float() for k in keys}
        counts = [len(t["labels"]) for t in targets]
        target_offsets = [sum(counts[:b]) for b in range(len(counts))]
        labels = [t["labels"] for t in targets]
        matcher_targets = [
            {"labels": lab, **{k: gt_masks[k][o : o + n] for k in keys}}
            for lab, o, n in zip(labels, target_offsets, counts)
        ]
        device = outputs["pred_logits"].device
        num_masks = _global_mean_denominator(
            torch.tensor(float(sum(counts)), device=device), min_total=1.0
        )

        groups = outputs.get("query_groups", 1)

        def losses_of(out: Dict) -> Dict[str, torch.Tensor]:
            indices = self.match_groups(out, matcher_targets, groups)
            return self.get_losses(
                out, labels, gt_masks, target_offsets, indices, num_masks * groups
            )

        losses = losses_of(outputs)
        if "dense_logits" in outputs:  # the dense probe on E (a training aid)
            losses["loss_dense"] = self.dense_weight * dense_loss(
                outputs["dense_logits"], gt_masks["masks"], counts
            )
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in losses_of(aux).items()})
        dn = outputs.get("denoising")
        if dn is not None:  # known assignment: no matching (DN-DETR)
            indices = dn["indices"]
            num_dn = _global_mean_denominator(
                torch.tensor(float(sum(len(q) for q, _ in indices)), device=device), min_total=1.0
            )
            for i, out in enumerate([dn] + dn["aux_outputs"]):
                suffix = "_dn" if i == 0 else f"_dn_{i - 1}"
                dn_losses = self.get_losses(out, labels, gt_masks, target_offsets, indices, num_dn)
                losses.update({k + suffix: v for k, v in dn_losses.items()})
        return losses

    def match_groups(self, outputs: Dict, targets: List[Dict], groups: int) -> Indices:
        """One-to-one matching within each of ``groups`` equal blocks of queries (Group DETR); the
        query indices of block g are offset by g x (queries per group)."""
        if groups == 1:
            return self.matcher(outputs, targets)
        per_group = outputs["pred_logits"].shape[1] // groups
        parts = []
        for g in range(groups):
            block = slice(g * per_group, (g + 1) * per_group)
            keys = ["pred_logits", *(p for p, _, _ in mask_kinds(outputs))]
            sub = {k: outputs[k][:, block] for k in keys}
            parts.append([(q + g * per_group, t) for q, t in self.matcher(sub, targets)])
        return [
            (torch.cat([p[b][0] for p in parts]), torch.cat([p[b][1] for p in parts]))
            for b in range(len(targets))
        ]
