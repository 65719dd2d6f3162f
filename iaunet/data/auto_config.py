"""Config keys sized from the training set at the start of training (``setup()``; 0 = auto).

What the model can do depends on the data: a query per object at least, objects at a size the
network sees well, a crop that holds several of them, enough iterations for the images there are.
``resolve_config_from_data`` fills the keys left at 0 from the training set's dataset dicts (no
image is opened) and logs one summary line; the values travel in the config saved with every
checkpoint, so that evaluation and ``iaunet-predict`` use them (:func:`fill_auto_keys`).

* ``MODEL.IAUNET.NUM_QUERIES``: ``ceil(1.5 x max objects in a training image)``, rounded up to a
  multiple of 10. Hungarian matching gives every object its own query, so fewer queries than
  objects leave objects unmatched (never learned) and cap the predictions of an image; the margin
  covers validation and test images denser than the densest training image, and query slots
  specialise by position, so a full house of exactly matched queries recalls less (Mask2Former: 100
  queries for COCO's <= ~60 objects). Rounding keeps the count, and with it the checkpoint's shape,
  stable when a few images are added. Fine-tuning never drops queries of the starting model
  (``MODEL.WEIGHTS``): trained queries each cover part of the image; the quick model cut from 20 to
  10 queries fell from 67.3 to 39.7 AP on 8 held-out synthetic scenes of 4-12 cells.
* ``INPUT.PIXEL_SCALE`` / ``INPUT.OBJECT_DIAMETER``:
  :func:`iaunet.data.statistics.resolve_data_keys` (with ``INPUT.RESIZE_MODE "scale"``: images
  are resized so that the median object is ``OBJECT_DIAMETER`` model pixels across).
* ``INPUT.IMAGE_SIZE`` (training crop, prediction tile; ``RESIZE_MODE "scale"`` only):
  ``CROP_DIAMETERS`` (5) median object diameters to the nearest multiple of 32, at least twice the
  95th-percentile object, no more than the median image side at the training scale, in [64, 512].
  128 px for the small config's 26-px objects: the crop of the synthetic pretraining scenes, so a
  training step costs what it cost there (objects larger than the synthetic cells' 20 px, for
  sharper outlines, not a larger crop).
* ``SOLVER.MAX_ITER``: ``PASSES`` (100) passes over the training set counted in crops (an image at
  the training scale covers ``h w / IMAGE_SIZE^2`` crops, at least 1), divided by the batch,
  rounded up to 100 and kept in [1250, 10000]: 1250 iterations fine-tune the synthetic model on
  three real images in the CPU time 1000 took before the loader skipped the objects outside the
  crop (docs/own_images.md), and the cap keeps a CPU run within hours.

In every config, a training image with more objects than ``NUM_QUERIES`` is a warning naming it.
"""

import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..checkpoint import checkpoint_queries, read_checkpoint
from ..config import ConfigError, get_key, set_key, trained_config
from .datasets.folder import hold_out_validation, register_path_datasets
from .datasets.stack_planes import PLANE_KEY
from .image_io import ImageReadError
from .statistics import object_diameters, objects, resolve_data_keys

logger = logging.getLogger(__name__)

# Keys whose 0 means "from the training set"; recorded in checkpoints.
AUTO_KEYS = (
    "MODEL.IAUNET.NUM_QUERIES",
    "INPUT.IMAGE_SIZE",
    "INPUT.PIXEL_SCALE",
    "INPUT.OBJECT_DIAMETER",
    "SOLVER.MAX_ITER",
)
QUERY_MARGIN, QUERY_STEP = 1.5, 10
CROP_DIAMETERS, CROP_STEP, CROP_RANGE = 5, 32, (64, 512)
PASSES, ITER_STEP, ITER_RANGE = 100, 100, (1250, 10000)
START_WEIGHTS = "synthetic_start/model_final.pth"
START_COMMAND = "python train_net.py --config-file configs/synthetic/iaunet_start.yaml"


def fill_auto_keys(cfg: CfgNode, trained: CfgNode, keys: Sequence[str] = AUTO_KEYS) -> List[str]:
    """Copy the ``keys`` that ``cfg`` leaves at 0 (auto) from ``trained`` (a checkpoint's config);
    returns the keys copied."""
    copied = []
    for key in keys:
        if get_key(cfg, key) <= 0 < get_key(trained, key):
            set_key(cfg, key, get_key(trained, key))
            copied.append(key)
    return copied


