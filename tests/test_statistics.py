"""Training-set statistics and the data-dependent keys INPUT.PIXEL_SCALE and OBJECT_DIAMETER."""

import pytest
from conftest import tiny_cfg
from detectron2.structures import BoxMode

from iaunet.data.statistics import dataset_statistics, resolve_data_keys


def _dicts():
    """Two images: 200x100 with two 10x10 objects, 400x400 with one 20x5 and one crowd region."""

    def obj(w, h, crowd=0):
        return {"bbox": [0, 0, w, h], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": crowd}

    return [
        {"file_name": "a.png", "height": 200, "width": 100, "annotations": [obj(10, 10)] * 2},
        {
            "file_name": "b.png",
            "height": 400,
            "width": 400,
            "annotations": [obj(20, 5), obj(9, 9, 1)],
        },
    ]


def test_dataset_statistics():
    s = dataset_statistics(_dicts())
    assert (s.num_images, s.num_objects, s.max_objects, s.max_objects_file) == (2, 3, 2, "a.png")
    assert s.median_image_size == 300 and s.median_diameter == 10  # sqrt(20 x 5) = 10 too
    with pytest.raises(ValueError, match="empty"):
        dataset_statistics([])


def test_longest_side_mode_records_the_scale():
    """Thesis protocol: longest side -> IMAGE_SIZE 100; per-image factors 0.5 and 0.25."""
    cfg = tiny_cfg(**{"INPUT.IMAGE_SIZE": 100})
    resolve_data_keys(cfg, _dicts())
    assert cfg.INPUT.PIXEL_SCALE == pytest.approx(0.375)  # median of 0.5, 0.25
    assert cfg.INPUT.OBJECT_DIAMETER == 5.0  # 10 x 0.5, 10 x 0.5, 10 x 0.25 -> median 5
    cfg = tiny_cfg(**{"INPUT.IMAGE_SIZE": 100, "INPUT.PIXEL_SCALE": 2.0})
    resolve_data_keys(cfg, _dicts())
    assert cfg.INPUT.PIXEL_SCALE == 2.0  # an explicit value is kept


def test_scale_mode_sizes_objects():
    cfg = tiny_cfg(**{"INPUT.RESIZE_MODE": "scale", "INPUT.OBJECT_DIAMETER": 25.0})
    resolve_data_keys(cfg, _dicts())
    assert cfg.INPUT.PIXEL_SCALE == 2.5  # median diameter 10 px -> 25 model px
    cfg = tiny_cfg(**{"INPUT.RESIZE_MODE": "scale"})
    with pytest.raises(ValueError, match="OBJECT_DIAMETER > 0"):
        resolve_data_keys(cfg, _dicts())
    cfg = tiny_cfg(**{"INPUT.RESIZE_MODE": "sideways"})
    with pytest.raises(ValueError, match="RESIZE_MODE"):
        resolve_data_keys(cfg, _dicts())
