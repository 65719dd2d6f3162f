#!/usr/bin/env python3
"""Convert ImageNet checkpoints, and the IAUNet authors' trained models, into weights that
``MODEL.WEIGHTS`` loads into our IAUNet model.

torchvision ResNet (detectron2 names; ``MODEL.RESNETS.STRIDE_IN_1X1 False``, ``INPUT.FORMAT RGB``).
The thesis models start from the V2 checkpoints (``ResNet50_Weights.DEFAULT``)::

    python tools/convert_pretrained.py resnet resnet50-11ad3fa6.pth R-50.pkl
    python tools/convert_pretrained.py resnet resnet101-cd907fc2.pth R-101.pkl

Swin (official microsoft/Swin-Transformer ``.pth`` or timm ``.pth``/``.safetensors``)::

    python tools/convert_pretrained.py swin swin_small_patch4_window7_224.pth swin_s.pkl
    python tools/convert_pretrained.py swin swin_base_patch4_window12_384_22k.pth swin_b.pkl \
        --window-size 12

The authors' IAUNet (github SlavkoPrytula/IAUNet: a Lightning checkpoint or a bare state dict with
``encoder.*`` = torchvision ResNet and ``decoder.*``), e.g. to check the thesis numbers::

    python tools/convert_pretrained.py iaunet-ref best.ckpt iaunet_r50_revvity.pth
    python train_net.py --config-file configs/revvity25/iaunet_R50.yaml --eval-only \
        MODEL.WEIGHTS iaunet_r50_revvity.pth

Output keys carry the model's prefixes (``backbone.`` ...), so they load without name-matching
heuristics. Swin: the classifier head and the non-persistent buffers (``relative_position_index``,
``attn_mask``) are dropped; the classifier's final norm initializes ``norm3`` (the res5 output norm,
same position); the output norms ``norm0..2`` keep their default init. With ``--window-size``
different from the checkpoint's, every ``relative_position_bias_table`` is resized by bicubic
interpolation, as the official Swin code does when fine-tuning at another window.
"""

import argparse
import logging
import math
import pickle
import re
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from iaunet.utils.safe_load import UnsafeFileError, load_weights_file

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]


