#!/usr/bin/env python
"""Equal-budget accuracy: IAUNet against detectron2's Mask R-CNN, trained from scratch on the same
data.

    python tools/compare_maskrcnn.py                            # quick config, synthetic cells, CPU
    python tools/compare_maskrcnn.py --iters 300 --batch 8 --output-dir output/compare_quick
    python tools/compare_maskrcnn.py --equal-time              # Mask R-CNN gets IAUNet's train time
    python tools/compare_maskrcnn.py --equal-time --maskrcnn-iters 118  # as its warning suggests
    python tools/compare_maskrcnn.py --config-file configs/revvity25/iaunet_R50.yaml --iters 4813 \
        --batch 8 --train revvity25_train --test revvity25_test --device cuda

Both models are trained from random weights for ``--iters`` iterations of ``--batch`` images (the
same number of images seen), from the same data loader (``IAUNetDatasetMapper``: same image
reading, augmentations and sample order for the same ``--seed``), then evaluated by the same
``COCOEvaluator`` (segm, max detections = ``TEST.DETECTIONS_PER_IMAGE``) and matching evaluator on
the same split. The table (AP, AP50, AP75, AP_S/M/L, F1 at IoU 0.5, predicted/true count) is printed
and written to ``<output-dir>/compare_maskrcnn.json``.

Mask R-CNN is detectron2's model-zoo R50-FPN (``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x``,
its standard heads), trained with the repository's ``Trainer``. What is matched to the IAUNet
config, and why:

* Backbone (``--maskrcnn-backbone auto``): the IAUNet config's ResNet depth, norm, stride-in-1x1
  and FREEZE_AT (a ResNet-18 FPN for the quick config, R50-FPN for the thesis configs; R50 for a
  Swin IAUNet): same backbone, so that the comparison is about the heads.
* Input: IAUNet's mapper and PIXEL_MEAN/STD for both. ``--maskrcnn-mapper detectron2`` uses
  detectron2's ``DatasetMapper`` instead (resize to ``INPUT.IMAGE_SIZE`` + horizontal flip; 8-bit
  images only).
* Anchors (``--anchor-scale auto``): detectron2's anchor sizes (32..512 px) are meant for a
  shortest side of 800; both models see ``INPUT.IMAGE_SIZE`` images, so they are scaled by
  IMAGE_SIZE / 800.
* Solver (``--maskrcnn-solver iaunet``): the IAUNet config's solver, so that only the architecture
  differs. ``--maskrcnn-solver detectron2``: Mask R-CNN's own recipe (SGD momentum 0.9, lr 0.02 x
  batch / 16, weight decay 1e-4, steps at 2/3 and 8/9 of the run).
* Test: the same ``TEST.DETECTIONS_PER_IMAGE`` and score threshold (``ROI_HEADS.SCORE_THRESH_TEST``
  = ``MODEL.IAUNET.TEST.SCORE_THRESH``).
"""

import argparse
import copy
import json
import logging
import os
from typing import Dict, Optional, Sequence

import torch

# iaunet first: it imports detectron2 and fvcore with fvcore's import-time torch.jit.script
# FutureWarning silenced (iaunet/__init__.py); detectron2.data first would print it.
import iaunet  # noqa: F401

# isort: split
from detectron2.config import CfgNode, get_cfg
from detectron2.utils.logger import setup_logger

from iaunet import add_iaunet_config
from iaunet.bench.benchmark import MASK_RCNN_CONFIG, mask_rcnn_config
from iaunet.bench.reports import comparison_report
from iaunet.bench.training_runs import (
    D2MapperTrainer,
    seconds_per_iteration,
    subset_dataset,
    train_and_evaluate,
)
from iaunet.config import exit_on_config_error, load_config, merge_config
from iaunet.data.auto_config import resolve_config_from_data
from iaunet.engine import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D2_ANCHOR_SIZES = [[32], [64], [128], [256], [512]]
D2_REFERENCE_SIZE = 800  # detectron2's default shortest side, for which its anchor sizes are chosen
logger = logging.getLogger("iaunet.compare_maskrcnn")


