"""Building blocks of the U-Net pixel decoder (thesis §3.4): CoordConv, SE, depthwise-separable
double conv."""

from typing import List

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import Conv2d, get_norm
from torch import nn


def _linspace(n, x: torch.Tensor) -> torch.Tensor:
    """``linspace(-1, 1, n)`` on ``x``'s device and dtype. A trace (the exported graphs) computes it
    from ``arange``: the ONNX exporter writes ``linspace`` with the step 2 / (n - 1), NaN for n = 1
    (a 1-px map: res5 of a 32-px input); the values differ from ``linspace``'s by float rounding."""
    if not torch.jit.is_tracing():
        return torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype)
    step = 2 / torch.as_tensor(n - 1).clamp(min=1).to(x.dtype)
    return torch.arange(n, device=x.device, dtype=x.dtype) * step - 1


def coord_planes(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2, H, W): x and y coordinates, each ``linspace(-1, 1)`` over the map."""
    b, _, h, w = x.shape
    yy, xx = torch.meshgrid(_linspace(h, x), _linspace(w, x), indexing="ij")
    return torch.stack([xx, yy]).unsqueeze(0).expand(b, -1, -1, -1)


def add_coords(x: torch.Tensor) -> torch.Tensor:
    """CoordConv input: (B, C, H, W) -> (B, C + 2, H, W), coordinates first."""
    return torch.cat([coord_planes(x), x], dim=1)


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> Linear(C, C/2) -> ReLU -> Linear(C/2, C) -> sigmoid ->
    scale."""

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class SeparableDoubleConv(nn.Module):
    """G_x: (depthwise 3x3 -> pointwise 1x1 -> norm -> ReLU) twice, plus a residual (1x1 when C
    changes)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "BN"):
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for _ in range(2):
            layers += [
                nn.Conv2d(c, c, 3, padding=1, groups=c),
                nn.Conv2d(c, out_channels, 1),
                get_norm(norm, out_channels),
                nn.ReLU(inplace=True),
            ]
            c = out_channels
        self.body = nn.Sequential(*layers)
        self.projection = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.projection(x)


class DecoderStage(nn.Module):
    """One U-Net level's block: ``se(conv(x))`` with conv = G_x (eq. 4) and se = SE (eq. 5, or
    identity)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "BN", se: bool = True):
        super().__init__()
        self.conv = SeparableDoubleConv(in_channels, out_channels, norm)
        self.se = SqueezeExcite(out_channels) if se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv(x))


def conv_stack(
    in_channels: int, out_channels: int, num_convs: int, norm: str = "BN"
) -> nn.Sequential:
    """``num_convs`` x [Conv3x3 -> norm -> ReLU] with MSRA init (the mask branch G_m)."""
    layers = []
    for i in range(num_convs):
        conv = Conv2d(
            in_channels if i == 0 else out_channels,
            out_channels,
            kernel_size=3,
            padding=1,
            bias=not norm,
            norm=get_norm(norm, out_channels),
            activation=nn.ReLU(inplace=True),
        )
        weight_init.c2_msra_fill(conv)
        layers.append(conv)
    return nn.Sequential(*layers)
