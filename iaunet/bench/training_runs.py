"""Training runs of the comparison tools: a config trained from scratch with a given trainer class,
timed, evaluated once (``tools/compare_maskrcnn.py``)."""

import os
import time
from typing import Dict

from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data import transforms as T
from detectron2.utils.env import seed_all_rng

from ..engine import Trainer


class D2MapperTrainer(Trainer):
    """Trainer with detectron2's DatasetMapper (resize to INPUT.IMAGE_SIZE, horizontal flip)."""

    @classmethod
    def build_train_loader(cls, cfg):
        size = cfg.INPUT.IMAGE_SIZE
        augs = [
            T.ResizeShortestEdge(size, max_size=size),
            T.RandomFlip(horizontal=True, vertical=False),
        ]
        return build_detection_train_loader(
            cfg, mapper=DatasetMapper(cfg, is_train=True, augmentations=augs)
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=DatasetMapper(cfg, is_train=False)
        )


def subset_dataset(name: str, limit: int) -> str:
    """Register ``<name>_first<limit>``: the first ``limit`` images of a registered dataset, same
    metadata."""
    if not limit:
        return name
    new = f"{name}_first{limit}"
    if new not in DatasetCatalog.list():
        DatasetCatalog.register(new, lambda: DatasetCatalog.get(name)[:limit])
        DatasetCatalog.get(
            name
        )  # loading fills the parent's metadata (class ids) before it is copied
        meta = {
            k: v
            for k, v in MetadataCatalog.get(name).as_dict().items()
            if k not in ("name", "json_file")
        }
        MetadataCatalog.get(new).set(
            **meta
        )  # no json_file: the evaluator converts the subset itself
    return new


def train_and_evaluate(cfg: CfgNode, trainer_cls, seed: int) -> Dict:
    """Train from scratch with ``trainer_cls(cfg)`` (its final EvalHook evaluates); returns segm
    metrics and timing."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    cfg.freeze()
    seed_all_rng(seed)  # same seed -> same sample order and augmentations for both models
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=False)
    params = sum(p.numel() for p in trainer.model.parameters())
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    # DefaultTrainer.train() returns the results only with TEST.EXPECTED_RESULTS; its final EvalHook
    # keeps them here.
    results = getattr(trainer, "_last_eval_results", None)
    if results and "segm" not in results:  # several test sets: {dataset: {"segm": ...}}
        results = results[cfg.DATASETS.TEST[0]]
    segm = dict(results.get("segm", {})) if results else {}
    matching = dict(results.get("matching", {})) if results else {}
    return {
        "params": params,
        "iterations": cfg.SOLVER.MAX_ITER,
        "batch": cfg.SOLVER.IMS_PER_BATCH,
        "images_seen": cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH,
        "train_and_eval_time_s": total,
        "train_time_s": trainer.storage.history("time").global_avg() * cfg.SOLVER.MAX_ITER
        if "time" in trainer.storage.histories()
        else total,
        "segm": segm,
        "matching": matching,
        "output_dir": cfg.OUTPUT_DIR,
    }


def seconds_per_iteration(cfg: CfgNode, trainer_cls, seed: int, iters: int = 10) -> float:
    """Median training-step time of ``cfg`` over ``iters`` iterations (after 2 warm-up ones),
    without evaluation or checkpoints: the probe that sizes an equal-time run."""
    probe = cfg.clone()
    probe.defrost()
    probe.SOLVER.MAX_ITER = iters + 2
    probe.DATASETS.TEST = ()
    probe.OUTPUT_DIR = cfg.OUTPUT_DIR + "_probe"
    os.makedirs(probe.OUTPUT_DIR, exist_ok=True)
    probe.freeze()
    seed_all_rng(seed)
    trainer = trainer_cls(probe)
    trainer.resume_or_load(resume=False)
    trainer.train()
    times = trainer.storage.history("time").values()[2:]
    return float(sorted(t for t, _ in times)[len(times) // 2])
