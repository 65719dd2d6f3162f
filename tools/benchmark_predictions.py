#!/usr/bin/env python
"""What a user of ``iaunet-predict`` gets, as matching metrics: F1 at IoU 0.5 (and precision,
recall, F1 over IoU 0.5:0.9, predicted/true count) of the CLI with its default flags, on the
validation scenes one file each and on large mosaics of them (where the scale and the tiling
matter).

    python tools/benchmark_predictions.py --weights output/synthetic_quick/model_final.pth
    python tools/benchmark_predictions.py --weights W --sizes 1024 1600 --predict-args --tile 128

Inputs (written under ``--work``, default ``output/benchmark_predictions``):

* ``scenes/``: every image of ``--dataset`` (default ``synthetic_cells_val``), as it is stored;
* ``mosaic<S>/``: ``--mosaics`` images of S x S px, each a grid of the dataset's scenes, every block
  flipped / rotated by 90 degrees at random, cropped to S (objects cut by the crop keep their
  visible part); ``mosaic<S>_16bit/``: the same as 16-bit TIFF (intensity x 200 + 1000).

Ground truth is the dataset's annotations moved with the blocks. Predictions are read back from the
run's ``predictions.json`` (COCO RLE) and matched one-to-one (:mod:`iaunet.evaluation.matching`).
"""

import argparse
import json
import os
from typing import Dict, List

import cv2
import numpy as np
import pycocotools.mask as mask_util
import tifffile
from detectron2.data import DatasetCatalog

from iaunet.data import read_image
from iaunet.evaluation.matching import InstanceMatchingEvaluator, image_counts, summarize
from iaunet.predict import main as predict_main


def _masks(record: Dict) -> np.ndarray:
    """(N, H, W) uint8 ground-truth masks of a dataset record."""
    rles = InstanceMatchingEvaluator.gt_rles(record)
    h, w = record["height"], record["width"]
    return mask_util.decode(rles).transpose(2, 0, 1) if rles else np.zeros((0, h, w), np.uint8)


def _rles(masks: np.ndarray) -> List[dict]:
    return mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []


def make_mosaic(records: List[Dict], size: int, rng: np.random.Generator):
    """One size x size mosaic of randomly flipped/rotated scenes and its (N, size, size) masks."""
    h, w = records[0]["height"], records[0]["width"]
    rows, cols = -(-size // h), -(-size // w)
    image = np.zeros((rows * h, cols * w), np.uint8)
    masks = []
    for r in range(rows):
        for c in range(cols):
            rec = records[rng.integers(len(records))]
            img = read_image(rec["file_name"])
            img = img if img.ndim == 2 else img[..., 0]
            m = _masks(rec)
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            img, m = np.rot90(img, k), np.rot90(m, k, axes=(1, 2))
            if flip:
                img, m = img[:, ::-1], m[:, :, ::-1]
            image[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
            for mm in m:
                full = np.zeros(image.shape, np.uint8)
                full[r * h : (r + 1) * h, c * w : (c + 1) * w] = mm
                masks.append(full[:size, :size])
    masks = [m for m in masks if m.any()]
    return image[:size, :size], np.stack(masks)


def build_inputs(dataset: str, work: str, sizes: List[int], mosaics: int, seed: int) -> Dict:
    """Write the input folders; returns {folder: {file name: ground-truth RLEs}}."""
    records = DatasetCatalog.get(dataset)
    rng = np.random.default_rng(seed)
    sets = {"scenes": {}}
    os.makedirs(os.path.join(work, "scenes"), exist_ok=True)
    for rec in records:
        name = os.path.basename(rec["file_name"])
        cv2.imwrite(os.path.join(work, "scenes", name), read_image(rec["file_name"]))
        sets["scenes"][name] = _rles(_masks(rec))
    for size in sizes:
        for folder in (f"mosaic{size}", f"mosaic{size}_16bit"):
            os.makedirs(os.path.join(work, folder), exist_ok=True)
            sets[folder] = {}
        for i in range(mosaics):
            image, masks = make_mosaic(records, size, rng)
            gt = _rles(masks)
            cv2.imwrite(os.path.join(work, f"mosaic{size}", f"m{i}.png"), image)
            sets[f"mosaic{size}"][f"m{i}.png"] = gt
            image16 = (image.astype(np.uint16) * 200 + 1000).astype(np.uint16)
            tifffile.imwrite(os.path.join(work, f"mosaic{size}_16bit", f"m{i}.tif"), image16)
            sets[f"mosaic{size}_16bit"][f"m{i}.tif"] = gt
    return sets


def evaluate(folder_gt: Dict[str, list], out_dir: str) -> Dict:
    with open(os.path.join(out_dir, "images.json")) as f:
        images = {img["id"]: os.path.basename(img["file_name"]) for img in json.load(f)["images"]}
    with open(os.path.join(out_dir, "predictions.json")) as f:
        preds = json.load(f)
    by_image = {name: [] for name in folder_gt}
    for p in preds:
        by_image[images[p["image_id"]]].append(p["segmentation"])
    counts = [image_counts(folder_gt[n], by_image[n]) for n in folder_gt]
    num_gt = sum(len(g) for g in folder_gt.values())
    num_pred = sum(len(p) for p in by_image.values())
    return summarize(np.sum(counts, axis=0), num_gt, num_pred)


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", required=True)
    p.add_argument("--config-file", default="", help="default: the config saved in the checkpoint")
    p.add_argument("--dataset", default="synthetic_cells_val")
    p.add_argument("--sizes", type=int, nargs="*", default=[1024, 1600])
    p.add_argument("--mosaics", type=int, default=2, help="mosaics per size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=os.path.join("output", "benchmark_predictions"))
    p.add_argument("--predict-args", nargs=argparse.REMAINDER, default=[], help="extra CLI flags")
    args = p.parse_args(argv)
    sets = build_inputs(args.dataset, args.work, args.sizes, args.mosaics, args.seed)
    rows = {}
    for folder, gt in sets.items():
        out = os.path.join(args.work, "predictions", folder)
        cli = [
            "--weights",
            args.weights,
            "--input",
            os.path.join(args.work, folder),
            "--output",
            out,
        ]
        cli += ["--config-file", args.config_file] if args.config_file else []
        code = predict_main(cli + list(args.predict_args))
        if code != 0:
            raise SystemExit(f"iaunet-predict failed on {folder} (exit status {code})")
        rows[folder] = evaluate(gt, out)
    flags = " ".join(args.predict_args) or "(default flags)"
    print(f"\niaunet-predict {flags}, {args.weights}; matching at IoU 0.5, one-to-one\n")
    print(
        "| input | images | true | predicted | precision | recall | F1 | F1@0.5:0.9 | pred/true |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for folder, r in rows.items():
        print(
            f"| {folder} | {len(sets[folder])} | {r['num_gt']} | {r['num_pred']} | "
            f"{r['precision@0.5']:.1f} | {r['recall@0.5']:.1f} | {r['F1@0.5']:.1f} | "
            f"{r['F1@0.5:0.9']:.1f} | {r['count_ratio']:.2f} |"
        )
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
