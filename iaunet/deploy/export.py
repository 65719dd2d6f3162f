"""IAUNet with its post-processing as one graph, exported to ONNX or TorchScript (docs/deploy.md).

The graph is the eager inference path up to the one data-dependent step:

    images (B, C, H, W) float32, 0..255, channel order INPUT.FORMAT (C = 3), or the INPUT.CHANNELS
      of the file (C = len(MODEL.PIXEL_MEAN)), any H and W
      -> normalize (MODEL.PIXEL_MEAN / PIXEL_STD), zero-pad to a multiple of 32 (inside the graph)
      -> IAUNet.forward_network
      -> postprocessing.topk_predictions (softmax x maskness, top-k, duplicate suppression)
      -> postprocessing.masks_at_input_size (x4 bilinear, padding removed)
      -> scores (B, k) float32, sorted decreasingly; classes (B, k) int64;
         mask_logits (B, k, H, W) float32 (mask = mask_logits > logit(MASK_THRESH), 0 for 0.5)

with k = min(TEST.DETECTIONS_PER_IMAGE, NUM_QUERIES x NUM_CLASSES). A model predicting whole
outlines too (``MODEL.IAUNET.AMODAL``, docs/amodal.md) has a fourth output, ``amodal_mask_logits``
(B, k, H, W), the whole outlines of the same detections; ``mask_logits`` are then their visible
parts (kept inside the whole outlines by ``topk_predictions``). What is left is the score
threshold (``postprocessing.select_detections``) and, for another output size, the resize of
``postprocessing.upsample_masks``; ``postprocessing.instances_from_topk(..., stride=1)`` does both,
as the eager model does after ``topk_predictions``. The functions are the eager model's own: there
is no second implementation.

The file carries the config it was exported with (ONNX metadata ``iaunet.config``; TorchScript
extra file ``iaunet_config.yaml``), so that the predictor (``backend="onnxruntime"`` /
``"torchscript"``) can run it without the checkpoint.
"""

import io
import logging
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from torch import nn

from ..inference.backends import (  # noqa: F401 (the file format: read there, written here)
    CONFIG_EXTRA_FILE,
    CONFIG_KEY,
    GRAPH_KEYS,
    INPUT_NAME,
    graph_keys,
    read_exported_config,
)
from ..modeling.postprocessing import masks_at_input_size
from ..utils.atomic import atomic_write

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
OUTPUT_NAMES = ("scores", "classes", "mask_logits")
AMODAL_OUTPUT = "amodal_mask_logits"  # the fourth output of a MODEL.IAUNET.AMODAL model
ONNX_OPSET = 17


class ExportableIAUNet(nn.Module):
    """An eval-mode :class:`iaunet.IAUNet` as a tensors-in, tensors-out module (see the module
    docstring for inputs and outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """images (B, C, H, W) float, 0..255 -> scores (B, k), classes (B, k), mask_logits
        (B, k, H, W) [, amodal_mask_logits (B, k, H, W)]."""
        model = self.model
        h, w = images.shape[-2:]
        x = (images.float() - model.pixel_mean) / model.pixel_std
        d = model.size_divisibility
        # Zeros after normalization, as detectron2's ImageList.from_tensors pads.
        x = F.pad(x, (0, (d - w % d) % d, 0, (d - h % d) % d))
        x = x.contiguous(memory_format=model.memory_format)
        out = model.forward_network(x)
        scores, classes, *masks = model.topk_predictions(
            out["pred_logits"], out["pred_masks"], (h, w), out.get("pred_amodal_masks")
        )
        return (
            scores,
            classes,
            *(masks_at_input_size(m, (h, w), model.mask_stride) for m in masks),
        )


def graph_config(predictor, package: bool = False) -> CfgNode:
    """The config an exported graph of ``predictor``'s model carries (the model is the predictor's;
    so are its settings): the predictor's own, less the steps that the graph does not run, each
    named in the log. Test-time augmentation runs in PyTorch only; a bioimage.io ``package``'s
    graph writes each mask whole and of any size (``iaunet-predict`` keeps the largest piece and
    drops the small ones for every backend, from the config the file carries)."""
    cfg = predictor.cfg.clone()
    cfg.defrost()
    if predictor.test_augmentation != "none":
        logger.info(
            f"MODEL.IAUNET.TEST.TTA {predictor.test_augmentation} is not exported: the graph runs "
            "one view (test-time augmentation runs in iaunet-predict's PyTorch backend)"
        )
        cfg.MODEL.IAUNET.TEST.TTA = "none"
    if package and predictor.one_piece:
        logger.info(
            "MODEL.IAUNET.TEST.ONE_PIECE is not in the bioimage.io package: its graph writes each "
            "mask whole (iaunet-predict keeps the largest piece of each, for any backend)"
        )
        cfg.MODEL.IAUNET.TEST.ONE_PIECE = False
    if package and predictor.min_area > 0:
        logger.info(
            f"MODEL.IAUNET.TEST.MIN_AREA {predictor.min_area} is not in the bioimage.io package: "
            "its graph keeps masks of any size (iaunet-predict drops the smaller ones, for any "
            "backend)"
        )
        cfg.MODEL.IAUNET.TEST.MIN_AREA = 0.0
    cfg.freeze()
    return cfg


def trace(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of an inference module (no gradients, no trace check)."""
    with torch.no_grad():
        return torch.jit.trace(module, example, check_trace=False)


def export_model(
    model: nn.Module,
    cfg: CfgNode,
    path: str,
    fmt: str,
    size: Sequence[int] = (512, 512),
    dynamic: bool = True,
    batch: int = 1,
) -> str:
    """Export eval-mode IAUNet ``model`` (built from ``cfg``) with its post-processing to
    ``path``.

    Args:
        fmt: "onnx" or "torchscript".
        size: (H, W) of the example input that the graph is traced with.
        dynamic: any batch size, height and width (ONNX dynamic axes); False fixes them to
            ``batch`` x ``size`` (ONNX; a TorchScript trace keeps the shape arithmetic anyway).
    Returns:
        ``path``, written atomically.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    module = ExportableIAUNet(model).cpu()
    example = torch.rand(batch, len(cfg.MODEL.PIXEL_MEAN), *size) * 255
    config = cfg.dump()
    if fmt == "torchscript":
        traced = trace(module, example)
        atomic_write(path, lambda f: torch.jit.save(traced, f, {CONFIG_EXTRA_FILE: config}))
        return path
    import onnx

    outputs = list(OUTPUT_NAMES) + ([AMODAL_OUTPUT] if cfg.MODEL.IAUNET.AMODAL else [])
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    axes.update({"scores": {0: "batch"}, "classes": {0: "batch"}})
    for name in outputs[2:]:
        axes[name] = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()  # < 2 GB: no external data
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,  # the TorchScript-based exporter: no onnxscript needed
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes=axes if dynamic else None,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    meta = proto.metadata_props.add()
    meta.key, meta.value = CONFIG_KEY, config
    proto.producer_name = "iaunet"
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    return path
