#!/usr/bin/env python
"""Export a trained IAUNet with its post-processing to ONNX, TorchScript or a bioimage.io model
package (docs/deploy.md).

    python tools/export_model.py --weights output/model_final.pth --format onnx --output model.onnx
    python tools/export_model.py --weights W --format torchscript --output model.pt --size 512 512
    python tools/export_model.py --weights W --config-file CFG --format onnx --output m.onnx \\
        --opts TEST.DETECTIONS_PER_IMAGE 300
    python tools/export_model.py --weights W --format bioimageio --output iaunet.zip \\
        --author "Your Name" [--test-image cells.tif] [--score-threshold 0.5]

The graph takes a float32 batch (B, 3, H, W) on the 0..255 scale (normalized and padded inside)
and returns scores (B, k), classes (B, k) and mask logits (B, k, H, W): see
:mod:`iaunet.deploy.export`. The ONNX graph has dynamic batch, height and width unless
``--size H W`` is given without ``--dynamic``; a TorchScript trace runs at any size. After writing,
the file is run once on a random image and compared with the eager model (``--no-check`` skips it).

``--format bioimageio`` writes a folder, or a zip when ``--output`` ends with .zip: rdf.yaml,
TorchScript and ONNX weights, test tensors, cover and README (:mod:`iaunet.deploy.bioimageio`);
then bioimageio.core's own test runs on it (``--no-check`` skips it).
"""

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

import torch

from iaunet.checkpoint import CheckpointError
from iaunet.config import ConfigError, exit_on_config_error
from iaunet.data.image_io import read_image
from iaunet.data.lazy_image import open_plane
from iaunet.deploy.bioimageio_rdf import PackageInfo
from iaunet.deploy.export import FORMATS, ExportableIAUNet, export_model, graph_config
from iaunet.evaluation.matching import DEFAULT_SCORE_THRESH
from iaunet.inference.backends import load_backend
from iaunet.inference.predictor import PredictorSpec

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
    p.add_argument("--format", required=True, choices=(*FORMATS, "bioimageio"))
    p.add_argument(
        "--output",
        required=True,
        metavar="PATH",
        help="e.g. model.onnx / model.pt; bioimageio: a folder, or a .zip",
    )
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
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the exported-vs-eager check (bioimageio: bioimageio.core's test)",
    )
    b = p.add_argument_group("bioimage.io package (--format bioimageio; docs/deploy.md)")
    b.add_argument(
        "--test-image",
        metavar="IMAGE",
        help="image the package records as its test, and the smallest input size it describes "
        "(default: a synthetic scene of half a training crop); the model must find objects in it",
    )
    b.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="detections scoring at least this are in the outputs (default: the model's "
        f"MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH, as iaunet-predict's; {DEFAULT_SCORE_THRESH} "
        "unless tuned or changed)",
    )
    b.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="1: gray images (default); 3: RGB; a model of INPUT.CHANNELS takes its channels",
    )
    b.add_argument(
        "--labels-only",
        action="store_true",
        help="only the label image as output (for tools that read no data-dependent axis)",
    )
    b.add_argument("--name", default=PackageInfo.name, help="model name in the rdf")
    b.add_argument("--description", default="", help="one paragraph (default: from the config)")
    b.add_argument("--author", action="append", default=[], help="author name (repeatable)")
    b.add_argument("--license", default=PackageInfo.license, help="SPDX license id")
    b.add_argument(
        "--project-url", default="", help="public repository of this project (cited, git_repo)"
    )
    b.add_argument("--tag", action="append", default=[], help="extra rdf tag (repeatable)")
    p.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ..."
    )
    return p.parse_args(argv)


def check_export(model, path: str, fmt: str, size: Sequence[int]) -> dict:
    """Run the exported file and the eager module on one random image; max score difference and
    the fraction of mask pixels on the same side of the threshold."""
    backend = "onnxruntime" if fmt == "onnx" else "torchscript"
    channels = int(model.pixel_mean.numel())
    run = load_backend(path, backend, model.postprocessing, channels=channels).run  # graph only
    images = torch.rand(1, channels, *size) * 255
    with torch.inference_mode():
        expected = ExportableIAUNet(model)(images)
    got = run(images)
    return {
        "max_score_diff": float((got[0] - expected[0]).abs().max()),
        "classes_equal": bool(torch.equal(got[1], expected[1])),
        "mask_agreement": float(((got[2] > 0) == (expected[2] > 0)).float().mean()),
    }


def export_package(model, cfg, args: argparse.Namespace, score_thresh: float) -> int:
    """``--format bioimageio``: write the package (detections scoring at least ``score_thresh``),
    then run bioimageio.core's test on it."""
    if args.size or args.dynamic:
        raise ConfigError("--size / --dynamic do not apply to --format bioimageio")
    try:
        from iaunet.deploy.bioimageio import export_bioimageio, validate_package
    except ImportError as e:
        raise ConfigError(
            f"--format bioimageio needs the bioimageio extra ({e.name} is missing): "
            'python -m pip install -e ".[bioimageio]"'
        ) from None
    try:
        image = None
        if args.test_image and cfg.INPUT.CHANNELS:  # the channels the model takes
            image = open_plane(args.test_image, channels=cfg.INPUT.CHANNELS).read()
        elif args.test_image:
            image = read_image(args.test_image)
        info = PackageInfo(
            name=args.name,
            authors=args.author,
            license=args.license,
            project_url=args.project_url,
            description=args.description,
            tags=args.tag,
        )
        start = time.perf_counter()
        export_bioimageio(
            model,
            cfg,
            args.output,
            info,
            score_thresh=score_thresh,
            channels=args.channels,
            test_image=image,
            labels_only=args.labels_only,
        )
    except ValueError as e:  # a bad test image, config or rdf field: one line
        raise ConfigError(f"{args.output}: {e}") from None
    logger.info(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    if args.no_check:
        return 0
    summary = validate_package(args.output)
    for error in summary.errors:
        logger.error(f"{'.'.join(map(str, error.loc))}: {error.msg}")
    logger.info(f"bioimageio.core test of {args.output}: {summary.status}")
    return 0 if summary.status == "passed" else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    args = parse_args(argv)
    # The predictor owns the trained model's settings (the saved config, TTA, output threshold):
    # the graph is its model, traced on the CPU (a TorchScript file loads onto any device).
    spec = PredictorSpec(
        weights=args.weights,
        config_file=args.config_file,
        opts=(*args.opts, "MODEL.DEVICE", "cpu"),
    )
    try:
        predictor = spec.build()
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    model = predictor.model
    cfg = graph_config(predictor, package=args.format == "bioimageio")
    if args.format == "bioimageio":
        score = predictor.output_threshold if args.score_threshold is None else args.score_threshold
        return export_package(model, cfg, args, score)
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
