"""The U-Net pixel decoder (thesis §3.4, eq. 4-6) and its mask head (§3.5.3, eq. 16)."""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from .blocks import DecoderStage, add_coords, conv_stack
from .mask_head import MaskHead

SKIP_FUSIONS = ("concat", "add", "full")


class UNetPixelDecoder(nn.Module):
    """Coarse-to-fine decoder over res5 (1/32), res4 (1/16), res3 (1/8), plus the mask head at 1/4.

    Per level ``l`` (coarse to fine): ``skip = skip_proj(res_l)``; ``x = G_x([coord, skip])`` at the
    first level and ``x = G_x([up2([coord, x]), skip])`` after (SE on ``G_x``'s output, eq. 4-5);
    the mask branch ``X_m = G_m(x)`` then ``X_m = G_m(up2(X_m) + x)`` (eq. 6).
    ``multi_scale_features`` are the X_m of every level, which the query decoder attends to; the
    mask head gives ``mask_features`` E = M(F(res2) + up(X_m at 1/8)) (eq. 16).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        hidden_dim: int,
        mask_dim: int,
        norm: str,
        skip_fusion: str,
        coord_conv: bool,
        se: bool,
        mask_branch: bool,
        mask_branch_convs: int,
        light_mask_head: bool,
        align_corners: bool = False,
        mask_stride: int = 4,
        image_channels: int = 3,
    ):
        super().__init__()
        if skip_fusion not in SKIP_FUSIONS:
            raise ValueError(
                f"MODEL.IAUNET.SKIP_FUSION must be one of {SKIP_FUSIONS}, got {skip_fusion!r}"
            )
        if len(input_shape) != 4:
            raise ValueError(
                "MODEL.IAUNET.IN_FEATURES must name 4 backbone outputs (1/4..1/32), "
                f"got {list(input_shape)}"
            )
        names = sorted(input_shape, key=lambda k: input_shape[k].stride)  # fine -> coarse
        self.res2_name = names[0]
        # The heavy mask head runs res2 through one more U-Net level instead of F (1x1 + norm).
        self.in_features = names[::-1] if not light_mask_head else names[:0:-1]  # coarse -> fine
        self.skip_fusion, self.coord_conv, self.use_mask_branch = (
            skip_fusion,
            coord_conv,
            mask_branch,
        )
        self.light_mask_head = light_mask_head
        self.align_corners = align_corners
        ncoord = 2 if coord_conv else 0

        self.skip_proj = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.mask_branch = nn.ModuleList()
        for i, name in enumerate(self.in_features):
            c_in = input_shape[name].channels
            if skip_fusion == "full":
                self.skip_proj.append(nn.Identity())
                c_skip = c_in
            else:
                self.skip_proj.append(nn.Conv2d(c_in, hidden_dim, 1))
                c_skip = hidden_dim
            if i == 0 or skip_fusion == "add":
                c_stage = c_skip + ncoord
            else:
                c_stage = hidden_dim + ncoord + c_skip
            self.stages.append(DecoderStage(c_stage, hidden_dim, norm, se))
            if mask_branch:
                self.mask_branch.append(conv_stack(hidden_dim, mask_dim, mask_branch_convs, norm))
        for module in (self.skip_proj, self.stages):
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)

        self.out_channels = mask_dim if mask_branch else hidden_dim  # of multi_scale_features
        # Levels the query decoder attends to: 1/32, 1/16, 1/8 (the heavy head's 1/4 level feeds E
        # only).
        self.num_levels = 3
        self.mask_head = MaskHead(
            self.out_channels,
            mask_dim,
            res2_channels=input_shape[self.res2_name].channels if light_mask_head else None,
            norm=norm,
            stride=mask_stride,
            image_channels=image_channels,
        )

    @property
    def mask_stride(self) -> int:
        """Stride of E (``mask_features``) and so of the mask logits: 4, or 2."""
        return self.mask_head.stride

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        m = cfg.MODEL.IAUNET
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in m.IN_FEATURES},
            "hidden_dim": m.HIDDEN_DIM,
            "mask_dim": m.MASK_DIM,
            "norm": m.NORM,
            "skip_fusion": m.SKIP_FUSION,
            "coord_conv": m.COORD_CONV,
            "se": m.SE,
            "mask_branch": m.MASK_BRANCH,
            "mask_branch_convs": m.MASK_BRANCH_CONVS,
            "light_mask_head": m.LIGHT_MASK_HEAD,
            "align_corners": m.ALIGN_CORNERS,
            "mask_stride": m.MASK_STRIDE,
            "image_channels": len(cfg.MODEL.PIXEL_MEAN),
        }

    def _up(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """x2 bilinear upsampling of the U-Net path (to ``like``'s size)."""
        return F.interpolate(
            x, size=like.shape[-2:], mode="bilinear", align_corners=self.align_corners
        )

    def _coords(self, x: torch.Tensor) -> torch.Tensor:
        return add_coords(x) if self.coord_conv else x

    def forward(
        self, features: Dict[str, torch.Tensor], image: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            features: backbone outputs, e.g. res2..res5 of shape (B, C_l, H/s_l, W/s_l).
            image: (B, 3, H, W) normalized input, used by the mask head at ``MASK_STRIDE`` 2.
        Returns:
            mask_features: E, (B, MASK_DIM, H/s, W/s), s = ``MASK_STRIDE`` (4, or 2).
            multi_scale_features: X_m per level, coarse to fine:
                [(B, C, H/32, W/32), (B, C, H/16, W/16), (B, C, H/8, W/8)], C = ``out_channels``.
        """
        x = xm = None
        multi_scale_features: List[torch.Tensor] = []
        for i, name in enumerate(self.in_features):
            skip = self.skip_proj[i](features[name])
            if x is None:
                x = self._coords(skip)
            elif self.skip_fusion == "add":
                x = self._coords(self._up(x, skip) + skip)
            else:
                x = torch.cat([self._up(self._coords(x), skip), skip], dim=1)
            x = self.stages[i](x)
            if self.use_mask_branch:
                xm = self.mask_branch[i](x if xm is None else self._up(xm, x) + x)
            else:
                xm = x
            multi_scale_features.append(xm)
        if self.light_mask_head:
            return self.mask_head(xm, features[self.res2_name], image), multi_scale_features
        # Heavy head: the 1/4 level is a full U-Net stage; it feeds E and is not attended to.
        return self.mask_head(multi_scale_features.pop(), image=image), multi_scale_features
