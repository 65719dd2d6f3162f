#!/usr/bin/env python
"""Speed and memory of IAUNet configs against detectron2's Mask R-CNN R50-FPN, in one process,
interleaved.

    python tools/benchmark.py --config-file configs/revvity25/iaunet_R50.yaml \
        --compare mask_rcnn --device cpu
    python tools/benchmark.py --config-file configs/revvity25/iaunet_R50.yaml \
        configs/revvity25/iaunet_swin_s.yaml \
        --compare mask_rcnn --device cuda --amp --runs 20 --sizes 512 1024 --batch-sizes 1 8
    python tools/benchmark.py --config-file configs/revvity25/iaunet_R50.yaml \
        --profile --no-train  # + torch.profiler
    python tools/benchmark.py --compare mask_rcnn --backends onnxruntime torchscript --threads 2 \
        --sizes 512 --batch-sizes 1 --no-train     # exported models (docs/deploy.md) as well

What is measured (every model with random weights, no checkpoint is read):

* Inference latency: one ``model([{"image": ...}])`` call in eval mode under
  ``torch.inference_mode``, with pre- and post-processing (full-resolution masks out), after
  ``--warmup`` calls; median and p90 over ``--runs``, for a batch of 1 at each of ``--sizes``.
  Models are interleaved call by call, so that load from other processes hits all of them alike.
* Images/s at each of ``--batch-sizes`` (first size): batch 1 comes from the latency runs.
* Training step: forward + backward + optimizer step (each model's own optimizer: IAUNet's AdamW
  with full-model clipping from ``iaunet.solver.build_optimizer``; Mask R-CNN's SGD from
  detectron2), for a batch of ``--train-batch`` synthetic images with ``--instances`` random
  ellipses each (data loading excluded).
* Peak memory per call and the dense-image conditions of both models: see
  :mod:`iaunet.bench.measure` and :mod:`iaunet.bench.benchmark`. The detection counts are checked
  and reported (``--as-configured`` keeps both models' own test thresholds).
"""

import argparse
import json
import os
import platform
import tempfile
from typing import Dict, List, Optional

import torch

from iaunet.bench.benchmark import (
    BACKENDS,
    MASK_RCNN_CONFIG,
    BenchModel,
    benchmark_inference,
    benchmark_training,
    build_backend,
    build_iaunet,
    build_mask_rcnn,
    inference_call,
    make_batch,
    train_step,
)
from iaunet.bench.measure import module_ranges, profile_table
from iaunet.bench.reports import benchmark_report, profile_report
from iaunet.config import exit_on_config_error

