#!/usr/bin/env python
"""Few-shot benchmark on real nuclei: the README's "Train on your own images" commands against
Otsu + watershed and Cellpose 3 trained from scratch, on four folds of one annotated image.

The DSB2018 nuclei image that the StarDist 0.9.2 wheel ships (``pip download --no-deps
stardist==0.9.2`` into ``--cache``, once; CC0 data, nothing is committed) is cut into four 256²
quadrants; fold k tests on quadrant k and trains on the other three, written as 16-bit TIFFs with
``_labels.tif`` label images (the README's folder layout). Per fold:

* IAUNet: ``train_net.py --config-file configs/custom/iaunet_small.yaml DATASETS.TRAIN
  '("folder:train",)' DATASETS.TEST '("folder:val",)'`` (auto-sized, from the quick model),
  segm AP from ``--eval-only`` (README step 5), F1 and count from the ``_labels.tif`` that
  ``iaunet-predict`` writes with its defaults (README step 6); CPU seconds of the training;
* Otsu + watershed (scikit-image, no training; seeds from the training objects' median diameter);
* Cellpose 3 (when ``cellpose`` is importable: ``pip install "cellpose==3.1.*"``) trained from
  scratch on the same three images for IAUNet's training CPU seconds on that fold.

Prints a table per method (per fold and mean) and writes ``results.json`` in ``--work``.

    python tools/benchmark_few_shot.py                       # 4 folds, all methods (~1.5 h CPU)
    python tools/benchmark_few_shot.py --folds 3 --no-cellpose
    python tools/benchmark_few_shot.py --opts SOLVER.MAX_ITER 500
    python tools/benchmark_few_shot.py --collect runA runB     # one table from several runs
    python tools/benchmark_few_shot.py --folds 0 --reuse --cellpose-cpu-s 1832  # trained model kept
"""

import argparse
import json
import os
import resource
import sys
import time
from typing import Dict, List

import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from iaunet.bench import few_shot as fs  # noqa: E402
from iaunet.bench.commands import last_segm_ap, run_logged  # noqa: E402
from iaunet.utils.atomic import atomic_write  # noqa: E402

SMALL = os.path.join(ROOT, "configs", "custom", "iaunet_small.yaml")
COLUMNS = ("AP", "AP50", "AP75", "precision", "recall", "F1", "count_ratio", "cpu_s")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: List[str], log: str) -> str:
    return run_logged(cmd, log, ROOT)


def iaunet_fold(args, fold: Dict) -> Dict:
    """README steps 4-6 on one fold: train, evaluate (``--eval-only``: AP), predict (labels)."""
    out = os.path.join(args.work, fold["name"], "iaunet")
    weights = os.path.join(out, "model_final.pth")
    timing = os.path.join(out, "training_time.json")
    if args.reuse and os.path.isfile(weights) and os.path.isfile(timing):
        print(f"{fold['name']}: reusing {weights} (--reuse)", flush=True)
        with open(timing) as f:
            spent = json.load(f)
    else:
        c0, t0 = children_cpu(), time.time()
        run(
            [sys.executable, "train_net.py", "--config-file", SMALL, "OUTPUT_DIR", out,
             "DATASETS.TRAIN", f'("folder:{fold["train"]}",)',
             "DATASETS.TEST", f'("folder:{fold["val"]}",)', "MODEL.WEIGHTS", args.weights,
             *args.opts],
            out + "_train.log",
        )  # fmt: skip
        spent = {"cpu_s": children_cpu() - c0, "wall_s": time.time() - t0}
        atomic_write(timing, json.dumps(spent))
    log = run(
        [sys.executable, "train_net.py", "--config-file", SMALL, "--eval-only",
         "MODEL.WEIGHTS", weights, "DATASETS.TEST", f'("folder:{fold["val"]}",)',
         "OUTPUT_DIR", os.path.join(out, "eval"), *args.opts],
        out + "_eval.log",
    )  # fmt: skip
    pred = os.path.join(out, "predictions")
    tests = fs.read_folder(fold["val"])
    run(
        [sys.executable, "-m", "iaunet.predict", "--weights", weights,
         "--output", pred, "--save", "labels", "--input",
         *(os.path.join(fold["val"], f"{stem}.tif") for stem, _, _ in tests),
         *(["--opts", *args.opts] if args.opts else [])],
        out + "_predict.log",
    )  # fmt: skip
    labels = [tifffile.imread(os.path.join(pred, f"{stem}_labels.tif")) for stem, _, _ in tests]
    matching = fs.label_image_matching([lab for _, _, lab in tests], labels)
    return {**last_segm_ap(log), **matching, **spent}


def otsu_fold(fold: Dict) -> Dict:
    diameter = fs.median_diameter([lab for _, _, lab in fs.read_folder(fold["train"])])
    tests = fs.read_folder(fold["val"])
    pred = [fs.otsu_watershed(img, diameter) for _, img, _ in tests]
    return {**fs.score_label_images([lab for _, _, lab in tests], pred), "cpu_s": 0.0}


