"""Augmentations for a handful of images: intensity jitter (image only) and free rotation (image and
masks together)."""

import numpy as np
import pytest
import tifffile
from conftest import tiny_cfg
from detectron2.data import transforms as T

from iaunet.data import IAUNetDatasetMapper
from iaunet.data.augmentations import RandomIntensity, RandomRotation
from iaunet.data.dataset_mapper import build_augmentations


def _blob_image(h=64, w=64):
    img = np.full((h, w, 3), 30.0, np.float32)
    img[20:40, 10:24] = 200.0
    return img


def test_intensity_changes_the_image_only_and_stays_in_range():
    np.random.seed(0)
    aug = RandomIntensity(prob=1.0)
    img = _blob_image()
    mask = (img[..., 0] > 100).astype(np.uint8)
    changed = 0
    for _ in range(10):
        t = aug.get_transform(img)
        out = t.apply_image(img.copy())
        assert out.shape == img.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 255
        assert np.array_equal(t.apply_segmentation(mask), mask)  # masks are untouched
        changed += not np.allclose(out, img)
        # the object stays brighter than the background: the jitter never inverts contrast
        assert out[25:35, 13:21].mean() > out[45:, 40:].mean() + 20
    assert changed == 10
    assert isinstance(RandomIntensity(prob=0.0).get_transform(img), T.NoOpTransform)
    with pytest.raises(ValueError, match="INPUT.INTENSITY_AUG"):
        RandomIntensity(prob=1.5)


def test_free_rotation_moves_masks_with_the_image_and_pads_corners():
    np.random.seed(1)
    img = _blob_image()
    mask = (img[..., 0] > 100).astype(np.uint8)
    aug = RandomRotation(prob=1.0, pad=77.0)
    angles = set()
    for _ in range(6):
        t = aug.get_transform(img)
        angles.add(round(t.angle))
        out, m = t.apply_image(img), t.apply_segmentation(mask)
        assert out.shape == img.shape and m.shape == mask.shape and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 1}  # nearest: labels stay labels
        bright = out[..., 0] > 115
        iou = (bright & (m > 0)).sum() / (bright | (m > 0)).sum()
        assert iou > 0.85, f"angle {t.angle:.0f}: image and mask misaligned (IoU {iou:.2f})"
        if 20 < t.angle % 90 < 70:  # corners uncovered: the pad value, no object
            assert out[0, 0, 0] == pytest.approx(77.0) and m[0, 0] == 0
    assert len(angles) == 6
    with pytest.raises(ValueError, match="INPUT.ROTATE"):
        RandomRotation(prob=-0.1)


def test_config_keys_add_the_augmentations_and_the_mapper_keeps_masks_aligned(tmp_path):
    cfg = tiny_cfg(**{"INPUT.ROTATE": 1.0, "INPUT.INTENSITY_AUG": 1.0, "INPUT.IMAGE_SIZE": 64})
    names = [type(a).__name__ for a in build_augmentations(cfg, is_train=True)]
    assert names.index("RandomRotation") < names.index("FixedSizeCrop")  # rotate, then crop
    assert names[-1] == "RandomIntensity"
    assert "RandomRotation" not in [type(a).__name__ for a in build_augmentations(cfg, False)]
    off = [type(a).__name__ for a in build_augmentations(tiny_cfg(), is_train=True)]
    assert "RandomRotation" not in off and "RandomIntensity" not in off

    img = np.full((64, 64), 300, np.uint16)
    img[10:30, 12:28] = 3000
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, img)
    poly = [12, 10, 28, 10, 28, 30, 12, 30]
    record = {
        "file_name": str(path), "height": 64, "width": 64, "image_id": 0,
        "annotations": [{"category_id": 0, "segmentation": [poly], "iscrowd": 0, "id": 1}],
    }  # fmt: skip
    mapper = IAUNetDatasetMapper(cfg, is_train=True)
    for seed in range(5):
        np.random.seed(seed)
        out = mapper(record)
        masks = out["instances"].gt_masks.tensor.numpy()
        if not len(masks):
            continue
        image = out["image"].numpy()[0]
        inside, outside = image[masks[0]].mean(), image[~masks.any(0)].mean()
        assert inside > outside + 30, f"seed {seed}: the mask left its object"
