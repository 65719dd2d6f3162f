"""IAUNet training forward on awkward batches: images without instances train with finite losses
and gradients, and a non-finite loss or matching cost stops training with an error naming the loss
term, the iteration and the images (rows of docs/robustness.md)."""

import itertools
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import _record, _square
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from iaunet.modeling.matcher import HungarianMatcher

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(tmp_path_factory, mappers):
    """Two mapped training images: one with two cells, one with none."""
    folder = tmp_path_factory.mktemp("batch")
    cv2.imwrite(str(folder / "cells.png"), np.full((48, 48), 60, np.uint8))
    cv2.imwrite(str(folder / "empty.png"), np.full((48, 48), 60, np.uint8))
    torch.manual_seed(0)
    np.random.seed(0)
    return [
        mappers[0](_record(folder / "cells.png", 48, 48, [_square(4, 4, 12), _square(24, 24, 16)])),
        mappers[0](_record(folder / "empty.png", 48, 48)),
    ]


def test_zero_instance_images_train(cfg, batch):
    assert [len(x["instances"]) for x in batch] == [2, 0]
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    for inputs in (batch, [batch[1], batch[1]]):  # mixed batch, then no instance at all
        model.zero_grad()
        losses = model(inputs)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_non_finite_loss_stops_training_naming_term_and_iteration(cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg)

    class BreakDiceAtIteration2(HookBase):
        def before_step(self):
            if self.trainer.iter == 2:
                model.criterion.weights["loss_dice"] = float("nan")

    trainer = SimpleTrainer(
        model, itertools.repeat(batch), torch.optim.SGD(model.parameters(), lr=0.0)
    )
    trainer.register_hooks([BreakDiceAtIteration2()])
    message = r"loss loss_dice = nan is not finite \(at iteration 2, images .*cells.png"
    with pytest.raises(FloatingPointError, match=message):
        trainer.train(0, 5)
    assert trainer.iter == 2


def test_matcher_never_sees_nan(cfg, batch, monkeypatch):
    def must_not_run(cost):
        raise AssertionError("linear_sum_assignment called on a NaN cost")

    monkeypatch.setattr("iaunet.modeling.matcher.linear_sum_assignment", must_not_run)
    outputs = {
        "pred_logits": torch.full((1, 4, 2), math.nan),
        "pred_masks": torch.zeros(1, 4, 8, 8),
    }
    targets = [{"labels": torch.zeros(1, dtype=torch.long), "masks": torch.ones(1, 32, 32)}]
    with pytest.raises(FloatingPointError, match="non-finite matching cost for image 0"):
        HungarianMatcher(num_points=16)(outputs, targets)
    model = build_model(cfg)
    model.train()
    model.pixel_std.zero_()  # inf inputs -> NaN predictions
    message = r"matching cost.*at iteration 7, images .*cells.png"
    with EventStorage(start_iter=7), pytest.raises(FloatingPointError, match=message):
        model(batch)
