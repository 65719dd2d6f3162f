"""Few-shot benchmark on real nuclei: the README's "Train on your own images" commands against
Otsu + watershed, Cellpose 3 and StarDist 2D trained from scratch, on four folds of one annotated
image, every method scored the same way: from the label image it writes.

The DSB2018 nuclei image that the StarDist 0.9.2 wheel ships (``pip download --no-deps
stardist==0.9.2`` into ``--cache``, once; CC0 data, nothing is committed) is cut into four 256²
quadrants; fold k tests on quadrant k and trains on the other three, written as 16-bit TIFFs with
``_labels.tif`` label images (the README's folder layout). Any image + label image can be used
instead (``--image/--labels``). Per fold:

* IAUNet: ``train_net.py --config-file configs/custom/iaunet_small.yaml DATASETS.TRAIN
  '("folder:train",)' DATASETS.TEST '("folder:val",)'`` (auto-sized, from the starting model),
  ``iaunet-predict`` with the model's saved defaults (its views: ``IAUNet``, label images in
  ``<work>/<fold>/iaunet/predictions/``) and with one view (``--tta none``: ``IAUNet (one view)``,
  in ``predictions_1view/``); the ``--eval-only`` AP, which ranks detections by IAUNet's own scores
  (a label image carries none), is kept as ``eval_AP`` / ``eval_AP50`` / ``eval_AP75``;
* Otsu + watershed (scikit-image, no training; seeds from the training objects' median diameter);
* Cellpose 3 (``cellpose==3.1.*``) from scratch on the same three images for the same CPU seconds,
  predicting in one view and with ``augment=True`` (two rows of one model);
* StarDist 2D (``stardist==0.9.2`` + ``tensorflow-cpu``) from scratch, its example notebook's
  recipe, for the same CPU seconds.

Each label image is scored by COCO AP / AP50 / AP75 (every object score 1), matching precision,
recall, F1 at IoU 0.5 and the predicted / true count; ``cpu_s`` is the training's CPU seconds,
``pred_cpu_s`` the prediction's CPU seconds per test image (model loaded, after one warm-up).
The training budget is IAUNet's default run on that fold, or ``--budget S`` CPU seconds for every
method (IAUNet's iterations from two short probe runs, as the peers' epochs; method names gain
``@S CPU-s``). The peers' packages are the ``fewshot`` extra (``pip install -e ".[fewshot]"``).

    python tools/benchmark_few_shot.py                       # 4 folds, all methods (~3 h CPU)
    python tools/benchmark_few_shot.py --budget 600 --work output/fs600   # 600 CPU-s each
    python tools/benchmark_few_shot.py --folds 3 --no-cellpose --no-stardist
    python tools/benchmark_few_shot.py --train-call --no-cellpose --no-stardist  # iaunet.train
    python tools/benchmark_few_shot.py --opts SOLVER.MAX_ITER 500
    python tools/benchmark_few_shot.py --variant scale=1.5,gamma=1.4 --work output/fs_v1  # another
    python tools/benchmark_few_shot.py --collect runA runB     # one table from several runs
    python tools/benchmark_few_shot.py --folds 0 --reuse --cellpose-cpu-s 1832  # trained model kept
"""

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import tifffile

from iaunet.bench import few_shot as fs
from iaunet.bench.commands import children_cpu, last_segm_ap, run_logged
from iaunet.utils.atomic import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "custom", "iaunet_small.yaml")
COLUMNS = ("AP", "AP50", "AP75", "precision", "recall", "F1", "count_ratio", "cpu_s", "pred_cpu_s")
IAUNET, IAUNET_1 = "IAUNet", "IAUNet (one view)"
OTSU = "Otsu + watershed"
CELLPOSE, CELLPOSE_AUG = "Cellpose 3 (scratch)", "Cellpose 3 (scratch, augment)"
STARDIST = "StarDist 2D (scratch)"
IAUNET_PROBE = (20, 60)  # iterations of the two probe runs that time an iteration (--budget)


def run(cmd: List[str], log: str) -> str:
    return run_logged(cmd, log, ROOT)


def timed_predictions(predict: Callable, images: Sequence[np.ndarray]):
    """(outputs, CPU seconds per image) of ``predict`` over ``images``, after one warm-up call
    (lazy set-up: graph building, thread pools)."""
    predict(images[0])
    c0 = time.process_time()
    labels = [predict(img) for img in images]
    return labels, (time.process_time() - c0) / len(images)


