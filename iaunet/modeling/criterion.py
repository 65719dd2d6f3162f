"""Set criterion: CE over K+1 classes, sigmoid BCE and Dice on matched masks, deep supervision (thesis §3.6)."""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils.comm import get_world_size
from torch import nn
from torch.autograd.function import once_differentiable

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


def _linear_upsampling_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear upsampling (align_corners=False), built by upsampling the identity so
    that its weights are exactly those F.interpolate uses. Bilinear upsampling of X is A_h @ X @ A_w^T."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].t()


class _UpsampledMaskLosses(torch.autograd.Function):
    """Per-mask mean sigmoid BCE and Dice of mask logits bilinearly upsampled to the target size (spec §1.5),
    summed over the masks. Same values and gradients as F.interpolate + ``bce_loss``/``dice_loss`` with autograd,
    but 3x faster on CPU (0.12 s vs 0.39 s for 60 masks 128² -> 512², forward and backward) and without any
    full-size activation kept for backward:

    * masks are processed a few at a time, so every temporary is a small buffer that the allocator reuses (60 MB
      temporaries are page-faulted in again on every use);
    * the gradient is computed in closed form in the forward pass and brought back to mask resolution with the
      transpose of the upsampling, A_h^T G A_w (two matmuls; aten's upsample backward is ~4x slower on CPU);
    * only the low-resolution gradients (2 x M x h x w) are saved.
    """

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, chunk_elems: int
    ):
        m, h, w = logits.shape
        H, W = targets.shape[-2:]
        n_pix = H * W
        bce, dice = logits.new_zeros(m), logits.new_zeros(m)
        need_grad = ctx.needs_input_grad[0]
        grads = logits.new_empty((2, m, h, w)) if need_grad else None
        a_h, a_w = _linear_upsampling_matrix(h, H, logits), _linear_upsampling_matrix(w, W, logits)
        step = max(1, chunk_elems // n_pix)
        for s in range(0, m, step):
            e = min(s + step, m)
            u = F.interpolate(
                logits[s:e, None], size=(H, W), mode="bilinear", align_corners=False
            ).view(e - s, n_pix)
            t = targets[index[s:e]].view(e - s, n_pix).to(u.dtype)
            # BCE with logits = softplus(u) - u * t
            bce[s:e] = (F.softplus(u).sum(1) - (u * t).sum(1)) / n_pix
            p = u.sigmoid_()  # u is not needed any more
            num = 2 * (p * t).sum(1) + 1
            den = p.sum(1) + t.sum(1) + 1
            dice[s:e] = 1 - num / den
            if need_grad:
                g = u.new_empty((2, e - s, n_pix))
                torch.sub(
                    p, t, out=g[0]
                )  # n_pix * d BCE / du (the 1 / n_pix is applied at mask resolution)
                # d Dice / du = p (1 - p) * (num / den^2 - 2 t / den)
                torch.mul(t, (-2 / den)[:, None], out=g[1]).add_((num / den**2)[:, None]).mul_(p)
                g[1].addcmul_(g[1], p, value=-1)
                grads[:, s:e] = a_h.t() @ (g.view(2, e - s, H, W) @ a_w)
        if need_grad:
            grads[0] /= n_pix
            ctx.save_for_backward(grads)
        return bce.sum(), dice.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_bce: torch.Tensor, grad_dice: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grad_bce * grads[0] + grad_dice * grads[1], None, None, None


def upsampled_mask_losses(
    logits: torch.Tensor, targets: torch.Tensor, index: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits (M, h, w); targets (N, H, W) in {0, 1} (any dtype); index (M,): the target row of each logit map
    (default: targets[i] for logits[i]). Returns (summed per-mask mean BCE, summed Dice) of the logits upsampled
    to (H, W). Targets are gathered chunk by chunk: ~0.5M pixels on CPU (2 MB, cache-resident), 64M on GPU.
    Always fp32 (autocast off: the closed-form gradient and the matmuls must not run in fp16)."""
    if index is None:
        index = torch.arange(logits.shape[0], device=logits.device)
    chunk = 1 << 19 if logits.device.type == "cpu" else 1 << 26
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _UpsampledMaskLosses.apply(logits.float(), targets, index, chunk)


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
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = targets[b]["labels"][tgt]
        ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, reduction="none")
        w = self.empty_weight[target_classes]
        return (ce * w).sum() / _global_mean_denominator(w.sum())

    def loss_masks(
        self,
        masks: torch.Tensor,
        targets: List[Dict],
        all_masks: torch.Tensor,
        indices,
        num_masks: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """BCE and Dice of matched masks; predictions (B, Q, h, w) upsampled to the target size."""
        src = torch.cat([masks[b, s.to(masks.device)] for b, (s, _) in enumerate(indices)])
        # rows of the batch's concatenated gt masks (see forward), gathered chunk by chunk by the loss
        rows = torch.cat(
            [targets[b]["mask_rows"][t.to(masks.device)] for b, (_, t) in enumerate(indices)]
        )
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            return zero, zero
        if not self.point_sampling:
            bce, dice = upsampled_mask_losses(src, all_masks, rows)
            return bce / num_masks, dice / num_masks
        tgt = all_masks[rows]
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

    def _losses(
        self, outputs: Dict, targets: List[Dict], all_masks: torch.Tensor, num_masks: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        loss_mask, loss_dice = self.loss_masks(
            outputs["pred_masks"], targets, all_masks, indices, num_masks
        )
        raw = {
            "loss_ce": self.loss_labels(outputs["pred_logits"], targets, indices),
            "loss_mask": loss_mask,
            "loss_dice": loss_dice,
        }
        return {k: v * self.weights[k] for k, v in raw.items()}

    def forward(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K+1), "pred_masks" (B, Q, h, w), "aux_outputs" (list of the same).
            targets: per image, "labels" (T,) int64 and "masks" (T, H, W) of the padded image.
        Returns:
            weighted losses: loss_ce, loss_mask, loss_dice, and loss_{ce,mask,dice}_{i} per auxiliary output.
        """
        # One float copy of all gt masks of the batch, shared by the matcher and the losses of every decoder
        # output, instead of a conversion and a gather per output and image (~0.4 s of a 5 s CPU step at 512²).
        sizes = {tuple(t["masks"].shape[-2:]) for t in targets}
        if len(sizes) != 1:
            raise ValueError(
                f"target masks must all have the padded batch size, got sizes {sorted(sizes)}"
            )
        all_masks = torch.cat([t["masks"] for t in targets]).float()
        targets, start = list(targets), 0
        for i, t in enumerate(targets):
            n = len(t["masks"])
            rows = torch.arange(start, start + n, device=all_masks.device)
            targets[i] = {**t, "masks": all_masks[start : start + n], "mask_rows": rows}
            start += n
        count = sum(len(t["labels"]) for t in targets)
        num_masks = _global_mean_denominator(
            torch.tensor(float(count), device=outputs["pred_logits"].device), min_total=1.0
        )
        losses = self._losses(outputs, targets, all_masks, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(
                {f"{k}_{i}": v for k, v in self._losses(aux, targets, all_masks, num_masks).items()}
            )
        return losses
