#!/usr/bin/env python3
"""Convert ImageNet checkpoints into weights that ``MODEL.WEIGHTS`` loads into an IAUNet model.

Swin (official microsoft/Swin-Transformer ``.pth`` or timm ``.pth``/``.safetensors``)::

    python tools/convert_pretrained.py swin swin_small_patch4_window7_224.pth swin_s.pkl
    python tools/convert_pretrained.py swin swin_base_patch4_window7_224_22k.pth swin_b_w12.pkl
    --window-size 12

torchvision ResNet (detectron2 names; train with ``MODEL.RESNETS.STRIDE_IN_1X1 False``,
``INPUT.FORMAT RGB``
and the torchvision ``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]`` / ``PIXEL_STD [58.395, 57.12,
57.375]``)::

    python tools/convert_pretrained.py resnet resnet50-0676ba61.pth R-50.pkl

Output keys carry the model's ``backbone.`` prefix, so they load without name-matching heuristics.
Swin: the classifier head and the non-persistent buffers (``relative_position_index``,
``attn_mask``) are
dropped; the classifier's final norm initializes ``norm3`` (the res5 output norm, same position);
the output
norms ``norm0..2`` keep their default init. With ``--window-size`` different from the checkpoint's,
every
``relative_position_bias_table`` is resized by bicubic interpolation, as the official Swin code does
when
fine-tuning at another window.
"""

import argparse
import logging
import math
import pickle
import re
from typing import Dict, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]


def load_state_dict(path: str) -> StateDict:
    """Read a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` checkpoint; unwraps ``model`` /
    ``state_dict``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def resize_rel_pos_bias_table(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """Bicubic resize of a Swin relative position bias table.

    table: ((2w - 1)^2, num_heads) for the checkpoint's window w -> ((2 * window_size - 1)^2,
    num_heads).
    """
    src = math.isqrt(table.shape[0])
    dst = 2 * window_size - 1
    if src == dst:
        return table
    grid = table.T.reshape(1, table.shape[1], src, src).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.reshape(table.shape[1], dst * dst).T.contiguous().to(table.dtype)


def convert_swin(
    state: StateDict, window_size: Optional[int] = None, prefix: str = "backbone."
) -> StateDict:
    """Map an official or timm Swin ImageNet state dict onto ``D2SwinTransformer`` parameter names.

    Official checkpoints downsample at the end of stage i (``layers.{i}.downsample``), timm and our
    backbone at the start of stage i + 1; the patch-merging weights are otherwise identical.
    """
    official = "layers.0.downsample.reduction.weight" in state
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("head.") or key.endswith(("relative_position_index", "attn_mask")):
            continue
        if official:
            key = re.sub(
                r"^layers\.(\d+)\.downsample",
                lambda m: f"layers.{int(m.group(1)) + 1}.downsample",
                key,
            )
        if key in ("norm.weight", "norm.bias"):
            key = key.replace("norm.", "norm3.")
        if key.endswith("relative_position_bias_table") and window_size is not None:
            value = resize_rel_pos_bias_table(value, window_size)
        out[prefix + key] = value
    return out


def convert_torchvision_resnet(state: StateDict, prefix: str = "backbone.") -> StateDict:
    """Map a torchvision ResNet state dict onto detectron2 ``ResNet`` names (``stem``,
    ``res2..res5``).

    ``fc`` and BatchNorm ``num_batches_tracked`` counters are dropped.
    """
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if not key.startswith("layer"):
            key = "stem." + key
        key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
        key = re.sub(r"bn(\d)", r"conv\1.norm", key)
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[prefix + key] = value
    return out


def save(state: StateDict, path: str, author: str) -> None:
    """Write ``{"model": ..., "__author__": ...}`` as detectron2 ``.pkl`` (numpy arrays) or torch
    ``.pth``."""
    if path.endswith(".pkl"):
        data = {k: v.detach().cpu().numpy() for k, v in state.items()}
        with open(path, "wb") as f:
            pickle.dump({"model": data, "__author__": author, "matching_heuristics": False}, f)
    else:
        torch.save({"model": state, "__author__": author, "matching_heuristics": False}, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["swin", "resnet"], help="checkpoint family")
    parser.add_argument("input", help="ImageNet checkpoint (.pth, .pt, .bin or .safetensors)")
    parser.add_argument("output", help="converted weights: .pkl (detectron2 format) or .pth")
    parser.add_argument(
        "--window-size",
        type=int,
        default=None,
        help="swin: resize relative position bias tables to this window (cfg "
        "MODEL.SWIN.WINDOW_SIZE)",
    )
    parser.add_argument(
        "--prefix", default="backbone.", help="name of the backbone inside the model"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    state = load_state_dict(args.input)
    if args.kind == "swin":
        converted = convert_swin(state, args.window_size, args.prefix)
    else:
        converted = convert_torchvision_resnet(state, args.prefix)
    save(converted, args.output, author=f"{args.kind} ImageNet ({args.input})")
    logger.info(
        "wrote %d tensors (%d in the checkpoint) to %s", len(converted), len(state), args.output
    )


if __name__ == "__main__":
    main()