# ``--train-call``: the fold's images as arrays through ``iaunet.train`` (notebooks, napari)
TRAIN_CALL = """import sys, iaunet
from iaunet.bench.few_shot import read_folder
train, val = read_folder(sys.argv[1]), read_folder(sys.argv[2])
iaunet.train([i for _, i, _ in train], [lab for _, _, lab in train], sys.argv[3],
             weights=sys.argv[4], val_images=[i for _, i, _ in val],
             val_labels=[lab for _, _, lab in val], opts=sys.argv[5:])"""


def train_iaunet(args, fold: Dict, out: str, opts: Sequence[str]) -> float:
    """README step 4 on one fold into ``out`` (``--train-call``: ``iaunet.train`` on the fold's
    arrays, which writes them under ``out/data/``); its CPU seconds."""
    c0 = children_cpu()
    if args.train_call:
        cmd = [sys.executable, "-c", TRAIN_CALL, fold["train"], fold["val"], out, args.weights]
        run([*cmd, *opts], out + "_train.log")
        return children_cpu() - c0
    run(
        [sys.executable, "train_net.py", "--config-file", SMALL, "OUTPUT_DIR", out,
         "DATASETS.TRAIN", f'("folder:{fold["train"]}",)',
         "DATASETS.TEST", f'("folder:{fold["val"]}",)', "MODEL.WEIGHTS", args.weights, *opts],
        out + "_train.log",
    )  # fmt: skip
    return children_cpu() - c0


def iaunet_fold(args, fold: Dict) -> Dict[str, Dict]:
    """README steps 4-6 on one fold: train (for ``--budget``: the iterations that fit, from two
    probe runs), evaluate (``--eval-only``: AP by IAUNet's own scores), predict (label images with
    the saved defaults and with one view). Returns {method: result}."""
    out = os.path.join(args.work, fold["name"], "iaunet")
    weights = os.path.join(out, "model_final.pth")
    timing = os.path.join(out, "training_time.json")
    if args.reuse and os.path.isfile(weights) and os.path.isfile(timing):
        print(f"{fold['name']}: reusing {weights} (--reuse)", flush=True)
        with open(timing) as f:
            spent = json.load(f)
    else:
        opts, t0 = list(args.opts), time.time()
        if args.budget:

            def probe(n: int) -> float:
                return train_iaunet(
                    args, fold, f"{out}_probe{n}", [*opts, "SOLVER.MAX_ITER", str(n)]
                )

            iters, per, fixed = fs.units_for_budget(probe, args.budget, IAUNET_PROBE)
            print(
                f"{fold['name']}: IAUNet {per:.2f} CPU-s/iteration + {fixed:.0f} CPU-s: "
                f"{iters} iterations in {args.budget:g} CPU-s",
                flush=True,
            )
            opts += ["SOLVER.MAX_ITER", str(iters)]
            t0 = time.time()
        spent = {"cpu_s": train_iaunet(args, fold, out, opts), "wall_s": time.time() - t0}
        atomic_write(timing, json.dumps(spent))
    log = run(
        [sys.executable, "train_net.py", "--config-file", SMALL, "--eval-only",
         "MODEL.WEIGHTS", weights, "DATASETS.TEST", f'("folder:{fold["val"]}",)',
         "OUTPUT_DIR", os.path.join(out, "eval"), *args.opts],
        out + "_eval.log",
    )  # fmt: skip
    own = {f"eval_{k}": v for k, v in last_segm_ap(log).items()}
    tests = fs.read_folder(fold["val"])
    gt, images = [lab for _, _, lab in tests], [img for _, img, _ in tests]
    results = {}
    for method, folder, tta in (
        (IAUNET, "predictions", []),
        (IAUNET_1, "predictions_1view", ["--tta", "none"]),
    ):
        pred = os.path.join(out, folder)
        run(
            [sys.executable, "-m", "iaunet.predict", "--weights", weights,
             "--output", pred, "--save", "labels", *tta, "--input",
             *(os.path.join(fold["val"], f"{stem}.tif") for stem, _, _ in tests),
             *(["--opts", *args.opts] if args.opts else [])],
            out + f"_{folder}.log",
        )  # fmt: skip
        labels = [tifffile.imread(os.path.join(pred, f"{s}_labels.tif")) for s, _, _ in tests]
        results[method] = {**fs.score_label_images(gt, labels), **own, **spent}
        results[method]["pred_cpu_s"] = iaunet_predict_cpu(weights, images, tta[1:], args.opts)
    return results


