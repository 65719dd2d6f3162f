"""IAUNet's detectron2 trainer and the setup shared by ``train_net.py`` and the tools.

``Trainer`` is a ``DefaultTrainer`` whose builders call into the package: the dataset mapper
(``iaunet.data``), the optimizer (``iaunet.solver``), COCO evaluation, the atomic checkpointer and
the visualization hook. It lives in the package, not in ``train_net.py``, because the tools
(``tools/compare_maskrcnn.py``) and the tests train with it too.
"""

import logging
import os
import sys
import types
import weakref
from typing import Dict, List

import detectron2.utils.comm as comm
import torch
from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_setup,
)
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, DatasetEvaluators
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicCheckpointer
from ..config import ConfigError, get_key, load_config, set_key
from ..data import IAUNetDatasetMapper, read_image
from ..data.auto_config import resolve_config_from_data
from ..data.datasets.stack_planes import PLANE_KEY, stack_plane
from ..data.samplers import SAMPLER_ATTR, build_resumable_train_loader
from ..evaluation import InstanceMatchingEvaluator, VisualizationHook
from ..evaluation.amodal import (
    SUBSETS,
    HiddenFractionEvaluator,
    WholeOutlineEvaluator,
    has_amodal,
    register_whole_cells,
)
from ..inference import IAUNetPredictor
from ..solver import build_optimizer
from ..utils.file_names import safe_file_name
from .hooks import ExactResume, PreemptionHook
from .stopping import TrainingStopped, stop_on_write_error
from .threshold_tuning import TuneOutputThreshold

# detectron2's TensorBoard writer (torch.utils.tensorboard) imports TensorFlow when it is installed
# (tensorboard.compat.tf; e.g. next to StarDist), only to write event files that tensorboard's own
# stub writes as well: seconds and hundreds of MB per training, and a segmentation fault when that
# first import happens in a worker thread (the napari training widget). A module named
# tensorboard.compat.notf is tensorboard's switch to its stub (tensorboard/compat/__init__.py).
if "tensorflow" not in sys.modules:
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

logger = logging.getLogger(__name__)

