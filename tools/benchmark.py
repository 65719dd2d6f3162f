#!/usr/bin/env python
"""Speed and memory of IAUNet configs against detectron2's Mask R-CNN R50-FPN, in one process, interleaved.

    python tools/benchmark.py --config-file configs/revvity25/iaunet_R50.yaml --compare mask_rcnn --device cpu
    python tools/benchmark.py --config-file configs/revvity25/iaunet_R50.yaml configs/revvity25/iaunet_swin_s.yaml \
        --compare mask_rcnn --device cuda --amp --runs 20 --sizes 512 1024 --batch-sizes 1 8
    python tools/benchmark.py --config-file configs/revvity25/iaunet_R50.yaml --profile --no-train  # + torch.profiler

What is measured (every model with random weights, no checkpoint is read):

* Inference latency: one ``model([{"image": ...}])`` call in eval mode under ``torch.inference_mode``, with
  pre- and post-processing (full-resolution masks out), after ``--warmup`` calls; median and p90 over ``--runs``,
  for a batch of 1 at each of ``--sizes``. Models are interleaved call by call, so that load from other
  processes hits all of them alike.
* Images/s at each of ``--batch-sizes`` (first size): batch 1 comes from the latency runs.
* Training step: forward + backward + optimizer step (each model's own optimizer: IAUNet's AdamW with
  full-model clipping from ``train_net.build_optimizer``; Mask R-CNN's SGD from detectron2), for a batch of
  ``--train-batch`` synthetic images with ``--instances`` random ellipses each (data loading excluded).
* Peak memory per call: CPU RSS high-water mark (``/proc/self/status`` VmHWM, reset through
  ``/proc/self/clear_refs`` before each call, freed heap returned by ``malloc_trim`` first), reported as the
  process peak and as the increase over the RSS before the call; on CUDA ``torch.cuda.max_memory_allocated``.

Dense-image conditions (spec §2): the cost of both models depends on how many instances reach the mask
stage. A randomly initialised Mask R-CNN sends only a couple of boxes to its mask head; here its RPN
objectness/delta layers and box classifier/regressor are zeroed and ``ROI_HEADS.SCORE_THRESH_TEST`` is 0, so
that ``POST_NMS_TOPK_TEST`` (1000) proposals reach the box head and ``TEST.DETECTIONS_PER_IMAGE`` (100)
detections reach the mask head. Likewise a randomly initialised IAUNet scores every query below its 0.01
threshold and would upsample no mask, so its ``TEST.SCORE_THRESH`` is set to -1: all ``DETECTIONS_PER_IMAGE``
top-k masks are post-processed. The counts are checked and reported (``--as-configured`` turns both off).
"""

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2 import model_zoo  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_optimizer as build_d2_optimizer  # noqa: E402
from detectron2.structures import BitMasks, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from iaunet.config import exit_on_config_error, load_config, merge_config  # noqa: E402

MASK_RCNN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
COMPARE_CHOICES = ("mask_rcnn",)


# --------------------------------------------------------------------------- models


class BenchModel:
    """A model under test with what the benchmark needs to drive it and to check its outputs."""

    def __init__(
        self,
        name: str,
        kind: str,
        model: torch.nn.Module,
        cfg: CfgNode,
        optimizer_fn: Callable,
        config: str,
    ):
        self.name, self.kind, self.model, self.cfg, self.config = name, kind, model, cfg, config
        self.optimizer_fn = optimizer_fn
        self.expected_detections = cfg.TEST.DETECTIONS_PER_IMAGE
        self.counts: Dict[str, int] = {}  # filled by hooks during a call (Mask R-CNN)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def build_iaunet(
    config_file: str, opts: Sequence[str], device: str, dense: bool, variant: str = ""
) -> BenchModel:
    import train_net  # the repository's train_net.py: IAUNet's optimizer (AdamW groups + clipping)

    cfg = load_config(config_file, list(opts) + variant.split())
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    if dense:
        cfg.MODEL.IAUNET.TEST.SCORE_THRESH = (
            -1.0
        )  # keep all top-k detections (see module docstring)
    cfg.freeze()
    model = build_model(cfg)
    rel = os.path.relpath(os.path.abspath(config_file), os.path.join(ROOT, "configs"))
    name = (
        "IAUNet "
        + os.path.splitext(rel if not rel.startswith("..") else os.path.basename(config_file))[0]
    )
    name += f" [{variant}]" if variant else ""
    bench = BenchModel(
        name, "iaunet", model, cfg, lambda m: train_net.build_optimizer(cfg, m), config_file
    )
    # top-k runs over queries x classes
    m = cfg.MODEL.IAUNET
    bench.expected_detections = min(cfg.TEST.DETECTIONS_PER_IMAGE, m.NUM_QUERIES * m.NUM_CLASSES)
    return bench


