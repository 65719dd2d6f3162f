import cv2
import numpy as np
import pytest
import tifffile
import torch
from conftest import _record, _square, tiny_cfg

from iaunet.data import IAUNetDatasetMapper, ImageReadError, read_image, to_model_range


def _scene(tmp_path, name="scene.png"):
    """A 90x150 gray image with 3 bright rectangles in the upper-left part + matching polygon
    annotations."""
    img = np.zeros((90, 150), np.uint8)
    rects = [(5, 5, 40, 30), (50, 10, 80, 25), (20, 40, 35, 70)]  # x0, y0, x1, y1
    annos = []
    for i, (x0, y0, x1, y1) in enumerate(rects):
        img[y0:y1, x0:x1] = 255
        annos.append(
            {
                "id": i,
                "category_id": 0,
                "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "bbox_mode": 1,
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            }
        )
    path = str(tmp_path / name)
    cv2.imwrite(path, img)
    return {"file_name": path, "height": 90, "width": 150, "image_id": 1, "annotations": annos}


def test_masks_stay_aligned_under_train_augmentations(tmp_path):
    cfg = tiny_cfg(**{"INPUT.IMAGE_SIZE": 96})
    mapper = IAUNetDatasetMapper(cfg, is_train=True)
    d = _scene(tmp_path)
    centers = set()
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(d)
        img = out["image"].numpy()
        assert img.shape == (3, 96, 96)
        inst = out["instances"]
        masks = inst.gt_masks.tensor.numpy()
        assert 1 <= len(masks) <= 3 and masks.shape[1:] == (96, 96)
        bright = img[0] > 200
        union = masks.any(0)
        iou = (bright & union).sum() / (bright | union).sum()
        assert iou > 0.9, f"seed {seed}: image and masks misaligned (IoU {iou:.2f})"
        for m in masks:
            assert img[0][m].mean() > 150  # every mask lies on a bright rectangle
        ys, xs = np.nonzero(union)
        centers.add((ys.mean() > 48, xs.mean() > 48))
        assert inst.gt_boxes.tensor.shape == (len(masks), 4)
    assert len(centers) >= 3  # flips moved the pattern to other quadrants


def test_crop_drops_emptied_instances(tmp_path):
    cfg = tiny_cfg(**{"INPUT.IMAGE_SIZE": 32, "INPUT.SCALE_RANGE": (1.5, 1.5), "INPUT.FLIPS": []})
    mapper = IAUNetDatasetMapper(cfg, is_train=True)
    counts = {len(mapper(_scene(tmp_path))["instances"]) for _ in range(10)}
    assert min(counts) < 3  # a 32px crop of a 48x80 resize cannot hold all three rectangles


def test_objects_outside_the_crop_are_skipped_without_changing_the_targets(tmp_path, monkeypatch):
    """The mapper warps only the masks of objects whose transformed box meets the crop (free
    rotations included): the same image and targets as warping every mask and dropping the empty
    ones, and objects the crop misses are never warped."""
    from detectron2.data import detection_utils

    from iaunet.data import dataset_mapper as dm

    cfg = tiny_cfg(**{"INPUT.IMAGE_SIZE": 32, "INPUT.SCALE_RANGE": (4.0, 4.0), "INPUT.ROTATE": 1.0})
    mapper = IAUNetDatasetMapper(cfg, is_train=True)
    d = _scene(tmp_path)
    warped = []
    transform = detection_utils.transform_instance_annotations
    monkeypatch.setattr(
        dm.utils,
        "transform_instance_annotations",
        lambda a, *r: warped.append(a) or transform(a, *r),
    )

    def mapped(seed):
        np.random.seed(seed)
        return mapper(d)

    skipped = 0
    for seed in range(8):
        warped.clear()
        fast = mapped(seed)
        skipped += 3 - len(warped)
        with monkeypatch.context() as m:
            m.setattr(dm, "_box_meets", lambda *a: True)
            every = mapped(seed)
        assert torch.equal(fast["image"], every["image"])
        assert torch.equal(fast["instances"].gt_masks.tensor, every["instances"].gt_masks.tensor)
        assert torch.equal(fast["instances"].gt_boxes.tensor, every["instances"].gt_boxes.tensor)
    assert skipped > 0  # 32-px crops of a 128x77 scene miss some of its three objects


def test_test_mapper_resizes_longest_side_and_drops_annotations(tmp_path):
    cfg = tiny_cfg(**{"INPUT.IMAGE_SIZE": 64})
    out = IAUNetDatasetMapper(cfg, is_train=False)(_scene(tmp_path))
    assert out["image"].shape == (3, 38, 64) and "instances" not in out
    assert (out["height"], out["width"]) == (90, 150)


