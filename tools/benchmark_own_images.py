#!/usr/bin/env python
"""Benchmark of the README's "Train on your own images" commands on held-out synthetic scenes.

Writes a training and a validation folder of synthetic scenes rendered with seeds that
``synthetic_cells_train`` / ``_val`` never use (16-bit TIFF images + ``_labels.tif`` label images,
zoomed so that the cells are not at the size the starting model was trained at), then runs the
commands exactly as the README gives them -- train (``configs/custom/iaunet_small.yaml``), evaluate
(``--eval-only``), predict (``iaunet-predict`` without a config) -- and prints a table: COCO segm AP
from the evaluation, and precision / recall / F1 at IoU 0.5 from the predicted instances
(``predictions.json``, score >= 0.5) matched one-to-one to the label images' objects as by every
other tool (:mod:`iaunet.evaluation.matching`). This trains (minutes on a CPU); it is not a test.

    python tools/benchmark_own_images.py                        # starts from the quick model
    python tools/benchmark_own_images.py --scratch              # also a run from scratch
    python tools/benchmark_own_images.py --opts SOLVER.MAX_ITER 300
"""

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import cv2
import numpy as np
import tifffile

from iaunet.bench.commands import last_segm_ap, run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEED_BASE = 70_000_000  # synthetic_cells* use seeds 0..255 and 1_000_003..1_000_034
SMALL = os.path.join(ROOT, "configs", "custom", "iaunet_small.yaml")


def write_scenes(folder: str, seeds, zoom: float) -> None:
    """``folder/images/<k>.tif`` (16-bit) and ``folder/masks/<k>.tif`` (label image, uint16; where
    cells overlap the later one wins, as in a label image drawn by hand)."""
    from detectron2.structures import polygons_to_bitmask

    from iaunet.data.datasets.synthetic import render_scene

    for sub in ("images", "masks"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for k, seed in enumerate(seeds):
        image, polygons = render_scene(seed)
        h, w = (round(s * zoom) for s in image.shape)
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        labels = np.zeros((h, w), np.uint16)
        for i, poly in enumerate(polygons, 1):
            labels[polygons_to_bitmask([(poly * zoom).ravel()], h, w)] = i
        tifffile.imwrite(
            os.path.join(folder, "images", f"scene{k:03d}.tif"),
            (500 + 30000 * image).astype(np.uint16),
        )
        tifffile.imwrite(os.path.join(folder, "masks", f"scene{k:03d}.tif"), labels)


def run(cmd: List[str], log: str) -> str:
    return run_logged(cmd, log, ROOT)


def matching_f1(pred_dir: str, masks_dir: str, thresh: float = 0.5) -> Dict[str, float]:
    """Precision, recall and F1 at IoU ``thresh`` as every tool reports them
    (:mod:`iaunet.evaluation.matching`: one-to-one, the most pairs of IoU >= ``thresh``; counts
    summed over the images)."""
    from iaunet.evaluation.matching import image_counts, label_image_rles, summarize

    with open(os.path.join(pred_dir, "images.json")) as f:
        images = json.load(f)["images"]
    with open(os.path.join(pred_dir, "predictions.json")) as f:
        preds = json.load(f)
    counts, num_gt, num_pred = np.zeros((1, 4)), 0, 0
    for img in images:
        stem = os.path.splitext(os.path.basename(img["file_name"]))[0]
        labels = tifffile.imread(os.path.join(masks_dir, f"{stem}.tif"))
        gt = label_image_rles(labels)
        dt = [p["segmentation"] for p in preds if p["image_id"] == img["id"]]
        counts += image_counts(gt, dt, taus=(thresh,))
        num_gt, num_pred = num_gt + len(gt), num_pred + len(dt)
    res = summarize(counts, num_gt, num_pred, taus=(thresh,))
    return {
        "precision": res[f"precision@{thresh:g}"],
        "recall": res[f"recall@{thresh:g}"],
        "F1": res[f"F1@{thresh:g}"],
        "objects": num_gt,
    }


def benchmark(args, name: str, weights: str) -> Dict[str, float]:
    work, out = args.work, os.path.join(args.work, name)
    train, val = os.path.join(work, "train"), os.path.join(work, "val")
    t0 = time.time()
    run(
        [sys.executable, "train_net.py", "--config-file", SMALL, "OUTPUT_DIR", out,
         "DATASETS.TRAIN", f'("folder:{train}",)', "DATASETS.TEST", f'("folder:{val}",)',
         "MODEL.WEIGHTS", weights, *args.opts],
        os.path.join(work, f"{name}_train.log"),
    )  # fmt: skip
    minutes = (time.time() - t0) / 60
    log = run(
        [sys.executable, "train_net.py", "--config-file", SMALL, "--eval-only",
         "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
         "DATASETS.TEST", f'("folder:{val}",)', "OUTPUT_DIR", os.path.join(out, "eval"),
         *args.opts],
        os.path.join(work, f"{name}_eval.log"),
    )  # fmt: skip
    pred = os.path.join(out, "predictions")
    run(
        [sys.executable, "-m", "iaunet.predict", "--weights", os.path.join(out, "model_final.pth"),
         "--input", os.path.join(val, "images"), "--output", pred],
        os.path.join(work, f"{name}_predict.log"),
    )  # fmt: skip
    return {
        **last_segm_ap(log),
        **matching_f1(pred, os.path.join(val, "masks")),
        "minutes": minutes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="output/benchmark_own_images", help="folders, runs, logs")
    p.add_argument("--train", type=int, default=8, help="training images (default 8)")
    p.add_argument("--val", type=int, default=16, help="validation images (default 16)")
    p.add_argument("--zoom", type=float, default=1.5, help="scene magnification (cells ~30 px)")
    p.add_argument("--weights", default="output/synthetic_start/model_final.pth")
    p.add_argument("--scratch", action="store_true", help="also train from scratch")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides (last)")
    args = p.parse_args(argv)
    args.work = os.path.abspath(args.work)
    write_scenes(
        os.path.join(args.work, "train"), range(SEED_BASE, SEED_BASE + args.train), args.zoom
    )
    val_seeds = range(SEED_BASE + 10_000, SEED_BASE + 10_000 + args.val)
    write_scenes(os.path.join(args.work, "val"), val_seeds, args.zoom)
    runs = {"from the synthetic model": os.path.abspath(args.weights)}
    if args.scratch:
        runs["from scratch"] = ""
    header = (
        f"{args.train} training / {args.val} validation images (zoom {args.zoom}), "
        f"overrides: {' '.join(args.opts) or 'none'}\n"
        "| start | AP | AP50 | AP75 | precision@0.5 | recall@0.5 | F1@0.5 | training (min) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for i, (label, weights) in enumerate(runs.items()):
        r = benchmark(args, f"run{i}", weights)
        rows.append(
            f"| {label} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | {r['precision']:.1f} "
            f"| {r['recall']:.1f} | {r['F1']:.1f} | {r['minutes']:.1f} |"
        )
        print("\n".join([header, *rows]), flush=True)  # the table so far
    return 0


if __name__ == "__main__":
    sys.exit(main())
