"""Matching metrics (iaunet.evaluation.matching) on hand-made cases with known answers."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Instances

from iaunet.evaluation.matching import InstanceMatchingEvaluator, image_counts, match, summarize


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
