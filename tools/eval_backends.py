#!/usr/bin/env python
"""COCO mask AP of one checkpoint run by several backends, with the same data and evaluator.

    python tools/eval_backends.py --weights output/synthetic_quick/model_final.pth \\
        --backends pytorch onnxruntime torchscript int8

Backends (``iaunet.bench.benchmark.backend_model``): ``pytorch`` (the eager model), ``onnxruntime``
/ ``torchscript`` (the model exported with ``iaunet.deploy.export``, then the eager
post-processing), ``int8`` (the query decoder's Linear layers dynamically quantized), ``compile``.
Each is evaluated by ``Trainer.test`` (the dataset's evaluators, as ``train_net.py --eval-only``)
on ``DATASETS.TEST`` or ``--dataset``. What an optimization costs in accuracy, before adopting it.
"""

import argparse
import json
import logging
import os
import tempfile
from typing import Dict, Optional, Sequence

import torch
from detectron2.modeling import build_model

from iaunet.bench.benchmark import BACKENDS, backend_model
from iaunet.checkpoint import AtomicCheckpointer, read_checkpoint
from iaunet.config import exit_on_config_error
from iaunet.engine import Trainer
from iaunet.inference.predictor import config_from_checkpoint


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", required=True, help="checkpoint (.pth)")
    p.add_argument("--config-file", default="", help="default: the config saved in the checkpoint")
    p.add_argument(
        "--backends", nargs="+", default=["pytorch", "onnxruntime"], choices=("pytorch",) + BACKENDS
    )
    p.add_argument("--dataset", default="", help="default: the config's DATASETS.TEST")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--output", default="", help="JSON results file")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict]:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = read_checkpoint(args.weights)
    cfg = config_from_checkpoint(checkpoint, args.config_file, args.opts, args.weights)
    cfg.MODEL.DEVICE = "cpu"
    if args.dataset:
        cfg.DATASETS.TEST = (args.dataset,)
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="iaunet-eval-")
    model = build_model(cfg).eval()
    AtomicCheckpointer(model).load_checkpoint(checkpoint)
    results = {}
    with tempfile.TemporaryDirectory(prefix="iaunet-export-") as folder:
        for backend in args.backends:
            runner = (
                model
                if backend == "pytorch"
                else backend_model(model, cfg, backend, folder, cfg.INPUT.IMAGE_SIZE)
            )
            results[backend] = Trainer.test(cfg, runner)
    lines = ["| backend | dataset | AP | AP50 | AP75 |", "|---|---|---|---|---|"]
    for backend, res in results.items():
        for dataset, r in res.items() if cfg.DATASETS.TEST[1:] else [(cfg.DATASETS.TEST[0], res)]:
            segm = r.get("segm", {})
            row = [segm.get(k, float("nan")) for k in ("AP", "AP50", "AP75")]
            lines.append(f"| {backend} | {dataset} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    print("\n".join(lines))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    exit_on_config_error(main, "eval_backends.py")
