#!/usr/bin/env python
"""Block-wise prediction on Dask (``iaunet-predict --dask``) against in-process tiled prediction on
large synthetic mosaics with ground truth: instances, F1, speed (megapixels/s), peak RSS per worker,
and a run killed half way and resumed.

    python tools/benchmark_big_image.py --weights output/synthetic_quick/model_final.pth \\
        --sizes 4096 --block 1024 --workers 1 2 --in-process --resume-check
    python tools/benchmark_big_image.py --weights W --model model.onnx --backends onnxruntime \\
        --sizes 8192 16384 --workers 2

Each mosaic (``--work``/mosaic<S>.tif, a tiled BigTIFF read lazily) is a grid of the validation
scenes (``--dataset``), each flipped / rotated at random, with their annotations as ground truth
(kept as crops: no full-size mask is ever made). Per size: the in-process path
(``IAUNetPredictor.predict(tiled=True)``, this process, one thread) when ``--in-process``; then
``predict_big`` on a LocalCluster of N one-thread worker processes for each ``--workers`` N and each
backend. F1 is one-to-one matching at IoU 0.5 of the instances scoring >= 0.5 (what the label image
shows). Peak RSS per worker: each worker process's resident memory, sampled every 0.2 s.
``--resume-check`` runs the command line with ``--dask local:2``, kills it (SIGKILL to its
process group) when half the blocks are written, runs it again and checks that no finished block
was recomputed and that the output equals the uninterrupted run's.
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Tuple

import numpy as np
import tifffile
import zarr
from detectron2.data import DatasetCatalog

from iaunet.bench.measure import rss_mb
from iaunet.bigimage.big_image import PredictorSpec, predict_big, read_objects, worker_predictor
from iaunet.data import read_image
from iaunet.data.lazy_image import open_plane
from iaunet.evaluation.matching import InstanceMatchingEvaluator, match_pairs

Crops = List[Tuple[int, int, np.ndarray]]  # (y0, x0, bool crop) per instance
THRESH = 0.5


def build_mosaic(dataset: str, size: int, path: str, seed: int = 0) -> Crops:
    """Write a size x size uint8 tiled BigTIFF of random scenes; returns the ground truth."""
    import pycocotools.mask as mask_util

    records = DatasetCatalog.get(dataset)
    rng = np.random.default_rng(seed)
    h, w = records[0]["height"], records[0]["width"]
    image = np.lib.format.open_memmap(path + ".npy", "w+", np.uint8, (size, size))
    gt: Crops = []
    for y in range(0, size, h):
        for x in range(0, size, w):
            rec = records[rng.integers(len(records))]
            img = read_image(rec["file_name"])
            img = img if img.ndim == 2 else img[..., 0]
            rles = InstanceMatchingEvaluator.gt_rles(rec)
            masks = mask_util.decode(rles).transpose(2, 0, 1) if rles else np.zeros((0, h, w))
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            img, masks = np.rot90(img, k), np.rot90(masks, k, axes=(1, 2))
            if flip:
                img, masks = img[:, ::-1], masks[:, :, ::-1]
            ch, cw = min(h, size - y), min(w, size - x)
            image[y : y + ch, x : x + cw] = img[:ch, :cw]
            for m in masks[:, :ch, :cw].astype(bool):
                ys, xs = np.nonzero(m)
                if len(ys):
                    crop = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                    gt.append((y + int(ys.min()), x + int(xs.min()), crop))
    tifffile.imwrite(path, image, bigtiff=True, tile=(512, 512))
    del image
    os.remove(path + ".npy")
    return gt


def f1(pred: Crops, gt: Crops, iou: float = 0.5) -> float:
    """F1 in % of the one-to-one matching at IoU >= ``iou`` (``evaluation.matching.match_pairs``, as
    every evaluation here), the IoUs computed on the crops of pairs whose boxes share a cell."""
    cell = 256
    buckets: Dict[Tuple[int, int], List[int]] = {}
    for j, (y0, x0, c) in enumerate(gt):
        for by in range(y0 // cell, (y0 + c.shape[0] - 1) // cell + 1):
            for bx in range(x0 // cell, (x0 + c.shape[1] - 1) // cell + 1):
                buckets.setdefault((by, bx), []).append(j)
    ious = np.zeros((len(gt), len(pred)))
    for i, (y0, x0, c) in enumerate(pred):
        cands = {
            j
            for by in range(y0 // cell, (y0 + c.shape[0] - 1) // cell + 1)
            for bx in range(x0 // cell, (x0 + c.shape[1] - 1) // cell + 1)
            for j in buckets.get((by, bx), [])
        }
        for j in cands:
            gy, gx, g = gt[j]
            ty0, tx0 = max(y0, gy), max(x0, gx)
            ty1 = min(y0 + c.shape[0], gy + g.shape[0])
            tx1 = min(x0 + c.shape[1], gx + g.shape[1])
            if ty1 <= ty0 or tx1 <= tx0:
                continue
            inter = np.count_nonzero(
                c[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]
                & g[ty0 - gy : ty1 - gy, tx0 - gx : tx1 - gx]
            )
            ious[j, i] = inter / (c.sum() + g.sum() - inter)
    total = len(pred) + len(gt)
    return 100.0 * 2 * len(match_pairs(ious, iou)[0]) / total if total else 100.0


def in_process(spec: PredictorSpec, path: str) -> Tuple[Crops, float, float]:
    """(instances >= THRESH, seconds, peak RSS MB) of the in-process tiled path in this process."""
    import torch

    torch.set_num_threads(1)
    predictor = spec.build()
    image = tifffile.imread(path)
    start = time.time()
    inst = predictor.predict(image, tiled=True, full_masks=False)
    seconds = time.time() - start
    keep = [
        (y0, x0, c) for s, (y0, x0, c) in zip(inst.scores.tolist(), inst.pred_masks) if s >= THRESH
    ]
    return keep, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_model(spec: PredictorSpec) -> None:
    worker_predictor(spec)  # kept in the worker; nothing is sent back


class RssSampler(threading.Thread):
    """The highest resident memory of each process in ``pids``, sampled every 0.2 s from outside
    (a worker's own ``ru_maxrss`` can include what its parent held when it was forked)."""

    def __init__(self, pids: List[int]):
        super().__init__(daemon=True)
        self.peak = {pid: 0.0 for pid in pids}
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            for pid in self.peak:
                try:
                    self.peak[pid] = max(self.peak[pid], (rss_mb(pid) or 0.0))
                except OSError:  # the process ended
                    pass


def on_dask(spec: PredictorSpec, path: str, out: str, workers: int, block: int) -> Dict:
    """One ``predict_big`` run on ``workers`` local one-thread worker processes."""
    from distributed import Client, LocalCluster

    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        env=env,
    ) as cluster, Client(cluster) as client:
        predictor = spec.build()
        client.run(_load_model, spec)  # each worker loads the model before the clock starts
        plane = open_plane(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        sampler = RssSampler(list(client.run(os.getpid).values()))
        sampler.start()
        summary = predict_big(plane, predictor, spec, out, stem, client, block)
        sampler.done.set()
        sampler.join()
        rss = sampler.peak
    objects = [
        (y0, x0, c) for row, (y0, x0), c in read_objects(out, stem) if row["score"] >= THRESH
    ]
    return {**summary, "rss_mb": sorted(rss.values()), "objects_kept": objects}


def resume_check(args, spec: PredictorSpec, path: str, reference: str) -> Dict:
    """Kill ``iaunet-predict --dask local:2`` half way, rerun it; compare with ``reference``."""
    out = os.path.join(args.work, f"resume_{os.path.basename(path)}")
    stem = os.path.splitext(os.path.basename(path))[0]
    cmd = [sys.executable, "-m", "iaunet.predict", "--input", path, "--output", out]
    cmd += ["--dask", "local:2", "--block", str(args.block), "--score-threshold", "0"]
    cmd += ["--weights", spec.weights] if spec.backend == "pytorch" else []
    cmd += ["--backend", spec.backend, "--model", spec.model] if spec.backend != "pytorch" else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    manifest = os.path.join(out, f"{stem}_blocks", "manifest.json")
    size = tifffile.TiffFile(path).series[0].shape
    blocks = (-(-size[0] // args.block)) * (-(-size[1] // args.block))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if os.path.isfile(manifest):
            with open(manifest) as f:
                if len(json.load(f)["written"]) >= blocks // 2:
                    break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = os.path.dirname(manifest)
    with open(manifest) as f:
        state = json.load(f)
    files = [n for n in os.listdir(folder) if n.endswith(".npz")]
    before = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in files}
    start = time.time()
    code = subprocess.run(cmd, env=env, stderr=subprocess.DEVNULL).returncode
    seconds = time.time() - start
    finished = [n for n in before if _finished(n, state, args.block, size)]
    recomputed = [n for n in finished if os.stat(os.path.join(folder, n)).st_mtime_ns != before[n]]
    same = _same_labels(os.path.join(out, f"{stem}.ome.zarr"), reference, args.block)
    with open(os.path.join(out, f"{stem}_objects.csv")) as a, open(
        os.path.join(os.path.dirname(reference), f"{stem}_objects.csv")
    ) as b:
        same_table = a.read() == b.read()
    return {
        "exit": code,
        "written_at_kill": len(state["written"]),
        "blocks": blocks,
        "finished_files": len(finished),
        "recomputed_finished": len(recomputed),
        "identical_labels": same,
        "identical_table": same_table,
        "restart_seconds": seconds,
    }


def _finished(name: str, state: Dict, block: int, size) -> bool:
    kind, rc = name[:-4].split("_", 1)
    r, c = (int(v) for v in rc.split("_"))
    index = r * (-(-size[1] // block)) + c
    return index in state["detected" if kind == "detections" else "written"]


def _same_labels(a: str, b: str, block: int) -> bool:
    za = zarr.open_array(os.path.join(a, "labels", "cells", "0"), mode="r")
    zb = zarr.open_array(os.path.join(b, "labels", "cells", "0"), mode="r")
    if za.shape != zb.shape:
        return False
    for y in range(0, za.shape[0], block):
        if not np.array_equal(za[y : y + block], zb[y : y + block]):
            return False
    return True


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", default="", help="checkpoint (the pytorch backend)")
    p.add_argument("--model", default="", help="exported .onnx (the onnxruntime backend)")
    p.add_argument("--backends", nargs="+", default=["pytorch"], choices=["pytorch", "onnxruntime"])
    p.add_argument("--dataset", default="synthetic_cells_val")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096])
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--in-process", action="store_true", help="also the in-process path (F1 ref)")
    p.add_argument("--resume-check", action="store_true")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides for every run")
    p.add_argument("--work", default=os.path.join("output", "benchmark_big_image"))
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    results: Dict = {}
    for size in args.sizes:
        path = os.path.join(args.work, f"mosaic{size}.tif")
        gt = build_mosaic(args.dataset, size, path)
        row: Dict = {"size": size, "true": len(gt), "runs": []}
        ref = None
        for backend in args.backends:
            spec = PredictorSpec(
                weights=os.path.abspath(args.weights) if backend == "pytorch" else "",
                model=os.path.abspath(args.model) if backend != "pytorch" else "",
                backend=backend,
                opts=tuple(args.opts),
                min_score=0.0,
            )
            if args.in_process and backend == args.backends[0]:
                ref, seconds, rss = in_process(spec, path)
                row["runs"].append(
                    {
                        "path": "in-process",
                        "backend": backend,
                        "workers": 0,
                        "seconds": seconds,
                        "mpx_s": size * size / 1e6 / seconds,
                        "rss_mb": [rss],
                        "f1_gt": f1(ref, gt),
                        "f1_in_process": 100.0,
                        "objects": len(ref),
                    }
                )
            for n in args.workers:
                out = os.path.join(args.work, f"dask{size}_{backend}_{n}w")
                r = on_dask(spec, path, out, n, args.block)
                kept = r.pop("objects_kept")
                row["runs"].append(
                    {
                        "path": "dask",
                        "backend": backend,
                        "workers": n,
                        "seconds": r["seconds"],
                        "mpx_s": size * size / 1e6 / r["seconds"],
                        "rss_mb": r["rss_mb"],
                        "f1_gt": f1(kept, gt),
                        "objects": len(kept),
                        "f1_in_process": f1(kept, ref) if ref is not None else None,
                    }
                )
                last_out = out
            if args.resume_check and backend == args.backends[0]:
                stem = os.path.splitext(os.path.basename(path))[0]
                row["resume"] = resume_check(
                    args, spec, path, os.path.join(last_out, f"{stem}.ome.zarr")
                )
        results[size] = row
        with open(os.path.join(args.work, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(
        "\n| image | path | backend | workers | time (s) | Mpx/s | peak RSS per process (MB) "
        "| F1 vs truth | F1 vs in-process |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size, row in results.items():
        for r in row["runs"]:
            vs = f"{r['f1_in_process']:.2f}" if r["f1_in_process"] is not None else ""
            print(
                f"| {size}² | {r['path']} | {r['backend']} | {r['workers'] or ''} | "
                f"{r['seconds']:.0f} | {r['mpx_s']:.3f} | "
                f"{', '.join(f'{m:.0f}' for m in r['rss_mb'])} | {r['f1_gt']:.2f} | {vs} |"
            )
        if "resume" in row:
            print(f"\n{size}² resume: {row['resume']}")
    return results


if __name__ == "__main__":
    main()
