"""Channels as model input (``INPUT.CHANNELS``): reading the selected channels of every layout by
index or name, per-channel normalization, the config's channel count, a gray starting model spread
over the new channels, and a two-channel model trained, predicted and exported end to end."""

import os

import cv2
import numpy as np
import pytest
import tifffile
import torch
from conftest import TINY_RUN_OPTS, run_train_net, tiny_cfg

from iaunet.config import ConfigError, load_config
from iaunet.data.datasets.synthetic_channels import (
    CHANNEL_NAMES,
    render_two_channel_scene,
    write_two_channel_folder,
)
from iaunet.data.image_io import ImageReadError, intensity_range, to_model_range
from iaunet.data.lazy_image import open_plane, open_stack

CYX = np.stack(
    [np.full((24, 32), 100, np.uint16), np.arange(24 * 32, dtype=np.uint16).reshape(24, 32)]
)


def _layouts(d):
    """The same two channels (GFP, DAPI) in every layout a lab has: path -> names given."""
    meta = {"axes": "CYX"}
    tifffile.imwrite(
        d / "ome.tif", CYX, ome=True, metadata={**meta, "Channel": {"Name": ["GFP", "DAPI"]}}
    )
    tifffile.imwrite(
        d / "imagej.tif", CYX, imagej=True, metadata={**meta, "Labels": ["GFP", "DAPI"]}
    )
    tifffile.imwrite(d / "cyx_plain.tif", CYX)  # no metadata, channels first
    tifffile.imwrite(d / "yxc_plain.tif", np.moveaxis(CYX, 0, -1))  # no metadata, channels last
    return {"ome": True, "imagej": True, "cyx_plain": False, "yxc_plain": False}


def test_channels_by_index_and_name_in_every_layout(tmp_path):
    for name, named in _layouts(tmp_path).items():
        path = str(tmp_path / f"{name}.tif")
        got = open_plane(path, channels=(1, 0)).read()
        assert got.shape == (24, 32, 2), name
        np.testing.assert_array_equal(got[:, :, 0], CYX[1], err_msg=name)
        np.testing.assert_array_equal(got[:, :, 1], CYX[0], err_msg=name)
        if named:
            by_name = open_plane(path, channels=("DAPI", "gfp")).read()  # names: any case
            np.testing.assert_array_equal(by_name, got, err_msg=name)
        else:
            with pytest.raises(
                ImageReadError, match="names no channels.*give the channels as indices"
            ):
                open_plane(path, channels=("DAPI",))
        assert open_stack(path, {"channels": (0, 1)}) is None, name  # channels, not planes


def test_channel_errors_name_the_file_and_what_it_has(tmp_path):
    _layouts(tmp_path)
    path = str(tmp_path / "ome.tif")
    with pytest.raises(
        ImageReadError, match=r"ome\.tif: has 2 channel\(s\): 'GFP', 'DAPI'; .*'FITC'"
    ):
        open_plane(path, channels=("FITC",))
    with pytest.raises(ImageReadError, match="asks for channel 2"):
        open_plane(path, channels=(2,))
    with pytest.raises(ImageReadError, match="--channel picks one plane"):
        open_plane(path, channel=0, channels=(0,))
    gray = tmp_path / "gray.png"
    cv2.imwrite(str(gray), np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageReadError, match=r"gray\.png: has 1 channel\(s\); .*channel 1"):
        open_plane(str(gray), channels=(0, 1))


def test_a_plane_of_a_zcyx_stack_keeps_its_channels(tmp_path):
    stack = np.stack([CYX + k for k in range(3)])
    path = tmp_path / "zcyx.tif"
    tifffile.imwrite(
        path, stack, imagej=True, metadata={"axes": "ZCYX", "Labels": ["GFP", "DAPI"] * 3}
    )
    found = open_stack(str(path), {"channels": ("DAPI", "GFP")})
    assert (found.axis, found.length) == ("z", 3)
    plane = found.plane(2, {"channel": None, "z": None, "t": None, "channels": ("DAPI", "GFP")})
    np.testing.assert_array_equal(plane.read(), np.moveaxis(stack[2][::-1], 0, -1))


