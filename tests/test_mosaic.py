"""Mosaic augmentation (INPUT.MOSAIC): four crops laid out 2 x 2 and cut at an offset."""

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.structures import BitMasks, Instances

from iaunet.data import IAUNetDatasetMapper
from iaunet.data.mosaic import MixingMapper, combine_mosaic, paste_objects, with_occluders
from iaunet.data.samplers import build_resumable_train_loader


def _part(value: float, boxes, size=(8, 8), name="x"):
    """A mapped sample: an image filled with ``value`` and one box mask per (y0, x0, y1, x1)."""
    h, w = size
    masks = torch.zeros((len(boxes), h, w), dtype=torch.bool)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    inst = Instances((h, w))
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.arange(len(boxes), dtype=torch.int64) + int(value)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    return {"file_name": name, "image": torch.full((3, h, w), value), "instances": inst}


def test_mosaic_places_images_and_masks_and_drops_slivers():
    parts = [
        _part(10, [(5, 5, 8, 8)], name="a"),  # bottom-right corner of the top-left crop
        _part(20, [(4, 0, 6, 2), (6, 0, 8, 1)], name="b"),  # left edge of the top-right crop
        _part(30, [(0, 6, 8, 8)], name="c"),
        _part(40, [(0, 0, 1, 1)], name="d"),
    ]
    out = combine_mosaic(parts, offset_y=4, offset_x=4, min_area=2)
    img = out["image"][0]
    assert img.shape == (8, 8)
    # the window [4, 12) x [4, 12) of the 16 x 16 canvas: one quadrant of each crop
    assert img[0, 0] == 10 and img[0, 4] == 20 and img[4, 0] == 30 and img[4, 4] == 40
    inst = out["instances"]
    boxes = inst.gt_boxes.tensor.tolist()  # x0, y0, x1, y1
    # a: canvas rows/cols 5..8 -> window 1..4; b (canvas cols 8..16): its 2x2 box at rows 4..6 ->
    # window rows 0..2, cols 4..6; its 2 px at rows 6..8 -> window rows 2..4, col 4 (kept);
    # c (canvas rows 8..16): its column strip -> window rows 4..8, cols 2..4;
    # d's single pixel (1 < min_area) is dropped
    assert boxes == [[1, 1, 4, 4], [4, 0, 6, 2], [4, 2, 5, 4], [2, 4, 4, 8]]
    assert inst.gt_classes.tolist() == [10, 20, 21, 30]
    assert inst.gt_masks.tensor.sum().item() == 9 + 4 + 2 + 8
    assert out["file_name"] == "a" and out["mosaic_of"] == ["a", "b", "c", "d"]


def test_mosaic_at_offset_zero_is_the_first_crop():
    parts = [_part(v, [(1, 1, 3, 3)], name=str(v)) for v in (1, 2, 3, 4)]
    out = combine_mosaic(parts, 0, 0)
    assert torch.equal(out["image"], parts[0]["image"])
    assert torch.equal(out["instances"].gt_masks.tensor, parts[0]["instances"].gt_masks.tensor)


def test_mosaic_rejects_bad_input():
    parts = [_part(1, [])] * 3 + [_part(2, [], size=(8, 6), name="small.png")]
    with pytest.raises(ValueError, match="small.png"):
        combine_mosaic(parts, 0, 0)
    with pytest.raises(ValueError, match="4 samples"):
        combine_mosaic(parts[:2], 0, 0)
    with pytest.raises(ValueError, match="INPUT.MOSAIC"):
        MixingMapper(lambda d: d, [], 1.5)


@pytest.mark.usefixtures("one_thread")
def test_training_loader_makes_mosaics_of_the_dataset():
    """INPUT.MOSAIC 1 through the real loader: every sample is a crop-sized mosaic of four
    training images whose instances are non-empty and lie on bright cells."""
    cfg = tiny_cfg(**{"INPUT.MOSAIC": 1.0, "DATALOADER.NUM_WORKERS": 0})
    names = {d["file_name"] for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])}
    np.random.seed(0)
    batch = next(iter(build_resumable_train_loader(cfg, IAUNetDatasetMapper(cfg, is_train=True))))
    size = cfg.INPUT.IMAGE_SIZE
    for d in batch:
        assert len(d["mosaic_of"]) == 4 and set(d["mosaic_of"]) <= names
        assert d["image"].shape == (3, size, size)
        masks = d["instances"].gt_masks.tensor
        assert masks.shape[1:] == (size, size) and masks.flatten(1).any(1).all()
        if len(masks):  # cells are brighter than the background
            assert d["image"][0][masks.any(0)].mean() > d["image"][0][~masks.any(0)].mean()
    off = tiny_cfg(**{"DATALOADER.NUM_WORKERS": 0})
    sample = next(iter(build_resumable_train_loader(off, IAUNetDatasetMapper(off, True))))[0]
    assert "mosaic_of" not in sample
    bad = tiny_cfg(**{"INPUT.MOSAIC": -0.5, "DATALOADER.NUM_WORKERS": 0})
    with pytest.raises(ValueError, match="INPUT.MOSAIC"):  # not silently "off"
        build_resumable_train_loader(bad, IAUNetDatasetMapper(bad, True))


