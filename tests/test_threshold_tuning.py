"""MODEL.IAUNET.TEST.TUNE_OUTPUT_THRESH (iaunet.engine.threshold_tuning): after training, the
outputs' score threshold with the best matching F1 is chosen and saved with model_final.pth."""

import os

import numpy as np
import pycocotools.mask as mask_util
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.structures import Instances
from own_images import write_folder

from iaunet.checkpoint import AtomicCheckpointer, read_checkpoint
from iaunet.config import trained_config
from iaunet.data.datasets.folder import register_path_datasets
from iaunet.engine import Trainer
from iaunet.engine.threshold_tuning import TuneOutputThreshold


class TrueObjects(torch.nn.Module):
    """A "model" that finds every true object of an image at score 0.3, and one false object at
    score 0.2: the best threshold is the lowest that drops the false one (0.25 on the grid)."""

    def __init__(self, dataset: str):
        super().__init__()
        self.records = {d["image_id"]: d for d in DatasetCatalog.get(dataset)}
        self.weight = torch.nn.Parameter(torch.zeros(1))  # something to checkpoint

    def forward(self, batched_inputs):
        outputs = []
        for inp in batched_inputs:
            d = self.records[inp["image_id"]]
            h, w = d["height"], d["width"]
            masks = [mask_util.decode(a["segmentation"]) for a in d["annotations"]]
            false = np.zeros((h, w), np.uint8)
            false[:4, :4] = 1
            inst = Instances((h, w))
            inst.pred_masks = torch.from_numpy(np.stack(masks + [false]).astype(bool))
            inst.scores = torch.tensor([0.3] * len(masks) + [0.2])
            inst.pred_classes = torch.zeros(len(masks) + 1, dtype=torch.long)
            outputs.append({"instances": inst})
        return outputs


class FakeTrainer:
    """What the hook uses of a Trainer, around :class:`TrueObjects`."""

    build_test_loader = Trainer.build_test_loader
    inference_model = staticmethod(lambda cfg, model: model)

    def __init__(self, cfg, model):
        self.cfg, self.model, self.iter, self.max_iter = cfg, model, 9, 10
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, config=cfg)


def test_tuned_threshold_is_set_and_saved_with_the_final_model(tmp_path, caplog):
    write_folder(str(tmp_path / "cells"), "labels", seeds=range(3))
    name = f"folder:{tmp_path / 'cells'}"
    register_path_datasets([name])
    cfg = tiny_cfg(**{"DATASETS.TRAIN": (name,), "DATASETS.TEST": ()})
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.freeze()
    trainer = FakeTrainer(cfg, TrueObjects(name))
    hook = TuneOutputThreshold()
    hook.trainer = trainer
    with caplog.at_level("INFO"):
        hook.after_train()
    assert cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH == 0.25
    assert "OUTPUT_SCORE_THRESH 0.25: matching F1@0.5 100.0 on the training images" in caplog.text
    assert "against 0.0 at 0.5" in caplog.text  # nothing scores 0.5: the default lost every object
    saved = trained_config(
        read_checkpoint(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))["config"]
    )
    assert saved.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH == 0.25
    # a training that stopped early tunes nothing
    trainer.iter = 3
    cfg.defrost()
    cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH = 0.5
    hook.after_train()
    assert cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH == 0.5
