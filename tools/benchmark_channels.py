#!/usr/bin/env python
"""Two channels against one: the same model trained on each channel alone and on both.

    python tools/benchmark_channels.py --weights output/synthetic_start/model_final.pth \\
        [--train 24] [--val 8] [--iters 400] [--arms cyto nuclei both] [--work W] \\
        [--opts KEY VALUE ...]

Synthetic two-channel fluorescence scenes (:mod:`iaunet.data.datasets.synthetic_channels`:
cells filling round patches with no visible border between them in the cytoplasm channel, one
nucleus per cell in the nuclei channel) are written as OME-TIFF ``CYX`` files with named channels,
``--train`` for training and ``--val`` (other seeds) for testing. Each arm fine-tunes the
starting model with the README's command (``train_net.py --config-file
configs/custom/iaunet_small.yaml``) and ``INPUT.CHANNELS`` set to its channels, for ``--iters``
iterations, then predicts the test scenes with ``iaunet-predict`` (no channel flag: the model's
saved channels) and scores the label images against the truth: AP / AP50 / AP75 (every object
score 1), precision, recall, F1 at IoU 0.5 and the predicted / true count
(:func:`iaunet.bench.few_shot.score_label_images`). Results: ``<work>/results.json`` and a table
on stdout.
"""

import argparse
import json
import os
import sys
import time

import tifffile

from iaunet.bench.commands import children_cpu, run_logged
from iaunet.bench.few_shot import score_label_images
from iaunet.data.datasets.synthetic_channels import write_two_channel_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "custom", "iaunet_small.yaml")
ARMS = {"cyto": ("cyto",), "nuclei": ("nuclei",), "both": ("cyto", "nuclei")}
COLUMNS = ("AP", "AP50", "AP75", "precision", "recall", "F1", "count_ratio", "train_cpu_s")
TRAIN_SEED, VAL_SEED = 1000, 5000


def run_arm(args, name: str, train: str, val: str) -> dict:
    """Train one arm, predict the test scenes, score the label images."""
    out = os.path.join(args.work, name)
    os.makedirs(out, exist_ok=True)
    channels = str(ARMS[name])
    c0 = children_cpu()
    train_cmd = [
        sys.executable, "train_net.py", "--config-file", SMALL, "OUTPUT_DIR", out,
        "DATASETS.TRAIN", f'("folder:{train}",)', "DATASETS.TEST", f'("folder:{val}",)',
        "MODEL.WEIGHTS", args.weights, "INPUT.CHANNELS", channels,
        "SOLVER.MAX_ITER", str(args.iters), *args.opts,
    ]  # fmt: skip
    run_logged(train_cmd, os.path.join(out, "train.log"), ROOT)
    cpu = children_cpu() - c0
    predictions = os.path.join(out, "predictions")
    stems = sorted(f[: -len("_labels.tif")] for f in os.listdir(val) if f.endswith("_labels.tif"))
    predict_cmd = [
        sys.executable, "-m", "iaunet.predict", "--weights", os.path.join(out, "model_final.pth"),
        "--input", *(os.path.join(val, f"{s}.tif") for s in stems), "--output", predictions,
        "--save", "labels", "--device", "cpu",
    ]  # fmt: skip
    run_logged(predict_cmd, os.path.join(out, "predict.log"), ROOT)
    truth = [tifffile.imread(os.path.join(val, f"{s}_labels.tif")) for s in stems]
    pred = [tifffile.imread(os.path.join(predictions, f"{s}_labels.tif")) for s in stems]
    result = score_label_images(truth, pred)
    result.update(
        channels=list(ARMS[name]),
        train_cpu_s=cpu,
        commands=[" ".join(train_cmd), " ".join(predict_cmd)],
    )
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", required=True, help="starting model (configs/synthetic/...start)")
    p.add_argument("--train", type=int, default=24, help="training scenes")
    p.add_argument("--val", type=int, default=8, help="test scenes")
    p.add_argument("--iters", type=int, default=400, help="training iterations of every arm")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    p.add_argument("--work", default="output/benchmark_channels")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="train_net.py options")
    args = p.parse_args(argv)
    train, val = os.path.join(args.work, "train"), os.path.join(args.work, "val")
    write_two_channel_folder(train, TRAIN_SEED, args.train)
    write_two_channel_folder(val, VAL_SEED, args.val)
    results = {}
    for name in args.arms:
        t0 = time.time()
        results[name] = run_arm(args, name, train, val)
        print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump({"train": args.train, "val": args.val, "iters": args.iters,
                   "results": results}, f, indent=1)  # fmt: skip
    print("| channels (INPUT.CHANNELS) | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, r in results.items():
        cells = [f"{r[c]:.2f}" if c == "count_ratio" else f"{r[c]:.1f}" for c in COLUMNS]
        print(f"| {', '.join(r['channels'])} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