def test_copy_paste_covers_objects_below_and_keeps_whole_outlines():
    """Pasted objects bring their pixels; the target's objects lose what they cover (one drops
    below the minimum area) and keep their whole outlines; boxes follow the visible parts."""
    target = _part(10, [(0, 0, 4, 4), (5, 5, 6, 6)], name="t")
    source = _part(50, [(2, 2, 6, 6), (6, 0, 8, 2)], name="s")
    for d in (target, source):  # whole outlines: the boxes themselves
        d["instances"].gt_amodal_masks = BitMasks(d["instances"].gt_masks.tensor.clone())
    out = paste_objects(target, source, [True, False], min_area=2)
    img = out["image"][0]
    assert img[3, 3] == 50 and img[0, 0] == 10 and img[7, 0] == 10  # the second is not pasted
    inst = out["instances"]
    # target's 4x4 square loses its 2x2 corner; its 1-px object is covered and dropped
    assert inst.gt_classes.tolist() == [10, 50]
    assert inst.gt_masks.tensor.flatten(1).sum(1).tolist() == [12, 16]
    assert inst.gt_amodal_masks.tensor.flatten(1).sum(1).tolist() == [16, 16]
    assert not (inst.gt_masks.tensor & ~inst.gt_amodal_masks.tensor).any()
    assert inst.gt_boxes.tensor.tolist() == [[0, 0, 4, 4], [2, 2, 6, 6]]
    assert out["file_name"] == "t" and out["pasted_from"] == "s"
    nothing = paste_objects(target, source, [False, False])
    assert torch.equal(nothing["image"], target["image"])
    assert torch.equal(nothing["instances"].gt_masks.tensor, target["instances"].gt_masks.tensor)
    with pytest.raises(ValueError, match="s.png"):
        paste_objects(target, _part(1, [], size=(8, 6), name="s.png"), [])
    with pytest.raises(ValueError, match="INPUT.COPY_PASTE"):
        MixingMapper(lambda d: d, [], 0.0, copy_paste=2.0)


def test_a_pasted_object_brings_what_hides_it():
    """Object 0 is hidden in part by 1, which is hidden in part by 2 (a stack); 3 stands alone.
    Picking 0 picks the whole stack, so that 0's hidden part lies under its occluders in the new
    crop as well; picking 2 (on top) or 3 picks only itself. Without whole outlines, nothing
    hides anything."""
    sample = _part(10, [(0, 0, 4, 4), (2, 2, 6, 6), (4, 4, 8, 8), (0, 6, 2, 8)])
    inst = sample["instances"]
    whole = inst.gt_masks.tensor.clone()
    visible = whole.clone()
    visible[0] &= ~whole[1]
    visible[1] &= ~whole[2]
    inst.gt_amodal_masks, inst.gt_masks = BitMasks(whole), BitMasks(visible)
    assert with_occluders(inst, [True, False, False, False]).tolist() == [True, True, True, False]
    assert with_occluders(inst, [False, False, True, True]).tolist() == [False, False, True, True]
    assert with_occluders(inst, [False, True, False, False]).tolist() == [False, True, True, False]
    out = paste_objects(_part(50, []), sample, with_occluders(inst, [True, False, False, False]))
    assert torch.equal(out["instances"].gt_masks.tensor, visible[:3])
    del inst._fields["gt_amodal_masks"]
    assert with_occluders(inst, [True, False, False, False]).tolist() == [True, False, False, False]


@pytest.mark.usefixtures("one_thread")
def test_training_loader_pastes_objects():
    """INPUT.COPY_PASTE 1 through the real loader: every sample names the training image its
    pasted objects come from, and its masks are non-empty and lie on bright cells."""
    cfg = tiny_cfg(**{"INPUT.COPY_PASTE": 1.0, "DATALOADER.NUM_WORKERS": 0})
    names = {d["file_name"] for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])}
    np.random.seed(0)
    batch = next(iter(build_resumable_train_loader(cfg, IAUNetDatasetMapper(cfg, is_train=True))))
    for d in batch:
        assert d["pasted_from"] in names and "mosaic_of" not in d
        masks = d["instances"].gt_masks.tensor
        assert len(masks) and masks.flatten(1).any(1).all()
        assert d["image"][0][masks.any(0)].mean() > d["image"][0][~masks.any(0)].mean()