def test_each_channel_is_normalized_on_its_own():
    rng = np.random.default_rng(0)
    dim = rng.integers(0, 200, (32, 32))
    bright = rng.integers(0, 20000, (32, 32))
    image = np.stack([dim, bright], -1).astype(np.uint16)
    ranges = intensity_range(image, channels=2)
    assert len(ranges) == 2 and ranges[0][1] < 200 < ranges[1][1]
    x = to_model_range(image, channels=2)
    assert x.shape == (32, 32, 2) and x.dtype == np.float32
    for c in range(2):  # both channels span 0..255, the dim one too
        assert np.percentile(x[:, :, c], 99) > 240 and np.percentile(x[:, :, c], 1) < 15
    with pytest.raises(ImageReadError, match=r"takes 2 channel\(s\).*shape \(32, 32, 3\)"):
        to_model_range(np.zeros((32, 32, 3), np.uint16), channels=2)


def test_config_gives_one_pixel_mean_per_channel():
    from conftest import QUICK_CONFIG

    cfg = load_config(QUICK_CONFIG, ["INPUT.CHANNELS", "('GFP', 'DAPI')"])
    assert list(cfg.MODEL.PIXEL_MEAN) == [cfg.MODEL.PIXEL_MEAN[0]] * 2
    assert len(cfg.MODEL.PIXEL_STD) == 2
    with pytest.raises(ConfigError, match=r"MODEL\.PIXEL_MEAN has 3 entries.*one per channel"):
        load_config(opts=["INPUT.CHANNELS", "(0, 1)", "MODEL.PIXEL_MEAN", "[1.0, 2.0, 3.0]"])
    with pytest.raises(ConfigError, match="names a channel twice"):
        load_config(opts=["INPUT.CHANNELS", "(1, 1)"])
    with pytest.raises(ConfigError, match="indices >= 0 or channel names"):
        load_config(opts=["INPUT.CHANNELS", "(-1,)"])


def test_a_gray_model_spreads_its_stem_over_new_channels():
    """A 3-channel (gray replicated) checkpoint loaded into a 2-channel model: the image-reading
    kernels are spread (logged), and an image whose two channels equal the gray one gives the
    3-channel model's outputs."""
    from detectron2.modeling import build_model

    from iaunet.checkpoint import AtomicCheckpointer

    torch.manual_seed(0)
    gray_cfg = tiny_cfg(**{"MODEL.IAUNET.MASK_STRIDE": 2})
    gray = build_model(gray_cfg).eval()
    two_cfg = tiny_cfg(**{"MODEL.IAUNET.MASK_STRIDE": 2})
    two_cfg.INPUT.CHANNELS = ("nuclei", "cyto")
    two_cfg.MODEL.PIXEL_MEAN, two_cfg.MODEL.PIXEL_STD = [133.5] * 2, [26.9] * 2
    two = build_model(two_cfg).eval()
    state = {k: v.clone() for k, v in gray.state_dict().items()}
    AtomicCheckpointer(two).load_checkpoint({"model": state})
    stem = "backbone.stem.conv1.weight"
    assert two.state_dict()[stem].shape[1] == 2
    torch.testing.assert_close(
        two.state_dict()[stem], gray.state_dict()[stem].sum(1, keepdim=True).repeat(1, 2, 1, 1) / 2
    )
    image = torch.rand(1, 64, 64) * 255
    with torch.no_grad():
        a = gray([{"image": image.expand(3, -1, -1), "height": 64, "width": 64}])[0]["instances"]
        b = two([{"image": image.expand(2, -1, -1), "height": 64, "width": 64}])[0]["instances"]
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)


def test_two_channel_scenes_need_the_nuclei_to_split_touching_cells():
    image, labels = render_two_channel_scene(3)
    assert image.shape == (2, 128, 128) and image.dtype == np.uint16 and labels.max() >= 4
    from scipy import ndimage

    touching = ndimage.label(labels > 0)[1] < labels.max()  # some cells share a border
    nuclei = ndimage.label(ndimage.gaussian_filter(image[1].astype(float), 1) > 400)[1]
    assert touching and nuclei == labels.max()  # one nucleus per cell


