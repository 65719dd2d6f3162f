"""Config keys sized from the training set (0 = auto) and the too-few-queries warning."""

import logging
import os

import pytest
import torch
from conftest import ROOT, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from iaunet.checkpoint import AtomicCheckpointer
from iaunet.config import ConfigError, load_config
from iaunet.data.auto_config import (
    auto_crop,
    auto_max_iter,
    auto_num_queries,
    resolve_config_from_data,
)

SMALL = os.path.join(ROOT, "configs", "custom", "iaunet_small.yaml")


def _dicts(counts, diameter=40, size=512):
    """Images of ``size`` px with ``counts[i]`` square objects of side ``diameter``."""
    box = {"bbox": [0, 0, diameter, diameter], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    return [
        {"file_name": f"img{i}.tif", "height": size, "width": size, "annotations": [box] * n}
        for i, n in enumerate(counts)
    ]


def _register(name, dicts):
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: dicts)
        MetadataCatalog.get(name).set(thing_classes=["cell"])
    return name


def test_auto_rules():
    assert [auto_num_queries(n) for n in (0, 6, 7, 11, 36, 40)] == [10, 10, 20, 20, 60, 60]
    # 26-px objects: 5 diameters -> 130 -> 128 (nearest); never above the (rounded) image side.
    assert auto_crop(_dicts([5], 52), scale=0.5, diameter=26) == 128
    assert auto_crop(_dicts([5], 40), scale=0.5, diameter=20) == 96  # 100 -> 96
    assert auto_crop(_dicts([5], 40, size=150), scale=0.5, diameter=26) == 96
    assert auto_crop(_dicts([5], 200, size=2000), scale=1.0, diameter=20) == 416  # 2 x 200
    # 3 images of 512 px at scale 0.5 -> 256 px = 4 crops of 128 each: 100 x 12 / 8 = 150 -> 1250.
    assert auto_max_iter(_dicts([5] * 3), 0.5, 128, 8) == 1250
    assert auto_max_iter(_dicts([5] * 100), 0.5, 128, 8) == 5000
    assert auto_max_iter(_dicts([5] * 1000), 0.5, 128, 8) == 10000
    assert auto_max_iter(_dicts([5] * 100), None, 128, 8) == 1300  # one crop per image


