#!/usr/bin/env python
"""Peak memory (RSS) of ``iaunet-predict`` and of COCO evaluation under load; the figures of
docs/robustness.md "Memory under load".

    python tools/benchmark_memory.py --weights output/synthetic_quick/model_final.pth \
        --work /tmp/mem
    python tools/benchmark_memory.py --weights W --work DIR --cases large --size 4096 \
        --predict-args=--scale=1

Cases, each in its own process, whose RSS (``/proc/<pid>/status`` VmRSS) is sampled every
``--interval`` s and whose peak is the kernel's high-water mark (``ru_maxrss`` from ``wait4``):

* ``large``: ``iaunet-predict`` on one ``--size`` x ``--size`` 16-bit TIFF, a mosaic of synthetic
  scenes (``iaunet.data.datasets.synthetic.render_scene``, 128 px, 4-12 cells each), tiled;
* ``many``: ``iaunet-predict`` on a folder of ``--files`` small 16-bit TIFFs (128 px scenes), with
  the RSS against the number of images done (label TIFFs written): it must not grow;
* ``eval``: detectron2's ``COCOEvaluator`` as ``iaunet.engine.Trainer.build_evaluator`` builds it
  (segm, ``max_dets_per_image`` = ``TEST.DETECTIONS_PER_IMAGE``), on ``--eval-images`` images of
  704 x 520 px (LIVECell's size) with ``--eval-instances`` cells each and as many predictions
  (the cells shifted by one pixel, as full-size bool masks: what the model returns).

Prints a JSON report (``--json`` writes it too).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from iaunet.bench.measure import rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENE = 128
EVAL_SIZE = (520, 704)  # LIVECell images (H, W)


def run_sampled(
    cmd: List[str], progress: Optional[Callable[[], int]] = None, interval: float = 0.2
) -> Dict:
    """Run ``cmd``; RSS samples (seconds, MB, progress()) and the peak RSS (MB) of the process."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    samples = []
    stderr: List[bytes] = []
    os.set_blocking(proc.stderr.fileno(), False)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        chunk = proc.stderr.read()
        if chunk:
            stderr.append(chunk)
        if pid:
            break
        rss = rss_mb(proc.pid)
        if rss is not None:
            samples.append(
                (round(time.time() - start, 2), round(rss, 1), progress() if progress else 0)
            )
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        log = b"".join(stderr).decode(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}:\n{log}")
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "seconds": round(time.time() - start, 1),
        "samples": samples,
    }


def scene16(seed: int) -> np.ndarray:
    """A 128 px synthetic scene as a 16-bit camera-like image (offset 500, gain 30000)."""
    from iaunet.data.datasets.synthetic import render_scene

    image, _ = render_scene(seed)
    return np.round(500 + image * 30000).astype(np.uint16)


def make_large_image(path: str, size: int) -> None:
    """A ``size`` x ``size`` uint16 mosaic of synthetic scenes (dense cells everywhere)."""
    import tifffile

    if os.path.exists(path):
        return
    n = size // SCENE
    mosaic = np.zeros((n * SCENE, n * SCENE), np.uint16)
    for i in range(n * n):
        r, c = divmod(i, n)
        mosaic[r * SCENE : (r + 1) * SCENE, c * SCENE : (c + 1) * SCENE] = scene16(i)
    tifffile.imwrite(path + ".part", mosaic)
    os.replace(path + ".part", path)


def make_many(folder: str, count: int) -> None:
    import tifffile

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        path = os.path.join(folder, f"scene_{i:05d}.tif")
        if not os.path.exists(path):
            tifffile.imwrite(path, scene16(10_000 + i))


def predict_command(args, inputs: str, output: str) -> List[str]:
    return [
        sys.executable,
        "-m",
        "iaunet.predict",
        "--weights",
        args.weights,
        "--input",
        inputs,
        "--output",
        output,
        "--device",
        "cpu",
        "--score-threshold",
        str(args.score_threshold),
        *args.predict_args,
    ]


def case_large(args) -> Dict:
    path = os.path.join(args.work, f"mosaic_{args.size}.tif")
    make_large_image(path, args.size)
    out = os.path.join(args.work, f"out_large_{args.size}")
    result = run_sampled(predict_command(args, path, out), interval=args.interval)
    with open(os.path.join(out, "predictions.json")) as f:
        result["instances"] = len(json.load(f))
    result["image"] = f"{args.size}x{args.size} uint16 ({os.path.getsize(path) / 2**20:.0f} MB)"
    return result