SYNC_BN_KEYS = ("MODEL.RESNETS.NORM", "MODEL.IAUNET.NORM")


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with IAUNet's data mapper, COCO segm evaluation, AdamW parameter groups,
    atomic checkpoints and prediction pictures."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__ except for DDP: detectron2's create_ddp_model always passes
        # device_ids=[local_rank], which DDP rejects for CPU workers (gloo).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cuda = next(model.parameters()).device.type == "cuda"
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            device_ids=[comm.get_local_rank()] if on_cuda else None,
        )
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(
            model, cfg.OUTPUT_DIR, config=cfg, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = build_model(cfg)
        logging.getLogger("iaunet").info(f"Model:\n{model}")
        return model

    def build_hooks(self):
        hooks = super().build_hooks()
        # Before the PeriodicWriter (last on the main process), so that the images reach
        # TensorBoard; of what the evaluation scores (iaunet-predict's tiles at the training scale).
        hooks.insert(-1, VisualizationHook(self.cfg, 4, inference_model=self.inference_model))
        if self.cfg.MODEL.IAUNET.TEST.TUNE_OUTPUT_THRESH:  # before the final evaluation
            at = next(i for i, h in enumerate(hooks) if isinstance(h, d2_hooks.EvalHook))
            hooks.insert(at, TuneOutputThreshold())
        # Exact resume and preemption (iaunet.engine.hooks): after the LR scheduler / PreciseBN,
        # before the checkpointer, so that a checkpoint holds the state of its step.
        at = 1 + max(
            i
            for i, h in enumerate(hooks)
            if isinstance(h, (d2_hooks.LRScheduler, d2_hooks.PreciseBN))
        )
        exact = ExactResume(
            getattr(self.data_loader, SAMPLER_ATTR, None),
            self.cfg.SOLVER.IMS_PER_BATCH,
            self.cfg.SOLVER.CHECKPOINT_PERIOD,
        )
        hooks[at:at] = [exact, PreemptionHook(self.checkpointer, exact)]
        return hooks

    # -- stopping on purpose (iaunet.engine.stopping) --------------------------------------------
    def train(self):
        try:
            return super().train()
        except TrainingStopped as e:
            if e.all_workers:  # all finish after_train (logs, metrics) before one exits and the
                comm.synchronize()  # launcher ends the others
            raise

    def after_step(self):
        with stop_on_write_error(self._checkpoint_state):
            super().after_step()

    def after_train(self):
        with stop_on_write_error(self._checkpoint_state):
            super().after_train()

    def _checkpoint_state(self) -> str:
        if not self.checkpointer.has_checkpoint():
            return "No checkpoint was saved yet"
        return (
            f"The last complete checkpoint is {self.checkpointer.get_checkpoint_file()} "
            "(last_checkpoint): free space or fix the folder, then continue with --resume"
        )

    # --------------------------------------------------------------------------------------------

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        if output_folder is None:
            # "folder:/abs/path" must not escape OUTPUT_DIR
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", safe_file_name(dataset_name))
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type != "coco":
            raise NotImplementedError(f"no evaluator for {dataset_name} of type {evaluator_type}")
        evaluators = segm_evaluators(cfg, dataset_name, output_folder)
        if has_amodal(dataset_name):  # whole outlines: all, and those of hidden objects
            for subset, suffix in SUBSETS.items():
                name = register_whole_cells(dataset_name, subset)
                folder = os.path.join(output_folder, subset)
                evaluators += [
                    WholeOutlineEvaluator(e, suffix)
                    for e in segm_evaluators(cfg, name, folder, ignore_crowd=subset == "hidden")
                ]
            evaluators.append(
                HiddenFractionEvaluator(dataset_name, cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH)
            )
        return DatasetEvaluators(evaluators)

    @classmethod
    def test(cls, cfg: CfgNode, model, evaluators=None):
        """detectron2's evaluation, then one warning line per test set whose matching F1 at IoU
        0.5 is below ``POOR_F1`` (what a user of the label images would find), naming what to
        try. With ``INPUT.RESIZE_MODE "scale"`` the predictions are ``iaunet-predict``'s
        (:class:`PredictorModel`: tiles at the training scale), so that the evaluation scores
        what a user gets."""
        results = super().test(cfg, cls.inference_model(cfg, model), evaluators)
        per_set = results if "matching" not in results else {cfg.DATASETS.TEST[0]: results}
        for name, res in per_set.items():
            f1 = res.get("matching", {}).get("F1@0.5") if isinstance(res, dict) else None
            if f1 is not None and f1 < POOR_F1:
                logging.getLogger("iaunet").warning(poor_result_hint(name, res["matching"], cfg))
        return results

    @staticmethod
    def inference_model(cfg: CfgNode, model):
        """The model evaluations run: with ``INPUT.RESIZE_MODE "scale"`` ``iaunet-predict``'s
        predictions (:class:`PredictorModel`: tiles at the training scale)."""
        return PredictorModel(model, cfg) if cfg.INPUT.RESIZE_MODE == "scale" else model

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        # detectron2's loader, with a sampler that --resume continues (iaunet.data.samplers)
        return build_resumable_train_loader(cfg, IAUNetDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        mapper = IAUNetDatasetMapper(cfg, is_train=False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)


def segm_evaluators(
    cfg: CfgNode, dataset_name: str, output_folder: str, ignore_crowd: bool = False
) -> List[DatasetEvaluator]:
    """COCO segm AP and, at the outputs' score threshold (OUTPUT_SCORE_THRESH), F1 / PQ / counts of
    ``dataset_name`` (``ignore_crowd``: see :class:`InstanceMatchingEvaluator`)."""
    coco = COCOEvaluator(
        dataset_name,
        tasks=("segm",),
        distributed=True,
        output_dir=output_folder,
        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
    matching = InstanceMatchingEvaluator(
        dataset_name,
        score_thresh=cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH,
        ignore_crowd=ignore_crowd,
    )
    return [coco, matching]


class PredictorModel(torch.nn.Module):
    """The model as ``iaunet-predict`` runs it, for detectron2's evaluation loop: each test image is
    read from its file and predicted by :class:`IAUNetPredictor` around ``model`` (resized by
    ``INPUT.PIXEL_SCALE``, tiled at ``INPUT.IMAGE_SIZE`` as in training and stitched). Evaluating
    the whole resized image at once instead would score something users never see when the
    images are larger than the training crops."""

    def __init__(self, model: torch.nn.Module, cfg: CfgNode):
        super().__init__()
        self.model = model.module if hasattr(model, "module") else model  # DDP
        self.predictor = IAUNetPredictor(cfg, model=self.model)

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        return [{"instances": self._predict(x)} for x in batched_inputs]

    def _predict(self, record: Dict):
        """A record's image as ``iaunet-predict`` sees it (a plane of a stack: with the stack's
        intensity range)."""
        if not record.get(PLANE_KEY):
            return self.predictor(read_image(record["file_name"], channels=self.predictor.channels))
        p = self.predictor
        image, value_range = stack_plane(
            record["file_name"], record[PLANE_KEY], p.intensity_norm, p.percentiles,
            p.normalize_uint8, p.channels,
        )  # fmt: skip
        return p.predict(image, value_range=value_range)


POOR_F1 = 50.0  # matching F1@0.5 (%) below which the evaluation is flagged as poor


def poor_result_hint(dataset: str, matching: dict, cfg: CfgNode) -> str:
    """One line: the evaluation of ``dataset`` is poor, what the counts say, and what to try."""
    ratio = matching.get("count_ratio", 1.0)
    counts = (
        "far fewer objects found than annotated"
        if ratio < 0.7
        else "far more objects found than annotated"
        if ratio > 1.4
        else "objects found at about the annotated count but badly outlined"
    )
    return (
        f"!! Poor result on {dataset}: F1@0.5 {matching['F1@0.5']:.1f} % "
        f"(precision {matching.get('precision@0.5', 0):.1f}, recall "
        f"{matching.get('recall@0.5', 0):.1f}, predicted/true {ratio:.2f}: {counts}). Try: "
        "annotate more images (every object in each), check the object size (iaunet-predict "
        "--diameter PX, or INPUT.OBJECT_DIAMETER), train longer (SOLVER.MAX_ITER "
        f"{2 * cfg.SOLVER.MAX_ITER}), or start from a model trained on similar images "
        "(MODEL.WEIGHTS)."
    )


def adapt_config_to_machine(cfg: CfgNode, world_size: int) -> List[str]:
    """Make ``cfg`` runnable here, in place; returns one note per change.

    * no CUDA: ``MODEL.DEVICE cpu``; AMP off on the CPU (detectron2's AMP training needs CUDA);
    * several CPU workers: ``SyncBN`` norms become detectron2's ``naiveSyncBN`` (same parameters and
      statistics; torch's SyncBatchNorm synchronizes CUDA tensors only).
    """
    notes = []
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        notes.append("CUDA is not available: running on CPU (MODEL.DEVICE cpu)")
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        cfg.SOLVER.AMP.ENABLED = False
        notes.append("SOLVER.AMP.ENABLED turned off: detectron2's AMP training needs CUDA")
    if cfg.MODEL.DEVICE == "cpu" and world_size > 1:
        for key in SYNC_BN_KEYS:
            if get_key(cfg, key) == "SyncBN":
                set_key(cfg, key, "naiveSyncBN")
                notes.append(
                    f"{key} SyncBN -> naiveSyncBN: synchronized BN on {world_size} CPU workers"
                )
    return notes


def check_pretrained_weights(cfg: CfgNode) -> None:
    """Refuse to train from random weights on a real dataset unless asked to: the thesis models
    start from ImageNet weights, and a silent from-scratch run costs days for a worse model."""
    synthetic = all(MetadataCatalog.get(n).get("synthetic", False) for n in cfg.DATASETS.TRAIN)
    if cfg.MODEL.WEIGHTS or synthetic or cfg.MODEL.IAUNET.TRAIN.FROM_SCRATCH:
        return
    if cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone":
        depth = cfg.MODEL.RESNETS.DEPTH
        source = {50: "resnet50-11ad3fa6.pth", 101: "resnet101-cd907fc2.pth"}.get(
            depth, f"torchvision's resnet{depth} (ImageNet V2) checkpoint"
        )
        command = f"python tools/convert_pretrained.py resnet {source} R-{depth}.pkl"
        weights = f"R-{depth}.pkl"
    else:
        command = "python tools/convert_pretrained.py swin <official Swin checkpoint> swin.pkl"
        weights = "swin.pkl"
    raise ConfigError(
        f"MODEL.WEIGHTS is empty: training on {', '.join(cfg.DATASETS.TRAIN)} would start from "
        f"random weights. Convert ImageNet weights ({command}) and add MODEL.WEIGHTS {weights}, "
        "or set MODEL.IAUNET.TRAIN.FROM_SCRATCH True to train from scratch on purpose"
    )


def check_config(cfg: CfgNode, training: bool) -> CfgNode:
    """What ``train_net.py`` checks before starting any worker (ConfigError naming the key)."""
    if training:
        check_pretrained_weights(cfg)
    return cfg


def setup(args) -> CfgNode:
    """Config from ``args.config_file`` + ``args.opts`` (ConfigError naming a bad file or key),
    adapted to the machine, its datasets named by a path registered and its auto keys sized from the
    training set (:func:`iaunet.data.auto_config.resolve_config_from_data`), frozen; detectron2's
    ``default_setup`` (output folder, config.yaml, seed, logging)."""
    cfg = check_config(load_config(args.config_file, args.opts), training=not args.eval_only)
    notes = adapt_config_to_machine(cfg, comm.get_world_size())
    # The logger first, so that what the training set decides (sizes, warnings) reaches log.txt.
    log = setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="iaunet")
    resolve_config_from_data(
        cfg, eval_only=getattr(args, "eval_only", False), resume=getattr(args, "resume", False)
    )
    cfg.freeze()
    default_setup(cfg, args)
    for note in notes:
        log.warning(note)
    return cfg
