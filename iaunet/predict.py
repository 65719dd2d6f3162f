"""Predict instance masks on microscopy files: ``python -m iaunet.predict`` / ``iaunet-predict``.

    iaunet-predict --config-file CFG --weights model_final.pth --input images/ "more/*.tif" --output
    out/
    iaunet-predict --backend onnxruntime --model model.onnx --input images/ --output out/
        [--score-threshold 0.5] [--tile 512] [--tile-overlap 64] [--device cuda] [--opts KEY VALUE
        ...]

Per image ``<stem>_labels.tif`` (instance ids, uint16 or uint32, 0 = background; where masks overlap
the
higher score wins; id k is the image's k-th entry of predictions.json) and ``<stem>_overlay.png``
(outlines and ids on the 8-bit rendering). Per run ``predictions.json`` (COCO results) and
``images.json`` (a COCO file with the images and categories and no annotations), so that
``COCO("images.json").loadRes("predictions.json")`` works. See docs/predict.md.

Exit status: 0 all images done, 1 some files failed (named in the log and the summary), 2 bad
command line.
"""

import argparse
import contextlib
import glob
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .checkpoint import CheckpointError, read_checkpoint
from .config import ConfigError, one_line
from .data.image_io import IMAGE_EXTENSIONS, read_image, to_model_range
from .evaluation.matching import DEFAULT_SCORE_THRESH
from .inference import IAUNetPredictor
from .inference.backends import BACKENDS, exported_config
from .inference.predictor import config_from_checkpoint
from .outputs import label_image, png_bytes, render_overlay, tiff_bytes
from .utils.atomic import atomic_write

logger = logging.getLogger("iaunet.predict")

GLOB_CHARS = "*?["


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iaunet-predict",
        description="IAUNet instance segmentation of image files (see docs/predict.md).",
    )
    p.add_argument(
        "--config-file",
        default="",
        metavar="CFG",
        help="config the model was trained with (default: the config saved in the checkpoint)",
    )
    p.add_argument(
        "--weights",
        default="",
        metavar="W",
        help="checkpoint, e.g. output/model_final.pth (the pytorch backend needs it)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pytorch",
        help="pytorch: the eager model of --weights; onnxruntime / torchscript: the exported "
        "--model (tools/export_model.py, docs/deploy.md)",
    )
    p.add_argument(
        "--model",
        default="",
        metavar="FILE",
        help="exported model (.onnx / .pt) for --backend onnxruntime / torchscript; its config is "
        "saved in it",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image files, folders (non-recursive) or quoted globs; png, jpg, tif/tiff",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument(
        "--score-threshold",
        type=float,
        default=DEFAULT_SCORE_THRESH,
        help="keep instances scoring at least this",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="resize factor image px -> model px (default: the scale the model was trained at, "
        "INPUT.PIXEL_SCALE recorded in the checkpoint)",
    )
    p.add_argument(
        "--diameter",
        type=float,
        default=None,
        metavar="PX",
        help="typical object diameter in your images, in pixels: sets the scale so that objects "
        "have the size the model was trained on (instead of --scale)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=0,
        metavar="SIZE",
        help="force tiled prediction with tiles of SIZE model px (default: TEST.TILE_SIZE or "
        "INPUT.IMAGE_SIZE; images larger than a tile at the model's scale are always tiled)",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        metavar="PX",
        help="model px shared by neighbouring tiles (TEST.TILE_OVERLAP; default 2 object "
        "diameters)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: MODEL.DEVICE of the config",
    )
    p.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="config overrides, e.g. --opts TEST.DETECTIONS_PER_IMAGE 300 (must come last)",
    )
    return p