def case_many(args) -> Dict:
    folder = os.path.join(args.work, f"many_{args.files}")
    make_many(folder, args.files)
    out = os.path.join(args.work, f"out_many_{args.files}")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))

    def done() -> int:
        return sum(1 for e in os.scandir(out) if e.name.endswith("_labels.tif"))

    result = run_sampled(predict_command(args, folder, out), done, interval=args.interval)
    samples = [(n, rss) for _, rss, n in result["samples"] if n > 0]
    marks = {}
    for mark in sorted({max(1, args.files // 10), args.files // 2, args.files}):
        at = [rss for n, rss in samples if n >= mark]
        if at:
            marks[mark] = at[0]
    result["rss_mb_at_images"] = marks
    later = [(n, rss) for n, rss in samples if n >= args.files // 10]
    if len(later) > 2:
        slope = np.polyfit([n for n, _ in later], [r for _, r in later], 1)[0]
        result["rss_slope_mb_per_1000_images"] = round(float(slope) * 1000, 1)
    result["samples"] = result["samples"][:: max(1, len(result["samples"]) // 200)]
    return result


def case_eval(args) -> Dict:
    report = os.path.join(args.work, "eval_worker.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--work", args.work, "--eval-worker"]
    cmd += ["--eval-images", str(args.eval_images), "--eval-instances", str(args.eval_instances)]
    result = run_sampled(cmd, interval=args.interval)
    with open(report) as f:
        result.update(json.load(f))
    return result


# -- evaluation worker (its own process) ---------------------------------------------------------


def _rss_now_mb() -> float:
    return rss_mb() or 0.0


def _cells(rng: np.random.Generator, count: int) -> List[np.ndarray]:
    """``count`` ellipse polygons (radius 4-9 px) spread over a LIVECell-sized image."""
    import cv2

    h, w = EVAL_SIZE
    polys = []
    for _ in range(count):
        center = (int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10)))
        axes = (int(rng.integers(4, 10)), int(rng.integers(4, 10)))
        polys.append(cv2.ellipse2Poly(center, axes, int(rng.integers(0, 180)), 0, 360, 30))
    return polys


def eval_worker(args) -> None:
    import cv2
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.structures import Boxes, Instances

    from iaunet.config import load_config
    from iaunet.engine import Trainer

    h, w = EVAL_SIZE
    rng = np.random.default_rng(0)
    images, annotations, cells = [], [], {}
    for i in range(1, args.eval_images + 1):
        images.append({"id": i, "file_name": f"img_{i}.png", "height": h, "width": w})
        cells[i] = _cells(rng, args.eval_instances)
        for p in cells[i]:
            x0, y0 = p.min(0)
            x1, y1 = p.max(0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "segmentation": [p.astype(float).ravel().tolist()],
                    "area": float(cv2.contourArea(p.astype(np.float32))),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "iscrowd": 0,
                }
            )
    gt = os.path.join(args.work, f"eval_gt_{args.eval_images}x{args.eval_instances}.json")
    with open(gt, "w") as f:
        json.dump(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "cell"}],
            },
            f,
        )
    register_coco_instances("bench_dense", {}, gt, args.work)
    DatasetCatalog.get("bench_dense")  # as the test loader does; sets the category id mapping
    cfg = load_config("", ["TEST.DETECTIONS_PER_IMAGE", str(args.eval_instances + 500)])
    cfg.OUTPUT_DIR = os.path.join(args.work, "eval_out")
    evaluator = Trainer.build_evaluator(cfg, "bench_dense")
    evaluator.reset()
    start = _rss_now_mb()
    for image in images:
        masks = np.zeros((args.eval_instances, h, w), np.uint8)
        for k, p in enumerate(cells[image["id"]]):
            cv2.fillPoly(masks[k], [p + 1], 1)  # shifted by one pixel: IoU ~0.7-0.8
        inst = Instances((h, w))
        inst.pred_masks = torch.from_numpy(masks).bool()
        inst.scores = torch.from_numpy(rng.uniform(0.3, 1.0, len(masks)).astype(np.float32))
        inst.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
        inst.pred_boxes = Boxes(torch.zeros(len(masks), 4))
        evaluator.process([{"image_id": image["id"]}], [{"instances": inst}])
        del inst, masks
    after_process = _rss_now_mb()
    t = time.time()
    results = evaluator.evaluate()
    report = {
        "rss_mb_before_process": round(start, 1),
        "rss_mb_after_process": round(after_process, 1),
        "evaluate_seconds": round(time.time() - t, 1),
        "segm_AP": round(results["segm"]["AP"], 2),
        "mask_tensor_mb_per_image": round(args.eval_instances * h * w / 2**20, 1),
    }
    with open(os.path.join(args.work, "eval_worker.json"), "w") as f:
        json.dump(report, f)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="checkpoint for iaunet-predict (cases large, many)")
    p.add_argument("--work", required=True, help="folder for the inputs and outputs (reused)")
    p.add_argument("--cases", nargs="+", default=["large", "many", "eval"])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument(
        "--predict-args",
        nargs="+",
        default=[],
        metavar="ARG",
        help="more iaunet-predict arguments, e.g. --predict-args=--scale=1 (a checkpoint without "
        "a recorded INPUT.PIXEL_SCALE)",
    )
    p.add_argument("--eval-images", type=int, default=8)
    p.add_argument("--eval-instances", type=int, default=2000)
    p.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, s")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--eval-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.eval_worker and set(args.cases) & {"large", "many"} and not args.weights:
        p.error("--weights is required for the cases large and many")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    if args.eval_worker:
        eval_worker(args)
        return {}
    cases = {"large": case_large, "many": case_many, "eval": case_eval}
    report = {"weights": args.weights, "threads": os.environ.get("OMP_NUM_THREADS")}
    for name in args.cases:
        report[name] = cases[name](args)
        summary = {k: v for k, v in report[name].items() if k != "samples"}
        print(f"{name}: {json.dumps(summary)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
