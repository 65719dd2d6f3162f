"""Datasets from folders (``folder:PATH``, ``coco:JSON``): readers, layouts, hold-out, errors."""

import json
import logging
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import roifile
import tifffile
from detectron2.data import DatasetCatalog, MetadataCatalog
from own_images import label_image, masks_pages, scene, write_folder
from pycocotools.coco import COCO

from iaunet.data.annotations_io import DatasetError, read_label_file, read_roi_file
from iaunet.data.datasets.folder import (
    hold_out_validation,
    holdout_files,
    parse_name,
    register_path_datasets,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IAUNET_DATASET_CACHE", str(tmp_path / "cache"))


def load(name):
    register_path_datasets([name])
    return DatasetCatalog.get(name)


def decoded(d):
    return [mask_util.decode(a["segmentation"]).astype(bool) for a in d["annotations"]]


def same_masks(got, want):
    """Masks equal up to order."""
    key = lambda m: tuple(np.argwhere(m)[0]) + (int(m.sum()),)  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    return len(got) == len(want) and all((g == w).all() for g, w in zip(got, want))


@pytest.mark.parametrize("kind", ["labels", "masks", "rois", "subfolders", "coco"])
def test_every_format_gives_the_drawn_objects(tmp_path, kind):
    """Label TIFFs and label PNGs give the flattened objects; the masks TIFF, ROI sets and COCO
    RLE keep the overlapping pair whole. ROIs (pixel corners) rasterize to exactly the pixels whose
    centres are inside, as Fiji does."""
    root = str(tmp_path / kind)
    expected = write_folder(root, kind, seeds=[1, 2, 3])
    dicts = load(f"folder:{root}")
    assert [os.path.basename(d["file_name"]) for d in dicts] == [
        "img00.tif",
        "img01.tif",
        "img02.tif",
    ]
    for d, want in zip(dicts, expected):
        assert (d["height"], d["width"]) == (96, 96)
        assert same_masks(decoded(d), want), d["file_name"]
        for a, m in zip(d["annotations"], decoded(d)):  # boxes are the masks' (XYWH)
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
    if kind in ("masks", "rois", "coco"):
        a, b = expected[0][-2:]
        assert (a & b).any()  # the overlap is there, in two instances


def test_masks_tiff_pages_and_fiji_rectangles(tmp_path):
    _, _, masks = scene(5)
    pages = masks_pages(masks)
    assert len(pages) == 2  # the overlapping pair needs a second page
    tifffile.imwrite(tmp_path / "m.tif", pages)
    assert same_masks(
        [
            mask_util.decode(i["segmentation"]).astype(bool)
            for i in read_label_file(str(tmp_path / "m.tif"), (96, 96))
        ],
        masks,
    )
    # A Fiji rectangle at x=2, y=3, 5 x 6 px covers pixels x 2..6, y 3..8; a composite ROI with a
    # hole keeps the hole; a line ROI has no area and is skipped.
    rect = roifile.ImagejRoi.frompoints(np.array([[2, 3], [7, 3], [7, 9], [2, 9]]), name="rect")
    ring = roifile.ImagejRoi()
    ring.roitype, ring.name = roifile.ROI_TYPE.RECT, "ring"
    ring.left, ring.top, ring.right, ring.bottom = 10, 10, 20, 20
    ring.multi_coordinates = np.array(
        [
            0,
            10,
            10,
            1,
            20,
            10,
            1,
            20,
            20,
            1,
            10,
            20,
            4,
            0,
            13,
            13,
            1,
            17,
            13,
            1,
            17,
            17,
            1,
            13,
            17,
            4,
        ],
        np.float32,
    )
    ring.shape_roi_size = len(ring.multi_coordinates)
    line = roifile.ImagejRoi.frompoints(np.array([[0, 0], [5, 5]]), name="line")
    line.roitype = roifile.ROI_TYPE.LINE
    roifile.roiwrite(tmp_path / "r.zip", [rect, ring, line], mode="w")
    got = [
        mask_util.decode(i["segmentation"])
        for i in read_roi_file(str(tmp_path / "r.zip"), (32, 32))
    ]
    want_rect = np.zeros((32, 32), np.uint8)
    want_rect[3:9, 2:7] = 1
    want_ring = np.zeros((32, 32), np.uint8)
    want_ring[10:20, 10:20] = 1
    want_ring[13:17, 13:17] = 0
    assert len(got) == 2 and (got[0] == want_rect).all() and (got[1] == want_ring).all()


def test_hold_out_is_fixed_and_named(tmp_path, caplog):
    root = str(tmp_path / "cells")
    write_folder(root, "labels", seeds=range(7))
    train, test = hold_out_validation([f"folder:{root}", "synthetic_cells_train"], [])
    assert train == (f"folder:{root}#train", "synthetic_cells_train")
    assert test == (f"folder:{root}#val",)
    assert hold_out_validation(["folder:x"], ["folder:y"]) == (("folder:x",), ("folder:y",))
    with caplog.at_level(logging.INFO, logger="iaunet"):
        val, tr = load(test[0]), load(train[0])
    names = sorted(os.path.basename(d["file_name"]) for d in val)
    assert len(val) == 1 and len(tr) == 6  # round(0.2 x 7) = 1
    assert not {d["file_name"] for d in val} & {d["file_name"] for d in tr}
    assert f"held out for validation (1 images): {names[0]}" in caplog.text
    files = [f"{root}/img{k:02d}.tif" for k in range(7)]
    assert holdout_files(files, root) == holdout_files(files[::-1], root)  # not listing order
    # COCOEvaluator's ground truth: only the held-out images, with their objects.
    gt = COCO(MetadataCatalog.get(test[0]).json_file)
    assert [img["file_name"] for img in gt.dataset["images"]] == names
    assert len(gt.dataset["annotations"]) == len(val[0]["annotations"])


def test_coco_json_by_name_and_split(tmp_path):
    root = str(tmp_path / "coco")
    write_folder(root, "coco", seeds=range(5))
    json_file = os.path.join(root, "annotations.json")
    dicts = load(f"coco:{json_file}")
    assert len(dicts) == 5 and MetadataCatalog.get(f"coco:{json_file}").thing_classes == ["object"]
    images_elsewhere = load(f"coco:{json_file}@{root}#val")
    assert len(images_elsewhere) == 1
    assert parse_name(f"coco:{json_file}@{root}#train").images == root


def _bad(tmp_path, case):
    """A folder with one problem; returns (folder, the file the message must name)."""
    root = tmp_path / case
    write_folder(str(root), "labels", seeds=[1, 2])
    lab = root / "img00_labels.tif"
    if case == "no_annotation":
        lab.unlink()
        return root, root / "img00.tif"
    if case == "other_size":
        tifffile.imwrite(lab, np.ones((50, 60), np.uint16))
    elif case == "beyond_uint16":
        tifffile.imwrite(lab, np.full((96, 96), 70000, np.int32))
    elif case == "negative":
        tifffile.imwrite(lab, np.full((96, 96), -1, np.int16))
    elif case == "fractional":
        tifffile.imwrite(lab, np.full((96, 96), 0.37, np.float32))
    elif case == "unreadable":
        lab.write_bytes(b"not a tiff at all")
    elif case == "colour":
        lab.unlink()
        lab = root / "img00_labels.png"
        cv2.imwrite(str(lab), np.ones((96, 96, 3), np.uint8))
    elif case == "two_annotations":
        (root / "img00_rois.zip").write_bytes(b"")
        return root, root / "img00.tif"
    elif case == "unreadable_image":
        (root / "img00.tif").write_bytes(b"garbage")
        return root, root / "img00.tif"
    return root, lab


CASES = {
    "no_annotation": "image without annotation; expected img00_labels.tif|.png",
    "other_size": "labels of size 50x60 (HxW) but the image is 96x96",
    "beyond_uint16": "ids up to 70000 exceed 65535",
    "negative": "negative ids (min -1)",
    "fractional": "float label image with fractional values (e.g. 0.37",
    "unreadable": "cannot read the label image",
    "colour": "colour image of shape (96, 96, 3)",
    "two_annotations": "several annotations",
    "unreadable_image": "cannot read image",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_inputs_name_the_file(tmp_path, case):
    root, culprit = _bad(tmp_path, case)
    with pytest.raises(DatasetError) as e:
        load(f"folder:{root}")
    message = str(e.value)
    assert "\n" not in message and str(culprit) in message and CASES[case] in message, message


def test_empty_annotations_warn_and_other_errors(tmp_path, caplog):
    root = tmp_path / "cells"
    write_folder(str(root), "labels", seeds=[1, 2])
    tifffile.imwrite(root / "img00_labels.tif", np.zeros((96, 96), np.uint16))
    with caplog.at_level(logging.WARNING, logger="iaunet"):
        dicts = load(f"folder:{root}")
    assert [len(d["annotations"]) for d in dicts] == [0, 6]
    assert f"{root / 'img00_labels.tif'}: no objects" in caplog.text
    tifffile.imwrite(root / "img01_labels.tif", np.zeros((96, 96), np.uint16))
    with pytest.raises(DatasetError, match="no objects in any of its 2 annotation files"):
        load(f"folder:{root}#train")
    with pytest.raises(DatasetError, match="does not exist"):
        load(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(DatasetError, match="must be one of"):
        load(f"folder:{root}#test")
    one = tmp_path / "one"
    write_folder(str(one), "labels", seeds=[1])
    with pytest.raises(DatasetError, match="too few to hold one out"):
        load(f"folder:{one}#val")
    with pytest.raises(DatasetError, match=f"is a path: name it folder:{one}"):
        register_path_datasets([str(one)])
    (tmp_path / "js").mkdir()
    for name in ("a.json", "b.json"):
        (tmp_path / "js" / name).write_text(json.dumps({}))
    with pytest.raises(DatasetError, match="several COCO json files"):
        load(f"folder:{tmp_path / 'js'}")


def test_folder_is_read_once_and_reread_when_it_changes(tmp_path):
    root = tmp_path / "cells"
    write_folder(str(root), "labels", seeds=[1, 2])
    load(f"folder:{root}")
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == 1
    lab = label_image(scene(9)[2])
    tifffile.imwrite(root / "img01_labels.tif", lab)
    dicts = DatasetCatalog.get(f"folder:{root}")
    assert len(os.listdir(tmp_path / "cache")) == 2
    assert len(dicts[1]["annotations"]) == len(np.unique(lab)) - 1


def test_lzw_tiffs_written_by_opencv(tmp_path):
    """OpenCV (and many microscopes) write LZW TIFFs, which tifffile decodes only with the
    optional imagecodecs package: images and labels still load."""
    image, _, masks = scene(3)
    root = tmp_path / "lzw"
    root.mkdir()
    cv2.imwrite(str(root / "a.tif"), image)
    cv2.imwrite(str(root / "a_labels.tif"), label_image(masks))
    (d,) = load(f"folder:{root}")
    assert (d["height"], d["width"]) == (96, 96) and len(d["annotations"]) == len(masks)