def auto_num_queries(max_objects: int) -> int:
    """``ceil(1.5 max_objects)`` rounded up to a multiple of 10 (at least 10)."""
    return max(QUERY_STEP, math.ceil(QUERY_MARGIN * max_objects / QUERY_STEP) * QUERY_STEP)


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def auto_crop(dicts: Sequence[Dict], scale: float, diameter: float) -> int:
    """Training crop side (model px) for ``RESIZE_MODE "scale"``; see the module docstring."""
    sides = [max(d["height"], d["width"]) * scale for d in dicts]
    dia = [x * scale for d in dicts for x in object_diameters(objects(d))] or [diameter]
    crop = max(
        round(CROP_DIAMETERS * diameter / CROP_STEP) * CROP_STEP,
        _round_up(2 * float(np.percentile(dia, 95)), CROP_STEP),
    )
    crop = min(crop, _round_up(float(np.median(sides)), CROP_STEP))
    return int(min(max(crop, CROP_RANGE[0]), CROP_RANGE[1]))


def auto_max_iter(dicts: Sequence[Dict], scale: Optional[float], crop: int, batch: int) -> int:
    """Iterations for ``PASSES`` passes over the training crops (one per image when ``scale`` is
    None); see the module docstring."""
    if scale is None:
        crops = float(len(dicts))
    else:
        crops = sum(max(1.0, d["height"] * d["width"] * scale**2 / crop**2) for d in dicts)
    iters = _round_up(PASSES * crops / max(batch, 1), ITER_STEP)
    return int(min(max(iters, ITER_RANGE[0]), ITER_RANGE[1]))