def iaunet_cfg(args) -> CfgNode:
    cfg = load_config(args.config_file, args.opts)
    _common(cfg, args, "iaunet")
    # As train_net.py: the auto keys sized from the training set, and the training scale recorded
    # in the checkpoint, so that iaunet-predict tiles large images with this model as with any.
    resolve_config_from_data(cfg)
    return cfg


def maskrcnn_cfg(args, icfg: CfgNode, iters: int = 0) -> CfgNode:
    """detectron2's model-zoo Mask R-CNN matched to the IAUNet config ``icfg`` as the module
    docstring says, trained for ``iters`` iterations (0: as many as IAUNet)."""
    iters = iters or args_iters(args, icfg)
    icfg = icfg.clone()  # may be frozen (trained already); its sub-nodes are copied below
    icfg.defrost()
    base = get_cfg()
    add_iaunet_config(base)  # Trainer and our mapper read IAUNet's INPUT/SOLVER keys
    cfg = mask_rcnn_config(
        args.maskrcnn_config,
        icfg.MODEL.IAUNET.NUM_CLASSES,
        max(icfg.MODEL.IAUNET.TEST.SCORE_THRESH, 0.0),
        base=base,
    )
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = (
        list(icfg.MODEL.PIXEL_MEAN),
        list(icfg.MODEL.PIXEL_STD),
    )

    depth = args.maskrcnn_backbone
    if depth == "auto":
        depth = (
            icfg.MODEL.RESNETS.DEPTH if icfg.MODEL.BACKBONE.NAME == "build_resnet_backbone" else 50
        )
    depth = int(str(depth).lstrip("R"))
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    if args.maskrcnn_backbone == "auto" and icfg.MODEL.BACKBONE.NAME == "build_resnet_backbone":
        cfg.MODEL.RESNETS.NORM = icfg.MODEL.RESNETS.NORM
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = icfg.MODEL.RESNETS.STRIDE_IN_1X1
        cfg.MODEL.BACKBONE.FREEZE_AT = icfg.MODEL.BACKBONE.FREEZE_AT
    else:  # from scratch: nothing is pretrained, so nothing is frozen
        cfg.MODEL.RESNETS.NORM = "BN"
        cfg.MODEL.BACKBONE.FREEZE_AT = 0

    size = icfg.INPUT.IMAGE_SIZE
    scale = size / D2_REFERENCE_SIZE if args.anchor_scale == "auto" else float(args.anchor_scale)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[max(4, round(s[0] * scale))] for s in D2_ANCHOR_SIZES]

    for key in (
        "FORMAT",
        "IMAGE_SIZE",
        "SCALE_RANGE",
        "FLIPS",
        "INTENSITY_NORM",
        "PERCENTILES",
        "SIZE_DIVISIBILITY",
        "MIN_INSTANCE_AREA",
    ):
        cfg.INPUT[key] = copy.deepcopy(icfg.INPUT[key])
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size,), size
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = size, size
    cfg.DATALOADER = icfg.DATALOADER.clone()
    cfg.TEST.DETECTIONS_PER_IMAGE = icfg.TEST.DETECTIONS_PER_IMAGE

    if args.maskrcnn_solver == "iaunet":
        cfg.SOLVER = icfg.SOLVER.clone()
    elif args.maskrcnn_solver == "detectron2":
        cfg.SOLVER.OPTIMIZER = "SGD"
        cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
        cfg.SOLVER.BASE_LR = 0.02 * args_batch(args, icfg) / 16
        cfg.SOLVER.STEPS = (int(iters * 2 / 3), int(iters * 8 / 9))
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(1, iters // 10))
    else:
        raise ValueError(
            f"--maskrcnn-solver must be iaunet or detectron2, got {args.maskrcnn_solver!r}"
        )
    merge_config(cfg, opts=args.maskrcnn_opts)
    _common(cfg, args, "mask_rcnn", icfg, iters)
    return cfg


def _check_equal_time(result: Dict, tolerance: float = 0.1) -> None:
    """Record Mask R-CNN's training time over IAUNet's; warn when they differ by more than
    ``tolerance``: the probe times 10 early iterations, and later ones can be slower (quick config,
    2 idle cores: probe 3.5 s/it, the run 7.4 s/it)."""
    mine, theirs = result["iaunet"]["train_time_s"], result["mask_rcnn"]["train_time_s"]
    ratio = theirs / mine
    result["settings"]["maskrcnn_time_ratio"] = ratio
    if abs(ratio - 1) > tolerance:
        iters = max(1, round(result["mask_rcnn"]["iterations"] / ratio))
        logger.warning(
            f"Equal time: Mask R-CNN trained {theirs:.0f} s, {ratio:.2f}x IAUNet's {mine:.0f} s "
            f"(its probe was off); for equal time run it again with --maskrcnn-iters {iters}"
        )


def args_iters(args, icfg: CfgNode) -> int:
    return args.iters or icfg.SOLVER.MAX_ITER


def args_batch(args, icfg: CfgNode) -> int:
    return args.batch or icfg.SOLVER.IMS_PER_BATCH


def _common(cfg: CfgNode, args, name: str, icfg: Optional[CfgNode] = None, iters: int = 0) -> None:
    """The settings both runs share: data, budget (``iters``, default ``args_iters``), device,
    seed, output folder, no periodic evaluation."""
    ref = icfg if icfg is not None else cfg
    if icfg is not None:  # the IAUNet run's data, already resolved
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (
            tuple(icfg.DATASETS.TRAIN),
            tuple(icfg.DATASETS.TEST),
        )
    else:
        cfg.DATASETS.TRAIN = (args.train,) if args.train else tuple(cfg.DATASETS.TRAIN)
        cfg.DATASETS.TEST = (subset_dataset(args.test or cfg.DATASETS.TEST[0], args.test_limit),)
    cfg.SOLVER.IMS_PER_BATCH = args_batch(args, ref)
    cfg.SOLVER.MAX_ITER = iters or args_iters(args, ref)
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER)
    cfg.SOLVER.CHECKPOINT_PERIOD = cfg.SOLVER.MAX_ITER + 1  # only model_final.pth
    cfg.TEST.EVAL_PERIOD = 0  # evaluated once, after training
    device = args.device or ref.MODEL.DEVICE
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    cfg.MODEL.DEVICE = device
    if device == "cpu":
        cfg.SOLVER.AMP.ENABLED = False  # detectron2's AMP training needs CUDA
    if args.num_workers is not None:
        cfg.DATALOADER.NUM_WORKERS = args.num_workers
    cfg.SEED = args.seed
    cfg.OUTPUT_DIR = os.path.join(args.output_dir, name)