def load_state_dict(path: str) -> StateDict:
    """Read a ``.pth``/``.pt``/``.bin``/``.pkl`` or ``.safetensors`` checkpoint as data
    (:func:`iaunet.utils.safe_load.load_weights_file`); unwraps ``model`` / ``state_dict``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = load_weights_file(path)  # read as data: a file that asks to run code is refused
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    # detectron2 .pkl files hold numpy arrays
    return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


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


def convert_torchvision_resnet(
    state: StateDict, prefix: str = "backbone.", keep_counters: bool = False
) -> StateDict:
    """Map a torchvision ResNet state dict onto detectron2 ``ResNet`` names (``stem``,
    ``res2..res5``).

    ``fc`` and BatchNorm ``num_batches_tracked`` counters are dropped.
    """
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("fc.") or (key.endswith("num_batches_tracked") and not keep_counters):
            continue
        if not key.startswith("layer"):
            key = "stem." + key
        key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
        key = re.sub(r"bn(\d)", r"conv\1.norm", key)
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[prefix + key] = value
    return out


# The authors' decoder names (``decoder.`` stripped) -> ours. Their mask-branch, lateral and output
# convolutions have biases that ours (followed by BN) do not: see ``_fold_conv_bias``.
REFERENCE_DECODER_KEYS = (
    (r"^skip_conv_layers\.", "pixel_decoder.skip_proj."),
    (r"^up_conv_layers\.(\d+)\.0\.depthwise_conv1\.", r"pixel_decoder.stages.\1.conv.body.0."),
    (r"^up_conv_layers\.(\d+)\.0\.pointwise_conv1\.", r"pixel_decoder.stages.\1.conv.body.1."),
    (r"^up_conv_layers\.(\d+)\.0\.norm_relu1\.0\.", r"pixel_decoder.stages.\1.conv.body.2."),
    (r"^up_conv_layers\.(\d+)\.0\.depthwise_conv2\.", r"pixel_decoder.stages.\1.conv.body.4."),
    (r"^up_conv_layers\.(\d+)\.0\.pointwise_conv2\.", r"pixel_decoder.stages.\1.conv.body.5."),
    (r"^up_conv_layers\.(\d+)\.0\.norm_relu2\.0\.", r"pixel_decoder.stages.\1.conv.body.6."),
    (r"^up_conv_layers\.(\d+)\.0\.projection\.", r"pixel_decoder.stages.\1.conv.projection."),
    (r"^up_conv_layers\.(\d+)\.1\.excite\.", r"pixel_decoder.stages.\1.se.fc."),
    # MaskStackedConv: [conv, BN, ReLU] x n -> detectron2 Conv2d(norm=...) x n
    (r"^mask_branch\.(\d+)\.mask_convs\.(\d+)\.", None),
    (r"^lateral_conv\.0\.", "pixel_decoder.mask_head.lateral."),
    (r"^lateral_conv\.1\.", "pixel_decoder.mask_head.lateral.norm."),
    (r"^output_conv\.0\.", "pixel_decoder.mask_head.output.0."),
    (r"^output_conv\.1\.", "pixel_decoder.mask_head.output.0.norm."),
    (
        r"^transformer_instance_cross_attention_layers\.(\d+)\.multihead_attn\.",
        r"query_decoder.cross_attention.\1.attn.",
    ),
    (
        r"^transformer_instance_cross_attention_layers\.(\d+)\.norm\.",
        r"query_decoder.cross_attention.\1.norm.",
    ),
    (
        r"^transformer_instance_self_attention_layers\.(\d+)\.self_attn\.",
        r"query_decoder.self_attention.\1.attn.",
    ),
    (
        r"^transformer_instance_self_attention_layers\.(\d+)\.norm\.",
        r"query_decoder.self_attention.\1.norm.",
    ),
    (r"^transformer_instance_ffn_layers\.", "query_decoder.ffn."),
    (r"^query_feat\.", "query_decoder.queries."),
    (r"^query_embed\.", "query_decoder.query_pos."),
    (r"^(decoder_norm|class_embed|mask_embed)\.", r"query_decoder.\1."),
)
# Layers of the authors' decoder that no output uses (no loss reads ``bbox_pred`` in their config).
REFERENCE_UNUSED = ("fc.", "objectness.", "bbox_pred.")


def _reference_decoder_key(key: str) -> Optional[str]:
    """Our name for a key of the authors' decoder (``decoder.`` stripped); None: not converted."""
    m = re.match(r"^mask_branch\.(\d+)\.mask_convs\.(\d+)\.(.*)$", key)
    if m:  # index 3j = conv of layer j, 3j + 1 = its BN, 3j + 2 = ReLU
        level, idx, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        norm = ".norm" if idx % 3 == 1 else ""
        return f"pixel_decoder.mask_branch.{level}.{idx // 3}{norm}.{rest}"
    for pattern, repl in REFERENCE_DECODER_KEYS:
        if repl is not None and re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _fold_conv_bias(out: StateDict) -> None:
    """BN(conv(x) + b) = BN'(conv(x)) with BN' = BN whose running mean is mu - b (exact in eval):
    for every ``<conv>.bias`` of ours whose conv is followed by ``<conv>.norm``."""
    for key in [k for k in out if k.endswith(".bias")]:
        conv = key[: -len(".bias")]
        if f"{conv}.norm.running_mean" in out and f"{conv}.weight" in out:
            out[f"{conv}.norm.running_mean"] = out[f"{conv}.norm.running_mean"] - out.pop(key)


def convert_iaunet_reference(state: StateDict) -> StateDict:
    """Map the authors' IAUNet state dict (``encoder.*`` torchvision ResNet, ``decoder.*``; a
    Lightning ``model.`` prefix is stripped) onto our model, BatchNorm statistics included."""
    state = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in state.items()}
    encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    out = convert_torchvision_resnet(encoder, keep_counters=True)
    unknown = []
    if "criterion.empty_weight" in state:  # the CE class weights ("no object" 0.1), same buffer
        out["criterion.empty_weight"] = state["criterion.empty_weight"]
    for key, value in state.items():
        if not key.startswith("decoder.") or key.endswith(("total_ops", "total_params")):
            continue
        key = key[len("decoder.") :]
        if key.startswith(REFERENCE_UNUSED):
            continue
        new = _reference_decoder_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown or not encoder:
        raise ValueError(
            "not an IAUNet reference checkpoint: "
            + (f"unknown decoder keys {unknown[:5]}" if unknown else "no encoder.* keys")
        )
    _fold_conv_bias(out)
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
    parser.add_argument("kind", choices=["swin", "resnet", "iaunet-ref"], help="checkpoint family")
    parser.add_argument("input", help="ImageNet checkpoint (.pth, .pt, .bin, .pkl or .safetensors)")
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

    try:
        state = load_state_dict(args.input)
    except UnsafeFileError as e:
        parser.exit(2, f"convert_pretrained.py: error: {e}\n")
    except Exception as e:  # missing, truncated, not a checkpoint
        parser.exit(2, f"convert_pretrained.py: error: cannot read {args.input}: {e}\n")
    if args.kind == "swin":
        converted = convert_swin(state, args.window_size, args.prefix)
    elif args.kind == "resnet":
        converted = convert_torchvision_resnet(state, args.prefix)
    else:
        converted = convert_iaunet_reference(state)
    save(converted, args.output, author=f"{args.kind} ImageNet ({args.input})")
    logger.info(
        "wrote %d tensors (%d in the checkpoint) to %s", len(converted), len(state), args.output
    )


if __name__ == "__main__":
    main()
