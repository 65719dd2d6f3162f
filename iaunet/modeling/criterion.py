"""Set criterion: CE over K+1 classes, sigmoid BCE and Dice on matched masks, deep supervision (thesis §3.6)."""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils.comm import get_world_size
from torch import nn

from .matcher import HungarianMatcher


def _global_mean_denominator(value: torch.Tensor, min_total: float = 0.0) -> torch.Tensor:
    """Sum ``value`` over all workers, clamp the sum to ``min_total`` and divide by the world size, so that
    DDP's gradient averaging yields exactly the gradient of (global sum / global count), whatever the
    per-worker split. The clamp applies to the global count (clamping the per-worker share instead would
    change the loss scale when there are fewer targets than workers)."""
    value = value.detach().clone()
    world_size = get_world_size()
    if world_size > 1:
        torch.distributed.all_reduce(value)
    return value.clamp(min=min_total) / world_size


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs: (M, P) logits, targets: (M, P) in {0, 1} -> summed Dice loss over the M masks."""
    inputs = inputs.sigmoid()
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def bce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs: (M, P) logits, targets: (M, P) -> per-mask mean BCE, summed over the M masks."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum()


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
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)
        self.point_sampling = point_sampling
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def loss_labels(self, logits: torch.Tensor, targets: List[Dict], indices) -> torch.Tensor:
        """Weighted CE over all B*Q queries, normalized by the global sum of class weights."""
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = targets[b]["labels"][tgt]
        ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, reduction="none")
        w = self.empty_weight[target_classes]
        return (ce * w).sum() / _global_mean_denominator(w.sum())

    def loss_masks(self, masks: torch.Tensor, targets: List[Dict], indices, num_masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """BCE and Dice of matched masks; predictions (B, Q, h, w) upsampled to the target size."""
        src = torch.cat([masks[b, s.to(masks.device)] for b, (s, _) in enumerate(indices)])
        tgt = torch.cat([targets[b]["masks"][t.to(masks.device)] for b, (_, t) in enumerate(indices)]).float()
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            return zero, zero
        src = src[:, None].float()
        if self.point_sampling:
            with torch.no_grad():
                points = get_uncertain_point_coords_with_randomness(
                    src, _uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
                )
                tgt = point_sample(tgt[:, None], points, align_corners=False)[:, 0]
            src = point_sample(src, points, align_corners=False)[:, 0]
        else:
            src = F.interpolate(src, size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0].flatten(1)
            tgt = tgt.flatten(1)
        return bce_loss(src, tgt) / num_masks, dice_loss(src, tgt) / num_masks

    def _losses(self, outputs: Dict, targets: List[Dict], num_masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        loss_mask, loss_dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks)
        raw = {"loss_ce": self.loss_labels(outputs["pred_logits"], targets, indices), "loss_mask": loss_mask, "loss_dice": loss_dice}
        return {k: v * self.weights[k] for k, v in raw.items()}

    def forward(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K+1), "pred_masks" (B, Q, h, w), "aux_outputs" (list of the same).
            targets: per image, "labels" (T,) int64 and "masks" (T, H, W) of the padded image.
        Returns:
            weighted losses: loss_ce, loss_mask, loss_dice, and loss_{ce,mask,dice}_{i} per auxiliary output.
        """
        count = sum(len(t["labels"]) for t in targets)
        num_masks = _global_mean_denominator(torch.tensor(float(count), device=outputs["pred_logits"].device), min_total=1.0)
        losses = self._losses(outputs, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._losses(aux, targets, num_masks).items()})
        return losses
