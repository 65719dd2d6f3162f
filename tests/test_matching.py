"""Matching metrics (iaunet.evaluation.matching) on hand-made cases with known answers."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Instances

from iaunet.engine.threshold_tuning import best_threshold, tuning_datasets
from iaunet.evaluation.matching import (
    InstanceMatchingEvaluator,
    ScoreThresholdSweep,
    f1_at_05,
    image_counts,
    match,
    summarize,
)


def _rle(*rects, size=(40, 40)):
    m = np.zeros(size, np.uint8, order="F")
    for y0, x0, y1, x1 in rects:
        m[y0:y1, x0:x1] = 1
    return mask_util.encode(m)


GT = [_rle((2, 2, 12, 12)), _rle((20, 20, 30, 30)), _rle((5, 25, 15, 35))]


def _metrics(pred, gt=GT):
    counts = image_counts(gt, pred)
    return summarize(counts, len(gt), len(pred))


def test_perfect():
    r = _metrics(list(GT))
    assert r["F1@0.5"] == r["precision@0.5"] == r["recall@0.5"] == 100 and r["PQ@0.9"] == 100
    assert r["count_ratio"] == 1 and r["mean_matched_iou@0.5"] == 100


def test_one_missed():
    r = _metrics(GT[:2])
    assert r["precision@0.5"] == 100 and r["recall@0.5"] == pytest.approx(200 / 3)
    assert r["F1@0.5"] == pytest.approx(80) and r["count_ratio"] == pytest.approx(2 / 3)


def test_one_duplicated():
    """A near-copy of a cell (IoU 0.9 with it) is a false positive: one-to-one matching."""
    dup = _rle((2, 2, 12, 11))
    r = _metrics(list(GT) + [dup])
    assert r["recall@0.5"] == 100 and r["precision@0.5"] == 75 and r["count_ratio"] == 4 / 3
    assert r["F1@0.5"] == pytest.approx(100 * 6 / 7)


def test_overlapping_ground_truth_and_thresholds():
    """Two overlapping cells (IoU 1/3 with each other): each prediction matches its own cell; a
    prediction of IoU 0.64 with its cell counts at tau 0.5-0.6 and not above."""
    gt = [_rle((0, 0, 10, 10)), _rle((0, 5, 10, 15))]
    pred = [_rle((0, 5, 10, 15)), _rle((0, 0, 8, 8))]  # exact, and 64/100 of the first
    r = _metrics(pred, gt)
    assert r["F1@0.5"] == 100 and r["F1@0.6"] == 100 and r["F1@0.65"] == 50
    assert r["PQ@0.5"] == pytest.approx(100 * (1 + 0.64) / 2)


def test_match_prefers_more_pairs_then_iou():
    iou = np.array([[0.9, 0.6], [0.7, 0.0]])  # greedy on the best IoU would match only one pair
    assert sorted(match(iou, 0.5).tolist()) == [0.6, 0.7]
    assert match(np.zeros((0, 3)), 0.5).size == 0


def test_evaluator_uses_the_score_threshold(monkeypatch):
    record = {
        "image_id": 7,
        "height": 40,
        "width": 40,
        "annotations": [{"segmentation": r, "iscrowd": 0} for r in GT],
    }
    ev = InstanceMatchingEvaluator("unused", score_thresh=0.5, distributed=False)
    monkeypatch.setattr(ev, "_ground_truth", lambda: {7: record})
    ev.reset()
    inst = Instances((40, 40))
    masks = np.stack([mask_util.decode(r) for r in GT + [GT[0]]]).astype(bool)
    inst.pred_masks = torch.from_numpy(masks)
    inst.scores = torch.tensor([0.9, 0.8, 0.7, 0.4])  # the duplicate scores below the threshold
    ev.process([{"image_id": 7}], [{"instances": inst}])
    r = ev.evaluate()["matching"]
    assert r["F1@0.5"] == 100 and r["num_pred"] == 3 and r["num_gt"] == 3


def test_score_threshold_sweep_counts_each_threshold():
    """One pass, counts at IoU 0.5 for every threshold: a duplicate at 0.3 and a miss scoring 0.2
    cost precision below 0.3 / 0.2; the third object, found at 0.6, is lost above 0.6."""
    record = {
        "image_id": 7,
        "height": 40,
        "width": 40,
        "annotations": [{"segmentation": r, "iscrowd": 0} for r in GT],
    }
    ev = ScoreThresholdSweep("unused", thresholds=(0.1, 0.25, 0.5, 0.65, 0.95))
    ev._gt = {7: record}
    ev.reset()
    inst = Instances((40, 40))
    wrong = _rle((30, 0, 40, 10))
    masks = [mask_util.decode(r) for r in (GT[0], GT[1], GT[2], GT[0], wrong)]
    inst.pred_masks = torch.from_numpy(np.stack(masks).astype(bool))
    inst.scores = torch.tensor([0.9, 0.8, 0.6, 0.3, 0.2])
    ev.process([{"image_id": 7}], [{"instances": inst}])
    res = ev.evaluate()["score_sweep"]
    # TP, FP, FN at 0.1 / 0.25 / 0.5 / 0.65 / 0.95
    assert res["counts"] == [[3, 2, 0], [3, 1, 0], [3, 0, 0], [2, 0, 1], [0, 0, 3]]
    f1 = f1_at_05(res["counts"])
    assert f1[2] == 100 and f1[0] == pytest.approx(100 * 6 / 8)
    assert best_threshold(res["thresholds"], f1) == (0.5, 100.0)
    assert best_threshold((0.1, 0.2, 0.3), (50.0, 80.0, 80.0)) == (0.2, 80.0)  # tie: the lowest


def test_thresholds_are_tuned_on_held_out_images_else_on_the_training_images():
    from detectron2.config import CfgNode

    cfg = CfgNode({"DATASETS": CfgNode({"TRAIN": ("folder:a#train", "b"), "TEST": ()})})
    cfg.DATASETS.TEST = ("folder:a#val",)
    assert tuning_datasets(cfg)[0] == ["folder:a#val"]
    # a test set given on the command line (maybe the user's test images) is never used
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("folder:a",), ("folder:test",)
    assert tuning_datasets(cfg) == (["folder:a"], "the training images (none were held out)")
    cfg.DATASETS.TEST = ("folder:c#val",)  # held out of a dataset that is not trained on
    assert tuning_datasets(cfg)[0] == ["folder:a"]
