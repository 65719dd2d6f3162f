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
carry more than one id. ``--cellpose-cpu-s S``: Cellpose 3 trained from scratch on the quick
model's training scenes for S CPU seconds, its planes stitched by its own ``stitch_threshold``,
scored the same way. Results: ``<work>/results.json`` and a line per method on stdout.
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

from iaunet.data.datasets.synthetic import SPLITS, render_scene, render_scene_stack
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
                obj = labels[k] == i
                if i and (obj & m).sum() / (obj | m).sum() >= 0.5:
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
    p.add_argument(
        "--cellpose-cpu-s", type=float, default=0, metavar="S",
        help="also Cellpose 3 from scratch on the same training scenes for S CPU seconds "
        "(the quick model's training CPU), stitched with --stitch (the fewshot extra)",
    )  # fmt: skip
    p.add_argument("--train-scenes", type=int, default=0, help="Cellpose: first N (default all)")
    p.add_argument("--peer-max-epochs", type=int, default=None, help="Cellpose: at most N epochs")
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
    cmd = ["--weights", args.weights, "--input", stacks_dir, "--output", out, "--save",
           "labels,csv", "--stitch-3d", str(args.stitch), "--link-gap", str(args.gap),
           "--device", "cpu"]  # fmt: skip
    cmd += ["--opts", *args.opts] if args.opts else []
    start = time.process_time()
    if predict_main(cmd) != 0:
        return 1
    labels = {n: tifffile.imread(os.path.join(out, f"{n}_labels.tif")) for n in truth}
    results = {"IAUNet": summary(truth, labels, time.process_time() - start, args.planes)}
    results["IAUNet"]["command"] = "iaunet-predict " + " ".join(cmd)
    if args.cellpose_cpu_s:
        results["Cellpose 3 (scratch)"] = cellpose_row(args, truth, stacks_dir)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump({"stacks": len(truth), "planes": args.planes, "span": list(args.span),
                   "stitch_3d": args.stitch, "results": results}, f, indent=1)  # fmt: skip
    for method, r in results.items():
        print(
            f"{method}: {len(truth)} stacks of {args.planes} planes, {r['cells']} cells, stitch "
            f"{args.stitch}: 3-D F1 {r['F1']:.1f} (precision {r['precision']:.1f}, recall "
            f"{r['recall']:.1f}), split {r['split_percent']:.1f} % of the cells, count ratio "
            f"{r['count_ratio']:.2f}, {r['cpu_s_per_plane']:.2f} CPU-s/plane"
        )
    return 0


def summary(truth: Dict, labels: Dict[str, np.ndarray], cpu: float, planes: int) -> Dict:
    """3-D precision / recall / F1, split cells and count ratio of the label stacks ``labels``
    against ``truth`` ({name: (masks, ranges)}); ``cpu``: the prediction's CPU seconds."""
    total = dict.fromkeys(("tp", "fp", "fn", "split", "cells"), 0)
    for name, (masks, ranges) in truth.items():
        stack = labels[name].reshape(-1, *labels[name].shape[-2:])  # --planes 1: a 2-D image
        for k, v in score_stack(stack, masks, ranges).items():
            total[k] += v
    tp, fp, fn = total["tp"], total["fp"], total["fn"]
    return {
        "cells": total["cells"],
        "precision": 100 * tp / max(tp + fp, 1), "recall": 100 * tp / max(tp + fn, 1),
        "F1": 100 * 2 * tp / max(2 * tp + fp + fn, 1),
        "split_percent": 100 * total["split"] / max(total["cells"], 1),
        "count_ratio": (tp + fp) / max(total["cells"], 1),
        "cpu_s_per_plane": cpu / max(len(truth) * planes, 1),
    }  # fmt: skip


def cellpose_row(args, truth: Dict, stacks_dir: str) -> Dict:
    """Cellpose 3 trained from scratch on the quick model's training scenes (``synthetic_cells_
    train``, as label images) for ``--cellpose-cpu-s``, each stack predicted plane by plane and
    stitched with ``stitch_threshold`` = ``--stitch`` (Cellpose's own 3-D linking)."""
    from iaunet.bench import few_shot as fs

    seed, count, _ = SPLITS["synthetic_cells_train"]
    images, label_images = [], []
    for i in range(args.train_scenes or count):
        image, polygons = render_scene(seed * 1_000_003 + i)
        lab = np.zeros(image.shape, np.uint16)
        for k, poly in enumerate(polygons, start=1):
            lab[polygons_to_bitmask([poly.ravel()], *image.shape)] = k
        images.append(np.round(image * 255).astype(np.uint8))
        label_images.append(lab)
    work = os.path.join(args.work, "cellpose")
    model, info = fs.train_cellpose(
        images, label_images, args.cellpose_cpu_s, work, max_epochs=args.peer_max_epochs
    )
    start, labels = time.process_time(), {}
    for name in truth:
        stack = tifffile.imread(os.path.join(stacks_dir, f"{name}.tif")).astype(np.float32)
        masks = model.eval(stack, channels=[0, 0], z_axis=0, do_3D=False,
                           stitch_threshold=args.stitch)[0]  # fmt: skip
        labels[name] = np.asarray(masks)
    return {**summary(truth, labels, time.process_time() - start, args.planes), **info}


if __name__ == "__main__":
    sys.exit(main())
