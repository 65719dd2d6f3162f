"""Z-stacks and time-lapses (iaunet.outputs.stacks, iaunet.predict_stack, lazy_image.open_stack):
the linker (continue, split, merge, gap, one-to-one), the stack's label image, table and TIFF axes,
reading stacks. iaunet-predict on a stack: tests/test_predict.py."""

import numpy as np
import pytest
import tifffile

from iaunet.data.image_io import ImageReadError
from iaunet.data.lazy_image import open_stack
from iaunet.outputs.stacks import (
    StackInfo,
    link_planes,
    plane_ids,
    stack_labels,
    stack_rows,
    stack_tiff_bytes,
)
from iaunet.structures import MaskCrops

H = W = 40


def rect(y0, x0, y1, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def plane(*masks) -> MaskCrops:
    return MaskCrops.from_bitmasks(np.stack(masks) if masks else np.zeros((0, H, W), bool))


def test_an_object_through_planes_keeps_one_id():
    a, b = rect(2, 2, 12, 12), rect(20, 20, 30, 34)
    planes = [plane(a), plane(b, rect(3, 2, 12, 13)), plane(rect(20, 21, 30, 34))]
    ids = link_planes(planes, 0.5)
    assert [i.tolist() for i in ids] == [[1], [2, 1], [2]]  # b starts object 2 in plane 1


def test_split_merge_and_one_to_one():
    whole = rect(0, 0, 10, 20)
    left, right = rect(0, 0, 10, 12), rect(0, 12, 10, 20)  # IoU 0.6 and 0.4 with the whole
    ids = link_planes([plane(whole), plane(left, right)], 0.5)
    assert ids[1].tolist() == [1, 2]  # the larger half keeps the id, the other starts an object
    # Two halves both above the threshold against one object: only one takes its id (a greedy
    # best-overlap linker would give both the same id).
    ids = link_planes([plane(whole), plane(left, right)], 0.3)
    assert sorted(ids[1].tolist()) == [1, 2]
    # A merge: two objects, then one mask over both; it continues the one it overlaps most.
    ids = link_planes([plane(left, right), plane(whole)], 0.3)
    assert ids[1].tolist() == [1]


def test_gap():
    a = rect(5, 5, 15, 15)
    planes = [plane(a), plane(), plane(a)]
    assert [i.tolist() for i in link_planes(planes, 0.5)] == [[1], [], [2]]
    assert [i.tolist() for i in link_planes(planes, 0.5, gap=1)] == [[1], [], [1]]
    assert [i.tolist() for i in plane_ids(planes)] == [[1], [], [2]]
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="IoU must be in"):
            link_planes(planes, bad)
    with pytest.raises(ValueError, match="gap"):
        link_planes(planes, 0.5, gap=-1)


def test_stack_labels_rows_and_tiff():
    a, b = rect(2, 2, 12, 12), rect(20, 20, 30, 30)
    planes = [plane(a, b), plane(a), plane(a), plane()]
    ids = link_planes(planes, 0.5)
    labels = stack_labels(planes, ids)
    assert labels.shape == (4, H, W) and labels.dtype == np.uint16
    assert set(np.unique(labels[1])) == {0, 1} and not labels[3].any()
    scores = [np.array([0.9, 0.8]), np.array([0.7]), np.array([0.8]), np.array([])]
    names = [["cell", "cell"], ["cell"], ["cell"], []]
    info = StackInfo("z", voxel_size=(2.0, 0.5, 0.5), unit="µm")
    rows = {r["id"]: r for r in stack_rows(labels, scores, ids, names, info)}
    assert rows[1]["planes"] == 3 and (rows[1]["z_first"], rows[1]["z_last"]) == (0, 2)
    assert rows[1]["volume_voxels"] == 300 and rows[1]["volume_um3"] == 300 * 0.5
    assert rows[1]["score"] == 0.8 and rows[1]["centroid_z"] == 1.0
    assert rows[2]["planes"] == 1 and rows[2]["volume_voxels"] == 100

    import io

    with tifffile.TiffFile(io.BytesIO(stack_tiff_bytes(labels, info))) as tif:
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        assert tif.imagej_metadata["spacing"] == 2.0 and tif.imagej_metadata["unit"] == "micron"
        xres = tif.pages[0].tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(2.0)  # pixels per micron
        np.testing.assert_array_equal(tif.asarray(), labels)

    t_info = StackInfo("t", interval=5.0)
    t_rows = stack_rows(labels, scores, ids, names, t_info)
    assert [(r["frame"], r["id"]) for r in t_rows] == [(0, 1), (0, 2), (1, 1), (2, 1)]
    with tifffile.TiffFile(io.BytesIO(stack_tiff_bytes(labels, t_info))) as tif:
        assert tif.series[0].axes == "TYX" and tif.imagej_metadata["finterval"] == 5.0

    big = labels.astype(np.uint32) * 70000  # ids above 65,535: OME-TIFF, same axes
    with tifffile.TiffFile(io.BytesIO(stack_tiff_bytes(big, info))) as tif:
        assert tif.is_ome and tif.series[0].axes == "ZYX" and tif.asarray().max() == big.max()
        assert 'PhysicalSizeZ="2.0"' in tif.ome_metadata


