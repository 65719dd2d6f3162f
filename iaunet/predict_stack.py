"""``iaunet-predict`` on z-stacks and time-lapses (TIFF files whose z or t axis is not chosen
with ``--z`` / ``--t``): every plane is predicted as a 2-D image, the instances of neighbouring
planes are linked into objects (``--stitch-3d IOU`` for z, ``--link-t IOU`` for t,
``--link-gap N``) and the stack's outputs are written (:mod:`iaunet.outputs.stacks`,
docs/predict.md "Z-stacks and time-lapses")."""

import argparse
import logging
from typing import Dict, Optional

import numpy as np

from .data.lazy_image import Stack
from .inference import IAUNetPredictor
from .outputs.stacks import StackInfo, link_planes, plane_ids
from .outputs.writer import PredictionWriter, image_prediction
from .predict_args import UsageError

logger = logging.getLogger("iaunet.predict")

LINK_FLAGS = {"z": "--stitch-3d", "t": "--link-t"}


def check_link_flags(args: argparse.Namespace) -> None:
    """A linking IoU in (0, 1] and a gap >= 0, else a UsageError naming the flag."""
    for flag, value in (("--stitch-3d", args.stitch_3d), ("--link-t", args.link_t)):
        if value is not None and not 0.0 < value <= 1.0:
            raise UsageError(f"{flag} is an IoU in (0, 1], got {value}")
    if args.link_gap < 0:
        raise UsageError(f"--link-gap must be >= 0 planes, got {args.link_gap}")


def predict_stack(
    predictor: IAUNetPredictor,
    writer: PredictionWriter,
    stack: Stack,
    args: argparse.Namespace,
    selection: Dict[str, Optional[int]],
    image_id: int,
    stem: str,
) -> Dict:
    """Predict every plane of ``stack`` (the other axes as ``selection`` chooses them), link them
    as the flags say and write the outputs; returns the file's ``images.json`` entry."""
    axis, path = stack.axis, stack.path
    iou = args.stitch_3d if axis == "z" else args.link_t
    other = "t" if axis == "z" else "z"
    if (args.link_t if axis == "z" else args.stitch_3d) is not None:
        kind = "z-stack" if axis == "z" else "time-lapse"
        logger.warning(f"{path}: a {kind}; {LINK_FLAGS[other]} is for the {other} axis: not used")
    raws = [stack.plane(k, selection).read() for k in range(stack.length)]
    # every plane normalized as the stack is (a plane with few cells must not have its
    # background stretched to the cells' contrast), as tiles are normalized as their image
    value_range = predictor.value_range(np.concatenate(raws))
    planes = []
    predicted = predictor.predict_planes(raws, value_range, tiled=True if args.tile else None)
    for k, (raw, instances) in enumerate(zip(raws, predicted)):
        planes.append(
            image_prediction(instances, raw, args.score_threshold, image_id=image_id, path=path,
                             stem=f"{stem}_{axis}{k:03d}")
        )  # fmt: skip
    masks = [p.masks for p in planes]
    if iou is None:
        ids = plane_ids(masks)
        count = sum(len(i) for i in ids)
        logger.info(f"{path}: {stack.length} {axis} planes, {count} objects with ids per plane "
                    f"(link them with {LINK_FLAGS[axis]} IOU)")  # fmt: skip
    else:
        ids = link_planes(masks, iou, args.link_gap)
        count = max((int(i.max()) for i in ids if len(i)), default=0)
        logger.info(f"{path}: {stack.length} {axis} planes linked at IoU {iou}: {count} objects")
    info = StackInfo(axis, stack.voxel_size, stack.unit, stack.interval)
    return writer.write_stack(planes, ids, info, image_id, path, stem)