def iaunet_predict_cpu(weights: str, images, tta: Sequence[str], opts: Sequence[str]) -> float:
    """CPU seconds per image of ``IAUNetPredictor`` as ``iaunet-predict`` runs it (saved defaults,
    or ``tta``)."""
    from iaunet.inference import IAUNetPredictor

    extra = ["MODEL.IAUNET.TEST.TTA", tta[0]] if tta else []
    predictor = IAUNetPredictor.from_checkpoint(weights, opts=[*opts, *extra])
    return timed_predictions(lambda img: predictor(img), images)[1]


def otsu_fold(fold: Dict) -> Dict:
    diameter = fs.median_diameter([lab for _, _, lab in fs.read_folder(fold["train"])])
    tests = fs.read_folder(fold["val"])
    pred, cpu = timed_predictions(
        lambda img: fs.otsu_watershed(img, diameter), [i for _, i, _ in tests]
    )
    return {
        **fs.score_label_images([lab for _, _, lab in tests], pred),
        "cpu_s": 0.0,
        "pred_cpu_s": cpu,
    }


def stardist_fold(args, fold: Dict, cpu_seconds: float) -> Dict[str, Dict]:
    """StarDist 2D trained from scratch on the fold's training images for ``cpu_seconds`` (in its
    own process, :func:`iaunet.bench.few_shot.run_stardist`), its label images scored."""
    data, tests = fs.read_folder(fold["train"]), fs.read_folder(fold["val"])
    labels, info = fs.run_stardist(
        [img for _, img, _ in data], [lab for _, _, lab in data], [img for _, img, _ in tests],
        cpu_seconds, os.path.join(args.work, fold["name"], "stardist"), args.peer_max_epochs,
    )  # fmt: skip
    return {STARDIST: {**fs.score_label_images([lab for _, _, lab in tests], labels), **info}}


def peer_fold(
    args,
    fold: Dict,
    train: Callable,
    predictors: Dict[str, Callable],
    cpu_seconds: float,
    name: str,
) -> Dict[str, Dict]:
    """A peer trained from scratch on the fold's training images for ``cpu_seconds`` (``train``:
    :func:`iaunet.bench.few_shot.train_cellpose` or ``train_stardist``), its label images from each
    of ``predictors`` ({method: predict(model, image)}) scored. Returns {method: result}."""
    data = fs.read_folder(fold["train"])
    model, info = train(
        [img for _, img, _ in data], [lab for _, _, lab in data], cpu_seconds,
        os.path.join(args.work, fold["name"], name), max_epochs=args.peer_max_epochs,
    )  # fmt: skip
    tests = fs.read_folder(fold["val"])
    gt, images = [lab for _, _, lab in tests], [img for _, img, _ in tests]
    results = {}
    for method, predict in predictors.items():
        labels, cpu = timed_predictions(lambda img: predict(model, img), images)
        results[method] = {**fs.score_label_images(gt, labels), **info, "pred_cpu_s": cpu}
    return results


SHOWN = COLUMNS + ("eval_AP",)  # eval_AP: IAUNet's --eval-only AP, ranked by its own scores


def _cell(column: str, value: float) -> str:
    if value != value:  # NaN: not measured for this method (or an older results.json)
        return "–"
    digits = {"count_ratio": 2, "pred_cpu_s": 2, "cpu_s": 0}.get(column, 1)
    return f"{value:.{digits}f}"


def table(results: Dict[str, Dict[str, Dict]], folds: List[Dict]) -> str:
    """One markdown table: a row per method and fold, and the mean over the folds."""
    lines = [
        "| method | fold (test quadrant) | " + " | ".join(SHOWN) + " |",
        "|---|---|" + "---|" * len(SHOWN),
    ]
    for method, per_fold in results.items():
        rows = [(f"{f['name']} ({f['test']})", per_fold[f["name"]]) for f in folds if f["name"]
                in per_fold]  # fmt: skip
        if len(rows) > 1:
            rows.append(("mean", {c: float(np.mean([r.get(c, np.nan) for _, r in rows]))
                                  for c in SHOWN}))  # fmt: skip
        for name, r in rows:
            cells = [_cell(c, r.get(c, np.nan)) for c in SHOWN]
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


