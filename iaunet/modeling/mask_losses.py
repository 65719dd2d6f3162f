"""Mask losses of thesis §3.6: per-mask sigmoid BCE and Dice, on sampled points or on
full-resolution masks.

``upsampled_mask_losses`` computes them on predicted mask logits bilinearly upsampled to the target
size, fused: the gradient is written in closed form in the forward pass and taken back to mask
resolution with the transpose of the upsampling, so that no full-size activation is kept for
backward (docs/performance.md, "Fused full-resolution mask loss", has the measurements).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs: (M, P) logits, targets: (M, P) in {0, 1} -> summed Dice loss over the M masks."""
    inputs = inputs.sigmoid()
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def bce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs: (M, P) logits, targets: (M, P) -> per-mask mean BCE, summed over the M masks."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum()


def _linear_upsampling_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear upsampling (align_corners=False), built by upsampling the
    identity so that its weights are exactly those F.interpolate uses. Bilinear upsampling of X is
    A_h @ X @ A_w^T."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].t()


class _UpsampledMaskLosses(torch.autograd.Function):
    """Per-mask mean sigmoid BCE and Dice of mask logits bilinearly upsampled to the target size
    (thesis §3.6), summed over the masks. Same values and gradients as F.interpolate + ``bce_loss``
    / ``dice_loss`` with autograd, without any full-size activation kept for backward:

    * masks are processed a few at a time, so every temporary is a small buffer that the allocator
      reuses;
    * the gradient is computed in closed form in the forward pass and brought back to mask
      resolution with the transpose of the upsampling, A_h^T G A_w (two matmuls, cheaper than aten's
      upsample backward on CPU);
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
    logits: torch.Tensor,
    targets: torch.Tensor,
    index: Optional[torch.Tensor] = None,
    chunk_pixels: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed per-mask mean BCE and summed Dice of ``logits`` upsampled to the targets' size.

    Args:
        logits: (M, h, w) mask logits.
        targets: (N, H, W) in {0, 1} (any dtype).
        index: (M,) the target row of each logit map (default: targets[i] for logits[i]).
        chunk_pixels: target pixels processed at once (default ~0.5M on CPU, cache-resident; 64M on
        GPU).

    Always fp32 (autocast off: the closed-form gradient and the matmuls must not run in fp16).
    """
    if index is None:
        index = torch.arange(logits.shape[0], device=logits.device)
    if chunk_pixels is None:
        chunk_pixels = 1 << 19 if logits.device.type == "cpu" else 1 << 26
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _UpsampledMaskLosses.apply(logits.float(), targets, index, chunk_pixels)
