"""COCO evaluation edge cases (COCOEvaluator as iaunet.engine.Trainer.build_evaluator configures
it): more than 100 instances per image, no predictions, no ground truth (rows of
docs/robustness.md)."""

import itertools
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import _ann, _coco_tree, _square
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BitMasks, Instances

pytestmark = pytest.mark.usefixtures("one_thread")


def _grid_dataset(tmp_path, n_rows=10, n_cols=15):
    """One 100 x 150 image with 150 separate 6x6 cells (polygons) and their masks."""
    h, w = n_rows * 10, n_cols * 10
    anns, masks = [], []
    for r, c in itertools.product(range(n_rows), range(n_cols)):
        x0, y0 = c * 10 + 2, r * 10 + 2
        anns.append(_ann(len(anns) + 1, polygon=_square(x0, y0, 6)))
        mask = np.zeros((h, w), bool)
        mask[y0 : y0 + 6, x0 : x0 + 6] = True
        masks.append(mask)
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "grid.png"), np.zeros((h, w), np.uint8))
    images = [{"id": 1, "file_name": "grid.png", "height": h, "width": w}]
    name, _ = _coco_tree(tmp_path, images=images, annotations=anns)
    DatasetCatalog.get(name)  # sets the metadata json_file that COCOEvaluator reads
    return name, torch.from_numpy(np.stack(masks))


def _evaluate(name, masks, max_dets):
    inst = Instances(tuple(masks.shape[1:]))
    inst.pred_masks = masks
    inst.scores = torch.linspace(1.0, 0.5, len(masks))
    inst.pred_classes = torch.zeros(len(masks), dtype=torch.long)
    inst.pred_boxes = BitMasks(masks).get_bounding_boxes()
    evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, max_dets_per_image=max_dets)
    evaluator.reset()
    evaluator.process([{"image_id": 1}], [{"instances": inst}])
    return evaluator.evaluate()["segm"]


def test_more_than_100_instances_per_image(tmp_path):
    """TEST.DETECTIONS_PER_IMAGE feeds max_dets_per_image: 300 scores all 150 perfect masks, 100
    caps recall."""
    name, masks = _grid_dataset(tmp_path)
    assert _evaluate(name, masks, 300)["AP"] == pytest.approx(100.0)
    assert _evaluate(name, masks, 100)["AP"] == pytest.approx(100 * 67 / 101)  # recall <= 100/150


def test_zero_predictions_and_zero_ground_truth(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "nogt").mkdir()
    name, masks = _grid_dataset(tmp_path / "gt", n_rows=1, n_cols=2)
    assert all(
        math.isnan(v) for v in _evaluate(name, masks[:0], 100).values()
    )  # no predictions: NaN + warning
    empty_name, _ = _coco_tree(tmp_path / "nogt", annotations=[])
    DatasetCatalog.get(empty_name)
    pred = torch.zeros(1, 32, 32, dtype=torch.bool)
    pred[0, 2:10, 2:10] = True
    assert math.isnan(_evaluate(empty_name, pred, 100)["AP"])  # no ground truth: AP undefined (NaN)


def test_scale_mode_evaluates_what_iaunet_predict_writes(tmp_path, caplog):
    """With INPUT.RESIZE_MODE "scale" the trainer evaluates the predictor's output (tiled at the
    training scale), not one forward pass over the whole resized image; a poor result is one
    warning line naming what to try."""
    import logging

    from conftest import tiny_cfg
    from detectron2.modeling import build_model

    from iaunet.data import read_image
    from iaunet.engine.trainer import PredictorModel, Trainer
    from iaunet.inference import IAUNetPredictor

    torch.manual_seed(0)
    anns = [_ann(1, polygon=_square(20, 20, 12)), _ann(2, polygon=_square(100, 90, 14))]
    (tmp_path / "images").mkdir()
    img = np.full((150, 160), 30, np.uint8)
    img[20:32, 20:32] = img[90:104, 100:114] = 220
    cv2.imwrite(str(tmp_path / "images" / "a.png"), img)
    images = [{"id": 1, "file_name": "a.png", "height": 150, "width": 160}]
    name, _ = _coco_tree(tmp_path, images=images, annotations=anns)
    cfg = tiny_cfg(**{"INPUT.RESIZE_MODE": "scale", "INPUT.PIXEL_SCALE": 1.0})
    cfg.DATASETS.TEST = (name,)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    model = build_model(cfg).eval()
    wrapped = PredictorModel(model, cfg)
    assert wrapped.predictor.will_tile((150, 160))  # 64-px tiles
    path = str(tmp_path / "images" / "a.png")
    with torch.no_grad():
        got = wrapped([{"file_name": path}])[0]["instances"]
        want = IAUNetPredictor(cfg, model=model)(read_image(path))
    assert torch.equal(got.pred_masks, want.pred_masks) and torch.equal(got.scores, want.scores)
    with caplog.at_level(logging.WARNING, logger="iaunet"):
        results = Trainer.test(cfg, model)
    assert "segm" in results and "matching" in results
    poor = [r.getMessage() for r in caplog.records if "Poor result" in r.getMessage()]
    assert len(poor) == 1 and name in poor[0] and "--diameter" in poor[0], caplog.text