@pytest.fixture(scope="module")
def two_channel_run(tmp_path_factory):
    """A tiny model trained by train_net.py on a folder of two-channel OME-TIFFs with
    ``INPUT.CHANNELS`` given by name, in the reverse of the file's order."""
    d = tmp_path_factory.mktemp("twoch")
    write_two_channel_folder(str(d / "data"), seed=0, count=3)
    folder = f'("folder:{d / "data"}",)'
    args = [*TINY_RUN_OPTS, "DATASETS.TRAIN", folder, "DATASETS.TEST", folder]
    args += ["MODEL.IAUNET.TRAIN.FROM_SCRATCH", "True", "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "2"]
    args += ["OUTPUT_DIR", str(d / "run"), "INPUT.PIXEL_SCALE", "1.0"]
    args += ["INPUT.CHANNELS", str(tuple(reversed(CHANNEL_NAMES)))]
    code, out = run_train_net(str(d), *args)
    assert code == 0, out[-3000:]
    return d, out


def test_train_net_trains_a_two_channel_model(two_channel_run):
    d, out = two_channel_run
    from iaunet.checkpoint import read_checkpoint
    from iaunet.config import trained_config

    checkpoint = read_checkpoint(str(d / "run" / "model_final.pth"))
    cfg = trained_config(checkpoint["config"])
    assert tuple(cfg.INPUT.CHANNELS) == ("nuclei", "cyto") and len(cfg.MODEL.PIXEL_MEAN) == 2
    assert checkpoint["model"]["backbone.stem.conv1.weight"].shape[1] == 2
    assert "Evaluation results for segm" in out


def test_train_net_names_an_image_without_the_channels(two_channel_run):
    """A channel name that an image of the training folder lacks: one line naming the file and
    its channels, exit status 2, before training."""
    d, _ = two_channel_run
    folder = f'("folder:{d / "data"}",)'
    args = [*TINY_RUN_OPTS, "DATASETS.TRAIN", folder, "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "2"]
    args += ["MODEL.IAUNET.TRAIN.FROM_SCRATCH", "True", "OUTPUT_DIR", str(d / "bad")]
    code, out = run_train_net(str(d), *args, "INPUT.CHANNELS", '("GFP", "cyto")')
    assert code == 2, out[-2000:]
    assert "has 2 channel(s): 'cyto', 'nuclei'; INPUT.CHANNELS channel 'GFP' is not one" in out
    assert "Traceback" not in out


def test_predict_and_export_take_the_saved_channels(two_channel_run, tmp_path):
    """iaunet-predict on a two-channel file with no flag; the ONNX export of the model gives the
    same label image; a file without the named channels is one line naming it."""
    from iaunet.predict import main

    d, _ = two_channel_run
    weights = str(d / "run" / "model_final.pth")
    image = str(d / "data" / "scene_000.tif")
    common = ["--input", image, "--score-threshold", "0.0", "--save", "labels"]
    assert main(["--weights", weights, "--output", str(tmp_path / "pt"), *common]) == 0
    labels = tifffile.imread(tmp_path / "pt" / "scene_000_labels.tif")
    assert labels.shape == (128, 128)

    from iaunet.deploy.export import export_model
    from iaunet.inference.predictor import IAUNetPredictor

    predictor = IAUNetPredictor.from_checkpoint(weights)
    onnx = str(tmp_path / "model.onnx")
    export_model(predictor.model, predictor.cfg, onnx, "onnx", size=(64, 64))
    args = ["--backend", "onnxruntime", "--model", onnx, "--output", str(tmp_path / "ort")]
    assert main(args + common) == 0
    ort = tifffile.imread(tmp_path / "ort" / "scene_000_labels.tif")
    assert (ort == labels).mean() >= 0.99

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, tifffile.imread(image))  # the channels without their names
    assert (
        main(["--weights", weights, "--output", str(tmp_path / "bad"), "--input", str(plain)]) == 1
    )
    assert not os.path.exists(tmp_path / "bad" / "plain_labels.tif")


def test_dask_blocks_take_the_saved_channels(two_channel_run, tmp_path):
    """``iaunet-predict --dask`` on a two-channel OME-TIFF read block by block (the named
    channels, the whole image's range per channel): the objects of the in-process run, and the
    same objects from a file that stores the channels in the other order under their names."""
    import zarr
    from distributed import Client, LocalCluster

    from iaunet.predict import main

    d, _ = two_channel_run
    weights = str(d / "run" / "model_final.pth")
    image = np.concatenate([render_two_channel_scene(s, (96, 128))[0] for s in (5, 6)], axis=2)
    for name, order in (("big", CHANNEL_NAMES), ("swapped", CHANNEL_NAMES[::-1])):
        data = image if name == "big" else image[::-1]
        meta = {"axes": "CYX", "Channel": {"Name": list(order)}}
        tifffile.imwrite(tmp_path / f"{name}.tif", data, ome=True, metadata=meta, tile=(32, 32))
    base = ["--weights", weights, "--score-threshold", "0.0"]
    local = ["--input", str(tmp_path / "big.tif"), "--output", str(tmp_path / "local")]
    assert main([*base, *local, "--save", "labels", "--tile", "64"]) == 0
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=None
    ) as cluster, Client(cluster) as client:
        files = [str(tmp_path / "big.tif"), str(tmp_path / "swapped.tif")]
        dask = ["--dask", client.scheduler.address, "--block", "128"]
        assert main([*base, "--input", *files, "--output", str(tmp_path / "dask"), *dask]) == 0
    local = tifffile.imread(tmp_path / "local" / "big_labels.tif")
    blocks, swapped = (
        zarr.open_array(str(tmp_path / "dask" / f"{n}.ome.zarr" / "labels" / "cells" / "0"))[:]
        for n in ("big", "swapped")
    )
    assert blocks.shape == local.shape == (96, 256) and local.max() >= 1
    assert ((local > 0) == (blocks > 0)).mean() >= 0.99
    np.testing.assert_array_equal(blocks, swapped)


