"""Block-wise prediction of large images on Dask (iaunet.bigimage): lazy image planes (lazy_image),
block geometry and cross-block stitching (blocks), the Dask run, its resume and worker failures
(big_image), the OME-Zarr labels (ome_zarr).

A randomly initialised tiny model (3 detections per 32-px model tile, tiles of 64 image px) on
images of a few hundred px; Dask runs on a LocalCluster (threads, or one worker process where a
worker is killed)."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tifffile
import torch
import zarr
from conftest import ROOT, scene_masks, tiny_cfg

from iaunet.bigimage.big_image import (
    PredictorSpec,
    chunk_size,
    context_blocks,
    predict_big,
    read_objects,
)
from iaunet.bigimage.blocks import (
    Block,
    TileGrid,
    block_grid,
    context_tiles,
    load_detections,
    object_id,
    object_rows,
    owned_tiles,
    paint_labels,
    read_window,
    save_detections,
    stitch_block,
)
from iaunet.checkpoint import AtomicCheckpointer
from iaunet.data.image_io import ImageReadError
from iaunet.data.lazy_image import open_plane
from iaunet.inference.tiling import Detection, tile_windows
from iaunet.outputs.masks import label_image

# 32-px model tiles at scale 0.5: tiles of 64 image px, overlap 32; 3 detections per tile
OPTS = ("INPUT.IMAGE_SIZE", "32", "INPUT.PIXEL_SCALE", "0.5", "TEST.DETECTIONS_PER_IMAGE", "3")
FULL_CONTEXT = 10**6  # a halo holding the whole image: every block stitches every tile


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    from detectron2.modeling import build_model

    d = tmp_path_factory.mktemp("big_ckpt")
    cfg = tiny_cfg(**{"MODEL.IAUNET.TEST.SCORE_THRESH": 0.0, "INPUT.PIXEL_SCALE": 1.0})
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), str(d), config=cfg).save("model")
    return PredictorSpec(weights=str(d / "model.pth"), opts=OPTS)


@pytest.fixture(scope="module")
def predictor(spec, one_thread):
    return spec.build()


def _image(h, w):
    scene, _ = scene_masks()
    return np.tile(scene, (-(-h // scene.shape[0]), -(-w // scene.shape[1])))[:h, :w]


@pytest.fixture(scope="module")
def tiff(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("big_in") / "img.tif")
    tifffile.imwrite(path, _image(192, 256), tile=(64, 64))
    return path


@pytest.fixture(scope="module")
def client():
    """Two one-thread workers in this process, reachable over TCP (for the command line)."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        dashboard_address=None,
    ) as cluster, Client(cluster) as c:
        yield c


def _objects(out, stem="img"):
    return sorted(
        (row["score"], y0, x0, crop.tobytes(), crop.shape)
        for row, (y0, x0), crop in read_objects(out, stem)
    )


def _labels(out, stem="img"):
    return zarr.open_array(os.path.join(out, f"{stem}.ome.zarr", "labels", "cells", "0"))[:]