def _backbone_name(cfg: CfgNode, fpn: bool) -> str:
    if cfg.MODEL.BACKBONE.NAME in ("build_resnet_backbone", "build_resnet_fpn_backbone"):
        return (
            f"R{cfg.MODEL.RESNETS.DEPTH}" + ("-FPN" if fpn else "") + f" ({cfg.MODEL.RESNETS.NORM})"
        )
    return cfg.MODEL.BACKBONE.NAME


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config-file",
        default=os.path.join(ROOT, "configs", "synthetic", "iaunet_quick.yaml"),
        help="IAUNet config",
    )
    p.add_argument(
        "--train", default="", help="registered training set (default: the config's DATASETS.TRAIN)"
    )
    p.add_argument(
        "--test", default="", help="registered test set (default: the config's first DATASETS.TEST)"
    )
    p.add_argument(
        "--test-limit",
        type=int,
        default=0,
        help="evaluate on the first N test images only (0 = all)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=0,
        help="iterations for both models (default: the config's MAX_ITER)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        help="images per iteration for both (default: the config's IMS_PER_BATCH)",
    )
    p.add_argument(
        "--device",
        default="",
        help="cpu | cuda (default: the config's MODEL.DEVICE; cpu without CUDA)",
    )
    p.add_argument("--num-workers", type=int, default=None, help="DATALOADER.NUM_WORKERS for both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--equal-time",
        action="store_true",
        help="train Mask R-CNN for as many iterations as fit in IAUNet's training time (measured "
        "with a 10-iteration probe) instead of the same number of iterations",
    )
    p.add_argument(
        "--maskrcnn-iters",
        type=int,
        default=0,
        help="Mask R-CNN's iterations (default: IAUNet's, or with --equal-time the probe's "
        "estimate): the count that the warning after an --equal-time run suggests when the "
        "probe was off",
    )
    p.add_argument("--output-dir", default=os.path.join("output", "compare_maskrcnn"))
    p.add_argument(
        "--maskrcnn-config", default=MASK_RCNN_CONFIG, help="detectron2 model zoo config"
    )
    p.add_argument(
        "--maskrcnn-backbone",
        default="auto",
        help="auto (the IAUNet config's ResNet) | R18 | R34 | R50 | R101",
    )
    p.add_argument("--maskrcnn-solver", default="iaunet", choices=("iaunet", "detectron2"))
    p.add_argument("--maskrcnn-mapper", default="iaunet", choices=("iaunet", "detectron2"))
    p.add_argument(
        "--anchor-scale",
        default="auto",
        help="auto (INPUT.IMAGE_SIZE / 800) or a factor for detectron2's anchor sizes",
    )
    p.add_argument(
        "--maskrcnn-opts",
        nargs="*",
        default=[],
        help="KEY VALUE overrides of the Mask R-CNN config",
    )
    p.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="KEY VALUE overrides of the IAUNet config",
    )
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    setup_logger(name="detectron2")
    setup_logger(name="iaunet")
    icfg = iaunet_cfg(args)
    mcfg = maskrcnn_cfg(args, icfg, args.maskrcnn_iters)
    result = {
        "settings": {
            **vars(args),
            "iters": icfg.SOLVER.MAX_ITER,
            "batch": icfg.SOLVER.IMS_PER_BATCH,
            "train": icfg.DATASETS.TRAIN[0],
            "test": icfg.DATASETS.TEST[0],
            "max_dets": icfg.TEST.DETECTIONS_PER_IMAGE,
            "device": icfg.MODEL.DEVICE,
            "anchor_sizes": [s[0] for s in mcfg.MODEL.ANCHOR_GENERATOR.SIZES],
        }
    }
    logger.info(f"IAUNet: {args.config_file} -> {icfg.OUTPUT_DIR}")
    result["iaunet"] = train_and_evaluate(icfg, Trainer, args.seed)
    result["iaunet"].update(
        name="IAUNet", backbone=_backbone_name(icfg, fpn=False), config=args.config_file
    )
    logger.info(f"Mask R-CNN: {args.maskrcnn_config} -> {mcfg.OUTPUT_DIR}")
    trainer_cls = Trainer if args.maskrcnn_mapper == "iaunet" else D2MapperTrainer
    if args.equal_time and not args.maskrcnn_iters:  # as many as fit in IAUNet's training time
        per_iter = seconds_per_iteration(mcfg, trainer_cls, args.seed)
        iters = max(1, int(result["iaunet"]["train_time_s"] / per_iter))
        logger.info(
            f"Equal time: IAUNet trained {result['iaunet']['train_time_s']:.0f} s; Mask R-CNN "
            f"{per_iter:.2f} s/iteration -> {iters} iterations"
        )
        mcfg = maskrcnn_cfg(args, icfg, iters)
    result["settings"]["maskrcnn_iters"] = mcfg.SOLVER.MAX_ITER
    result["mask_rcnn"] = train_and_evaluate(mcfg, trainer_cls, args.seed)
    result["mask_rcnn"].update(
        name="Mask R-CNN", backbone=_backbone_name(mcfg, fpn=True), config=args.maskrcnn_config
    )
    if args.equal_time:
        _check_equal_time(result)

    table = comparison_report(result)
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "compare_maskrcnn.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    exit_on_config_error(main, "compare_maskrcnn.py")
