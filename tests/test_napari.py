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
    assert [w.display_name for w in manifest.contributions.widgets] == [
        "IAUNet prediction",
        "IAUNet training",
    ]
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

    # the slider filters the last prediction again, without running the model
    scores = np.asarray(points.features["score"])
    predictor = widget._predictor(widget._inputs()[3])
    predictor.predict = lambda *a, **k: pytest.fail("the model ran for a threshold change")
    widget.score_threshold.value = float(np.median(scores)) + 1e-6
    kept = int((scores >= widget.score_threshold.value).sum())
    assert 0 < kept < n or n == 1
    assert len(viewer.layers["cells scores"].data) == kept
    assert viewer.layers["cells labels"].data.max() <= kept
    assert widget.status.value == f"{kept} instances, " + widget.status.value.split(", ")[1]
    del predictor.predict
    widget.score_threshold.value = 0.0
    assert len(viewer.layers["cells scores"].data) == n

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


def _nuclei_layers(viewer, names=("a", "b")):
    from test_train_call import _nuclei

    for k, name in enumerate(names):
        image, labels = _nuclei(k)
        viewer.add_image(image, name=name)
        viewer.add_labels(labels, name=f"{name} labels")


def test_training_widget_adds_trains_and_hands_over_the_model(
    make_napari_viewer, qtbot, tmp_path, plugin, synthetic_ready
):
    """Add two corrected images to the training set (files that train_net.py reads), train a few
    iterations in the worker thread, and the prediction widget gets the new model."""
    from detectron2.data import DatasetCatalog
    from test_train_call import OPTS

    from iaunet.data.datasets.folder import register_path_datasets
    from iaunet.inference import IAUNetPredictor
    from iaunet.napari_plugin.training import START_MODEL, TrainWidget

    viewer = make_napari_viewer()
    _nuclei_layers(viewer)
    _, predict = viewer.window.add_plugin_dock_widget("iaunet", "IAUNet prediction")
    _, widget = viewer.window.add_plugin_dock_widget("iaunet", "IAUNet training")
    assert isinstance(widget, TrainWidget)
    widget.folder.value = str(tmp_path / "train")
    for name in ("a", "b"):
        widget.image.value, widget.labels.value = name, f"{name} labels"
        assert widget.add_to_training_set().endswith(f"{name}.tif"), widget.status.value
    assert "2 image(s)" in widget.status.value
    name = f"folder:{tmp_path / 'train'}"
    register_path_datasets([name])
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 2 and all(len(d["annotations"]) == 4 for d in dicts)

    widget.source.value = START_MODEL
    widget.output.value = str(tmp_path / "runs")
    widget.iterations.value = 2
    widget.run(opts=[*OPTS, "MODEL.WEIGHTS", ""])
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    path = str(tmp_path / "runs" / "run_001" / "model_final.pth")
    assert widget.last_model == path, widget.status.value
    assert widget.status.value.startswith("model:") and "F1@0.5" in widget.status.value
    assert widget.progress.value == widget.progress.max == 2
    assert predict.weights.value.as_posix() == path  # the next prediction uses it
    assert IAUNetPredictor.from_checkpoint(path)(viewer.layers["a"].data).image_size == (96, 96)


def test_training_widget_stop_keeps_a_checkpoint(
    make_napari_viewer, qtbot, tmp_path, synthetic_ready
):
    from test_train_call import OPTS

    from iaunet.inference import IAUNetPredictor
    from iaunet.napari_plugin.training import TrainWidget

    viewer = make_napari_viewer()
    _nuclei_layers(viewer)
    widget = TrainWidget(viewer)
    widget.folder.value = str(tmp_path / "train")
    for name in ("a", "b"):
        widget.image.value, widget.labels.value = name, f"{name} labels"
        widget.add_to_training_set()
    widget.output.value = str(tmp_path / "runs")
    widget.iterations.value = 200
    widget.run(opts=[*OPTS, "MODEL.WEIGHTS", ""])
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=300_000)
    widget.stop()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    assert os.path.basename(widget.last_model).startswith("model_0"), widget.status.value
    assert widget.progress.value < 200
    assert not os.path.exists(tmp_path / "runs" / "run_001" / "model_final.pth")
    predictor = IAUNetPredictor.from_checkpoint(widget.last_model)
    assert predictor(viewer.layers["a"].data).image_size == (96, 96)


def test_training_widget_reports_bad_layers(make_napari_viewer, tmp_path):
    from iaunet.napari_plugin.training import TrainWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32)), name="img")
    viewer.add_labels(np.zeros((32, 32), int), name="empty")
    viewer.add_labels(np.ones((20, 20), int), name="small")
    viewer.add_image(np.zeros((3, 32, 32)), name="stack")
    widget = TrainWidget(viewer)
    widget.folder.value = str(tmp_path / "train")
    for image, labels, message in [
        ("img", "empty", "empty: annotate"),
        ("img", "small", "do not fit image 'img'"),
        ("stack", "empty", "2-D images"),
    ]:
        widget.image.value, widget.labels.value = image, labels
        assert widget.add_to_training_set() is None
        assert message in widget.status.value, widget.status.value
    assert not os.path.exists(tmp_path / "train")
    widget.run()
    assert widget.worker is None and "training folder is empty" in widget.status.value


def test_widget_gives_a_channel_model_its_channels(make_napari_viewer, qtbot, tmp_path, plugin):
    """A model of INPUT.CHANNELS ("nuclei", "cyto"): a (C, H, W) layer with channel names in its
    metadata and the same channels opened as layers named by them give the same prediction; a
    2-D layer without them is one line naming the channels."""
    from detectron2.modeling import build_model

    from iaunet.data.datasets.synthetic_channels import render_two_channel_scene

    cfg = tiny_cfg(**{"MODEL.IAUNET.TEST.SCORE_THRESH": 0.0, "INPUT.PIXEL_SCALE": 1.0})
    cfg.merge_from_list(["INPUT.CHANNELS", ("nuclei", "cyto")])
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [40.0, 40.0], [30.0, 30.0]
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), str(tmp_path), config=cfg).save("model")
    image = render_two_channel_scene(2, (64, 80))[0]
    viewer = make_napari_viewer()
    viewer.add_image(image, name="scene", metadata={"channel_names": ["cyto", "nuclei"]})
    widget = PredictWidget(viewer)
    widget.weights.value = str(tmp_path / "model.pth")
    widget.score_threshold.value = 0.0
    widget.device.value = "cpu"
    results = []
    for layer in ("scene", "cyto"):
        if layer == "cyto":  # the file opened channel by channel
            viewer.add_image(image[0], name="cyto")
            viewer.add_image(image[1], name="nuclei")
        widget.image.value = layer
        widget.run()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
        assert widget.status.value.endswith("mask page(s)"), widget.status.value
        results.append(viewer.layers[f"{layer} labels"].data.copy())
    assert results[0].shape == (64, 80) and results[0].max() >= 1
    np.testing.assert_array_equal(results[0], results[1])
    viewer.layers.remove("nuclei")
    widget.image.value = "cyto"
    widget.run()
    assert widget.worker is None and "open the channels as image layers named 'nuclei', 'cyto'" in (
        widget.status.value
    )