def test_block_grid_and_tiles():
    h, w = 300, 420
    tiles = list(enumerate(tile_windows(h, w, 64, 32)))
    grid_of_tiles = TileGrid(h, w, 64, 32)
    assert len(grid_of_tiles) == len(tiles)
    for size in (64, 100, 128, 1000):
        grid = block_grid(h, w, size)
        cover = np.zeros((h, w), int)
        for b in grid:
            y0, x0, y1, x1 = b.core
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()  # the cores tile the image
        owned = [t for b in grid for t in owned_tiles(b, grid_of_tiles)]
        assert sorted(owned) == tiles  # every tile is run once, by one block
        for b in grid:
            mine = owned_tiles(b, grid_of_tiles)
            if mine:
                y0, x0, y1, x1 = read_window(mine)
                assert all(y0 <= t[0] and x0 <= t[1] and t[2] <= y1 and t[3] <= x1 for _, t in mine)
            ctx = context_tiles(b, grid_of_tiles, 40)
            assert set(mine) <= set(ctx)
            cy0, cx0, cy1, cx1 = b.core
            for t in tiles:  # exactly the tiles that meet the core widened by the halo
                ty0, tx0, ty1, tx1 = t[1]
                meets = ty0 < cy1 + 40 and cy0 - 40 < ty1 and tx0 < cx1 + 40 and cx0 - 40 < tx1
                assert (t in ctx) == meets
    assert chunk_size(512) == 512 and chunk_size(4096) == 1024


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _view(tile, window, mask, score, index=0, partial=False):
    """A detection of ``mask`` (full-image bool) as ``tile`` sees it (cut to its window)."""
    y0, x0, y1, x1 = window
    m = np.zeros_like(mask)
    m[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    ys, xs = np.nonzero(m)
    crop = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return Detection(tile, window, int(ys.min()), int(xs.min()), crop, score, 0, partial, index)


def test_object_cut_by_block_border(tmp_path):
    """A cell on the border of two blocks: seen whole by a tile of each block and cut by a third.
    Both blocks keep the same, most confident whole view under one id, paint their side of it, and
    exactly one of them lists it."""
    h, w, block = 128, 256, 128
    grid = block_grid(h, w, block)
    cell = _disc(h, w, 60, 126, 10)  # centre left of the border at x = 128
    other = _disc(h, w, 20, 40, 6)  # far from the border, in block 0 only
    tiles = [(0, (0, 64, 128, 192)), (1, (0, 128, 128, 256)), (2, (0, 0, 128, 128))]
    dets = [
        _view(0, tiles[0][1], cell, 0.9),  # whole, owned by block 0 (starts at x 64)
        _view(1, tiles[1][1], cell, 0.7, partial=True),  # cut at x 128, block 1
        _view(2, tiles[2][1], cell, 0.95, index=1, partial=True),  # cut at x 128, block 0
        _view(2, tiles[2][1], other, 0.8),
    ]
    # through the files the detect tasks write
    save_detections(str(tmp_path / "d.npz"), dets)
    back = load_detections(str(tmp_path / "d.npz"))
    assert [(d.tile, d.index, d.box, d.score, d.partial) for d in back] == [
        (d.tile, d.index, d.box, d.score, d.partial) for d in dets
    ]
    assert all(np.array_equal(a.crop, b.crop) for a, b in zip(back, dets))
    painted = np.zeros((h, w), np.uint32)
    listed = []
    for b in grid:
        _, touching, owned = stitch_block(b, back, tiles)  # every tile meets both blocks
        y0, x0, y1, x1 = b.core
        painted[y0:y1, x0:x1] = paint_labels(b.core, touching, 3, np.dtype(np.uint32))
        listed += owned
        cell_views = [d for d in touching if d.box[3] > 110]
        assert len(cell_views) == 1 and cell_views[0].tile == 0  # the whole view, not the cut 0.95
    cell_id = object_id(dets[0], 3)
    assert sorted(object_id(d, 3) for d in listed) == sorted([cell_id, object_id(dets[3], 3)])
    assert np.array_equal(painted == cell_id, cell)  # one id on both sides of the border
    assert np.array_equal(painted == object_id(dets[3], 3), other)


def test_blocks_equal_in_process(predictor, spec, tiff, client, tmp_path):
    """With the whole image as context, any block size gives the in-process tiled prediction:
    the same objects (masks, scores) and the same flattened label image."""
    raw = tifffile.imread(tiff)
    ref = predictor.predict(raw, tiled=True, full_masks=False)
    # what iaunet-predict writes: the objects at or above the outputs' threshold (the model's)
    assert predictor.output_threshold == 0.5 and (ref.scores < 0.5).any()
    ref = ref[ref.scores >= predictor.output_threshold]
    outs = []
    for block in (64, 128):
        out = str(tmp_path / f"b{block}")
        summary = predict_big(
            open_plane(tiff), predictor, spec, out, "img", client, block, halo=FULL_CONTEXT
        )
        assert summary["objects"] == len(ref)
        outs.append(out)
    assert _objects(outs[0]) == _objects(outs[1])
    assert np.array_equal(_labels(outs[0]), _labels(outs[1]))
    expected = sorted(
        (round(float(s), 6), y0, x0, c.tobytes(), c.shape)
        for s, (y0, x0, c) in zip(ref.scores, ref.pred_masks)
    )
    assert _objects(outs[0]) == expected
    # the label image: in-process ids are ranks; map the block ids to them
    rank = {
        (round(float(s), 6), y0, x0): k + 1
        for k, (s, (y0, x0, _)) in enumerate(zip(ref.scores, ref.pred_masks))
    }
    to_rank = {0: 0}
    for row, (y0, x0), _ in read_objects(outs[0], "img"):
        to_rank[row["id"]] = rank[(row["score"], y0, x0)]
    labels = _labels(outs[0])
    relabelled = np.vectorize(to_rank.get)(labels)
    assert np.array_equal(relabelled, label_image(ref.pred_masks, *raw.shape))
    # the image plane is stored next to its labels
    image = zarr.open_array(os.path.join(outs[0], "img.ome.zarr", "0"))[:]
    assert np.array_equal(image, raw)
    with open(os.path.join(outs[0], "img_objects.csv")) as f:
        header = f.readline().strip().split(",")
        assert header[:4] == ["id", "class", "score", "area"]
        assert len(f.readlines()) == len(ref)


def test_ome_zarr_validates_and_opens_in_napari(predictor, spec, tiff, client, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04 import Image, ImageLabel

    out = str(tmp_path / "out")
    predict_big(open_plane(tiff), predictor, spec, out, "img", client, 128)
    path = os.path.join(out, "img.ome.zarr")
    Image.from_zarr(zarr.open_group(path, mode="r"))  # NGFF 0.4 schema (pydantic models)
    ImageLabel.from_zarr(zarr.open_group(os.path.join(path, "labels", "cells"), mode="r"))
    nodes = list(Reader(parse_url(path))())  # ome-zarr-py finds the image and its labels
    assert any("image-label" in n.zarr.root_attrs for n in nodes)
    # napari, headless: its OME-Zarr reader plugin gives the image and the labels layer
    from napari_ome_zarr import napari_get_reader

    layers = napari_get_reader(path)(path)
    kinds = [layer[2] if len(layer) > 2 else "image" for layer in layers]
    assert "labels" in kinds
    data = layers[kinds.index("labels")][0]
    labels = np.asarray(data[0] if isinstance(data, list) else data)
    assert np.array_equal(labels, _labels(out))


def _reference(predictor, spec, plane, client, out, block):
    predict_big(plane, predictor, spec, out, "img", client, block)
    return _labels(out), _objects(out)


def _zarr_input(path, image):
    """A (c, y, x) OME-Zarr with two channels, the image in channel 1, pixel size 0.5 um."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    stack = np.stack([np.zeros_like(image), image])
    root = zarr.open_group(path, mode="w", zarr_format=2)
    write_image(
        stack,
        root,
        axes="cyx",
        fmt=FormatV04(),
        scale_factors=(),
        scale={"c": 1.0, "y": 0.5, "x": 0.5},
        axes_units={"y": "micrometer", "x": "micrometer"},
        storage_options={"chunks": (1, 64, 64)},
    )


def test_killed_run_resumes(predictor, spec, client, tmp_path):
    """``iaunet-predict --dask <scheduler>`` on an OME-Zarr channel, killed (SIGKILL) after some
    blocks: the same command finishes, recomputes no finished block, and writes what an
    uninterrupted run writes."""
    image = _image(320, 384)
    src = str(tmp_path / "in.ome.zarr")
    _zarr_input(src, image)
    ref_labels, ref_objects = _reference(
        predictor, spec, open_plane(src, channel=1), client, str(tmp_path / "ref"), 64
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "iaunet.predict", "--weights", spec.weights, "--input", src]
    address = client.scheduler.address
    cmd += ["--output", str(out), "--dask", address, "--block", "64", "--channel", "1"]
    cmd += ["--opts", *OPTS]  # the model's output threshold, as the reference's
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    manifest = out / "in_blocks" / "manifest.json"
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    written = []
    deadline = time.time() + 300  # the command imports torch and detectron2 first
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists():
            written = json.loads(manifest.read_text())["written"]
            if len(written) >= 8:
                break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    assert 0 < len(state["written"]) < 30, proc.stdout.read().decode()[-2000:]
    grid = block_grid(320, 384, 64)
    done = {
        f: os.stat(out / "in_blocks" / f).st_mtime_ns
        for i in state["detected"]
        for f in [f"detections_{grid[i].name}.npz"]
    }
    done.update(
        {
            f: os.stat(out / "in_blocks" / f).st_mtime_ns
            for i in state["written"]
            for f in [f"objects_{grid[i].name}.npz"]
        }
    )
    log = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert log.returncode == 0, log.stderr[-3000:]
    assert "resuming" in log.stderr
    for f, mtime in done.items():  # finished blocks were not computed again
        assert os.stat(out / "in_blocks" / f).st_mtime_ns == mtime, f
    assert np.array_equal(_labels(str(out), "in"), ref_labels)
    assert _objects(str(out), "in") == ref_objects
    root = zarr.open_group(str(out / "in.ome.zarr"), mode="r")
    scale = root.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [0.5, 0.5]  # the input's pixel size and unit travel to the output
    assert root.attrs["multiscales"][0]["axes"][0]["unit"] == "micrometer"


def test_worker_killed_mid_run(predictor, spec, tiff, client, tmp_path):
    """A worker process killed (SIGKILL) while it predicts: Dask starts another and runs its tasks
    again; the output is complete and equal to an undisturbed run."""
    from distributed import Client, LocalCluster

    ref_labels, ref_objects = _reference(
        predictor, spec, open_plane(tiff), client, str(tmp_path / "ref"), 64
    )
    out = str(tmp_path / "out")
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        env={"OMP_NUM_THREADS": "1"},
    ) as cluster, Client(cluster) as c:
        pid = next(iter(c.run(os.getpid).values()))
        result = {}

        def run():
            result["summary"] = predict_big(open_plane(tiff), predictor, spec, out, "img", c, 64)

        thread = threading.Thread(target=run)
        thread.start()
        folder = os.path.join(out, "img_blocks")
        deadline = time.time() + 120
        while time.time() < deadline and not (
            os.path.isdir(folder) and any(f.startswith("detections_") for f in os.listdir(folder))
        ):
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        thread.join(300)
        new_pid = next(iter(c.run(os.getpid).values()))
    assert new_pid != pid  # a new worker process did the rest
    assert result["summary"]["blocks"] == 12
    assert np.array_equal(_labels(out), ref_labels)
    assert _objects(out) == ref_objects


def test_context_blocks_are_neighbours(spec, tiff):
    from iaunet.bigimage.big_image import BlockJob

    job = BlockJob(open_plane(tiff), spec, "", "", (192, 256), 64, 64, 64, 32, None, 3, "uint32")
    grid = job.grid()  # 3 x 4 blocks of 64 px; halo 64: the 3 x 3 around block 5
    assert context_blocks(job, grid[5]) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert context_blocks(job, grid[0]) == [0, 1, 4, 5]


def test_lazy_planes(tmp_path):
    """OME-Zarr (pyramid level from the declared pixel size, channel choice), TIFF (channel,
    pyramid levels), PNG; regions equal the image's; one-line errors naming the file."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (3, 2, 128, 160), dtype=np.uint16)  # (c, z, y, x)
    path = str(tmp_path / "pyr.ome.zarr")
    root = zarr.open_group(path, mode="w", zarr_format=2)
    axes = [{"name": "c", "type": "channel"}, {"name": "z", "type": "space"}]
    axes += [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    write_image(image, root, axes=axes, fmt=FormatV04(), scale_factors=(2, 4))
    plane = open_plane(path, channel=2, z=1)
    assert plane.shape == (128, 160) and plane.level == 0
    assert np.array_equal(plane[10:50, 20:90], image[2, 1, 10:50, 20:90])
    half = open_plane(path, channel=2, z=1, model_scale=0.5)  # the model halves: level 1
    assert half.level == 1 and half.shape == (64, 80) and half.downsample == (2.0, 2.0)
    assert open_plane(path, channel=0, z=0, model_scale=0.3).level == 1  # never coarser than asked
    assert open_plane(path, channel=0, z=0, model_scale=0.25).level == 2
    clone = pickle.loads(pickle.dumps(plane))  # what a Dask worker gets: it reopens the file
    assert np.array_equal(clone[0:5, 0:5], image[2, 1, 0:5, 0:5])
    with pytest.raises(ImageReadError, match=r"pyr.ome.zarr: axis c has 3 planes.*--channel"):
        open_plane(path, z=0)
    with pytest.raises(ImageReadError, match=r"--z 5 is out of range"):
        open_plane(path, channel=0, z=5)
    with pytest.raises(ImageReadError, match=r"--t given, but the image has no t axis"):
        open_plane(path, channel=0, z=0, t=0)

    tif = str(tmp_path / "ch.ome.tif")
    tifffile.imwrite(tif, image[:, 0], tile=(64, 64), metadata={"axes": "CYX"}, ome=True)
    tplane = open_plane(tif, channel=1)
    assert tplane.kind == "tiff" and tplane.shape == (128, 160)
    assert np.array_equal(tplane[3:70, 5:100], image[1, 0, 3:70, 5:100])
    pyr = str(tmp_path / "pyr.tif")
    with tifffile.TiffWriter(pyr, bigtiff=True) as tw:
        tw.write(image[0, 0], subifds=1, tile=(64, 64))
        tw.write(image[0, 0, ::2, ::2], subfiletype=1, tile=(64, 64))
    assert open_plane(pyr, model_scale=0.5).shape == (64, 80)
    assert np.array_equal(open_plane(pyr, model_scale=0.5).read(), image[0, 0, ::2, ::2])
    rgb = str(tmp_path / "rgb.tif")
    tifffile.imwrite(rgb, image[:, 0].transpose(1, 2, 0).astype(np.uint8), photometric="rgb")
    assert open_plane(rgb)[0:4, 0:4].shape == (4, 4, 3)
    import cv2

    png = str(tmp_path / "a.png")
    cv2.imwrite(png, image[0, 0].astype(np.uint8))
    assert np.array_equal(open_plane(png).read(), image[0, 0].astype(np.uint8))
    clone = pickle.loads(pickle.dumps(open_plane(png)))  # the worker reads the file itself
    assert clone._array is None
    assert np.array_equal(clone[2:9, 3:7], image[0, 0, 2:9, 3:7].astype(np.uint8))
    with pytest.raises(ImageReadError, match=r"a.png: --channel need a TIFF or OME-Zarr"):
        open_plane(png, channel=0)
    assert Block(5, 1, 2, (64, 128, 128, 192)).name == "0001_0002"


def test_benchmark_tool(spec, tmp_path):
    """tools/benchmark_big_image.py end to end on a 256² mosaic: in-process, then one Dask worker
    process; ground truth as crops, F1 by one-to-one matching."""
    from conftest import load_tool

    tool = load_tool("benchmark_big_image")
    gt = tool.build_mosaic("synthetic_cells_val", 256, str(tmp_path / "m.tif"))
    assert tifffile.imread(tmp_path / "m.tif").shape == (256, 256) and len(gt) > 10
    assert tool.f1(gt, gt) == 100.0
    shifted = [(y0 + 3, x0 + 3, c) for y0, x0, c in gt]
    assert tool.f1(gt[: len(gt) // 2], gt) == pytest.approx(
        100 * (len(gt) // 2) * 2 / (len(gt) + len(gt) // 2)
    )
    assert tool.f1(shifted, gt) < 100.0
    work = str(tmp_path / "work")
    results = tool.main(
        ["--weights", spec.weights, "--sizes", "256", "--block", "128", "--workers", "1"]
        + ["--in-process", "--work", work, "--opts", *OPTS]
    )
    runs = results[256]["runs"]
    assert [(r["path"], r["workers"]) for r in runs] == [("in-process", 0), ("dask", 1)]
    assert all(r["seconds"] > 0 and 0 <= r["f1_gt"] <= 100 and r["rss_mb"] for r in runs)
    assert os.path.isfile(os.path.join(work, "results.json"))


def _whole_view(tile, window, visible, whole, score, index=0):
    """A detection with its whole outline (both full-image bool masks, whole within the window)."""
    d = _view(tile, window, visible, score, index)
    ys, xs = np.nonzero(whole)
    d.whole = (
        int(ys.min()),
        int(xs.min()),
        whole[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1],
    )
    return d


def test_cell_on_top_in_the_next_block(tmp_path):
    """Whole outlines through the block files: a cell whose hidden part lies under a cell owned by
    the next block is listed once, with its areas, hidden fraction and the id of the cell on top,
    which is found in the block's context although the block does not own it."""
    h, w = 64, 128
    under_whole, top = _disc(h, w, 32, 56, 10), _disc(h, w, 32, 72, 10)  # centres x 56 | 72
    under = under_whole & ~top
    tile = (0, (0, 0, h, w))
    dets = [
        _whole_view(0, tile[1], top, top, 0.9),
        _whole_view(0, tile[1], under, under_whole, 0.8, 1),
    ]
    save_detections(str(tmp_path / "d.npz"), dets)
    back = load_detections(str(tmp_path / "d.npz"))
    assert all(
        np.array_equal(a.whole[2], b.whole[2]) and a.whole[:2] == b.whole[:2]
        for a, b in zip(back, dets)
    )
    rows = {}
    for b in block_grid(h, w, 64):  # x 0..63 | 64..127
        kept, _, owned = stitch_block(b, back, [tile])
        for row in object_rows(owned, 3, b, around=kept):
            rows[row["id"]] = row
    top_id, under_id = object_id(dets[0], 3), object_id(dets[1], 3)
    assert sorted(rows) == sorted([top_id, under_id])
    assert rows[under_id]["block"] == "0000_0000" and rows[top_id]["block"] == "0000_0001"
    assert rows[under_id]["area_whole"] == rows[under_id]["area"] == under_whole.sum()
    assert rows[under_id]["area_visible"] == under.sum()
    assert rows[under_id]["hidden_fraction"] == round(1 - under.sum() / under_whole.sum(), 4)
    assert rows[under_id]["on_top_ids"] == str(top_id)
    assert rows[top_id]["hidden_fraction"] == 0 and rows[top_id]["on_top_ids"] == ""


def test_amodal_blocks_equal_in_process(client, tiff, tmp_path):
    """An amodal model on Dask: the visible parts, the whole outlines, the label image and the
    table's amodal columns are those of in-process tiled prediction."""
    from detectron2.modeling import build_model

    from iaunet.outputs.table import AMODAL_COLUMNS, amodal_rows

    cfg = tiny_cfg(
        **{
            "MODEL.IAUNET.AMODAL": True,
            "MODEL.IAUNET.TEST.SCORE_THRESH": 0.0,
            "INPUT.PIXEL_SCALE": 1.0,
        }
    )
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), str(tmp_path), config=cfg).save("amodal")
    # every object (--score-threshold 0): the random model's scores are below the default 0.5
    spec = PredictorSpec(weights=str(tmp_path / "amodal.pth"), opts=OPTS, min_score=0.0)
    predictor = spec.build()
    raw = tifffile.imread(tiff)
    ref = predictor.predict(raw, tiled=True, full_masks=False)
    ref = ref[ref.scores >= predictor.output_threshold]
    assert len(ref) > 0
    out = str(tmp_path / "out")
    summary = predict_big(open_plane(tiff), predictor, spec, out, "img", client, 128, FULL_CONTEXT)
    assert summary["objects"] == len(ref)
    key = {
        (round(float(s), 6), y0, x0): k
        for k, (s, (y0, x0, _)) in enumerate(zip(ref.scores, ref.pred_masks))
    }
    visible, whole = list(ref.pred_masks), list(ref.pred_amodal_masks)
    ids = {}
    for (row, (y0, x0), crop), (_, (wy, wx), wcrop) in zip(
        read_objects(out, "img"), read_objects(out, "img", whole=True)
    ):
        k = key[(row["score"], y0, x0)]
        ids[row["id"]] = k + 1
        assert np.array_equal(crop, visible[k][2])
        assert (wy, wx) == tuple(int(v) for v in whole[k][:2]) and np.array_equal(
            wcrop, whole[k][2]
        )
    assert len(ids) == len(ref)
    labels = np.vectorize(lambda i: ids.get(i, 0))(_labels(out))
    assert np.array_equal(labels, label_image(ref.pred_masks, *raw.shape))  # the visible parts
    expected = amodal_rows(ref.pred_masks, ref.pred_amodal_masks)
    with open(os.path.join(out, "img_objects.csv")) as f:
        rows = list(csv.DictReader(f))
    assert set(AMODAL_COLUMNS) <= set(rows[0])
    assert any(float(r["hidden_fraction"]) > 0 for r in rows)
    for r in rows:
        e = expected[ids[int(r["id"])] - 1]
        assert (
            int(r["area_visible"]) == e["area_visible"] and int(r["area_whole"]) == e["area_whole"]
        )
        assert float(r["hidden_fraction"]) == e["hidden_fraction"]
        on_top = sorted(ids[int(i)] for i in r["on_top_ids"].split(";") if i)
        assert on_top == sorted(int(i) for i in e["on_top_ids"].split(";") if i)


def test_cli_dask_gives_the_in_process_objects(predictor, spec, tiff, client, tmp_path, capsys):
    """``iaunet-predict`` in process and with ``--dask`` on the same pixels, both with the model's
    own output threshold: the same objects (label images equal up to ids) and the same table rows
    (ids aside)."""
    from iaunet.checkpoint import read_checkpoint
    from iaunet.config import trained_config
    from iaunet.predict import main

    # the model's own output threshold halfway through its scores on the image (as one tuned
    # after training): half of the detections are below it
    scores = predictor.predict(tifffile.imread(tiff), tiled=True, full_masks=False).scores
    checkpoint = read_checkpoint(spec.weights)
    cfg = trained_config(checkpoint["config"])
    cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH = float(scores.median())
    weights = str(tmp_path / "tuned.pth")
    torch.save({**checkpoint, "config": cfg.dump()}, weights)
    base, opts = ["--weights", weights, "--input", tiff], ["--opts", *OPTS]
    assert main([*base, "--output", str(tmp_path / "local"), "--save", "labels,csv", *opts]) == 0
    dask = ["--dask", client.scheduler.address, "--block", "256"]
    assert main([*base, "--output", str(tmp_path / "dask"), *dask, *opts]) == 0
    capsys.readouterr()
    local = tifffile.imread(tmp_path / "local" / "img_labels.tif")
    blocks = _labels(str(tmp_path / "dask"))
    pairs = {(int(a), int(b)) for a, b in zip(local.ravel(), blocks.ravel())}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # 1:1 ids
    assert len(pairs) > 2 and (0, 0) in pairs

    def rows(path):
        with open(path) as f:
            table = list(csv.DictReader(f))
        same = [c for c in table[0] if c in ("class", "score", "area", "centroid_y", "centroid_x")]
        return sorted(tuple(r[c] for c in same) for r in table), same

    (mine, cols), (theirs, cols2) = (
        rows(tmp_path / "local" / "img_objects.csv"),
        rows(tmp_path / "dask" / "img_objects.csv"),
    )
    assert cols == cols2 and {"score", "area"} <= set(cols)
    assert len(mine) == len(pairs) - 1
    assert [(r[0], round(float(r[1]), 4), *r[2:]) for r in mine] == [
        (r[0], round(float(r[1]), 4), *r[2:]) for r in theirs
    ]
