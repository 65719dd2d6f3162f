"""Prediction beside ground truth for a few validation images, after evaluation.

Images go to ``OUTPUT_DIR/vis/<dataset>_<k>_<iterNNNNNNN|eval>.png`` and to TensorBoard: through the
active detectron2 ``EventStorage`` during training (written by the trainer's TensorBoard writer), or
a ``SummaryWriter`` on ``OUTPUT_DIR`` otherwise (``--eval-only``).
"""

import logging
import os
from typing import Callable, List, Optional

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.visualizer import ColorMode, Visualizer
from torch.nn.parallel import DistributedDataParallel

from ..data.dataset_mapper import IAUNetDatasetMapper
from ..utils.file_names import safe_file_name

logger = logging.getLogger(__name__)


def render_prediction_and_gt(
    model: torch.nn.Module,
    dataset_dict: dict,
    mapper: IAUNetDatasetMapper,
    metadata,
    score_thresh: float = 0.5,
) -> np.ndarray:
    """(H', 2W', 3) uint8 RGB: predictions scoring at least ``score_thresh`` (left), ground truth
    (right). Small images are drawn enlarged (longest side up to 512) so that outlines and labels
    stay legible."""
    inputs = mapper(dataset_dict)
    with torch.inference_mode():
        instances = model([inputs])[0]["instances"].to("cpu")
    instances = instances[instances.scores >= score_thresh]
    image = mapper.load_image(dataset_dict).round().astype(np.uint8)
    scale = min(4.0, max(1.0, 512 / max(image.shape[:2])))
    pred = Visualizer(
        image, metadata, scale=scale, instance_mode=ColorMode.IMAGE
    ).draw_instance_predictions(instances)
    gt = Visualizer(image, metadata, scale=scale).draw_dataset_dict(dataset_dict)
    return np.concatenate([pred.get_image(), gt.get_image()], axis=1)


def visualize_predictions(
    cfg,
    model: torch.nn.Module,
    num_images: int = 4,
    score_thresh: Optional[float] = None,
    iteration: Optional[int] = None,
) -> List[str]:
    """Draw the first ``num_images`` images of every ``cfg.DATASETS.TEST`` dataset (main process
    only).

    Args:
        model: the model (DDP-wrapped or not); put in eval mode for the call, its mode restored
            after.
        score_thresh: the predictions drawn score at least this; None:
            ``MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH``, what a user of ``iaunet-predict`` gets.
        iteration: training iteration for file names and TensorBoard steps; None after
            ``--eval-only``.
    Returns:
        Paths of the PNG files written (empty on other processes).
    """
    if not comm.is_main_process():
        return []
    if score_thresh is None:
        score_thresh = cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH
    model = model.module if isinstance(model, DistributedDataParallel) else model
    try:
        storage = get_event_storage()
    except AssertionError:  # no training loop around us
        storage = None
    out_dir = os.path.join(cfg.OUTPUT_DIR, "vis")
    os.makedirs(out_dir, exist_ok=True)
    suffix = f"iter{iteration:07d}" if iteration is not None else "eval"
    mapper = IAUNetDatasetMapper(cfg, is_train=False)
    writer, paths = None, []
    was_training = model.training
    model.eval()
    try:
        for name in cfg.DATASETS.TEST:
            metadata = MetadataCatalog.get(name)
            for k, dataset_dict in enumerate(DatasetCatalog.get(name)[:num_images]):
                vis = render_prediction_and_gt(model, dataset_dict, mapper, metadata, score_thresh)
                path = os.path.join(out_dir, f"{safe_file_name(name)}_{k}_{suffix}.png")
                cv2.imwrite(path, cv2.cvtColor(vis, cv2.COLOR_RGB2BGR))
                paths.append(path)
                tag, chw = (
                    f"vis/{name}/{k}",
                    torch.from_numpy(np.ascontiguousarray(vis.transpose(2, 0, 1))),
                )
                if storage is not None:
                    storage.put_image(tag, chw)
                else:
                    if writer is None:
                        from torch.utils.tensorboard import SummaryWriter

                        writer = SummaryWriter(cfg.OUTPUT_DIR)
                    writer.add_image(tag, chw, global_step=iteration or 0)
    finally:
        model.train(was_training)
        if writer is not None:
            writer.close()
    logger.info(f"Saved {len(paths)} prediction/ground-truth images to {out_dir}")
    return paths


class VisualizationHook(HookBase):
    """Runs :func:`visualize_predictions` when ``EvalHook`` evaluates: every ``TEST.EVAL_PERIOD``
    iterations and at the end of training. Register it before ``PeriodicWriter`` so that the images
    reach TensorBoard with the same write. ``inference_model(cfg, model)``: the model as the
    evaluation runs it (e.g. ``Trainer.inference_model``: tiles at the training scale, as
    ``iaunet-predict``), so that the pictures show what the evaluation scores."""

    def __init__(
        self,
        cfg,
        num_images: int = 4,
        score_thresh: Optional[float] = None,
        inference_model: Optional[Callable] = None,
    ):
        # the trainer's own config, read when drawing: a threshold set at the end of training
        # (MODEL.IAUNET.TEST.TUNE_OUTPUT_THRESH) is the one drawn with
        self.cfg = cfg
        self.num_images = num_images
        self.score_thresh = score_thresh
        self.inference_model = inference_model
        self.period = cfg.TEST.EVAL_PERIOD

    def _visualize(self, iteration: int) -> None:
        try:
            model = self.trainer.model
            if self.inference_model is not None:
                model = self.inference_model(self.cfg, model)
            visualize_predictions(
                self.cfg,
                model,
                self.num_images,
                self.score_thresh,
                iteration=iteration,
            )
        except Exception:  # pictures are a convenience: never stop a training run for them
            logger.warning("Visualization of validation predictions failed", exc_info=True)

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self.period > 0 and next_iter % self.period == 0 and next_iter != self.trainer.max_iter:
            self._visualize(next_iter)

    def after_train(self) -> None:
        # The trainer leaves ``iter == max_iter`` after a complete run; nothing is drawn after a
        # failed one.
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._visualize(self.trainer.max_iter)
