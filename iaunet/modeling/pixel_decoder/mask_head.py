"""The light mask head (thesis §3.5.3, eq. 16): the per-pixel embedding E at 1/4 resolution, or at
1/2 with a detail stage fed by the image (``MODEL.IAUNET.MASK_STRIDE 2``, beyond the thesis)."""

from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from torch import nn

from .blocks import conv_stack

MASK_STRIDES = (4, 2)


class MaskHead(nn.Module):
    """``E = M(F(res2) + up(X_m^{1/8}))`` with F = Conv1x1 + norm and M = Conv3x3 + norm + ReLU.

    With ``res2_channels=None`` (the heavy-head ablation, ``MODEL.IAUNET.LIGHT_MASK_HEAD False``)
    there is no F: the input is already at 1/4 (a full U-Net level on res2) and ``E = M(x)``.

    ``stride=2``: ``E_{1/2} = up2(E) + P(D(image))``, D two 3x3 convs (the first of stride 2) with
    ``mask_dim / 4`` channels on the normalized image and P a 1x1 projection: image detail for the
    mask boundaries of small objects, which E at 1/4 places only to a fraction of its pixels (a
    cell 12 px across is 3 px of E). ~8% more FLOPs for the quick config (fvcore, 512²: 15.6 against
    14.5 GFLOPs).
    """

    def __init__(
        self,
        in_channels: int,
        mask_dim: int,
        res2_channels: Optional[int] = None,
        norm: str = "BN",
        stride: int = 4,
        image_channels: int = 3,
    ):
        super().__init__()
        if stride not in MASK_STRIDES:
            raise ValueError(
                f"MODEL.IAUNET.MASK_STRIDE must be one of {MASK_STRIDES}, got {stride}"
            )
        self.stride = stride
        self.lateral = (
            Conv2d(res2_channels, in_channels, 1, bias=not norm, norm=get_norm(norm, in_channels))
            if res2_channels is not None
            else None
        )
        self.output = conv_stack(in_channels, mask_dim, 1, norm)
        self.detail = None
        if stride == 2:
            c = max(mask_dim // 4, 8)
            first = Conv2d(
                image_channels,  # len(MODEL.PIXEL_MEAN): 3, or the INPUT.CHANNELS
                c,
                3,
                stride=2,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, c),
                activation=nn.ReLU(inplace=True),
            )
            self.detail = nn.Sequential(
                first, *conv_stack(c, c, 1, norm), nn.Conv2d(c, mask_dim, 1)
            )

    def forward(
        self,
        x: torch.Tensor,
        res2: Optional[torch.Tensor] = None,
        image: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: X_m at 1/8 (B, C, H/8, W/8), res2: (B, C2, H/4, W/4) -> mask_features E (B, D_mask,
        H/4, W/4); with ``stride=2`` also ``image`` (B, 3, H, W), normalized -> E at H/2, W/2.
        Heavy head: x is already (B, C, H/4, W/4) and res2 is not used."""
        if self.lateral is not None:
            size = res2.shape[-2:]
            # align_corners=False here also in the reference code (only its U-Net x2 steps use True)
            x = self.lateral(res2) + F.interpolate(
                x, size=size, mode="bilinear", align_corners=False
            )
        e = self.output(x)
        if self.detail is None:
            return e
        if image is None:
            raise ValueError("MODEL.IAUNET.MASK_STRIDE 2 needs the image in the mask head")
        detail = self.detail(image)
        return detail + F.interpolate(
            e, size=detail.shape[-2:], mode="bilinear", align_corners=False
        )
