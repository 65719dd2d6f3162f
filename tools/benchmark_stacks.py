#!/usr/bin/env python
"""Z-stacks: ``iaunet-predict --stitch-3d`` on synthetic ZYX hyperstacks with 3-D ground truth.

    python tools/benchmark_stacks.py --weights output/synthetic_quick/model_final.pth \\
        [--stitch 0.5] [--gap 1] [--planes 9] [--span 3 5] [--scenes 32] [--work W] \\
        [--opts KEY VALUE ...]

Each synthetic validation scene (``synthetic_cells_val``: its seeds) is rendered as a
``--planes``-plane ImageJ hyperstack (:func:`render_scene_stack`): every cell in 3 to 5 consecutive
planes (``--span``, drawn per cell) and absent from the others, which show the scene's background
with their own noise. The stacks are
predicted by the command line (``iaunet-predict --stitch-3d IOU --save labels,csv``) and its
``_labels.tif`` is scored in 3-D: each linked object against each true cell (a cell's voxels are its
mask in each of its planes), one-to-one at 3-D IoU >= 0.5 (:func:`match_pairs`) -> precision,
recall, F1; a cell is **split** when the objects that match it plane by plane (2-D IoU >= 0.5)
carry more than one id. Results: ``<work>/results.json`` and a table on stdout.
"""

import argparse
import json
import os
import sys
import time
from typing import Dict

import numpy as np
import pycocotools.mask as mask_util
import tifffile
from detectron2.structures.masks import polygons_to_bitmask

from iaunet.data.datasets.synthetic import SPLITS, render_scene_stack
from iaunet.evaluation.matching import match_pairs
from iaunet.predict import main as predict_main


def rle3d(volume: np.ndarray) -> dict:
    """A (Z, H, W) bool volume as one RLE of its (Z*H, W) unfolding (IoU of volumes)."""
    return mask_util.encode(
        np.asfortranarray(volume.reshape(-1, volume.shape[-1]).astype(np.uint8))
    )


def score_stack(labels: np.ndarray, masks: np.ndarray, ranges) -> Dict[str, int]:
    """TP / FP / FN at 3-D IoU 0.5 and the number of split cells."""
    planes = labels.shape[0]
    truth = []
    for m, (a, b) in zip(masks, ranges):
        v = np.zeros((planes, *m.shape), bool)
        v[a : b + 1] = m
        truth.append(rle3d(v))
    ids = [i for i in np.unique(labels) if i]
    pred = [rle3d(labels == i) for i in ids]
    iou = np.asarray(mask_util.iou(pred, truth, [0] * len(truth))) if pred and truth else None
    tp = len(match_pairs(iou.T, 0.5)[0]) if iou is not None else 0
    split = 0
    for m, (a, b) in zip(masks, ranges):
        matched = set()
        for k in range(a, b + 1):
            for i in np.unique(labels[k][m]):
                if i and (labels[k] == i)[m].sum() / ((labels[k] == i) | m).sum() >= 0.5:
                    matched.add(int(i))
        split += len(matched) > 1
    return {"tp": tp, "fp": len(pred) - tp, "fn": len(truth) - tp, "split": split,
            "cells": len(truth)}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint (.pth)")
    p.add_argument("--planes", type=int, default=9)
    p.add_argument("--span", type=int, nargs=2, default=(3, 5), metavar=("MIN", "MAX"))
    p.add_argument("--stitch", type=float, default=0.5, help="--stitch-3d IoU")
    p.add_argument("--gap", type=int, default=1, help="--link-gap planes (its default)")
    p.add_argument("--scenes", type=int, default=0, help="first N scenes (default: all)")
    p.add_argument("--work", default="output/benchmark_stacks")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="iaunet-predict --opts")
    args = p.parse_args(argv)
    seed, count, _ = SPLITS["synthetic_cells_val"]
    stacks_dir, out = os.path.join(args.work, "stacks"), os.path.join(args.work, "predictions")
    os.makedirs(stacks_dir, exist_ok=True)
    truth = {}
    for i in range(args.scenes or count):
        stack, polygons, ranges = render_scene_stack(
            seed * 1_000_003 + i, args.planes, tuple(args.span)
        )
        h, w = stack.shape[1:]
        masks = [polygons_to_bitmask([p.ravel()], h, w) for p in polygons]
        name = f"stack_{i:03d}"
        tifffile.imwrite(os.path.join(stacks_dir, f"{name}.tif"), np.round(stack * 255).astype(
            np.uint8), imagej=True, metadata={"axes": "ZYX"})  # fmt: skip
        truth[name] = (masks, ranges)
    start = time.process_time()
    cmd = ["--weights", args.weights, "--input", stacks_dir, "--output", out, "--save",
           "labels,csv", "--stitch-3d", str(args.stitch), "--link-gap", str(args.gap),
           "--device", "cpu"]  # fmt: skip
    cmd += ["--opts", *args.opts] if args.opts else []
    if predict_main(cmd) != 0:
        return 1
    cpu = time.process_time() - start
    total = dict.fromkeys(("tp", "fp", "fn", "split", "cells"), 0)
    for name, (masks, ranges) in truth.items():
        labels = tifffile.imread(os.path.join(out, f"{name}_labels.tif"))
        labels = labels.reshape(-1, *labels.shape[-2:])  # --planes 1: a 2-D image
        for k, v in score_stack(labels, masks, ranges).items():
            total[k] += v
    tp, fp, fn = total["tp"], total["fp"], total["fn"]
    result = {
        "stacks": len(truth), "planes": args.planes, "span": list(args.span),
        "stitch_3d": args.stitch, "cells": total["cells"],
        "precision": 100 * tp / max(tp + fp, 1), "recall": 100 * tp / max(tp + fn, 1),
        "F1": 100 * 2 * tp / max(2 * tp + fp + fn, 1),
        "split_percent": 100 * total["split"] / max(total["cells"], 1),
        "count_ratio": (tp + fp) / max(total["cells"], 1),
        "cpu_s_per_plane": cpu / max(len(truth) * args.planes, 1),
        "command": "iaunet-predict " + " ".join(cmd),
    }  # fmt: skip
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"{len(truth)} stacks of {args.planes} planes, {total['cells']} cells, --stitch-3d "
        f"{args.stitch}: 3-D F1 {result['F1']:.1f} (precision {result['precision']:.1f}, "
        f"recall {result['recall']:.1f}), split {result['split_percent']:.1f} % of the cells, "
        f"count ratio {result['count_ratio']:.2f}, {result['cpu_s_per_plane']:.2f} CPU-s/plane"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