def build_mask_rcnn(
    opts: Sequence[str],
    device: str,
    dense: bool,
    config_name: str = MASK_RCNN_CONFIG,
    variant: str = "",
) -> BenchModel:
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config_name))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    cfg.MODEL.WEIGHTS = ""
    if dense:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    merge_config(cfg, opts=list(opts) + variant.split())
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    model = build_model(cfg)
    if dense:
        zero_dense_heads_(model)
    name = "Mask R-CNN " + os.path.splitext(os.path.basename(config_name))[0].replace(
        "mask_rcnn_", ""
    )
    bench = BenchModel(
        name + (f" [{variant}]" if variant else ""),
        "mask_rcnn",
        model,
        cfg,
        lambda m: build_d2_optimizer(cfg, m),
        config_name,
    )

    def count_proposals(_module, args):
        bench.counts["proposals"] = min(
            len(p) for p in args[2]
        )  # ROIHeads.forward(images, features, proposals, ...)

    def count_mask_rois(_module, args):
        bench.counts["mask_head_rois"] = int(
            args[0].shape[0]
        )  # mask_head(pooled features (R, C, 14, 14), instances)

    model.roi_heads.register_forward_pre_hook(count_proposals)
    model.roi_heads.mask_head.register_forward_pre_hook(count_mask_rois)
    return bench


@torch.no_grad()
def zero_dense_heads_(model: torch.nn.Module) -> None:
    """Zero the RPN objectness/delta convs and the box classifier/regressor of a GeneralizedRCNN.

    Every anchor then has the same objectness and stays where it is, so NMS keeps POST_NMS_TOPK_TEST proposals;
    every proposal scores 1/(K+1) for every class, so with SCORE_THRESH_TEST 0 the box NMS keeps
    DETECTIONS_PER_IMAGE detections, all of which go through the mask head, as for a trained model on a dense image.
    """
    rpn_head = model.proposal_generator.rpn_head
    predictor = model.roi_heads.box_predictor
    for layer in (
        rpn_head.objectness_logits,
        rpn_head.anchor_deltas,
        predictor.cls_score,
        predictor.bbox_pred,
    ):
        layer.weight.zero_()
        layer.bias.zero_()


# --------------------------------------------------------------------------- inputs


