"""Swin Transformer (timm implementation) as a detectron2 backbone with outputs res2..res5.

The layers are timm's ``SwinTransformer`` modules, so parameter names are timm's
(``patch_embed.*``, ``layers.{i}.downsample.*``, ``layers.{i}.blocks.{j}.*``) plus one LayerNorm per
output (``norm{i}``, as in Mask2Former's ``D2SwinTransformer``); ``tools/convert_pretrained.py``
maps official and timm ImageNet checkpoints onto them.
"""

import logging
from functools import partial
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from timm.layers import PatchEmbed
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from torch import nn

logger = logging.getLogger(__name__)

_STAGE_NAMES = ("res2", "res3", "res4", "res5")


class PadFirstSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the padding order of the official (detection) Swin.

    The official implementation pads a feature map to a multiple of the window *before* the cyclic
    shift and builds the shift mask on the padded map. timm rolls first and pads after, so whenever
    padding is needed the rows/columns wrapped around by the shift share a mask region (and attend)
    with the opposite border. Detection inputs (e.g. 512 / 4 = 128, not a multiple of 7) nearly
    always need padding, so the blocks of our backbone use this order; without padding both orders
    give the same result.
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """Shifted-window attention. x: (B, H, W, C) after norm1 -> (B, H, W, C)."""
        _, H, W, C = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (win_w - W % win_w) % win_w, 0, (win_h - H % win_h) % win_h))
        Hp, Wp = x.shape[1], x.shape[2]
        shift_h, shift_w = self.shift_size
        shifted = shift_h > 0 or shift_w > 0
        mask: Optional[torch.Tensor] = None
        if shifted:
            x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
            mask = self.get_attn_mask(
                x
            )  # (num_windows, win_h*win_w, win_h*win_w) for the padded map
        windows = window_partition(x, self.window_size).view(-1, win_h * win_w, C)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, C)
        x = window_reverse(windows, self.window_size, Hp, Wp)
        if shifted:
            x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :H, :W].contiguous()


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """Swin-T/S/B backbone configured by ``cfg.MODEL.SWIN``.

    Accepts any input size: the patch embedding pads to the patch size, patch merging pads odd sizes
    and every block pads its feature map to a multiple of the window (the window size is fixed, as
    in the official detection Swin, not shrunk to small feature maps). Inputs padded to
    ``size_divisibility`` (32) give outputs of exactly ``H / stride x W / stride``.
    """

    def __init__(self, cfg: CfgNode, input_shape: ShapeSpec):
        super().__init__()
        s = cfg.MODEL.SWIN
        if s.APE:
            raise ValueError(
                "MODEL.SWIN.APE (absolute position embedding) is not supported by timm's Swin"
            )
        swin = SwinTransformer(
            img_size=s.PRETRAIN_IMG_SIZE,
            patch_size=s.PATCH_SIZE,
            in_chans=input_shape.channels,
            num_classes=0,
            embed_dim=s.EMBED_DIM,
            depths=tuple(s.DEPTHS),
            num_heads=tuple(s.NUM_HEADS),
            window_size=s.WINDOW_SIZE,
            # keep the full window (and its shift) on feature maps smaller than it
            always_partition=True,
            strict_img_size=False,  # any input size; shift masks are built per forward
            embed_layer=partial(PatchEmbed, dynamic_img_pad=True),
            mlp_ratio=s.MLP_RATIO,
            qkv_bias=s.QKV_BIAS,
            proj_drop_rate=s.DROP_RATE,
            attn_drop_rate=s.ATTN_DROP_RATE,
            drop_path_rate=s.DROP_PATH_RATE,
        )
        for stage in swin.layers:
            for block in stage.blocks:
                block.__class__ = PadFirstSwinBlock
            stage.grad_checkpointing = s.USE_CHECKPOINT
        # Keep only the feature layers; the classifier's final norm and head are not part of the
        # backbone.
        self.patch_embed = swin.patch_embed
        if not s.PATCH_NORM:
            self.patch_embed.norm = nn.Identity()
        self.layers = swin.layers

        self._out_features = list(s.OUT_FEATURES)
        unknown = set(self._out_features) - set(_STAGE_NAMES)
        if unknown:
            raise ValueError(
                f"MODEL.SWIN.OUT_FEATURES: unknown {sorted(unknown)}, choose from {_STAGE_NAMES}"
            )
        self._out_feature_strides: Dict[str, int] = {}
        self._out_feature_channels: Dict[str, int] = {}
        for i, name in enumerate(_STAGE_NAMES[: len(self.layers)]):
            self._out_feature_strides[name] = s.PATCH_SIZE * 2**i
            self._out_feature_channels[name] = s.EMBED_DIM * 2**i
            if name in self._out_features:
                # Stage outputs are un-normalized residual streams: normalize each one, as
                # Mask2Former does.
                self.add_module(f"norm{i}", nn.LayerNorm(s.EMBED_DIM * 2**i))
        logger.info(
            "Swin backbone: embed %d, depths %s, heads %s, window %d, drop path %.2f",
            s.EMBED_DIM,
            list(s.DEPTHS),
            list(s.NUM_HEADS),
            s.WINDOW_SIZE,
            s.DROP_PATH_RATE,
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: (B, C, H, W) -> {"res{i+2}": (B, EMBED_DIM * 2**i, ceil(H / stride), ceil(W /
        stride))}."""
        if x.dim() != 4:
            raise ValueError(
                f"D2SwinTransformer takes (B, C, H, W) inputs, got shape {tuple(x.shape)}"
            )
        x = self.patch_embed(x)  # (B, H/4, W/4, EMBED_DIM), channels last
        outputs: Dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self.layers):
            x = stage(x)
            name = _STAGE_NAMES[i]
            if name in self._out_features:
                outputs[name] = getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous()
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of each output feature."""
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        """Input sizes must be multiples of the largest stride (32) for exact ``H / stride``
        outputs."""
        return self._out_feature_strides[_STAGE_NAMES[len(self.layers) - 1]]