def earlier_results(work: str) -> Dict[str, Dict[str, Dict]]:
    """The rows of an earlier run's ``results.json`` in ``work`` (e.g. the peers', when IAUNet's
    saved models are scored again with ``--reuse --opts ...``); this run's rows replace those of
    the same method and fold."""
    path = os.path.join(work, "results.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        results = json.load(f)["results"]
    rows = sum(len(per_fold) for per_fold in results.values())
    print(
        f"{path}: {rows} rows of an earlier run kept (this run's rows replace theirs)", flush=True
    )
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="output/benchmark_few_shot", help="folds, runs, logs")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/iaunet"),
                   help="where the StarDist wheel and its two images are kept")  # fmt: skip
    p.add_argument("--image", help="another image to cut into folds (with --labels)")
    p.add_argument("--labels", help="its label image")
    p.add_argument("--variant", default="", metavar="KEY=V,...",
                   help="a version of the image to check settings on images they were not chosen "
                   "on: scale, rotate (degrees), gamma, gain, noise (%% of the range), seed; e.g. "
                   "scale=1.5,gamma=1.4")  # fmt: skip
    p.add_argument("--folds", default="0,1,2,3", help="folds to run (test quadrant k)")
    p.add_argument("--weights", default="output/synthetic_start/model_final.pth",
                   help="starting model (configs/synthetic/iaunet_start.yaml)")  # fmt: skip
    p.add_argument("--budget", type=float, default=None, metavar="S",
                   help="train every method for S CPU seconds (default: IAUNet's default run; "
                   "the peers get its CPU seconds on each fold)")  # fmt: skip
    p.add_argument(
        "--train-call",
        action="store_true",
        help="train IAUNet through iaunet.train on the fold's arrays instead of train_net.py "
        "(rows gain [iaunet.train]; the same trainer, config and defaults)",
    )
    p.add_argument("--no-cellpose", action="store_true", help="skip Cellpose")
    p.add_argument("--no-stardist", action="store_true", help="skip StarDist")
    p.add_argument("--reuse", action="store_true",
                   help="do not train a fold again whose model_final.pth (and its training time) "
                   "is in --work")  # fmt: skip
    p.add_argument("--cellpose-cpu-s", type=float, default=None, metavar="S",
                   help="the peers' training budget in CPU seconds (default: --budget, else "
                   "IAUNet's on that fold; give IAUNet's time on an idle machine when folds ran "
                   "side by side, which inflates the CPU seconds they measure)")  # fmt: skip
    p.add_argument("--peer-max-epochs", "--cellpose-max-epochs", type=int, default=None,
                   help="cap the peers' epochs (smoke tests)")  # fmt: skip
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
    if args.variant:
        try:
            image, labels = fs.image_variant(image, labels, fs.parse_variant(args.variant))
        except ValueError as e:
            p.error(str(e))
    written = fs.write_folds(image, labels, args.work)
    folds = [written[int(k)] for k in args.folds.split(",")]
    cellpose = {
        CELLPOSE: fs.cellpose_labels,
        CELLPOSE_AUG: lambda model, img: fs.cellpose_labels(model, img, augment=True),
    }
    peers: Dict[str, Callable] = {}
    if not args.no_cellpose:
        peers["cellpose"] = lambda fold, budget: peer_fold(
            args, fold, fs.train_cellpose, cellpose, budget, "cellpose"
        )
    if not args.no_stardist:
        peers["stardist"] = lambda fold, budget: stardist_fold(args, fold, budget)
    for name in list(peers):
        if not fs.available(name):
            print(f"{name} is not installed (pip install -e '.[fewshot]'): skipped", flush=True)
            del peers[name]
    at = f" @{args.budget:g} CPU-s" if args.budget else ""
    at += " [iaunet.train]" if args.train_call else ""
    results = earlier_results(args.work)  # rows of an earlier run in --work are kept
    for fold in folds:
        found = iaunet_fold(args, fold)
        found[OTSU] = otsu_fold(fold)
        budget = args.cellpose_cpu_s or args.budget or found[IAUNET]["cpu_s"]
        for run_peer in peers.values():
            found.update(run_peer(fold, budget))
        for method, result in found.items():
            results.setdefault(method if method == OTSU else method + at, {})[fold["name"]] = result
        print(table(results, written), flush=True)
        atomic_write(
            os.path.join(args.work, "results.json"),
            json.dumps({"opts": args.opts, "budget": args.budget, "variant": args.variant,
                        "folds": written, "results": results}, indent=1),
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
