"""Models and inputs of the speed/memory benchmark (``tools/benchmark.py``): IAUNet configs and
detectron2's Mask R-CNN under dense-image conditions, synthetic dense "cell" images, inference and
training-step measurements interleaved across the models (:mod:`iaunet.bench.measure`).

Dense-image conditions (thesis §4): the cost of both models depends on how many instances reach the
mask stage. A randomly initialised Mask R-CNN sends only a couple of boxes to its mask head; here
its RPN objectness/delta layers and box classifier/regressor are zeroed and
``ROI_HEADS.SCORE_THRESH_TEST`` is 0, so that ``POST_NMS_TOPK_TEST`` (1000) proposals reach the box
head and ``TEST.DETECTIONS_PER_IMAGE`` (100) detections reach the mask head. Likewise a randomly
initialised IAUNet scores every query below its 0.01 threshold and would upsample no mask, so its
``TEST.SCORE_THRESH`` is set to -1: all ``DETECTIONS_PER_IMAGE`` top-k masks are post-processed.
"""

import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer as build_d2_optimizer
from detectron2.structures import BitMasks, Instances
from detectron2.utils.events import EventStorage

from ..config import load_config, merge_config
from ..modeling.postprocessing import PostProcessing
from ..solver import build_optimizer
from .measure import autocast, interleaved, sync

MASK_RCNN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
BACKENDS = ("onnxruntime", "torchscript", "compile", "int8")  # besides eager PyTorch
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


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
        self.weights = model  # whose parameters are counted (an exported model has none)
        self.trainable = True  # False: inference only (exported backends)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.weights.parameters())

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.weights.parameters() if p.requires_grad)


def build_iaunet(
    config_file: str, opts: Sequence[str], device: str, dense: bool, variant: str = ""
) -> BenchModel:
    cfg = load_config(config_file, list(opts) + variant.split())
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    if dense:
        cfg.MODEL.IAUNET.TEST.SCORE_THRESH = (
            -1.0
        )  # keep all top-k detections (see module docstring)
    cfg.freeze()
    model = build_model(cfg)
    rel = os.path.relpath(os.path.abspath(config_file), CONFIGS_DIR)
    name = (
        "IAUNet "
        + os.path.splitext(rel if not rel.startswith("..") else os.path.basename(config_file))[0]
    )
    name += f" [{variant}]" if variant else ""
    bench = BenchModel(name, "iaunet", model, cfg, lambda m: build_optimizer(cfg, m), config_file)
    # top-k runs over queries x classes
    m = cfg.MODEL.IAUNET
    bench.expected_detections = min(cfg.TEST.DETECTIONS_PER_IMAGE, m.NUM_QUERIES * m.NUM_CLASSES)
    return bench


def backend_model(model: torch.nn.Module, cfg: CfgNode, backend: str, folder: str, size: int):
    """Eval-mode IAUNet ``model`` (built from ``cfg``; same weights) run by another backend, with
    the eager model's call interface: ``"onnxruntime"`` / ``"torchscript"`` (exported to
    ``folder``, traced at ``size``, dynamic axes; the eager post-processing after the graph,
    :mod:`iaunet.inference.backends`), ``"compile"`` (``torch.compile`` of ``forward_network``)
    or ``"int8"`` (eager, the query decoder's Linear layers dynamically quantized to int8)."""
    from ..deploy.export import export_model
    from ..inference.backends import load_backend

    if backend in ("onnxruntime", "torchscript"):
        path = os.path.join(folder, f"{len(os.listdir(folder))}.{backend}")
        fmt = "onnx" if backend == "onnxruntime" else backend
        export_model(model, cfg, path, fmt, (size, size))
        return load_backend(path, backend, PostProcessing.from_config(cfg), cfg.MODEL.DEVICE)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    runner = build_model(cfg).eval()
    runner.load_state_dict(model.state_dict())
    if backend == "compile":
        runner.forward_network = torch.compile(runner.forward_network, dynamic=False)
    elif backend == "int8":
        runner.query_decoder = torch.ao.quantization.quantize_dynamic(
            runner.query_decoder, {torch.nn.Linear}, dtype=torch.qint8
        )
    return runner


def build_backend(bench: BenchModel, backend: str, folder: str, size: int) -> BenchModel:
    """``bench``'s IAUNet run by ``backend`` (:func:`backend_model`), inference only."""
    runner = backend_model(bench.model, bench.cfg, backend, folder, size)
    out = BenchModel(f"{bench.name} <{backend}>", "iaunet", runner, bench.cfg, None, bench.config)
    out.weights, out.trainable = bench.model, False
    out.expected_detections = bench.expected_detections
    return out


def mask_rcnn_config(
    config_name: str = MASK_RCNN_CONFIG,
    num_classes: int = 1,
    score_thresh: Optional[float] = None,
    base: Optional[CfgNode] = None,
) -> CfgNode:
    """detectron2's model-zoo Mask R-CNN config ``config_name`` without weights (nothing is
    downloaded), for ``num_classes`` classes, keeping detections above ``score_thresh`` (None: the
    config's); merged into ``base`` when given (a config with more keys, e.g. IAUNet's input keys
    for its data pipeline). The one builder of the Mask R-CNN baselines (``tools/benchmark.py``,
    ``tools/compare_maskrcnn.py``)."""
    cfg = base if base is not None else get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config_name))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    if score_thresh is not None:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_thresh
    return cfg


def build_mask_rcnn(
    opts: Sequence[str],
    device: str,
    dense: bool,
    config_name: str = MASK_RCNN_CONFIG,
    variant: str = "",
) -> BenchModel:
    cfg = mask_rcnn_config(config_name, 1, 0.0 if dense else None)
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

    Every anchor then has the same objectness and stays where it is, so NMS keeps POST_NMS_TOPK_TEST
    proposals; every proposal scores 1/(K+1) for every class, so with SCORE_THRESH_TEST 0 the box
    NMS keeps DETECTIONS_PER_IMAGE detections, all of which go through the mask head, as for a
    trained model on a dense image.
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


def synthetic_sample(
    size: int, num_instances: int, rng: np.random.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A dense "cell" image: ``num_instances`` random filled ellipses (they may overlap) on a noisy
    background.

    Returns: image (3, S, S) float32 on the 0..255 scale (gray replicated), masks (N, S, S) bool (N
    may be less than ``num_instances`` only when an ellipse falls outside the image).
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


def inference_call(bench: BenchModel, inputs: List[Dict], amp: bool, device: str):
    with torch.inference_mode(), autocast(device, amp):
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
    res = interleaved(
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
    with EventStorage(0), autocast(device, amp), torch.profiler.record_function("train::forward"):
        losses = bench.model(batch)
        loss = sum(losses.values())
    sync(device)
    times["forward_s"] = time.perf_counter() - start
    with torch.profiler.record_function("train::backward"):
        (scaler.scale(loss) if scaler is not None else loss).backward()
    sync(device)
    times["backward_s"] = time.perf_counter() - start - times["forward_s"]
    with torch.profiler.record_function("train::optimizer"):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    sync(device)
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
        # The lr of a real run's first (warm-up) iterations: the step costs the same, and
        # random-init Mask R-CNN diverges within a few steps at its full SGD lr 0.02.
        for group in optimizers[bench.name].param_groups:
            group["lr"] *= bench.cfg.SOLVER.WARMUP_FACTOR
    phases = {b.name: [] for b in models}
    res = interleaved(
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