COMPARE_CHOICES = ("mask_rcnn",)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def profile_model(bench: BenchModel, args, top: int = 15) -> Dict:
    """torch.profiler (CPU activities) over one inference call and one training step, after a
    warm-up of each."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if args.device.startswith("cuda") else []
    )
    size = args.sizes[0]
    result = {}
    inputs = make_batch(size, 1, args.instances, args.seed, with_targets=False)
    handles = module_ranges(bench.model)
    try:
        bench.model.eval()
        inference_call(bench, inputs, args.amp, args.device)
        with profile(activities=activities) as prof:
            inference_call(bench, inputs, args.amp, args.device)
        result["inference"] = profile_table(prof, top)
        if not args.no_train:
            batch = make_batch(
                args.train_size or size, args.train_batch, args.instances, args.seed + 1, True
            )
            bench.model.train()
            optimizer = bench.optimizer_fn(bench.model)
            for group in optimizer.param_groups:
                group["lr"] *= bench.cfg.SOLVER.WARMUP_FACTOR  # as in benchmark_training
            train_step(bench, optimizer, batch, None, args.amp, args.device)
            with profile(activities=activities) as prof:
                train_step(bench, optimizer, batch, None, args.amp, args.device)
            result["train"] = profile_table(prof, top)
            bench.model.eval()
    finally:
        for h in handles:
            h.remove()
    return result


def _load() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config-file",
        nargs="+",
        default=[os.path.join(ROOT, "configs", "revvity25", "iaunet_R50.yaml")],
        help="IAUNet config(s)",
    )
    p.add_argument(
        "--compare", nargs="*", default=[], choices=COMPARE_CHOICES, help="baselines to interleave"
    )
    p.add_argument(
        "--maskrcnn-config",
        default=MASK_RCNN_CONFIG,
        help="detectron2 model zoo config of the baseline",
    )
    p.add_argument(
        "--maskrcnn-opts",
        nargs="*",
        default=[],
        help="KEY VALUE overrides of the Mask R-CNN config",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help='also benchmark each IAUNet config with these "KEY VALUE ..." overrides (repeatable)',
    )
    p.add_argument(
        "--maskrcnn-variant",
        action="append",
        default=[],
        help='also benchmark Mask R-CNN with these "KEY VALUE ..." overrides (repeatable)',
    )
    p.add_argument(
        "--backends",
        nargs="*",
        default=[],
        choices=BACKENDS,
        help="also run each IAUNet model (same weights) exported to ONNX (onnxruntime) / "
        "TorchScript, under torch.compile, or with its query decoder's Linear layers in int8 "
        "(dynamic quantization); inference only",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--amp",
        action="store_true",
        help="autocast (fp16 on CUDA with a GradScaler for training, bf16 on CPU)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="channels_last memory format for every model: MODEL.CHANNELS_LAST True for IAUNet "
        "(also possible as "
        "a --variant), 4-D weights converted for Mask R-CNN",
    )
    p.add_argument("--runs", type=int, default=5, help="timed calls per model and measurement")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per model before each measurement"
    )
    p.add_argument("--throughput-runs", type=int, default=2, help="timed calls for batch sizes > 1")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)"
    )
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[512, 1024], help="square input sizes for latency"
    )
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8],
        help="batch sizes for images/s (first size)",
    )
    p.add_argument("--train-batch", type=int, default=2, help="images per training step")
    p.add_argument(
        "--train-size", type=int, default=0, help="training image size (default: first of --sizes)"
    )
    p.add_argument(
        "--instances", type=int, default=30, help="random ellipse instances per synthetic image"
    )
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument(
        "--as-configured",
        action="store_true",
        help="keep both models' test thresholds (no dense-image conditions, see the docstring)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also torch.profiler the IAUNet model(s) and print top costs",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--output",
        default=os.path.join("output", "benchmark", "benchmark.json"),
        help="JSON results file",
    )
    p.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="KEY VALUE overrides of the IAUNet config(s)",
    )
    return p.parse_args(argv)


def run(args) -> Dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = _load()
    models: List[BenchModel] = []
    for i, config in enumerate(args.config_file):
        for variant in [""] + args.variant:
            torch.manual_seed(args.seed + i)
            opts = list(args.opts) + (["MODEL.CHANNELS_LAST", "True"] if args.channels_last else [])
            models.append(build_iaunet(config, opts, args.device, not args.as_configured, variant))
    if args.backends:
        with tempfile.TemporaryDirectory(prefix="iaunet-bench-") as folder:  # loaded in memory
            for bench in list(models):
                for backend in args.backends:
                    models.append(build_backend(bench, backend, folder, args.sizes[0]))
    if "mask_rcnn" in args.compare:
        for variant in [""] + args.maskrcnn_variant:
            torch.manual_seed(args.seed)
            models.append(
                build_mask_rcnn(
                    args.maskrcnn_opts,
                    args.device,
                    not args.as_configured,
                    args.maskrcnn_config,
                    variant,
                )
            )
    if (
        args.channels_last
    ):  # IAUNet: MODEL.CHANNELS_LAST (weights and input); Mask R-CNN: its 4-D weights
        for b in models:
            if b.kind != "iaunet":
                b.model.to(memory_format=torch.channels_last)

    result = {
        "machine": {
            "device": torch.cuda.get_device_name()
            if args.device == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_before": load_before,
        },
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "output"},
            "threads": torch.get_num_threads(),
        },
        "models": {
            b.name: {
                "kind": b.kind,
                "config": b.config,
                "params": b.params,
                "trainable_params": b.trainable_params,
                "expected_detections": b.expected_detections,
                "inference": {},
                "throughput": {},
            }
            for b in models
        },
        "warnings": [],
    }
    for z in args.sizes:
        for name, r in benchmark_inference(models, z, 1, args, args.seed).items():
            result["models"][name]["inference"][str(z)] = r
    for bs in args.batch_sizes:
        if bs == 1:
            res = {
                b.name: result["models"][b.name]["inference"][str(args.sizes[0])] for b in models
            }
        else:
            # The models are warm from the latency runs at this size: no extra warm-up for the big
            # batches.
            res = benchmark_inference(
                models, args.sizes[0], bs, args, args.seed, runs=args.throughput_runs, warmup=0
            )
        for name, r in res.items():
            result["models"][name]["throughput"][str(bs)] = {
                "batch": bs,
                "size": args.sizes[0],
                "images_per_s": r["images_per_s"],
                "median_s": r["median_s"],
                "peak_rss_increase_mb": r["peak_rss_increase_mb"],
                "cuda_max_allocated_mb": r["cuda_max_allocated_mb"],
            }
    if not args.no_train:
        for name, r in benchmark_training([b for b in models if b.trainable], args).items():
            result["models"][name]["train"] = r

    for b in models:
        m = result["models"][b.name]
        for z, r in m["inference"].items():
            if not args.as_configured and r["detections"] < b.expected_detections:
                result["warnings"].append(
                    f"{b.name} at {z}²: {r['detections']} detections, {b.expected_detections} "
                    "expected"
                )
    iaunets = [b for b in models if b.kind == "iaunet"]
    result["ratios"] = {}
    for baseline in (b for b in models if b.kind == "mask_rcnn"):
        base = result["models"][baseline.name]
        for b in iaunets:
            m = result["models"][b.name]
            for z in args.sizes:
                ratio = m["inference"][str(z)]["median_s"] / base["inference"][str(z)]["median_s"]
                result["ratios"][f"{b.name} / {baseline.name} latency at {z}²"] = ratio
            if "train" in m and "train" in base:
                ratio = m["train"]["median_s"] / base["train"]["median_s"]
                result["ratios"][f"{b.name} / {baseline.name} train step"] = ratio
    if args.profile:
        result["profile"] = {b.name: profile_model(b, args) for b in iaunets if b.trainable}
    result["machine"]["load_after"] = _load()
    return result


def main(argv=None) -> Dict:
    args = parse_args(argv)
    result = run(args)
    print(benchmark_report(result))
    for name, prof in result.get("profile", {}).items():
        print(profile_report(name, prof))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.output}")
    return result


if __name__ == "__main__":
    exit_on_config_error(main, "benchmark.py")
