"""Prediction / ground-truth images after evaluation (iaunet.evaluation.visualization)."""

import os
from types import SimpleNamespace

import cv2
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from iaunet.evaluation import VisualizationHook, visualize_predictions


def test_visualize_predictions_and_hook(tmp_path):
    cfg = tiny_cfg(
        **{
            "MODEL.IAUNET.TEST.SCORE_THRESH": 0.0,
            "OUTPUT_DIR": str(tmp_path),
            "TEST.EVAL_PERIOD": 5,
            "INPUT.IMAGE_SIZE": 32,
            "DATASETS.TEST": ("synthetic_cells_val",),
        }
    )
    model = build_model(cfg).train()

    # After --eval-only: no EventStorage, so a SummaryWriter on OUTPUT_DIR.
    paths = visualize_predictions(cfg, model, num_images=1, score_thresh=0.0)
    assert model.training  # mode restored
    assert [os.path.basename(p) for p in paths] == ["synthetic_cells_val_0_eval.png"]
    h, w = cv2.imread(paths[0]).shape[:2]
    assert w == 2 * h  # prediction | ground truth of a square image
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))

    # In training: with EvalHook's schedule, into the trainer's EventStorage; the pictures are of
    # the model as the evaluation runs it (inference_model), not of the training model itself.
    drawn = []

    class AsEvaluated(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, batched_inputs):
            drawn.append(len(batched_inputs))
            return self.inner(batched_inputs)

    hook = VisualizationHook(cfg, 1, inference_model=lambda c, m: AsEvaluated(m))
    hook.trainer = SimpleNamespace(iter=4, max_iter=10, model=model)
    with EventStorage(4) as storage:
        hook.after_step()  # 5th iteration: EVAL_PERIOD
        hook.trainer.iter = 5
        hook.after_step()
        hook.trainer.iter = 9
        hook.after_step()  # last iteration: left to after_train, as EvalHook does
        hook.trainer.iter = 10  # what TrainerBase.train leaves after a complete run
        hook.after_train()
        assert [name for name, _, _ in storage._vis_data] == ["vis/synthetic_cells_val/0"] * 2
    assert drawn == [1, 1] and model.training
    assert sorted(os.listdir(tmp_path / "vis")) == [
        f"synthetic_cells_val_0_{s}.png" for s in ("eval", "iter0000005", "iter0000010")
    ]
