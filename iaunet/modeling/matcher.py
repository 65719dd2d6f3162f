"""Hungarian matching between predicted and ground-truth instances (thesis §3.6)."""

from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import nn

# The kinds of mask a query predicts: (output key, target key, loss-name suffix). The visible part
# always; the whole (amodal) outline too with MODEL.IAUNET.AMODAL (a second mask embedding).
MASK_KINDS = (("pred_masks", "masks", ""), ("pred_amodal_masks", "amodal_masks", "_amodal"))

Masks = Union[torch.Tensor, Sequence[torch.Tensor]]


def mask_kinds(outputs: Dict) -> List[Tuple[str, str, str]]:
    """The entries of :data:`MASK_KINDS` that ``outputs`` predicts."""
    return [kind for kind in MASK_KINDS if kind[0] in outputs]


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise Dice cost. inputs: (Q, P) logits, targets: (T, P) in {0, 1} -> (Q, T)."""
    inputs = inputs.sigmoid()
    numerator = 2 * inputs @ targets.T
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_bce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean sigmoid BCE. inputs: (Q, P) logits, targets: (T, P) in [0, 1] -> (Q, T).

    BCE(x, t) = softplus(x) - x t, so the mean over points is (sum softplus(x) - x . t) / P: one
    softplus and one matmul (the pos/neg formulation needs two BCE passes and two matmuls; same
    values to fp32 rounding)."""
    return (F.softplus(inputs).sum(-1)[:, None] - inputs @ targets.T) / inputs.shape[-1]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment per image with cost = w_cls*(-p_class) + w_bce*BCE +
    w_dice*Dice.

    Mask costs are computed on ``num_points`` uniformly sampled points, the same points for
    predictions and targets, in fp32. A query predicting two masks (visible part and whole
    outline, ``pred_amodal_masks``) is matched on the sum of both mask costs. Pure: no state, no
    side effects.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 5.0,
        cost_dice: float = 2.0,
        num_points: int = 12544,
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    def cost_matrix(
        self,
        logits: torch.Tensor,
        masks: Masks,
        tgt_labels: torch.Tensor,
        tgt_masks: Masks,
    ) -> torch.Tensor:
        """logits (Q, K+1), masks (Q, h, w), tgt_labels (T,), tgt_masks (T, H, W) -> cost (Q, T).

        ``masks`` and ``tgt_masks`` may also be sequences, one (Q, h, w) / (T, H, W) per mask kind
        (visible, whole): their mask costs, on the same points, add up."""
        if isinstance(masks, torch.Tensor):
            masks, tgt_masks = (masks,), (tgt_masks,)
        prob = logits.float().softmax(-1)
        cost = self.cost_class * -prob[:, tgt_labels]
        points = torch.rand(1, self.num_points, 2, device=masks[0].device)
        for pred, tgt in zip(masks, tgt_masks):
            tgt = point_sample(
                tgt[:, None].float(), points.expand(tgt.shape[0], -1, -1), align_corners=False
            )[:, 0]
            pred = point_sample(
                pred[:, None].float(), points.expand(pred.shape[0], -1, -1), align_corners=False
            )[:, 0]
            cost = (
                cost
                + self.cost_mask * batch_bce_cost(pred, tgt)
                + self.cost_dice * batch_dice_cost(pred, tgt)
            )
        return cost

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K+1), "pred_masks" (B, Q, h, w) [and
                "pred_amodal_masks" (B, Q, h, w)].
            targets: per image, "labels" (T,) and "masks" (T, H, W) [and "amodal_masks"].
        Returns:
            per image, (query indices, target indices), int64 tensors of length min(Q, T).
        """
        indices = []
        with torch.autocast(device_type=outputs["pred_masks"].device.type, enabled=False):
            for b, tgt in enumerate(targets):
                if len(tgt["labels"]) == 0:
                    empty = torch.zeros(0, dtype=torch.int64)
                    indices.append((empty, empty))
                    continue
                kinds = mask_kinds(outputs)
                cost = self.cost_matrix(
                    outputs["pred_logits"][b],
                    [outputs[p][b] for p, _, _ in kinds],
                    tgt["labels"],
                    [tgt[t] for _, t, _ in kinds],
                )
                cost = cost.cpu()
                if not torch.isfinite(cost).all():
                    raise FloatingPointError(
                        f"non-finite matching cost for image {b} of the batch: the model's "
                        "predictions are NaN/inf "
                        "(diverged training; lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS)"
                    )
                q, t = linear_sum_assignment(cost.numpy())
                indices.append(
                    (torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64))
                )
        return indices