def warn_too_few_queries(dicts: Sequence[Dict], num_queries: int) -> List[str]:
    """Warn (naming them) about training images with more objects than ``num_queries``; returns
    their file names."""
    over = sorted(
        ((len(objects(d)), d["file_name"]) for d in dicts if len(objects(d)) > num_queries),
        reverse=True,
    )
    if over:
        listed = ", ".join(f"{f} ({n} objects)" for n, f in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        logger.warning(
            f"!! {len(over)} training image(s) hold more objects than MODEL.IAUNET.NUM_QUERIES="
            f"{num_queries}: {listed}{more}. Each object needs its own query: the extra objects "
            "are never matched (never learned) and predictions stop at NUM_QUERIES per image. "
            f"Set MODEL.IAUNET.NUM_QUERIES {auto_num_queries(over[0][0])} (or 0: sized from the "
            "training set)."
        )
    return [f for _, f in over]


def _check_weights(cfg: CfgNode, resume: bool) -> None:
    weights = cfg.MODEL.WEIGHTS
    if not weights or "://" in weights or os.path.isfile(weights.split("?")[0]):
        return
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return  # --resume loads OUTPUT_DIR's last checkpoint, not MODEL.WEIGHTS
    hint = (
        "give the path of a checkpoint, or start from scratch with MODEL.WEIGHTS '' "
        "MODEL.IAUNET.TRAIN.FROM_SCRATCH True"
    )
    if weights.replace(os.sep, "/").endswith(START_WEIGHTS):
        hint = (
            "it is the starting model (synthetic cells and nuclei): train it first with "
            f"`{START_COMMAND} OUTPUT_DIR {os.path.dirname(os.path.dirname(weights)) or '.'}/"
            "synthetic_start` (about 20 min on a laptop CPU), or start from scratch with "
            "MODEL.WEIGHTS '' MODEL.IAUNET.TRAIN.FROM_SCRATCH True"
        )
    raise ConfigError(f"MODEL.WEIGHTS {weights} not found: {hint}")


def _read_weights(weights: str) -> Optional[Dict]:
    """The checkpoint dict of ``MODEL.WEIGHTS`` (None when it is not a local file)."""
    if not weights or not os.path.isfile(weights.split("?")[0]):
        return None
    return read_checkpoint(weights)


def _load(names: Sequence[str]) -> List[Dict]:
    dicts = []
    for name in names:
        dicts += DatasetCatalog.get(name)
    return dicts


def check_channels(channels: Sequence, names: Sequence[str]) -> None:
    """Every image of the datasets ``names`` has the channels ``INPUT.CHANNELS`` asks for (by
    index or name; TIFF and OME-Zarr headers only): a ConfigError naming the first file that has
    not, before training starts."""
    if not channels:
        return
    from .lazy_image import open_plane

    seen = set()
    for name in names:
        for record in DatasetCatalog.get(name):
            plane = record.get(PLANE_KEY) or ()
            key = (record["file_name"], tuple(plane[:1]))
            if key in seen:
                continue
            seen.add(key)
            try:
                where = {plane[0]: int(plane[1])} if plane else {}
                open_plane(record["file_name"], **where, channels=channels)
            except ImageReadError as e:
                raise ConfigError(f"{e} (DATASETS {name})") from None


def resolve_config_from_data(
    cfg: CfgNode, *, eval_only: bool = False, resume: bool = False
) -> Dict[str, object]:
    """Register the datasets named by a path, hold out a validation part when ``DATASETS.TEST`` is
    empty, and fill the auto keys (module docstring) in place: from the training set, or with
    ``eval_only`` from the config saved in ``MODEL.WEIGHTS``. Returns the values filled.
    Raises ConfigError (DatasetError) naming the key or file at fault."""
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = hold_out_validation(
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST
    )
    register_path_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    _check_weights(cfg, resume)
    auto = [k for k in AUTO_KEYS if get_key(cfg, k) <= 0]
    filled: Dict[str, object] = {}
    if eval_only:
        if not cfg.DATASETS.TEST:
            raise ConfigError("--eval-only with an empty DATASETS.TEST: nothing to evaluate")
        checkpoint = _read_weights(cfg.MODEL.WEIGHTS) if auto else None
        saved = checkpoint.get("config") if checkpoint else None
        trained = trained_config(saved, cfg.MODEL.WEIGHTS) if saved else None
        for key in fill_auto_keys(cfg, trained) if trained is not None else []:
            filled[key] = get_key(cfg, key)
        # What evaluation cannot do without: the model's shape and the test resize.
        needed = ["MODEL.IAUNET.NUM_QUERIES", "INPUT.IMAGE_SIZE"]
        if cfg.INPUT.RESIZE_MODE == "scale":
            needed.append("INPUT.PIXEL_SCALE")
        auto = [k for k in auto if k not in filled and k in needed]
        if auto and not cfg.DATASETS.TRAIN:
            raise ConfigError(
                f"{', '.join(auto)} 0 (auto) and MODEL.WEIGHTS {cfg.MODEL.WEIGHTS or '(none)'} "
                "records no value: give them, or the training set (DATASETS.TRAIN)"
            )
    elif not cfg.DATASETS.TRAIN:
        raise ConfigError(
            "DATASETS.TRAIN is empty: name the training images, e.g. DATASETS.TRAIN "
            "'(\"folder:my_cells/train\",)' (README, 'Train on your own images')"
        )
    for name in cfg.DATASETS.TEST:  # check the validation files now, not after training
        if name.startswith(("folder:", "coco:")):
            DatasetCatalog.get(name)
    check_channels(cfg.INPUT.CHANNELS, [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST])
    if eval_only and not auto:
        return filled
    dicts = _load(cfg.DATASETS.TRAIN)
    names = {n: MetadataCatalog.get(n).get("thing_classes", None) for n in cfg.DATASETS.TRAIN}
    if len({str(c) for c in names.values()}) > 1:  # detectron2's loader would stop on it
        raise ConfigError(
            "the training sets name their classes differently ("
            + ", ".join(f"{n}: {c}" for n, c in names.items())
            + "); a folder of label images or ROI sets has the one class 'object': name the COCO "
            "categories alike"
        )
    num_classes = max((a["category_id"] for d in dicts for a in objects(d)), default=-1) + 1
    if num_classes > cfg.MODEL.IAUNET.NUM_CLASSES:
        classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)
        raise ConfigError(
            f"the training set has {num_classes} classes ({classes}) but "
            f"MODEL.IAUNET.NUM_CLASSES is {cfg.MODEL.IAUNET.NUM_CLASSES}"
        )
    mode = cfg.INPUT.RESIZE_MODE
    if cfg.INPUT.IMAGE_SIZE <= 0 and mode != "scale":
        raise ConfigError('INPUT.IMAGE_SIZE 0 (auto) needs INPUT.RESIZE_MODE "scale"')
    try:
        stats = resolve_data_keys(cfg, dicts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.MODEL.IAUNET.NUM_QUERIES <= 0:
        start = 0 if eval_only else checkpoint_queries(_read_weights(cfg.MODEL.WEIGHTS)) or 0
        cfg.MODEL.IAUNET.NUM_QUERIES = max(auto_num_queries(stats.max_objects), start)
        if cfg.TEST.DETECTIONS_PER_IMAGE < cfg.MODEL.IAUNET.NUM_QUERIES:
            cfg.TEST.DETECTIONS_PER_IMAGE = cfg.MODEL.IAUNET.NUM_QUERIES
    if cfg.INPUT.IMAGE_SIZE <= 0:
        cfg.INPUT.IMAGE_SIZE = auto_crop(dicts, cfg.INPUT.PIXEL_SCALE, cfg.INPUT.OBJECT_DIAMETER)
    if cfg.SOLVER.MAX_ITER <= 0 and not eval_only:
        # "longest_side" resizes every image to one crop; "scale" cuts crops from scaled images
        scale = cfg.INPUT.PIXEL_SCALE if mode == "scale" else None
        cfg.SOLVER.MAX_ITER = auto_max_iter(
            dicts, scale, cfg.INPUT.IMAGE_SIZE, cfg.SOLVER.IMS_PER_BATCH
        )
    filled.update({k: get_key(cfg, k) for k in auto if k not in filled})
    logger.info(f"Training set: {stats.summary()}")
    if filled:
        values = ", ".join(f"{k} {v:g}" for k, v in filled.items())
        logger.info(f"Sized from the training set (0 = auto in the config): {values}")
    if not eval_only:
        warn_too_few_queries(dicts, cfg.MODEL.IAUNET.NUM_QUERIES)
    return filled