def test_open_stack_layouts(tmp_path):
    rng = np.random.default_rng(0)
    zyx = tmp_path / "zyx.tif"
    tifffile.imwrite(
        zyx, rng.integers(0, 255, (6, 16, 16), dtype=np.uint8), imagej=True,
        resolution=(4.0, 4.0), metadata={"axes": "ZYX", "spacing": 1.5, "unit": "micron"},
    )  # fmt: skip
    stack = open_stack(str(zyx), {})
    assert (stack.axis, stack.length) == ("z", 6)
    assert stack.voxel_size == pytest.approx((1.5, 0.25, 0.25)) and stack.unit == "µm"
    assert stack.plane(2, {}).read().shape == (16, 16)
    assert open_stack(str(zyx), {"z": 2}) is None  # one plane chosen: a 2-D image

    tyx = tmp_path / "tyx.tif"
    tifffile.imwrite(tyx, np.zeros((3, 8, 8), np.uint16), imagej=True, metadata={"axes": "TYX"})
    assert (open_stack(str(tyx), {}).axis, open_stack(str(tyx), {}).length) == ("t", 3)

    zcyx = tmp_path / "zcyx.tif"
    data = rng.integers(0, 255, (4, 2, 8, 8), dtype=np.uint8)
    tifffile.imwrite(zcyx, data, imagej=True, metadata={"axes": "ZCYX"})
    stack = open_stack(str(zcyx), {"channel": 1})
    np.testing.assert_array_equal(stack.plane(3, {"channel": 1}).read(), data[3, 1])

    tzyx = tmp_path / "tzyx.tif"
    tifffile.imwrite(tzyx, np.zeros((2, 3, 8, 8), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(ImageReadError, match=r"tzyx\.tif: both z \(3\) and t \(2\).*--t"):
        open_stack(str(tzyx), {})
    assert open_stack(str(tzyx), {"t": 1}).axis == "z"

    ome = tmp_path / "ome.tif"
    tifffile.imwrite(ome, np.zeros((5, 8, 8), np.uint16), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3,
                               "PhysicalSizeZ": 2.0})  # fmt: skip
    assert open_stack(str(ome), {}).voxel_size == pytest.approx((2.0, 0.3, 0.3))

    rgb = tmp_path / "rgb.tif"  # (3, H, W) without metadata: colour first, not a stack
    tifffile.imwrite(rgb, np.zeros((3, 8, 8), np.uint8), metadata=None)
    assert open_stack(str(rgb), {}) is None
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((8, 8), np.uint8))
    assert open_stack(str(flat), {}) is None


def test_render_scene_stack():
    """Each cell is in 3-5 consecutive planes and absent (the background there) elsewhere."""
    from detectron2.structures.masks import polygons_to_bitmask

    from iaunet.data.datasets.synthetic import render_scene, render_scene_stack

    stack, polygons, ranges = render_scene_stack(7, planes=9, span=(3, 5))
    assert stack.shape == (9, 128, 128) and stack.dtype == np.float32
    assert len(polygons) == len(ranges) == len(render_scene(7)[1])
    for poly, (a, b) in zip(polygons, ranges):
        assert 3 <= b - a + 1 <= 5 and 0 <= a <= b < 9
        inside = polygons_to_bitmask([poly.ravel()], 128, 128)
        means = stack[:, inside].mean(1)
        present = np.arange(9)[(np.arange(9) >= a) & (np.arange(9) <= b)]
        assert means[present].min() > means[np.setdiff1d(np.arange(9), present)].max()


def test_benchmark_stacks_scoring():
    """The 3-D scoring of tools/benchmark_stacks.py on known label images: the truth itself, a
    cell split between two ids through its planes, and an extra object."""
    from conftest import load_tool

    score = load_tool("benchmark_stacks").score_stack
    a, b = rect(2, 2, 12, 12), rect(20, 20, 30, 30)
    masks, ranges = [a, b], [(0, 2), (1, 3)]
    labels = np.zeros((4, H, W), np.uint16)
    labels[0:3][:, a] = 1
    labels[1:4][:, b] = 2
    assert score(labels, masks, ranges) == {"tp": 2, "fp": 0, "fn": 0, "split": 0, "cells": 2}
    split = labels.copy()
    split[3][b] = 3  # cell b's last plane under another id: still matched in 3-D, but split
    assert score(split, masks, ranges) == {"tp": 2, "fp": 1, "fn": 0, "split": 1, "cells": 2}
    extra = labels.copy()
    extra[3][rect(30, 0, 38, 8)] = 4
    assert score(extra, masks, ranges)["fp"] == 1


