"""The command line of ``iaunet-predict`` (:mod:`iaunet.predict`): its flags, the config overrides
they stand for, and the input files they name (folders, globs, OME-Zarr) with unique stems."""

import argparse
import glob
import logging
import os
from typing import List, Sequence

from .data.image_io import IMAGE_EXTENSIONS
from .data.lazy_image import is_zarr
from .evaluation.matching import DEFAULT_SCORE_THRESH
from .inference.backends import BACKENDS
from .modeling.tta import VIEWS
from .outputs.writer import OUTPUTS

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
        help="image files, folders (non-recursive) or quoted globs; png, jpg, tif/tiff; OME-Zarr "
        "images (.zarr folders)",
    )
    for axis in ("channel", "z", "t"):
        p.add_argument(
            f"--{axis}",
            type=int,
            default=None,
            metavar="I",
            help=f"the {axis} plane to predict, for TIFF / OME-Zarr images with a {axis} axis",
        )
    s = p.add_argument_group("z-stacks and time-lapses (TIFF with a z or t axis; docs/predict.md)")
    s.add_argument(
        "--stitch-3d",
        type=float,
        default=None,
        metavar="IOU",
        help="link the objects of neighbouring planes of a z-stack into 3-D objects (one id "
        "through the stack) where their masks overlap at IoU >= IOU, as Cellpose's "
        "stitch_threshold (e.g. 0.5); without it every plane's objects get their own ids",
    )
    s.add_argument(
        "--link-t",
        type=float,
        default=None,
        metavar="IOU",
        help="carry object ids from frame to frame of a time-lapse where masks overlap at IoU >= "
        "IOU (the same linking as --stitch-3d)",
    )
    s.add_argument(
        "--link-gap",
        type=int,
        default=1,
        metavar="N",
        help="planes or frames an object may be missing from and keep its id (default 1: a cell "
        "missed in one plane is not split in two; 0 links neighbours only, as Cellpose)",
    )
    p.add_argument(
        "--dask",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS|local:N",
        help="predict block by block on Dask: a scheduler address (tcp://host:8786), or local:N "
        "for N local worker processes of one thread (local: one per CPU core); outputs OME-Zarr "
        "labels and a per-object table, resumable (docs/predict.md, 'Whole slides')",
    )
    p.add_argument(
        "--block",
        type=int,
        default=2048,
        metavar="PX",
        help="with --dask: block side in image px (a multiple of 1024 above 1024; default 2048)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument(
        "--save",
        default="all",
        metavar="LIST",
        help=f"comma-separated outputs to write: {','.join(OUTPUTS)}, or all (default: all)",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="keep instances scoring at least this (default: the model's "
        "MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH, tuned after training where the config says so; "
        f"{DEFAULT_SCORE_THRESH} unless changed)",
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
        help="model px shared by neighbouring tiles (TEST.TILE_OVERLAP; default half a tile)",
    )
    p.add_argument(
        "--tta",
        choices=tuple(VIEWS),
        default=None,
        help="test-time augmentation: none, flip (4 views: ~4x the time) or dihedral (8 views); "
        "default: the model's MODEL.IAUNET.TEST.TTA (flip for configs/custom/iaunet_small.yaml)",
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


def flag_opts(args: argparse.Namespace) -> List[str]:
    """``--opts`` followed by the config overrides of the flags that were given."""
    flags = {
        "MODEL.DEVICE": args.device,
        "TEST.TILE_OVERLAP": args.tile_overlap,
        "TEST.TILE_SIZE": args.tile or None,
        "MODEL.IAUNET.TEST.TTA": args.tta,
    }
    return list(args.opts) + [str(x) for kv in flags.items() if kv[1] is not None for x in kv]


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Files as given; folders (non-recursive) and globs filtered to image extensions; sorted,
    deduplicated."""

    def images(names):
        return sorted(
            n for n in names if os.path.isfile(n) and n.lower().endswith(IMAGE_EXTENSIONS)
        )

    files: List[str] = []
    for path in paths:
        if is_zarr(path):
            found = [path.rstrip("/")]
        elif os.path.isdir(path):
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
    """File stems (``x.ome.zarr``: ``x``), made unique (``name``, ``name-2``, ...) when two inputs
    share one."""
    stems, seen = [], set()
    for f in files:
        base = os.path.splitext(os.path.basename(f.rstrip("/")))[0]
        if f.lower().rstrip("/").endswith(".ome.zarr"):
            base = base[: -len(".ome")]
        stem = base
        k = 1
        while stem in seen:
            k += 1
            stem = f"{base}-{k}"
        seen.add(stem)
        stems.append(stem)
    return stems
