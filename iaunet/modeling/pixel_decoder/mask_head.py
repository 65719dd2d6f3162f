"""The light mask head (thesis §3.5.3, eq. 16): the per-pixel embedding E at 1/4 resolution."""

from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from torch import nn

from .blocks import conv_stack


class MaskHead(nn.Module):
    """``E = M(F(res2) + up(X_m^{1/8}))`` with F = Conv1x1 + norm and M = Conv3x3 + norm + ReLU.

    With ``res2_channels=None`` (the heavy-head ablation, ``MODEL.IAUNET.LIGHT_MASK_HEAD False``)
    there is
    no F: the input is already at 1/4 (a full U-Net level on res2) and ``E = M(x)``.
    """

    def __init__(
        self,
        in_channels: int,
        mask_dim: int,
        res2_channels: Optional[int] = None,
        norm: str = "BN",
    ):
        super().__init__()
        self.lateral = (
            Conv2d(res2_channels, in_channels, 1, bias=not norm, norm=get_norm(norm, in_channels))
            if res2_channels is not None
            else None
        )
        self.output = conv_stack(in_channels, mask_dim, 1, norm)

    def forward(self, x: torch.Tensor, res2: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: X_m at 1/8 (B, C, H/8, W/8), res2: (B, C2, H/4, W/4) -> mask_features E (B, D_mask,
        H/4, W/4).
        Heavy head: x is already (B, C, H/4, W/4) and res2 is not used."""
        if self.lateral is not None:
            size = res2.shape[-2:]
            # align_corners=False here also in the reference code (only its U-Net x2 steps use True)
            x = self.lateral(res2) + F.interpolate(
                x, size=size, mode="bilinear", align_corners=False
            )
        return self.output(x)