def test_ome_zarr_and_rgb_tiff_channels(tmp_path):
    """OME-Zarr channels by their omero labels (regions read lazily, pickled for Dask workers),
    and the samples of an RGB TIFF by index."""
    import pickle

    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    path = str(tmp_path / "two.ome.zarr")
    root = zarr.open_group(path, mode="w", zarr_format=2)
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space"} for a in "yx"]
    write_image(CYX, root, axes=axes, fmt=FormatV04(), scale_factors=())
    root.attrs["omero"] = {"channels": [{"label": "GFP"}, {"label": "DAPI"}]}
    plane = pickle.loads(pickle.dumps(open_plane(path, channels=("DAPI", "GFP"))))
    assert plane.shape == (24, 32, 2)
    np.testing.assert_array_equal(plane[2:10, 3:20], np.moveaxis(CYX[::-1, 2:10, 3:20], 0, -1))
    with pytest.raises(ImageReadError, match=r"two\.ome\.zarr: has 2 channel.*'FITC'"):
        open_plane(path, channels=("FITC",))

    rgb = np.stack([CYX[0], CYX[1], CYX[1] // 2], -1).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    got = open_plane(str(tmp_path / "rgb.tif"), channels=(2, 0)).read()
    np.testing.assert_array_equal(got, rgb[:, :, [2, 0]])


def test_folder_of_ome_zarr_images_trains_with_their_channels(tmp_path):
    """OME-Zarr images in a training folder (``a.ome.zarr`` + ``a_labels.tif``): registered with
    their size, read by the mapper with the model's channels by their omero labels."""
    import zarr
    from detectron2.data import DatasetCatalog
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    from iaunet.data.dataset_mapper import IAUNetDatasetMapper
    from iaunet.data.datasets.folder import register_path_datasets

    folder = tmp_path / "zarrs"
    folder.mkdir()
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space"} for a in "yx"]
    for k in range(2):
        image, labels = render_two_channel_scene(k, (64, 64))
        root = zarr.open_group(str(folder / f"s{k}.ome.zarr"), mode="w", zarr_format=2)
        write_image(image, root, axes=axes, fmt=FormatV04(), scale_factors=())
        root.attrs["omero"] = {"channels": [{"label": n} for n in CHANNEL_NAMES]}
        tifffile.imwrite(folder / f"s{k}_labels.tif", labels)
    (name,) = register_path_datasets([f"folder:{folder}"])
    records = DatasetCatalog.get(name)
    assert [(os.path.basename(r["file_name"]), r["height"], r["width"]) for r in records] == [
        ("s0.ome.zarr", 64, 64),
        ("s1.ome.zarr", 64, 64),
    ]
    cfg = tiny_cfg(**{"INPUT.PIXEL_SCALE": 1.0})
    cfg.merge_from_list(["INPUT.CHANNELS", ("nuclei", "cyto"), "MODEL.PIXEL_MEAN", [40.0] * 2])
    mapper = IAUNetDatasetMapper(cfg, is_train=False)
    x = mapper(records[1])["image"]
    nuclei = render_two_channel_scene(1, (64, 64))[0][1]
    assert x.shape == (2, 64, 64)
    np.testing.assert_allclose(x[0].numpy(), to_model_range(nuclei[:, :, None], channels=1)[..., 0])