def cellpose_fold(args, fold: Dict, cpu_seconds: float) -> Dict:
    train = fs.read_folder(fold["train"])
    model, info = fs.train_cellpose(
        [img for _, img, _ in train],
        [lab for _, _, lab in train],
        cpu_seconds,
        os.path.join(args.work, fold["name"], "cellpose"),
        max_epochs=args.cellpose_max_epochs,
    )
    tests = fs.read_folder(fold["val"])
    pred = [fs.cellpose_labels(model, img) for _, img, _ in tests]
    return {**fs.score_label_images([lab for _, _, lab in tests], pred), **info}


def table(results: Dict[str, Dict[str, Dict]], folds: List[Dict]) -> str:
    """One markdown table: a row per method and fold, and the mean over the folds."""
    lines = [
        "| method | fold (test quadrant) | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for method, per_fold in results.items():
        rows = [(f"{f['name']} ({f['test']})", per_fold[f["name"]]) for f in folds if f["name"]
                in per_fold]  # fmt: skip
        if len(rows) > 1:
            rows.append(("mean", {c: float(np.mean([r[c] for _, r in rows])) for c in COLUMNS}))
        for name, r in rows:
            cells = [
                f"{r[c]:.2f}" if c == "count_ratio" else f"{r[c]:.0f}" if c == "cpu_s"
                else f"{r[c]:.1f}"
                for c in COLUMNS
            ]  # fmt: skip
            lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(works: List[str]) -> str:
    """The table of several runs' ``results.json`` together (folds by name, later runs win)."""
    results: Dict[str, Dict[str, Dict]] = {}
    folds: Dict[str, Dict] = {}
    for work in works:
        with open(os.path.join(work, "results.json")) as f:
            saved = json.load(f)
        folds.update({fold["name"]: fold for fold in saved["folds"]})
        for method, per_fold in saved["results"].items():
            results.setdefault(method, {}).update(per_fold)
    return table(results, [folds[k] for k in sorted(folds)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="output/benchmark_few_shot", help="folds, runs, logs")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/iaunet"),
                   help="where the StarDist wheel and its two images are kept")  # fmt: skip
    p.add_argument("--image", help="another image to cut into folds (with --labels)")
    p.add_argument("--labels", help="its label image")
    p.add_argument("--folds", default="0,1,2,3", help="folds to run (test quadrant k)")
    p.add_argument("--weights", default="output/synthetic_start/model_final.pth",
                   help="starting model (configs/synthetic/iaunet_start.yaml)")  # fmt: skip
    p.add_argument("--no-cellpose", action="store_true", help="skip Cellpose")
    p.add_argument("--reuse", action="store_true",
                   help="do not train a fold again whose model_final.pth (and its training time) "
                   "is in --work")  # fmt: skip
    p.add_argument("--cellpose-cpu-s", type=float, default=None, metavar="S",
                   help="Cellpose's training budget in CPU seconds (default: IAUNet's on that "
                   "fold; give IAUNet's time on an idle machine when folds ran side by side, "
                   "which inflates the CPU seconds they measure)")  # fmt: skip
    p.add_argument("--cellpose-max-epochs", type=int, default=None,
                   help="cap Cellpose's epochs (smoke tests)")  # fmt: skip
    p.add_argument("--collect", nargs="+", metavar="WORK",
                   help="print one table from the results.json of earlier runs (e.g. folds run in "
                   "parallel) and exit")  # fmt: skip
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="IAUNet config overrides (train, evaluate, predict)")  # fmt: skip
    args = p.parse_args(argv)
    if args.collect:
        print(collect(args.collect))
        return 0
    args.work = os.path.abspath(args.work)
    args.weights = os.path.abspath(args.weights) if args.weights else ""
    if bool(args.image) != bool(args.labels):
        p.error("--image and --labels go together")
    if args.image:
        image, labels = tifffile.imread(args.image), tifffile.imread(args.labels)
    else:
        image, labels = fs.stardist_nuclei(args.cache)
    folds = fs.write_folds(image, labels, args.work)
    folds = [folds[int(k)] for k in args.folds.split(",")]
    use_cellpose = not args.no_cellpose and fs.cellpose_available()
    if not args.no_cellpose and not use_cellpose:
        print("cellpose is not installed (pip install 'cellpose==3.1.*'): skipped", flush=True)
    results: Dict[str, Dict[str, Dict]] = {"IAUNet": {}, "Otsu + watershed": {}}
    if use_cellpose:
        results["Cellpose 3 (scratch)"] = {}
    for fold in folds:
        r = iaunet_fold(args, fold)
        results["IAUNet"][fold["name"]] = r
        results["Otsu + watershed"][fold["name"]] = otsu_fold(fold)
        if use_cellpose:
            budget = args.cellpose_cpu_s or r["cpu_s"]
            results["Cellpose 3 (scratch)"][fold["name"]] = cellpose_fold(args, fold, budget)
        print(table(results, folds), flush=True)
    atomic_write(
        os.path.join(args.work, "results.json"),
        json.dumps({"opts": args.opts, "folds": folds, "results": results}, indent=1),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