def synthetic_sample(
    size: int, num_instances: int, rng: np.random.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A dense "cell" image: ``num_instances`` random filled ellipses (they may overlap) on a noisy background.

    Returns: image (3, S, S) float32 on the 0..255 scale (gray replicated), masks (N, S, S) bool (N may be less
    than ``num_instances`` only when an ellipse falls outside the image).
    """
    image = rng.normal(40.0, 8.0, (size, size)).astype(np.float32)
    masks = []
    rmin, rmax = max(2.0, size / 40), max(3.0, size / 12)
    for _ in range(num_instances):
        mask = np.zeros((size, size), np.uint8)
        center = tuple(int(v) for v in rng.uniform(0, size, 2))
        axes = tuple(int(v) for v in rng.uniform(rmin, rmax, 2))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        if mask.any():
            masks.append(mask.astype(bool))
            image += mask * float(rng.uniform(40, 120))
    image = np.clip(image, 0, 255)
    return torch.from_numpy(np.repeat(image[None], 3, 0)), torch.from_numpy(np.stack(masks))


def make_batch(
    size: int, batch: int, num_instances: int, seed: int, with_targets: bool
) -> List[Dict]:
    """detectron2-format inputs; targets carry gt_masks, gt_boxes (Mask R-CNN) and gt_classes."""
    rng = np.random.default_rng(seed)
    inputs = []
    for _ in range(batch):
        image, masks = synthetic_sample(size, num_instances, rng)
        item = {"image": image, "height": size, "width": size}
        if with_targets:
            inst = Instances((size, size))
            inst.gt_masks = BitMasks(masks)
            inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
            inst.gt_classes = torch.zeros(len(masks), dtype=torch.int64)
            item["instances"] = inst
        inputs.append(item)
    return inputs


# --------------------------------------------------------------------------- memory and timing


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the code in its ``with`` block: CPU RSS (MB) and, on CUDA, allocated tensor memory (MB)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.rss_peak_mb = self.rss_increase_mb = self.cuda_peak_mb = self.cuda_increase_mb = None
        self.per_call = False

    def __enter__(self):
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(
                0
            )  # give freed heap back, so the baseline RSS is what is really in use
        self._base = _status_kb("VmRSS")
        self.per_call = self._base is not None and _reset_peak_rss()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.cuda_peak_mb, self.cuda_increase_mb = (
                peak / 2**20,
                (peak - self._cuda_base) / 2**20,
            )
        if self.per_call:
            peak_kb = _status_kb("VmHWM")
            self.rss_peak_mb, self.rss_increase_mb = peak_kb / 1024, (peak_kb - self._base) / 1024
        else:  # process-lifetime high-water mark (Linux reports KiB)
            self.rss_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def _summary(times: List[float], memory: List[PeakMemory]) -> Dict:
    def peak(attr):
        values = [getattr(m, attr) for m in memory if getattr(m, attr) is not None]
        return round(max(values), 1) if values else None

    return {
        "median_s": statistics.median(times),
        "p90_s": float(np.percentile(times, 90)),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "times_s": times,
        "peak_rss_mb": peak("rss_peak_mb"),
        "peak_rss_increase_mb": peak("rss_increase_mb"),
        "cuda_max_allocated_mb": peak("cuda_peak_mb"),
        "cuda_peak_increase_mb": peak("cuda_increase_mb"),
    }


def _interleaved(
    models: List[BenchModel],
    call: Callable[[BenchModel], Dict],
    runs: int,
    warmup: int,
    device: str,
    on_call=None,
) -> Dict[str, Dict]:
    """Warm each model up, then time ``call`` run by run, alternating the models (and their order) within each run."""
    for bench in models:
        for _ in range(warmup):
            call(bench)
    times = {b.name: [] for b in models}
    memory = {b.name: [] for b in models}
    for r in range(runs):
        for bench in models if r % 2 == 0 else models[::-1]:
            with PeakMemory(device) as mem:
                _sync(device)
                start = time.perf_counter()
                out = call(bench)
                _sync(device)
                elapsed = time.perf_counter() - start
            times[bench.name].append(elapsed)
            memory[bench.name].append(mem)
            if on_call is not None:
                on_call(bench, out)
    return {name: _summary(times[name], memory[name]) for name in times}


# --------------------------------------------------------------------------- measurements


def inference_call(bench: BenchModel, inputs: List[Dict], amp: bool, device: str):
    with torch.inference_mode(), _autocast(device, amp):
        return bench.model(inputs)


def benchmark_inference(models, size, batch, args, seed, runs=None, warmup=None) -> Dict[str, Dict]:
    inputs = make_batch(size, batch, args.instances, seed, with_targets=False)
    detections = {b.name: [] for b in models}
    counts = {b.name: {} for b in models}

    def on_call(bench, outputs):
        detections[bench.name].append(min(len(o["instances"]) for o in outputs))
        for k, v in bench.counts.items():
            counts[bench.name][k] = min(v, counts[bench.name].get(k, v))

    for bench in models:
        bench.model.eval()
    res = _interleaved(
        models,
        lambda b: inference_call(b, inputs, args.amp, args.device),
        args.runs if runs is None else runs,
        args.warmup if warmup is None else warmup,
        args.device,
        on_call,
    )
    for name, r in res.items():
        r["batch"], r["size"] = batch, size
        r["images_per_s"] = batch / r["median_s"]
        r["detections"] = min(detections[name])  # fewest detections in any image of any timed call
        r.update(counts[name])
    return res


def train_step(
    bench: BenchModel, optimizer, batch: List[Dict], scaler, amp: bool, device: str
) -> Dict[str, float]:
    """One forward + backward + optimizer step; returns the seconds spent in each phase."""
    times = {}
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with EventStorage(0), _autocast(device, amp), torch.profiler.record_function("train::forward"):
        losses = bench.model(batch)
        loss = sum(losses.values())
    _sync(device)
    times["forward_s"] = time.perf_counter() - start
    with torch.profiler.record_function("train::backward"):
        (scaler.scale(loss) if scaler is not None else loss).backward()
    _sync(device)
    times["backward_s"] = time.perf_counter() - start - times["forward_s"]
    with torch.profiler.record_function("train::optimizer"):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    _sync(device)
    times["optimizer_s"] = time.perf_counter() - start - times["forward_s"] - times["backward_s"]
    return times


def benchmark_training(models, args) -> Dict[str, Dict]:
    size = args.train_size or args.sizes[0]
    batch = make_batch(size, args.train_batch, args.instances, args.seed + 1, with_targets=True)
    optimizers = {}
    scaler = torch.amp.GradScaler("cuda") if args.amp and args.device.startswith("cuda") else None
    for bench in models:
        bench.model.train()
        optimizers[bench.name] = bench.optimizer_fn(bench.model)
        # The lr of a real run's first (warm-up) iterations: the step costs the same, and random-init Mask R-CNN
        # diverges within a few steps at its full SGD lr 0.02.
        for group in optimizers[bench.name].param_groups:
            group["lr"] *= bench.cfg.SOLVER.WARMUP_FACTOR
    phases = {b.name: [] for b in models}
    res = _interleaved(
        models,
        lambda b: train_step(b, optimizers[b.name], batch, scaler, args.amp, args.device),
        args.runs,
        args.warmup,
        args.device,
        on_call=lambda b, times: phases[b.name].append(times),
    )
    for bench in models:
        bench.model.eval()
        r = res[bench.name]
        r.update(
            batch=args.train_batch,
            size=size,
            instances_per_image=min(len(x["instances"]) for x in batch),
        )
        for key in ("forward_s", "backward_s", "optimizer_s"):
            r[key + "_median"] = statistics.median(t[key] for t in phases[bench.name])
    return res


# --------------------------------------------------------------------------- profiling


def _module_ranges(model: torch.nn.Module) -> List:
    """Label the forward of the model's direct children as profiler ranges ``module::<name>``; returns the hooks."""
    handles = []
    for name, child in model.named_children():
        stack = []

        def pre(_m, _args, name=name, stack=stack):
            ctx = torch.profiler.record_function(f"module::{name}")
            ctx.__enter__()
            stack.append(ctx)

        def post(_m, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [child.register_forward_pre_hook(pre), child.register_forward_hook(post)]
    return handles


@contextlib.contextmanager
def _postprocess_range(model):
    if not hasattr(model, "instance_inference"):
        yield
        return
    original = model.instance_inference

    def wrapped(*a, **k):
        with torch.profiler.record_function("module::instance_inference"):
            return original(*a, **k)

    model.instance_inference = wrapped
    try:
        yield
    finally:
        del model.instance_inference


def _table(prof, top: int) -> Dict:
    events = prof.key_averages()
    ranges = [e for e in events if e.key.startswith(("module::", "train::"))]
    ops = sorted(
        (e for e in events if e not in ranges), key=lambda e: e.self_cpu_time_total, reverse=True
    )
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranges.sort(key=lambda e: e.cpu_time_total, reverse=True)
    return {
        "total_self_cpu_ms": total / 1e3,
        "top_ops": [
            {
                "op": e.key,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "share": e.self_cpu_time_total / total,
                "calls": e.count,
            }
            for e in ops[:top]
        ],
        "ranges": [
            {"range": e.key, "cpu_ms": e.cpu_time_total / 1e3, "calls": e.count} for e in ranges
        ],
    }


def profile_model(bench: BenchModel, args, top: int = 15) -> Dict:
    """torch.profiler (CPU activities) over one inference call and one training step, after a warm-up of each."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if args.device.startswith("cuda") else []
    )
    size = args.sizes[0]
    result = {}
    inputs = make_batch(size, 1, args.instances, args.seed, with_targets=False)
    handles = _module_ranges(bench.model)
    try:
        bench.model.eval()
        inference_call(bench, inputs, args.amp, args.device)
        with _postprocess_range(bench.model), profile(activities=activities) as prof:
            inference_call(bench, inputs, args.amp, args.device)
        result["inference"] = _table(prof, top)
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
            result["train"] = _table(prof, top)
            bench.model.eval()
    finally:
        for h in handles:
            h.remove()
    return result


# --------------------------------------------------------------------------- report


def _load() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _fmt(v, digits=3):
    return "—" if v is None else f"{v:.{digits}f}"


def _rss(r: Dict) -> Optional[float]:
    """The per-call peak RSS increase, or the process peak where the kernel cannot reset the high-water mark."""
    return r["peak_rss_increase_mb"] if r["peak_rss_increase_mb"] is not None else r["peak_rss_mb"]


def markdown_report(result: Dict) -> str:
    s = result["settings"]
    lines = [
        f"Device: {result['machine']['device']}, {s['threads']} threads, AMP {'on' if s['amp'] else 'off'}; "
        f"load average (1/5/15 min) before {result['machine']['load_before']}, after {result['machine']['load_after']}.",
        "",
    ]
    sizes = s["sizes"]
    header = ["model", "params"] + [f"latency {z}² median / p90 (s)" for z in sizes]
    header += [f"img/s b{b} @{sizes[0]}²" for b in s["batch_sizes"]]
    if not s["no_train"]:
        header += [
            f"train step b{s['train_batch']} @{s['train_size'] or sizes[0]}² median / p90 (s)"
        ]
    header += [f"peak RSS +MB infer @{sizes[0]}²", "detections"]
    if not s["no_train"]:
        header.insert(len(header) - 1, "peak RSS +MB train")
    if s["device"].startswith("cuda"):
        header.insert(len(header) - 1, f"CUDA max alloc MB infer @{sizes[0]}²")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in result["models"].items():
        inf = m["inference"]
        row = [name, f"{m['params'] / 1e6:.1f}M"]
        row += [f"{_fmt(inf[str(z)]['median_s'])} / {_fmt(inf[str(z)]['p90_s'])}" for z in sizes]
        row += [_fmt(m["throughput"][str(b)]["images_per_s"], 2) for b in s["batch_sizes"]]
        first = inf[str(sizes[0])]
        if not s["no_train"]:
            t = m["train"]
            row += [
                f"{_fmt(t['median_s'])} / {_fmt(t['p90_s'])} (fwd {_fmt(t['forward_s_median'], 2)}, "
                f"bwd {_fmt(t['backward_s_median'], 2)}, opt {_fmt(t['optimizer_s_median'], 2)})"
            ]
        row += [_fmt(_rss(first), 0)]
        if not s["no_train"]:
            row += [_fmt(_rss(m["train"]), 0)]
        if s["device"].startswith("cuda"):
            row += [_fmt(first["cuda_max_allocated_mb"], 0)]
        counts = f"{first['detections']}"
        if "proposals" in first:
            counts += f" ({first['proposals']} proposals, {first['mask_head_rois']} mask-head RoIs)"
        row += [counts]
        lines.append("| " + " | ".join(row) + " |")
    if result.get("ratios"):
        lines.append("")
        for key, r in result["ratios"].items():
            lines.append(f"- {key}: {r:.2f}")
    for w in result.get("warnings", []):
        lines.append(f"- WARNING: {w}")
    return "\n".join(lines)


def profile_report(name: str, prof: Dict) -> str:
    lines = []
    for phase, t in prof.items():
        lines.append(
            f"\n### {name}: {phase} (torch.profiler, total self CPU {t['total_self_cpu_ms']:.0f} ms)\n"
        )
        if t["ranges"]:
            lines.append(
                "ranges (module:: = forward of a child module): "
                + ", ".join(f"{m['range']} {m['cpu_ms']:.0f} ms" for m in t["ranges"])
            )
            lines.append("")
        lines += ["| op | self CPU ms | share | calls |", "|---|---|---|---|"]
        lines += [
            f"| {o['op']} | {o['self_cpu_ms']:.1f} | {100 * o['share']:.1f} % | {o['calls']} |"
            for o in t["top_ops"]
        ]
    return "\n".join(lines)


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
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--amp",
        action="store_true",
        help="autocast (fp16 on CUDA with a GradScaler for training, bf16 on CPU)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="channels_last memory format for every model: MODEL.CHANNELS_LAST True for IAUNet (also possible as "
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
            # The models are warm from the latency runs at this size: no extra warm-up for the big batches.
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
        for name, r in benchmark_training(models, args).items():
            result["models"][name]["train"] = r

    for b in models:
        m = result["models"][b.name]
        for z, r in m["inference"].items():
            if not args.as_configured and r["detections"] < b.expected_detections:
                result["warnings"].append(
                    f"{b.name} at {z}²: {r['detections']} detections, {b.expected_detections} expected"
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
            if not args.no_train:
                ratio = m["train"]["median_s"] / base["train"]["median_s"]
                result["ratios"][f"{b.name} / {baseline.name} train step"] = ratio
    if args.profile:
        result["profile"] = {b.name: profile_model(b, args) for b in iaunets}
    result["machine"]["load_after"] = _load()
    return result


def main(argv=None) -> Dict:
    args = parse_args(argv)
    result = run(args)
    print(markdown_report(result))
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
