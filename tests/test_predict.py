"""IAUNetPredictor (whole image, tiled stitching) and the ``iaunet.predict`` CLI."""

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import roifile
import tifffile
import torch
from conftest import ROOT, tiny_cfg
from detectron2.structures import Instances
from pycocotools.coco import COCO

from iaunet.checkpoint import AtomicCheckpointer
from iaunet.config import ConfigError
from iaunet.inference import IAUNetPredictor, MaskCrops
from iaunet.inference.tiling import (
    Detection,
    stitch_detections,
    tile_starts,
)
from iaunet.outputs import label_image
from iaunet.predict import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised tiny model saved as training saves it (weights + config, with the
    training scale recorded: INPUT.PIXEL_SCALE 1). Its scores are ~1/(K+1), so no threshold.
    Returns (config yaml, checkpoint)."""
    from detectron2.modeling import build_model

    d = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_cfg(**{"MODEL.IAUNET.TEST.SCORE_THRESH": 0.0, "INPUT.PIXEL_SCALE": 1.0})
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), str(d), config=cfg).save("model")
    (d / "config.yaml").write_text(cfg.dump())
    return str(d / "config.yaml"), str(d / "model.pth")


@pytest.fixture(scope="module")
def predictor(checkpoint):
    """The checkpoint's model at scale 0.5 with 32 px tiles, to keep the CPU tests fast: images
    up to 64 px are predicted whole, larger ones tiled."""
    return IAUNetPredictor.from_checkpoint(
        checkpoint[1], opts=["INPUT.IMAGE_SIZE", 32, "INPUT.PIXEL_SCALE", 0.5]
    )


def _write_inputs(d) -> dict:
    """Good images (name -> (H, W)) and bad files in folder ``d``."""
    rng = np.random.default_rng(0)
    tifffile.imwrite(d / "a16.tif", rng.integers(0, 4000, (40, 48), dtype=np.uint16))
    cv2.imwrite(str(d / "rgb.png"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    cv2.imwrite(str(d / "gray.png"), rng.integers(0, 255, (24, 36), dtype=np.uint8))
    cv2.imwrite(str(d / "wide.png"), rng.integers(0, 255, (200, 300), dtype=np.uint8))
    (d / "empty.png").write_bytes(b"")
    (d / "notes.tif").write_text("not an image")
    png = (d / "rgb.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    tifffile.imwrite(d / "stack.tif", rng.integers(0, 255, (5, 16, 16), dtype=np.uint8))
    (d / "readme.txt").write_text("ignored: not an image extension")
    return {"a16": (40, 48), "rgb": (32, 32), "gray": (24, 36), "wide": (200, 300)}


def test_cli_end_to_end(checkpoint, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    good = _write_inputs(inp)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iaunet.predict",  # no --config-file: the config saved in the checkpoint
            "--weights",
            checkpoint[1],
            "--input",
            str(inp),
            "--output",
            str(out),
            "--score-threshold",
            "0",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert "Traceback" not in log
    failures = [line for line in log.splitlines() if "failed: " in line]
    for bad in ("empty.png", "notes.tif", "truncated.png"):
        assert any(bad in line for line in failures), log
    assert "5 images processed, 3 failed" in log
    # a (5, 16, 16) TIFF is a z-stack: every plane predicted, ids per plane without --stitch-3d
    assert "stack.tif: 5 z planes" in log and "with ids per plane" in log
    assert tifffile.imread(out / "stack_labels.tif").shape == (5, 16, 16)

    for stem, (h, w) in good.items():
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        assert labels.shape == (h, w) and labels.dtype == np.uint16
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert overlay is not None and overlay.shape == (h, w, 3)
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries

    gt = COCO(str(out / "images.json"))
    dt = gt.loadRes(str(out / "predictions.json"))
    images = [img for img in gt.dataset["images"] if "axis" not in img]  # stacks: no COCO results
    by_name = {os.path.basename(img["file_name"]): img for img in images}
    assert sorted(by_name) == sorted(f"{s}.{'tif' if s == 'a16' else 'png'}" for s in good)
    for img in images:
        anns = dt.loadAnns(dt.getAnnIds(imgIds=[img["id"]]))
        assert anns, img
        labels = tifffile.imread(out / img["labels"])
        assert labels.max() <= len(anns)
        for a in anns:
            assert a["category_id"] == 1 and 0 <= a["score"] <= 1 and len(a["bbox"]) == 4
            assert list(a["segmentation"]["size"]) == [img["height"], img["width"]]
            assert isinstance(a["segmentation"]["counts"], str)
        _check_overlap_outputs(out, img, anns)
    run_table = list(csv.DictReader(open(out / "objects.csv")))
    assert len(run_table) == len(dt.dataset["annotations"])
    assert {r["image"] for r in run_table} == {str(inp / n) for n in by_name}


def test_default_score_threshold_is_the_models(checkpoint, tmp_path):
    """Without --score-threshold the model's MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH decides what is
    kept (tuned after training, saved in the checkpoint); --score-threshold overrides it."""
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(1)
    cv2.imwrite(str(inp / "gray.png"), rng.integers(0, 255, (24, 36), dtype=np.uint8))

    def rows(name, *extra):
        out = tmp_path / name
        args = ["--weights", checkpoint[1], "--input", str(inp), "--output", str(out)]
        assert main([*args, "--save", "csv", "--device", "cpu", *extra]) == 0
        return len(list(csv.DictReader(open(out / "objects.csv"))))

    kept = rows("all", "--opts", "MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH", "0.0")
    assert kept > 0  # the random model's scores are ~1/(K+1)
    assert rows("none", "--opts", "MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH", "0.99") == 0
    args = ("--score-threshold", "0", "--opts", "MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH", "0.99")
    assert rows("flag", *args) == kept


def _check_overlap_outputs(out, img, anns):
    """ROI set, mask pages and table of one image against its COCO results (the full masks)."""
    from iaunet.outputs.rois import roi_mask

    full = [mask_util.decode(a["segmentation"]).astype(bool) for a in anns]
    shape = (img["height"], img["width"])
    rois = roifile.roiread(str(out / img["rois"]))
    assert len(rois) == len([m for m in full if m.any()])  # overlapping instances: separate ROIs
    for roi in rois:
        k = int(roi.name.split("_")[0])
        mask = full[k - 1]
        inter = (roi_mask(roi, shape) & mask).sum()
        assert inter / (roi_mask(roi, shape) | mask).sum() >= 0.98
    pages = tifffile.imread(out / img["masks"]).reshape(-1, *shape)
    assert pages.dtype == np.uint16
    for k, mask in enumerate(full, start=1):
        on = [p for p in pages if (p == k).any()]
        assert len(on) <= 1 and (not mask.any() or ((on[0] == k) == mask).all())
    rows = list(csv.DictReader(open(out / img["objects"])))
    assert [int(r["id"]) for r in rows] == list(range(1, len(anns) + 1))
    assert [int(r["area"]) for r in rows] == [int(m.sum()) for m in full]


def test_cli_tiled(checkpoint, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    cv2.imwrite(
        str(inp / "big.png"), np.random.default_rng(1).integers(0, 255, (90, 64), dtype=np.uint8)
    )
    code = main(
        [
            "--config-file",
            checkpoint[0],
            "--weights",
            checkpoint[1],
            "--input",
            str(inp / "*.png"),
            "--output",
            str(out),
            "--score-threshold",
            "0",
            "--tile",
            "64",
            "--tile-overlap",
            "16",
            "--save",
            "labels,rois",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert tifffile.imread(out / "big_labels.tif").shape == (90, 64)
    assert sorted(p.name for p in out.iterdir()) == ["big_labels.tif", "big_rois.zip"]
    assert "1 images processed, 0 failed" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no_match", "missing_weights", "unknown_opt", "bad_save"])
def test_cli_usage_errors(checkpoint, tmp_path, capsys, case):
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((8, 8), np.uint8))
    args = {
        "--config-file": checkpoint[0],
        "--weights": checkpoint[1],
        "--input": str(tmp_path / "*.png"),
        "--output": str(tmp_path / "out"),
    }
    opts, expected = (
        [],
        {
            "no_match": "no image files matched",
            "missing_weights": "weights file not found",
            "unknown_opt": "MODEL.NOT_A_KEY",
            "bad_save": "unknown output xml",
        }[case],
    )
    if case == "no_match":
        args["--input"] = str(tmp_path / "*.tif")
    elif case == "missing_weights":
        args["--weights"] = str(tmp_path / "nope.pth")
    elif case == "bad_save":
        args["--save"] = "labels,xml"
    else:
        opts = ["--opts", "MODEL.NOT_A_KEY", "1"]
    assert main([x for kv in args.items() for x in kv] + opts) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize(
    "image",
    [
        np.full((37, 53), 200, np.uint8),
        np.arange(37 * 53, dtype=np.uint16).reshape(37, 53),
        np.random.default_rng(0).random((37, 53, 3), dtype=np.float32),
        np.random.default_rng(0).integers(0, 255, (37, 53, 4), dtype=np.uint8),
        np.zeros((37, 53, 1), np.uint16),
    ],
    ids=["uint8_gray", "uint16_gray", "float32_rgb", "uint8_rgba", "uint16_hw1"],
)
def test_predictor_shapes(predictor, image):
    inst = predictor(image)
    n = len(inst)
    assert inst.image_size == (37, 53) and n > 0
    assert inst.pred_masks.shape == (n, 37, 53) and inst.pred_masks.dtype == torch.bool
    assert (
        inst.scores.shape == (n,)
        and inst.pred_classes.shape == (n,)
        and inst.pred_boxes.tensor.shape == (n, 4)
    )
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])


def test_predictor_tiles_large_images_at_the_training_scale(predictor, monkeypatch):
    """At scale 0.5 a 90x70 image is 45x35 model px: larger than a 32 px tile, so it is tiled with
    64 px tiles of the image (32 model px); a 60x40 image (30x20 model px) is predicted whole."""
    image = np.random.default_rng(0).integers(0, 60000, (90, 70), dtype=np.uint16)
    inst = predictor.predict(image, full_masks=False)
    assert inst.image_size == (90, 70) and isinstance(inst.pred_masks, MaskCrops)
    assert inst.pred_masks.to_bitmasks().shape == (len(inst), 90, 70)
    calls, forwards = [], []
    real = predictor._run_model_batch

    def spy(images, out_sizes, scale=None):
        calls.extend((img.shape[:2], scale) for img in images)
        forwards.append(len(images))
        return real(images, out_sizes, scale)

    monkeypatch.setattr(predictor, "_run_model_batch", spy)
    assert predictor(image).pred_masks.shape[1:] == (90, 70)
    assert len(calls) == 4 and all(max(shape) <= 64 and s == 0.5 for shape, s in calls), calls
    assert forwards == [4]  # TEST.TILE_BATCH tiles per forward call
    calls.clear()
    assert predictor(image[:60, :40]).image_size == (60, 40)
    assert calls == [((60, 40), None)]  # whole image, at the predictor's scale


def test_scale_from_checkpoint_flags_and_legacy(checkpoint, tmp_path, caplog):
    """The recorded INPUT.PIXEL_SCALE is applied; --scale / --diameter override it; a checkpoint
    without a recorded scale warns and names the flags; one without a config needs --config-file."""
    p = IAUNetPredictor.from_checkpoint(checkpoint[1])
    assert p.scale == 1.0 and p.model_size((300, 200)) == (300, 200)
    assert IAUNetPredictor.from_checkpoint(checkpoint[1], scale=0.25).model_size((400, 80)) == (
        100,
        20,
    )
    with pytest.raises(ValueError, match="records no object diameter"):
        IAUNetPredictor.from_checkpoint(checkpoint[1], diameter=20)
    p = IAUNetPredictor.from_checkpoint(
        checkpoint[1], opts=["INPUT.OBJECT_DIAMETER", 12.0], diameter=24
    )
    assert p.scale == 0.5
    with pytest.raises(ValueError, match="not both"):
        IAUNetPredictor.from_checkpoint(checkpoint[1], scale=0.5, diameter=24)
    legacy = str(tmp_path / "legacy.pth")
    torch.save({"model": torch.load(checkpoint[1], weights_only=False)["model"]}, legacy)
    with pytest.raises(ConfigError, match="legacy.pth holds no config.*--config-file"):
        IAUNetPredictor.from_checkpoint(legacy)
    old_cfg = tmp_path / "old.yaml"
    old_cfg.write_text(tiny_cfg().dump())  # INPUT.PIXEL_SCALE 0: nothing recorded
    with caplog.at_level("WARNING", logger="iaunet"):
        p = IAUNetPredictor.from_checkpoint(legacy, str(old_cfg))
    assert "records no training scale" in caplog.text and "--scale" in caplog.text
    assert p.scale is None and p.model_size((300, 200)) == (64, 43)  # longest side IMAGE_SIZE


def test_tile_starts():
    assert tile_starts(50, 64, 16) == [0]
    for length, tile, overlap in [(300, 128, 32), (1000, 512, 64), (513, 512, 0), (4096, 512, 100)]:
        s = tile_starts(length, tile, overlap)
        assert s[0] == 0 and s[-1] + tile == length
        assert all(
            b - a <= tile - overlap for a, b in zip(s, s[1:])
        )  # neighbours share >= overlap px
        assert len(s) == 1 or (len(s) - 1) * (tile - overlap) < length - overlap  # no spare tile
    with pytest.raises(ValueError):
        tile_starts(100, 32, 32)


# Discs (y, x, r) on a 300 x 260 image cut into 128 px tiles with >= 32 px overlap: tile starts are
# y 0/86/172 and x 0/66/132, so the overlap bands are y 86-128, 172-214 and x 66-128, 132-194.
DISCS = [
    (40, 40, 15),  # inside one tile
    (60, 128, 18),  # across the x=128 tile edge
    (107, 97, 13),  # in the corner where four tiles overlap
    (193, 163, 12),  # in another four-tile corner
    (150, 64, 14),  # across the x=66 edge of the next tile
    (240, 200, 45),  # larger than the overlap: no tile sees it whole
    (285, 20, 14),  # cut by the image border (not a tile edge)
    (10, 250, 9),  # image corner
    (172, 20, 10),  # on a tile start
]


def _disc_image():
    h, w = 300, 260
    image, masks = np.zeros((h, w), np.uint8), []
    for y, x, r in DISCS:
        m = np.zeros((h, w), np.uint8)
        cv2.circle(m, (x, y), r, 1, -1)
        assert not (cv2.dilate(image, np.ones((5, 5), np.uint8)) & m).any(), "discs must not touch"
        image[m > 0] = 255
        masks.append(m.astype(bool))
    return image, masks


def _components(tile: np.ndarray) -> Instances:
    """A deterministic stand-in for the model: each bright connected component of the tile is an
    instance, scores depend on the tile content (so that duplicates of different tiles differ)."""
    n, lab = cv2.connectedComponents((tile[..., 0] > 127).astype(np.uint8))
    inst = Instances(tile.shape[:2])
    inst.pred_masks = torch.from_numpy(
        np.stack([lab == k for k in range(1, n)]).reshape(n - 1, *tile.shape[:2])
    )
    inst.scores = torch.tensor(
        [0.5 + 0.4 * (lab == k).mean() for k in range(1, n)], dtype=torch.float32
    )
    inst.pred_classes = torch.zeros(n - 1, dtype=torch.int64)
    return inst


@pytest.mark.parametrize("full_masks", [True, False])
def test_tiled_stitching_keeps_each_object_once_and_whole(predictor, monkeypatch, full_masks):
    image, gt = _disc_image()
    calls = []
    monkeypatch.setattr(
        predictor,
        "_run_model_batch",
        lambda tiles, out_sizes, scale=None: [
            calls.append(t.shape) or _components(t) for t in tiles
        ],
    )
    for key, value in (("scale", 1.0), ("tile_size", 128), ("tile_overlap", 32)):
        monkeypatch.setattr(predictor, key, value)
    inst = predictor.predict(image, full_masks=full_masks)
    assert len(calls) == 9 and all(s[:2] == (128, 128) for s in calls)  # native tiles, no padding
    masks = inst.pred_masks.numpy() if full_masks else inst.pred_masks.to_bitmasks().numpy()
    assert masks.shape == (len(DISCS), 300, 260)
    for disc, g in zip(DISCS, gt):
        ious = [(g & m).sum() / (g | m).sum() for m in masks]
        assert max(ious) > 0.95, (disc, max(ious))
        assert sum(i > 0 for i in ious) == 1, disc  # exactly one instance covers it
    boxes = inst.pred_boxes.tensor.numpy()
    for m, b in zip(masks, boxes):
        ys, xs = np.nonzero(m)
        assert list(b) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_mask_crops_rle_and_labels():
    h, w = 23, 31
    full = np.zeros((4, h, w), bool)
    full[0, 0:5, 0:4] = True  # image corner
    full[1, 10:23, 25:31] = True  # opposite corner
    full[2, 3:12, 2:20] = True  # overlaps 0 and 3
    full[3, 8:15, 15:28] = True
    crops = MaskCrops.from_bitmasks(torch.from_numpy(full))
    assert (crops.to_bitmasks().numpy() == full).all()
    for rle, m in zip(crops.to_rles(), full):
        assert (
            rle["counts"]
            == mask_util.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
        )
    assert len(crops[torch.tensor([True, False, True, False])]) == 2 and len(crops[1:]) == 3
    labels = label_image(crops, h, w)  # crops in decreasing score order: lower index wins overlaps
    assert (
        labels.dtype == np.uint16
        and labels[4, 3] == 1
        and labels[10, 16] == 3
        and labels[9, 16] == 3
    )
    assert labels[3, 16] == 3 and labels[12, 26] == 2 and labels[14, 20] == 4 and labels[20, 0] == 0
    empty = MaskCrops.from_bitmasks(torch.zeros((1, h, w), dtype=torch.bool))
    assert mask_util.area(empty.to_rles()[0]) == 0


def _det(tile, window, y0, x0, size, score, partial=False, width=None):
    crop = np.ones((size, width or size), bool)
    return Detection(tile, window, y0, x0, crop, score, 0, partial)


def test_stitching_keeps_the_most_confident_whole_view():
    """Of an object's whole views the most confident is kept, wherever it lies in its tile (a
    low-scoring view, later cut by the user's score threshold, must not suppress a confident one);
    a cut view, however confident, gives way to a whole view; distinct objects stay."""
    a, b = (0, 0, 100, 100), (0, 60, 100, 160)  # overlap x in [60, 100)
    # an object whole in both tiles, nearer the centre of a (centroid x 72) where it scores lower
    whole = [_det(0, a, 10, 62, 20, 0.3), _det(1, b, 10, 63, 20, 0.9)]
    # an object across tile a's inner edge (x = 100): cut in a (confident), whole in b
    cut = [_det(0, a, 40, 90, 10, 0.95, partial=True), _det(1, b, 40, 90, 20, 0.6)]
    other = [_det(1, b, 70, 120, 10, 0.7)]
    kept = stitch_detections(whole + cut + other)
    assert sorted((d.tile, d.y0, d.x0, d.score) for d in kept) == [
        (1, 10, 63, 0.9),
        (1, 40, 90, 0.6),
        (1, 70, 120, 0.7),
    ]
    assert [d.crop.shape for d in kept] == [(20, 20), (10, 10), (20, 20)]  # by score, none joined
    # an object larger than the overlap: cut by both tiles, its pieces are joined
    a_piece = _det(0, a, 80, 50, 15, 0.8, partial=True, width=50)  # x 50..100
    b_piece = _det(1, b, 80, 60, 15, 0.7, partial=True, width=60)  # x 60..120
    (joined,) = stitch_detections([a_piece, b_piece])
    assert (joined.x0, joined.box[3], joined.score) == (50, 120, 0.8) and joined.crop.all()


def test_predict_stack_end_to_end(checkpoint, tmp_path, capsys):
    """A z-stack of three identical planes, linked at IoU 0.5: every plane's objects are the same,
    so each object spans the three planes with one id; the label image keeps axes and sizes; the
    table has one row per object. Without linking, ids are per plane."""
    from iaunet.data.datasets.synthetic import render_scene

    image = (render_scene(3, (64, 64))[0] * 255).astype(np.uint8)
    stack = np.stack([image] * 3)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 3.0, "unit": "micron"})  # fmt: skip
    out = tmp_path / "out"
    args = ["--weights", checkpoint[1], "--input", str(path), "--output", str(out)]
    args += ["--score-threshold", "0", "--device", "cpu"]
    assert main(args + ["--stitch-3d", "0.5"]) == 0
    with tifffile.TiffFile(out / "cells_labels.tif") as tif:
        labels = tif.asarray()
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["spacing"] == 3.0
    assert labels.shape == (3, 64, 64)
    np.testing.assert_array_equal(labels[0], labels[2])
    rows = list(csv.DictReader(open(out / "cells_objects.csv")))
    assert rows and len(rows) == len(np.unique(labels)) - 1
    assert all(r["planes"] == "3" and r["z_first"] == "0" and r["z_last"] == "2" for r in rows)
    assert all(
        float(r["volume_um3"]) == pytest.approx(int(r["volume_voxels"]) * 0.75) for r in rows
    )
    for k in range(3):  # the overlap-preserving outputs per plane
        assert (out / f"cells_z{k:03d}_masks.tif").is_file()
        assert (out / f"cells_z{k:03d}_rois.zip").is_file()
    assert not os.path.exists(out / "cells_z000_labels.tif")

    out2 = tmp_path / "out2"
    assert main(args[:5] + [str(out2)] + args[6:]) == 0
    unlinked = tifffile.imread(out2 / "cells_labels.tif")
    ids = [set(np.unique(p)) - {0} for p in unlinked]  # each plane its own objects
    assert all(ids) and not (ids[0] & ids[1] or ids[1] & ids[2] or ids[0] & ids[2])
    assert main(args + ["--stitch-3d", "1.5"]) == 2  # a bad IoU: one line, exit 2
    assert "--stitch-3d is an IoU in (0, 1], got 1.5" in capsys.readouterr().err


def test_predict_planes_batched_equals_one_by_one(predictor):
    """A stack's planes, TEST.TILE_BATCH per forward call, give each plane's own prediction."""
    rng = np.random.default_rng(0)
    planes = [rng.integers(0, 4000, (60, 50), dtype=np.uint16) for _ in range(5)]
    value_range = predictor.value_range(np.concatenate(planes))
    batched = predictor.predict_planes(planes, value_range)
    assert len(batched) == 5
    for plane, got in zip(planes, batched):
        one = predictor.predict(plane, full_masks=False, value_range=value_range)
        assert isinstance(got.pred_masks, MaskCrops) and len(got) == len(one) > 0
        torch.testing.assert_close(got.scores, one.scores, atol=1e-4, rtol=0)
        for (y0, x0, a), (y1, x1, b) in zip(got.pred_masks, one.pred_masks):
            assert (y0, x0) == (y1, x1) and np.array_equal(a, b)


def test_predict_time_lapse_end_to_end(checkpoint, tmp_path, capsys):
    """A TYX time-lapse of a still scene, --link-t 0.5: ids carried from frame to frame (each
    object in every frame), TYX axes and frame interval kept, one table row per object per
    frame."""
    from iaunet.data.datasets.synthetic import render_scene

    image = (render_scene(4, (64, 64))[0] * 255).astype(np.uint8)
    movie = np.stack([image] * 3)
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, movie, imagej=True, metadata={"axes": "TYX", "finterval": 30.0})
    out = tmp_path / "out"
    args = ["--weights", checkpoint[1], "--input", str(path), "--output", str(out)]
    assert main(args + ["--score-threshold", "0", "--device", "cpu", "--link-t", "0.5"]) == 0
    with tifffile.TiffFile(out / "movie_labels.tif") as tif:
        labels = tif.asarray()
        assert tif.series[0].axes == "TYX" and tif.imagej_metadata["finterval"] == 30.0
    rows = list(csv.DictReader(open(out / "movie_objects.csv")))
    assert list(rows[0])[:2] == ["frame", "id"] and {r["frame"] for r in rows} == {"0", "1", "2"}
    frames = [set(np.unique(f)) - {0} for f in labels]
    assert frames[0] and frames[0] == frames[1] == frames[2]  # the same objects, the same ids
    assert len(rows) == sum(len(f) for f in frames)
    assert "3 t planes linked at IoU 0.5" in capsys.readouterr().err


def test_benchmark_stacks_tool(checkpoint, tmp_path):
    """tools/benchmark_stacks.py end to end on two small stacks: IAUNet through iaunet-predict
    --stitch-3d and Cellpose 3 (one epoch) through its stitch_threshold, both scored in 3-D."""
    from conftest import load_tool

    work = tmp_path / "bench"
    argv = ["--weights", checkpoint[1], "--work", str(work), "--scenes", "2", "--planes", "4"]
    argv += ["--span", "2", "3", "--cellpose-cpu-s", "3", "--train-scenes", "2"]
    argv += ["--peer-max-epochs", "1", "--opts", "MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH", "0.1"]
    assert load_tool("benchmark_stacks").main(argv) == 0
    saved = json.loads((work / "results.json").read_text())
    assert saved["planes"] == 4 and set(saved["results"]) == {"IAUNet", "Cellpose 3 (scratch)"}
    for method, r in saved["results"].items():
        assert r["cells"] > 0 and 0 <= r["F1"] <= 100 and 0 <= r["split_percent"] <= 100, method
    assert "--stitch-3d 0.5 --link-gap 1" in saved["results"]["IAUNet"]["command"]
    assert tifffile.imread(work / "predictions" / "stack_001_labels.tif").shape == (4, 128, 128)
