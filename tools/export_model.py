#!/usr/bin/env python
"""Export a trained IAUNet with its post-processing to ONNX or TorchScript (docs/deploy.md).

    python tools/export_model.py --weights output/model_final.pth --format onnx --output model.onnx
    python tools/export_model.py --weights W --format torchscript --output model.pt --size 512 512
    python tools/export_model.py --weights W --config-file CFG --format onnx --output m.onnx \\
        --opts TEST.DETECTIONS_PER_IMAGE 300

The graph takes a float32 batch (B, 3, H, W) on the 0..255 scale (normalized and padded inside)
and returns scores (B, k), classes (B, k) and mask logits (B, k, H, W): see
:mod:`iaunet.inference.export`. The ONNX graph has dynamic batch, height and width unless
``--size H W`` is given without ``--dynamic``; a TorchScript trace runs at any size. After writing,
the file is run once on a random image and compared with the eager model (``--no-check`` skips it).
"""

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

import torch
from detectron2.modeling import build_model

from iaunet.checkpoint import AtomicCheckpointer, CheckpointError, read_checkpoint
from iaunet.config import ConfigError, exit_on_config_error
from iaunet.inference.backends import load_backend
from iaunet.inference.export import FORMATS, ExportableIAUNet, export_model
from iaunet.inference.predictor import config_from_checkpoint

logger = logging.getLogger("iaunet.export")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", required=True, metavar="W", help="checkpoint (.pth)")
    p.add_argument(
        "--config-file",
        default="",
        metavar="CFG",
        help="config the model was trained with (default: the config saved in the checkpoint)",
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, metavar="FILE", help="e.g. model.onnx / model.pt")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input size of the example the graph is traced with; alone, it also fixes the ONNX "
        "input to 1 x 3 x H x W (default: INPUT.IMAGE_SIZE square, dynamic axes)",
    )
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic batch, height and width (the default without --size)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the exported-vs-eager check")
    p.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ..."
    )
    return p.parse_args(argv)


def check_export(model, path: str, fmt: str, size: Sequence[int]) -> dict:
    """Run the exported file and the eager module on one random image; max score difference and
    the fraction of mask pixels on the same side of the threshold."""
    backend = "onnxruntime" if fmt == "onnx" else "torchscript"
    run = load_backend(path, backend, model.postprocessing).run  # the graph's outputs only
    images = torch.rand(1, 3, *size) * 255
    with torch.inference_mode():
        expected = ExportableIAUNet(model)(images)
    got = run(images)
    return {
        "max_score_diff": float((got[0] - expected[0]).abs().max()),
        "classes_equal": bool(torch.equal(got[1], expected[1])),
        "mask_agreement": float(((got[2] > 0) == (expected[2] > 0)).float().mean()),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    args = parse_args(argv)
    try:
        checkpoint = read_checkpoint(args.weights)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    cfg = config_from_checkpoint(checkpoint, args.config_file, args.opts, args.weights)
    cfg.MODEL.DEVICE = "cpu"  # traced on the CPU; a TorchScript file loads onto any device
    cfg.MODEL.WEIGHTS = args.weights
    model = build_model(cfg).eval()
    AtomicCheckpointer(model).load_checkpoint(checkpoint)
    size = tuple(args.size) if args.size else (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.IMAGE_SIZE)
    dynamic = args.dynamic or not args.size
    start = time.perf_counter()
    export_model(model, cfg, args.output, args.format, size=size, dynamic=dynamic)
    logger.info(
        f"wrote {args.output} ({args.format}, traced at {size[0]}x{size[1]}, "
        f"{'dynamic batch/height/width' if dynamic else 'fixed input size'}) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    if not args.no_check:
        check = check_export(model, args.output, args.format, size)
        logger.info(f"exported vs eager on a random {size[0]}x{size[1]} image: {check}")
        if check["max_score_diff"] > 1e-3 or check["mask_agreement"] < 0.99:
            logger.error("the exported model disagrees with the eager model")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_config_error(main, "export_model.py"))