def test_napari_reader_opens_a_stack_in_3d(tmp_path):
    from iaunet.napari_plugin.reader import get_reader

    labels = np.zeros((4, H, W), np.uint16)
    labels[1:3, 5:9, 5:9] = 1
    path = str(tmp_path / "cells_labels.tif")
    info = StackInfo("z", voxel_size=(2.0, 0.5, 0.5), unit="µm")
    with open(path, "wb") as f:
        f.write(stack_tiff_bytes(labels, info))
    ((data, meta, kind),) = get_reader(path)(path)
    assert kind == "labels" and data.shape == (4, H, W)
    assert meta["scale"] == pytest.approx((2.0, 0.5, 0.5))


def _stack_folder(d, planes=8):
    """A folder with a 16-bit z-stack of a synthetic scene (cells in 3-5 planes) and its label
    stack, and one 2-D image with its labels. Returns (stack, label stack)."""
    from detectron2.structures.masks import polygons_to_bitmask

    from iaunet.data.datasets.synthetic import render_scene_stack

    d.mkdir()
    stack, polygons, ranges = render_scene_stack(11, planes=planes, span=(3, 3), size=(64, 64))
    labels = np.zeros(stack.shape, np.uint16)
    for i, (poly, (a, b)) in enumerate(zip(polygons, ranges), start=1):
        labels[a : b + 1][:, polygons_to_bitmask([poly.ravel()], 64, 64)] = i
    stack16 = np.round(stack * 4000).astype(np.uint16)
    tifffile.imwrite(d / "stack.tif", stack16, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(d / "stack_labels.tif", labels, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(d / "flat.tif", stack16[ranges[0][0]])
    tifffile.imwrite(d / "flat_labels.tif", labels[ranges[0][0]])
    return stack16, labels


def test_folder_stacks_train_one_image_per_plane(tmp_path, monkeypatch):
    """A stack with a label stack: one record per plane with objects (its plane's labels), planes
    without objects at EMPTY_PLANE_RATIO; the mapper normalizes a plane with the stack's range;
    a label stack of other planes is an error naming both files."""
    from conftest import tiny_cfg
    from detectron2.data import DatasetCatalog

    from iaunet.data import IAUNetDatasetMapper, to_model_range
    from iaunet.data.annotations_io import DatasetError
    from iaunet.data.datasets.folder import register_path_datasets
    from iaunet.data.datasets.stack_planes import EMPTY_PLANE_RATIO

    monkeypatch.setenv("IAUNET_DATASET_CACHE", str(tmp_path / "cache"))
    stack, labels = _stack_folder(tmp_path / "data")
    name = f"folder:{tmp_path / 'data'}"
    register_path_datasets([name])
    records = DatasetCatalog.get(name)
    planes = [r for r in records if "plane" in r]
    full = [k for k in range(len(labels)) if labels[k].any()]
    empty = len(labels) - len(full)
    assert len(records) == len(planes) + 1  # and the 2-D image
    assert len(planes) == len(full) + min(empty, int(np.ceil(EMPTY_PLANE_RATIO * len(full))))
    for r in planes:
        axis, k = r["plane"]
        assert axis == "z" and len(r["annotations"]) == len(np.unique(labels[k])) - 1

    cfg = tiny_cfg(**{"INPUT.INTENSITY_NORM": "percentile"})
    mapper = IAUNetDatasetMapper(cfg, is_train=False)
    k = planes[0]["plane"][1]
    got = mapper.load_image(planes[0])
    lo, hi = np.percentile(stack.reshape(-1, 64), cfg.INPUT.PERCENTILES)
    want = to_model_range(stack[k], value_range=(lo, hi), image_format=cfg.INPUT.FORMAT)
    np.testing.assert_allclose(got, want, atol=1e-3)

    bad = tmp_path / "bad"
    _stack_folder(bad)
    tifffile.imwrite(bad / "stack_labels.tif", labels[:5], imagej=True, metadata={"axes": "ZYX"})
    message = r"stack_labels\.tif: labels of shape \(5, 64, 64\) for a stack of 8 z planes"
    with pytest.raises(DatasetError, match=message):
        register_path_datasets([f"folder:{bad}"])
        DatasetCatalog.get(f"folder:{bad}")


def test_train_net_on_a_stack_folder(tmp_path):
    """train_net.py trains on a folder holding a z-stack and evaluates its planes (each
    predicted with the stack's intensity range, as iaunet-predict does)."""
    from conftest import TINY_RUN_OPTS, run_train_net

    _stack_folder(tmp_path / "data")
    folder = f'("folder:{tmp_path / "data"}",)'
    args = [*TINY_RUN_OPTS, "DATASETS.TRAIN", folder, "DATASETS.TEST", folder]
    args += ["MODEL.IAUNET.TRAIN.FROM_SCRATCH", "True", "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "2"]
    args += ["OUTPUT_DIR", str(tmp_path / "run"), "INPUT.PIXEL_SCALE", "1.0"]
    code, out = run_train_net(str(tmp_path), *args)
    assert code == 0, out[-3000:]
    assert (tmp_path / "run" / "model_final.pth").is_file()
    assert "Evaluation results for segm" in out