def test_small_config_sizes_itself_from_the_data(caplog):
    """36 objects of 40 px in the densest image: 60 queries, scale 26/40, 128-px crops."""
    name = _register("auto_test_dense", _dicts([10, 36, 20]))
    cfg = load_config(SMALL, ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"])
    cfg.MODEL.WEIGHTS = ""
    with caplog.at_level(logging.INFO, logger="iaunet"):
        filled = resolve_config_from_data(cfg)
    assert filled == {
        "MODEL.IAUNET.NUM_QUERIES": 60,
        "INPUT.IMAGE_SIZE": 128,
        "INPUT.PIXEL_SCALE": 0.65,
        "SOLVER.MAX_ITER": 1250,
    }
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 60  # the quick config's 50 would cap the queries
    assert (
        "Sized from the training set" in caplog.text
        and "MODEL.IAUNET.NUM_QUERIES 60" in caplog.text
    )
    assert "more objects than" not in caplog.text


def test_too_few_queries_is_a_loud_warning_in_any_config(caplog):
    name = _register("auto_test_crowded", _dicts([3, 9, 12]))
    cfg = tiny_cfg(**{"DATASETS.TRAIN": f"('{name}',)", "MODEL.IAUNET.NUM_QUERIES": 8})
    with caplog.at_level(logging.WARNING, logger="iaunet"):
        resolve_config_from_data(cfg)
    warning = [r.getMessage() for r in caplog.records if "more objects than" in r.getMessage()]
    assert len(warning) == 1
    assert "2 training image(s)" in warning[0]
    assert "img2.tif (12 objects), img1.tif (9 objects)" in warning[0]
    assert "NUM_QUERIES 20" in warning[0]
    assert cfg.MODEL.IAUNET.NUM_QUERIES == 8  # a given value is kept


def test_small_config_starts_from_the_start_config_model():
    """The small config's MODEL.WEIGHTS is what the starting-model config writes, and the message
    for a missing one (below) names that config: synthetic cells and nuclei, the quick model's
    architecture."""
    small = load_config(SMALL)
    start = load_config(os.path.join(ROOT, "configs", "synthetic", "iaunet_start.yaml"))
    assert os.path.normpath(small.MODEL.WEIGHTS) == os.path.normpath(
        os.path.join(start.OUTPUT_DIR, "model_final.pth")
    )
    assert set(start.DATASETS.TRAIN) == {"synthetic_cells_train", "synthetic_nuclei_train"}
    quick = load_config(os.path.join(ROOT, "configs", "synthetic", "iaunet_quick.yaml"))
    assert quick.DATASETS.TRAIN == ("synthetic_cells_train",)  # the benchmark stays as it is
    assert start.MODEL.IAUNET.NUM_QUERIES == quick.MODEL.IAUNET.NUM_QUERIES


def test_missing_weights_and_classes_are_config_errors(tmp_path):
    name = _register("auto_test_two_classes", _dicts([3]))
    cfg = tiny_cfg(**{"DATASETS.TRAIN": f"('{name}',)"})
    cfg.MODEL.WEIGHTS = str(tmp_path / "output" / "synthetic_start" / "model_final.pth")
    with pytest.raises(
        ConfigError,
        match="first with `python train_net.py --config-file configs/synthetic/iaunet_start.yaml",
    ):
        resolve_config_from_data(cfg)
    two = [
        dict(d, annotations=[dict(a, category_id=1) for a in d["annotations"]]) for d in _dicts([2])
    ]
    cfg = tiny_cfg(**{"DATASETS.TRAIN": f"('{_register('auto_test_k2', two)}',)"})
    with pytest.raises(ConfigError, match="has 2 classes .* but MODEL.IAUNET.NUM_CLASSES is 1"):
        resolve_config_from_data(cfg)
    with pytest.raises(ConfigError, match="DATASETS.TRAIN is empty"):
        resolve_config_from_data(tiny_cfg(**{"DATASETS.TRAIN": "()"}))


def test_eval_only_takes_the_sizes_from_the_checkpoint(tmp_path):
    trained = tiny_cfg(**{"MODEL.IAUNET.NUM_QUERIES": 30, "INPUT.PIXEL_SCALE": 0.5})
    trained.INPUT.RESIZE_MODE, trained.INPUT.OBJECT_DIAMETER = "scale", 20.0
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(trained), str(tmp_path), config=trained).save("model")
    cfg = tiny_cfg(**{"MODEL.IAUNET.NUM_QUERIES": 0, "INPUT.IMAGE_SIZE": 0, "DATASETS.TRAIN": "()"})
    cfg.INPUT.RESIZE_MODE, cfg.INPUT.OBJECT_DIAMETER = "scale", 20.0
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    filled = resolve_config_from_data(cfg, eval_only=True)
    assert filled == {
        "MODEL.IAUNET.NUM_QUERIES": 30,
        "INPUT.IMAGE_SIZE": 64,
        "INPUT.PIXEL_SCALE": 0.5,
    }
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.IAUNET.NUM_QUERIES = 0
    with pytest.raises(
        ConfigError, match="MODEL.IAUNET.NUM_QUERIES 0 \\(auto\\) and MODEL.WEIGHTS"
    ):
        resolve_config_from_data(cfg, eval_only=True)


def test_fine_tuning_keeps_every_query_of_the_starting_model(tmp_path):
    start = tiny_cfg(**{"MODEL.IAUNET.NUM_QUERIES": 30})
    AtomicCheckpointer(build_model(start), str(tmp_path), config=start).save("model")
    name = _register("auto_test_sparse", _dicts([4, 6]))
    cfg = tiny_cfg(**{"DATASETS.TRAIN": f"('{name}',)", "MODEL.IAUNET.NUM_QUERIES": 0})
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    resolve_config_from_data(cfg)
    assert cfg.MODEL.IAUNET.NUM_QUERIES == 30  # the data alone would give 10
    cfg = tiny_cfg(**{"DATASETS.TRAIN": f"('{name}',)", "MODEL.IAUNET.NUM_QUERIES": 0})
    resolve_config_from_data(cfg)
    assert cfg.MODEL.IAUNET.NUM_QUERIES == 10