def test_16bit_and_gray_reading(tmp_path):
    img16 = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 20 + 1000
    tifffile.imwrite(tmp_path / "a.tif", img16)
    cv2.imwrite(str(tmp_path / "b.png"), img16)  # 16-bit PNG
    for name in ("a.tif", "b.png"):
        raw = read_image(str(tmp_path / name))
        assert raw.dtype == np.uint16 and raw.shape == (40, 50)
        x = to_model_range(raw, "percentile", (0, 100))
        assert x.shape == (40, 50, 3) and x.dtype == np.float32
        assert x.min() == 0 and x.max() == 255 and (x[..., 0] == x[..., 2]).all()
        y = to_model_range(raw, "dtype")
        assert y.max() == pytest.approx(img16.max() / 65535 * 255, rel=1e-5)
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB order
    cv2.imwrite(str(tmp_path / "c.png"), rgb[..., ::-1])
    assert (read_image(str(tmp_path / "c.png"))[..., 0] == 200).all()
    assert to_model_range(np.full((4, 4), 7, np.uint8)).max() == 7  # 8-bit kept as is


def test_unreadable_image_names_the_file(tmp_path):
    cfg = tiny_cfg()
    mapper = IAUNetDatasetMapper(cfg, is_train=True)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    d = {"file_name": str(bad), "height": 10, "width": 10, "annotations": []}
    with pytest.raises(ImageReadError, match="broken.png"):
        mapper(d)
    with pytest.raises(ImageReadError, match="missing.tif"):
        mapper(dict(d, file_name=str(tmp_path / "missing.tif")))
    d2 = _scene(tmp_path)
    with pytest.raises(ValueError, match="scene.png.*90x150.*annotation says 91x150"):
        mapper(dict(d2, height=91))
    with pytest.raises(ImageReadError, match="NaN"):
        to_model_range(np.array([[np.nan, 1.0]], np.float32), name="f.tif")


# Unusual image sizes and polygons (rows of docs/robustness.md); `mappers` and `model` are the
# module-scoped tiny_cfg() fixtures of conftest.py.


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("h,w", [(1, 1), (10, 12)], ids=["1x1", "smaller_than_crop"])
def test_tiny_images_are_padded_to_the_crop(tmp_path, mappers, h, w):
    cv2.imwrite(str(tmp_path / "tiny.png"), np.full((h, w), 90, np.uint8))
    train = mappers[0](_record(tmp_path / "tiny.png", h, w, [_square(0, 0, max(w, h))]))
    assert train["image"].shape == (3, 64, 64) and len(train["instances"]) == 1
    test = mappers[1](_record(tmp_path / "tiny.png", h, w))
    assert max(test["image"].shape[1:]) == 64


@pytest.mark.usefixtures("one_thread")
def test_elongated_images_keep_at_least_one_pixel(tmp_path, mappers, model):
    """8 x 2000 at IMAGE_SIZE 64: the short side rounds to 0.26 px; it used to crash inside
    interpolate."""
    for h, w in [(8, 2000), (2000, 8)]:
        path = tmp_path / f"long_{h}x{w}.png"
        cv2.imwrite(str(path), np.full((h, w), 120, np.uint8))
        strip = [0, 0, 500, 0, 500, 8, 0, 8] if h < w else [0, 0, 8, 0, 8, 500, 0, 500]
        train = mappers[0](_record(path, h, w, [strip]))
        assert train["image"].shape == (3, 64, 64) and len(train["instances"]) == 1
        test = mappers[1](_record(path, h, w))
        assert test["image"].shape[1:] == ((1, 64) if h < w else (64, 1))
        model.eval()
        with torch.no_grad():
            result = model([test])[0]["instances"]
        assert result.image_size == (h, w)


@pytest.mark.usefixtures("one_thread")
def test_bad_polygons_in_the_mapper(tmp_path, mappers):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((32, 32), np.uint8))
    out_of_bounds = [-10, -10, 100, -10, 100, 12, -10, 12]  # clipped to the image
    bowtie = [2, 2, 20, 20, 20, 2, 2, 20]  # self-intersecting: rasterized as drawn (two triangles)
    mapper = IAUNetDatasetMapper(
        tiny_cfg(
            **{
                "INPUT.IMAGE_SIZE": 32,
                "INPUT.SCALE_RANGE": (1.0, 1.0),
                "INPUT.FLIPS": [],
                "INPUT.ROTATE90": 0.0,
            }
        ),
        is_train=True,
    )
    inst = mapper(_record(tmp_path / "a.png", 32, 32, [out_of_bounds, bowtie]))["instances"]
    masks = inst.gt_masks.tensor
    assert len(inst) == 2 and masks[0, :12].all() and not masks[0, 13:].any()
    assert masks[1, 10, 4] and masks[1, 10, 17]  # left and right triangles
    assert not masks[1, 4, 10] and not masks[1, 16, 10]  # nothing above or below the crossing
