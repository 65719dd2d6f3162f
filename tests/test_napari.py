"""The napari plugin (iaunet.napari_plugin), headless: its npe2 manifest, the dock widget running a
checkpoint this test writes on an image layer, and the reader of ``_masks.tif`` files.

Runs with the ``napari`` extra (part of the ``test`` extra): Qt's offscreen platform (conftest) and
a virtual X display for napari's OpenGL canvas (pytest-xvfb)."""

import os

import numpy as np
import pytest
import torch
from conftest import ROOT, scene_masks, tiny_cfg
from npe2 import PluginManager, PluginManifest

from iaunet.checkpoint import AtomicCheckpointer
from iaunet.data.datasets.synthetic import render_scene
from iaunet.napari_plugin.widget import PredictWidget
from iaunet.outputs.masks import mask_pages, pages_tiff_bytes

MANIFEST = os.path.join(ROOT, "iaunet", "napari_plugin", "napari.yaml")


@pytest.fixture(autouse=True)
def _display():
    """napari draws with OpenGL: without a display (no Xvfb for pytest-xvfb) say how to get one
    instead of failing deep inside vispy."""
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen" and not os.environ.get("DISPLAY"):
        pytest.fail(
            "napari's canvas needs an OpenGL display: install Xvfb (apt-get install xvfb), which "
            "pytest-xvfb starts for the tests"
        )


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised tiny model saved as training saves it (scores ~1/(K+1): no
    threshold); 8 queries, so at most 8 instances."""
    from detectron2.modeling import build_model

    d = tmp_path_factory.mktemp("napari_ckpt")
    cfg = tiny_cfg(**{"MODEL.IAUNET.TEST.SCORE_THRESH": 0.0, "INPUT.PIXEL_SCALE": 1.0})
    cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH = 0.35  # as TUNE_OUTPUT_THRESH saves it
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), str(d), config=cfg).save("model")
    return str(d / "model.pth")


@pytest.fixture(scope="module")
def plugin():
    """The manifest registered with npe2 as napari finds it through the ``napari.manifest`` entry
    point of an installed iaunet (registered here when this checkout is not the installed one).
    Once per module: napari keeps the commands of an unregistered plugin, so registering twice
    fails."""
    pm = PluginManager.instance()
    manifest = PluginManifest.from_file(MANIFEST)
    try:
        pm.get_manifest(manifest.name)
        registered = False
    except KeyError:
        pm.register(manifest)
        registered = True
    yield manifest
    if registered:
        pm.unregister(manifest.name)


def test_manifest_declared_and_valid():
    manifest = PluginManifest.from_file(MANIFEST)
    assert manifest.name == "iaunet"
    assert [w.display_name for w in manifest.contributions.widgets] == ["IAUNet prediction"]
    assert "*_masks.tif" in manifest.contributions.readers[0].filename_patterns
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert '"napari.manifest": ["iaunet = iaunet.napari_plugin:napari.yaml"]' in setup
    for command in manifest.contributions.commands:  # every python_name resolves
        module, attr = command.python_name.split(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr))


def test_widget_predicts_on_an_image_layer(make_napari_viewer, qtbot, weights, plugin):
    viewer = make_napari_viewer()
    image, _ = render_scene(5, (60, 84))
    viewer.add_image((image * 4000).astype(np.uint16), name="cells", scale=(0.5, 0.5))
    _, widget = viewer.window.add_plugin_dock_widget("iaunet", "IAUNet prediction")
    assert isinstance(widget, PredictWidget)
    assert widget.image.choices == ("cells",)
    widget.weights.value = weights
    assert widget.score_threshold.value == pytest.approx(0.35)  # the model's own threshold
    widget.score_threshold.value = 0.0
    widget.scale.value = 0.75  # image px -> model px
    widget.device.value = "cpu"
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.status.value.endswith("mask page(s)"), widget.status.value
    assert widget.progress.value == 3

    labels = viewer.layers["cells labels"]
    points = viewer.layers["cells scores"]
    pages = [layer for layer in viewer.layers if layer.name.startswith("cells masks page")]
    n = len(points.data)
    assert 1 <= n <= 8  # 8 queries, no threshold
    assert labels.data.shape == (60, 84) and labels.data.max() <= n
    assert pages and all(p.data.shape == (60, 84) for p in pages)
    ids = set().union(*(np.unique(p.data).tolist() for p in pages)) - {0}
    assert ids == set(range(1, n + 1))  # every instance on exactly one page
    for k in ids:
        assert sum(int((p.data == k).any()) for p in pages) == 1
    assert list(points.features["id"]) == list(range(1, n + 1))
    assert np.all(np.diff(points.features["score"]) <= 0)  # id order = decreasing score
    assert tuple(labels.scale) == (0.5, 0.5) == tuple(points.scale)  # results sit on the image

    assert widget._predictor(widget._inputs()[3]).model.test_augmentation == "none"  # as trained

    widget.tta.value = "flip"  # a re-run with 4 views replaces the layers instead of adding more
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert sum(layer.name == "cells labels" for layer in viewer.layers) == 1
    assert widget._predictor(widget._inputs()[3]).model.test_augmentation == "flip"


def test_widget_reports_bad_input(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 16, 16)), name="stack")
    widget = PredictWidget(viewer)
    widget.weights.value = str(tmp_path / "missing.pth")
    widget.run()
    assert widget.worker is None and "2-D images" in widget.status.value
    viewer.add_image(np.zeros((16, 16)), name="plane")
    widget.image.value = "plane"
    widget.run()
    assert "weights file not found" in widget.status.value


def test_reader_opens_mask_pages_as_labels(make_napari_viewer, tmp_path, plugin):
    from iaunet.inference import MaskCrops

    _, masks = scene_masks()
    crops = MaskCrops.from_bitmasks(masks)
    pages = mask_pages(crops, *masks.shape[1:])
    path = tmp_path / "scene_masks.tif"
    path.write_bytes(pages_tiff_bytes(pages))
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="iaunet")
    assert len(layers) == len(pages) >= 2
    assert all(layer._type_string == "labels" for layer in layers)
    assert [layer.name for layer in layers][0] == "scene masks page 1"
    assert sum(len(np.unique(layer.data)) - 1 for layer in layers) == len(masks)
