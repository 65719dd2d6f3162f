"""Optimizer of IAUNet (thesis §4.2: AdamW), with detectron2's per-parameter-group conventions.

``train_net.Trainer.build_optimizer`` calls :func:`build_optimizer`; the lr schedule is detectron2's
(``SOLVER.LR_SCHEDULER_NAME``, e.g. ``WarmupCosineLR`` to ``SOLVER.BASE_LR_END``).
"""

import copy
import itertools
from typing import Any, Dict, List, Set

import torch
from detectron2.solver.build import maybe_add_gradient_clipping

NORM_MODULE_TYPES = (
    # BatchNorm*d, SyncBatchNorm, detectron2's NaiveSyncBatchNorm
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.GroupNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


POSITION_TABLES = ("relative_position_bias_table", "absolute_pos_embed")


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over one parameter group per tensor:

    * lr ``SOLVER.BASE_LR``, times ``SOLVER.BACKBONE_MULTIPLIER`` for the backbone;
    * weight decay ``SOLVER.WEIGHT_DECAY``, ``SOLVER.WEIGHT_DECAY_NORM`` for norm layers,
      ``SOLVER.WEIGHT_DECAY_EMBED`` for embeddings (queries, Swin's position tables);
    * gradient clipping per ``SOLVER.CLIP_GRADIENTS``; ``CLIP_TYPE "full_model"`` clips the norm of
      all gradients together (Mask2Former), the other types are detectron2's.

    The reference recipe (configs/Base-IAUNet.yaml) gives every tensor the same lr and decay, i.e.
    the authors' single ``AdamW(model.parameters())`` group.
    """
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
            if isinstance(module, NORM_MODULE_TYPES):
                hyper["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_NORM
            # Embeddings: the queries, Swin's position tables.
            if isinstance(module, torch.nn.Embedding) or name in POSITION_TABLES:
                hyper["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_EMBED
            params.append({"params": [value], **hyper})

    optimizer_type = cfg.SOLVER.OPTIMIZER
    if optimizer_type == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {}
    elif optimizer_type == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {optimizer_type!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optim_cls(params, cfg.SOLVER.BASE_LR, **kwargs)
    return maybe_add_gradient_clipping(cfg, optim_cls)(params, cfg.SOLVER.BASE_LR, **kwargs)


def _with_full_model_clipping(optim_cls, clip_norm: float, norm_type: float):
    """An optimizer class whose ``step`` first clips the gradient norm of all parameters
    together."""

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, clip_norm, norm_type)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer
