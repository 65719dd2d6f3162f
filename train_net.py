#!/usr/bin/env python
"""IAUNet training / evaluation script (detectron2 ``DefaultTrainer``).

python train_net.py --config-file configs/synthetic/iaunet_quick.yaml
python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
python train_net.py --config-file CFG --resume
python train_net.py --config-file CFG --num-gpus 8
python train_net.py --config-file CFG --num-gpus 2 MODEL.DEVICE cpu   # CPU workers, gloo (docs/distributed.md)
"""

import copy
import itertools
import logging
import os
import weakref
from typing import Any, Dict, List, Set

import detectron2.utils.comm as comm
import torch
from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, verify_results
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.modeling import build_model
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.logger import setup_logger

from iaunet.checkpoint import AtomicCheckpointer
from iaunet.config import exit_on_config_error
from iaunet.config import load_config as iaunet_load_config
from iaunet.data import IAUNetDatasetMapper
from iaunet.evaluation import VisualizationHook, visualize_predictions

NORM_MODULE_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


class Trainer(DefaultTrainer):
    """DefaultTrainer with IAUNet's data mapper, COCO evaluation, AdamW param groups and full-model clipping,
    synchronized BN and a DDP wrapper that also works for CPU workers (gloo)."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except that DDP comes from `build_ddp_model`: detectron2's
        # create_ddp_model always passes device_ids=[local_rank], which DDP rejects for CPU modules.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = self.build_ddp_model(cfg, model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logger = logging.getLogger("iaunet.train_net")
        if comm.get_world_size() > 1:
            model = convert_sync_batchnorm(model, plain_bn=cfg.MODEL.SYNC_BN)
            synced = sum(
                isinstance(m, (NaiveSyncBatchNorm, torch.nn.SyncBatchNorm)) for m in model.modules()
            )
            logger.info(
                f"{synced} BatchNorm layers synchronized across {comm.get_world_size()} workers"
            )
        logger.info(f"Model:\n{model}")
        return model

    @classmethod
    def build_ddp_model(cls, cfg, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel when there are several workers (unchanged otherwise).
        Every parameter receives a gradient in every configuration, so find_unused_parameters stays off."""
        device_ids = (
            [comm.get_local_rank()] if next(model.parameters()).device.type == "cuda" else None
        )
        return create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)

    def build_hooks(self):
        hooks = super().build_hooks()
        # Before the PeriodicWriter (last on the main process), so that the images reach TensorBoard.
        hooks.insert(-1, VisualizationHook(self.cfg, num_images=4))
        return hooks

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type != "coco":
            raise NotImplementedError(f"no evaluator for {dataset_name} of type {evaluator_type}")
        return DatasetEvaluators(
            [
                COCOEvaluator(
                    dataset_name,
                    tasks=("segm",),
                    distributed=True,
                    output_dir=output_folder,
                    max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
                )
            ]
        )

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=IAUNetDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=IAUNetDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) with the backbone lr multiplier, no weight decay on norms/embeddings, and clipping."""
    defaults = {"lr": cfg.SOLVER.BASE_LR, "weight_decay": cfg.SOLVER.WEIGHT_DECAY}
    params: List[Dict[str, Any]] = []
    memo: Set[torch.nn.parameter.Parameter] = set()
    for module_name, module in model.named_modules():
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in memo:
                continue
            memo.add(value)
            hyper = copy.copy(defaults)
            if module_name.startswith("backbone"):
                hyper["lr"] = hyper["lr"] * cfg.SOLVER.BACKBONE_MULTIPLIER
            if "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                hyper["weight_decay"] = 0.0
            if isinstance(module, NORM_MODULE_TYPES):
                hyper["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_NORM
            if isinstance(module, torch.nn.Embedding):
                hyper["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_EMBED
            params.append({"params": [value], **hyper})

    clip = cfg.SOLVER.CLIP_GRADIENTS
    optimizer_type = cfg.SOLVER.OPTIMIZER
    if optimizer_type == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {}
    elif optimizer_type == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {optimizer_type!r}")
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optim_cls(params, cfg.SOLVER.BASE_LR, **kwargs)
    return maybe_add_gradient_clipping(cfg, optim_cls)(params, cfg.SOLVER.BASE_LR, **kwargs)


def convert_sync_batchnorm(model: torch.nn.Module, plain_bn: bool = True) -> torch.nn.Module:
    """Synchronized BN, whose batch statistics are those of the global batch, for a multi-worker run.

    ``plain_bn``: convert the BatchNorm layers (``MODEL.SYNC_BN``); otherwise only the ``SyncBatchNorm``
    layers of ``NORM: "SyncBN"`` are synchronized. On CUDA torch's ``SyncBatchNorm``; elsewhere detectron2's
    ``NaiveSyncBatchNorm``, which all-reduces through gloo (torch's raises an error off CUDA), so that
    "SyncBN" also works on CPU workers. Converted layers keep their parameters (same objects) and buffers.
    """
    if next(model.parameters()).device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if plain_bn else model
    types = (
        (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm) if plain_bn else (torch.nn.SyncBatchNorm,)
    )
    return _to_naive_sync_bn(model, types)


def _to_naive_sync_bn(module: torch.nn.Module, types: tuple) -> torch.nn.Module:
    if type(module) in types:
        sync = NaiveSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, _to_naive_sync_bn(child, types))
    return module


def _with_full_model_clipping(optim_cls, clip_norm: float, norm_type: float):
    """An optimizer class whose ``step`` first clips the gradient norm of all parameters together."""

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, clip_norm, norm_type)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def load_config(args) -> CfgNode:
    """Defaults + IAUNet keys + the config file + ``--opts``; ConfigError naming the file or key if invalid."""
    return iaunet_load_config(args.config_file, args.opts)


def setup(args):
    """Build the config (``load_config``), adapt it to the machine (CUDA, AMP) and set up logging."""
    cfg = load_config(args)
    notes = []
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        notes.append("CUDA is not available: running on CPU (MODEL.DEVICE cpu)")
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        cfg.SOLVER.AMP.ENABLED = False
        notes.append("SOLVER.AMP.ENABLED turned off: detectron2's AMP training needs CUDA")
    cfg.freeze()
    default_setup(cfg, args)
    logger = setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="iaunet")
    for note in notes:
        logger.warning(note)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        visualize_predictions(
            cfg, model
        )  # prediction | ground truth images in OUTPUT_DIR/vis (main process)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    logging.getLogger(__name__).info(f"Command line arguments: {args}")
    exit_on_config_error(
        lambda: load_config(args), "train_net.py"
    )  # one line, before any worker starts
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