def build_predictor(args: argparse.Namespace) -> IAUNetPredictor:
    """The predictor of the command line: the checkpoint's config (or ``--config-file``),
    ``--opts``,
    then the flags. A bad command line, config or checkpoint is a UsageError naming it."""
    exported = args.backend != "pytorch"
    if exported and not args.model:
        raise UsageError(f"--backend {args.backend} needs --model (an exported model file)")
    if not exported and not args.weights:
        raise UsageError("--weights is required (or --backend onnxruntime --model FILE.onnx)")
    if exported and not os.path.isfile(args.model):
        raise UsageError(f"model file not found: {args.model}")
    if args.weights and "://" not in args.weights and not os.path.isfile(args.weights):
        raise UsageError(f"weights file not found: {args.weights}")
    if args.scale is not None and args.diameter is not None:
        raise UsageError("give --scale or --diameter, not both")
    if args.tile < 0 or (args.tile_overlap is not None and args.tile_overlap < 0):
        raise UsageError("--tile and --tile-overlap must be >= 0")
    source = args.weights or args.model  # the config: the checkpoint's, else the exported file's
    try:
        if args.weights:
            checkpoint = read_checkpoint(args.weights)
        else:
            checkpoint = {"config": exported_config(args.model)}
        cfg = config_from_checkpoint(checkpoint, args.config_file, args.opts, source)
    except (ConfigError, CheckpointError, ValueError) as e:
        raise UsageError(str(e)) from None
    cfg.MODEL.WEIGHTS = args.weights
    if args.device:
        cfg.MODEL.DEVICE = args.device
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda (MODEL.DEVICE) requested but CUDA is not available; use --device cpu"
        )
    if args.tile_overlap is not None:
        cfg.TEST.TILE_OVERLAP = args.tile_overlap
    if args.tile:
        cfg.TEST.TILE_SIZE = args.tile
        if cfg.TEST.TILE_OVERLAP >= args.tile:
            raise UsageError(
                f"the tile overlap ({cfg.TEST.TILE_OVERLAP}) must be smaller than --tile "
                f"({args.tile})"
            )
    # The model's own threshold must not hide instances the user asked for.
    thresh = cfg.MODEL.IAUNET.TEST.SCORE_THRESH
    cfg.MODEL.IAUNET.TEST.SCORE_THRESH = min(thresh, args.score_threshold)
    cfg.freeze()
    try:
        return IAUNetPredictor(
            cfg,
            scale=args.scale,
            diameter=args.diameter,
            checkpoint=checkpoint if args.weights else None,
            backend=args.backend,
            model_file=args.model,
        )
    except Exception as e:  # a config value the model/predictor rejects
        raise UsageError(
            f"cannot set up the predictor ({args.model if exported else args.weights}): "
            f"{one_line(e)}"
        ) from None


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Files as given; folders (non-recursive) and globs filtered to image extensions; sorted,
    deduplicated."""

    def images(names):
        return sorted(
            n for n in names if os.path.isfile(n) and n.lower().endswith(IMAGE_EXTENSIONS)
        )

    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = images(os.path.join(path, n) for n in os.listdir(path))
            if not found:
                logger.warning(f"no png/jpg/tif images in folder {path}")
        elif os.path.isfile(path):
            found = [path]
        elif any(c in path for c in GLOB_CHARS):
            found = images(glob.glob(path))
            if not found:
                logger.warning(f"no png/jpg/tif images match {path}")
        else:
            raise UsageError(f"input not found: {path}")
        files.extend(found)
    files = list(dict.fromkeys(os.path.normpath(f) for f in files))
    if not files:
        raise UsageError(f"no image files matched --input {' '.join(paths)}")
    return files


def output_stems(files: Sequence[str]) -> List[str]:
    """File stems, made unique (``name``, ``name-2``, ...) when two inputs share one."""
    stems, seen = [], set()
    for f in files:
        stem = base = os.path.splitext(os.path.basename(f))[0]
        k = 1
        while stem in seen:
            k += 1
            stem = f"{base}-{k}"
        seen.add(stem)
        stems.append(stem)
    return stems


def category_ids(metadata, num_classes: int) -> List[int]:
    """Contiguous class -> dataset category id (the metadata's mapping when present, else class +
    1)."""
    mapping = (
        getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
        if metadata is not None
        else None
    )
    if mapping:
        reverse = {v: k for k, v in mapping.items()}
        return [int(reverse.get(c, c + 1)) for c in range(num_classes)]
    return [c + 1 for c in range(num_classes)]


def predict_file(
    predictor: IAUNetPredictor,
    path: str,
    image_id: int,
    stem: str,
    out_dir: str,
    score_threshold: float,
    cat_ids: List[int],
    force_tile: bool,
) -> Tuple[Dict, List[Dict]]:
    """Predict one file and write its label TIFF and overlay PNG; returns (image entry, COCO
    results)."""
    raw = read_image(path)
    instances = predictor.predict(raw, tiled=True if force_tile else None, full_masks=False)
    instances = instances[instances.scores >= score_threshold]
    instances = instances[instances.scores.argsort(descending=True)]
    masks = instances.pred_masks
    h, w = masks.image_size
    label_name, overlay_name = f"{stem}_labels.tif", f"{stem}_overlay.png"
    atomic_write(os.path.join(out_dir, label_name), tiff_bytes(label_image(masks, h, w)))
    image8 = (
        to_model_range(raw, predictor.intensity_norm, predictor.percentiles)
        .round()
        .astype(np.uint8)
    )
    atomic_write(os.path.join(out_dir, overlay_name), png_bytes(render_overlay(image8, masks)))

    results = []
    for rle, score, label in zip(
        masks.to_rles(), instances.scores.tolist(), instances.pred_classes.tolist()
    ):
        results.append(
            {
                "image_id": image_id,
                "category_id": cat_ids[label],
                "segmentation": rle,
                "score": round(float(score), 5),
                "bbox": [round(float(v), 2) for v in mask_util.toBbox(rle)],
            }
        )
    entry = {
        "id": image_id,
        "file_name": os.path.abspath(path),
        "height": h,
        "width": w,
        "labels": label_name,
        "overlay": overlay_name,
    }
    return entry, results


@contextlib.contextmanager
def _log_to_stderr(level: int = logging.INFO):
    """Send the iaunet / detectron2 / fvcore logs to the current stderr for the duration of a CLI
    run."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[%(asctime)s %(name)s] %(levelname)s: %(message)s", "%H:%M:%S")
    )
    # fvcore repeats detectron2's checkpoint messages at INFO; its warnings (mismatched weights)
    # matter.
    levels = {"iaunet": level, "detectron2": level, "fvcore": max(level, logging.WARNING)}
    loggers = [logging.getLogger(name) for name in levels]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(levels[lg.name])
        lg.propagate = False
    try:
        yield loggers
    finally:
        for lg, (lvl, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(lvl)
            lg.propagate = propagate


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with _log_to_stderr() as loggers:
        try:
            return run(args, loggers)
        except UsageError as e:
            logger.error(str(e))
            return 2


def run(args: argparse.Namespace, loggers: List[logging.Logger]) -> int:
    files = expand_inputs(args.input)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} exists and is not a folder")
    predictor = build_predictor(args)
    os.makedirs(args.output, exist_ok=True)
    cfg = predictor.cfg
    cat_ids = category_ids(predictor.metadata, cfg.MODEL.IAUNET.NUM_CLASSES)
    class_names = list(getattr(predictor.metadata, "thing_classes", None) or [])

    images, results, failed = [], [], []
    with logging_redirect_tqdm(loggers=loggers):
        for image_id, (path, stem) in enumerate(
            tqdm(
                list(zip(files, output_stems(files))),
                desc="iaunet-predict",
                unit="img",
                file=sys.stderr,
            ),
            start=1,
        ):
            try:
                entry, res = predict_file(
                    predictor,
                    path,
                    image_id,
                    stem,
                    args.output,
                    args.score_threshold,
                    cat_ids,
                    bool(args.tile),
                )
            except Exception as e:  # one bad file must not stop the batch; the log names it
                msg = one_line(e)
                logger.error(f"failed: {msg if path in msg else f'{path}: {msg}'}")
                failed.append(path)
                continue
            images.append(entry)
            results.extend(res)

    categories = [
        {"id": cid, "name": class_names[c] if c < len(class_names) else f"class_{c}"}
        for c, cid in enumerate(cat_ids)
    ]
    atomic_write(os.path.join(args.output, "predictions.json"), json.dumps(results))
    atomic_write(
        os.path.join(args.output, "images.json"),
        json.dumps(
            {"images": images, "categories": categories, "annotations": []}, indent=1
        ).encode(),
    )
    summary = f"{len(images)} images processed, {len(failed)} failed"
    if failed:
        logger.error(f"{summary}: {', '.join(failed)}")
        return 1
    logger.info(f"{summary}; outputs in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
