"""bioimage.io model packages (tools/export_model.py --format bioimageio,
iaunet.deploy.bioimageio): bioimageio.core's own test passes on the package of a tiny model and
fails when a test output is perturbed; bioimageio.core's prediction on an image the package has
not seen equals iaunet-predict's."""

import hashlib
import json
import os
import zipfile

import numpy as np
import pycocotools.mask as mask_util
import pytest
import tifffile
import torch
from bioimageio.core import create_prediction_pipeline, predict
from bioimageio.spec import InvalidDescr, ModelDescr, load_description
from conftest import ROOT, load_tool, tiny_cfg
from detectron2.modeling import build_model

from iaunet.checkpoint import AtomicCheckpointer
from iaunet.deploy.bioimageio import synthetic_test_image, validate_package
from iaunet.predict import main as iaunet_predict

export_tool = load_tool("export_model")

# A tiny Swin backbone (0.9M parameters: 4 MB weights, where tiny_cfg's ResNet-18 has 46 MB that
# every check of bioimage.io's test reads again) and a widened class head (see `package`): on these
# scenes (40 x 40 and 101 x 87 px) seven detections score 0.51-0.52, the eighth 0.02.
SWIN = {
    "MODEL.BACKBONE.NAME": "D2SwinTransformer",
    "MODEL.SWIN.EMBED_DIM": 24,
    "MODEL.SWIN.DEPTHS": [1, 1, 1, 1],
    "MODEL.SWIN.NUM_HEADS": [1, 1, 1, 1],
    "MODEL.SWIN.WINDOW_SIZE": 4,
}
SCORE_THRESH = 0.3


def _saved_model(folder, **overrides) -> str:
    """A random tiny model (pixel scale 0.8, percentile-normalized inputs, ``overrides``) saved as
    a checkpoint in ``folder``; its path. Class logits of a random model hardly differ between
    queries (std 0.01): all scores would tie; a larger std separates the queries that are kept
    from those that are not."""
    opts = {"INPUT.PIXEL_SCALE": 0.8, "INPUT.NORMALIZE_8BIT": True, "TEST.TILE_SIZE": 128}
    cfg = tiny_cfg(**opts, **SWIN)
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    for m in model.modules():
        if hasattr(m, "class_embed"):
            torch.nn.init.normal_(m.class_embed.weight, std=3.0)
    AtomicCheckpointer(model, str(folder), config=cfg).save("model")
    return str(folder / "model.pth")


@pytest.fixture(scope="module")
def package(tmp_path_factory, one_thread):
    """A random tiny model (pixel scale 0.8, percentile-normalized inputs) saved as a checkpoint
    and exported by the tool as a zip package. Returns (checkpoint, package)."""
    d = tmp_path_factory.mktemp("bioimageio")
    weights = _saved_model(d)
    out = str(d / "iaunet.zip")
    args = ["--weights", weights, "--format", "bioimageio", "--output", out]
    args += ["--author", "IAUNet tests", "--project-url", "https://example.com/iaunet-d2"]
    assert export_tool.main(args + ["--score-threshold", str(SCORE_THRESH), "--no-check"]) == 0
    return weights, out


def test_package_contents(package):
    _, path = package
    descr = load_description(path)
    assert not isinstance(descr, InvalidDescr), descr.validation_summary.format()
    assert descr.format_version == ModelDescr.implemented_format_version  # the installed spec's
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        readme = z.read("README.md").decode()
    assert {"rdf.yaml", "weights.pt", "weights.onnx", "cover.png", "test_input.npy"} <= names
    assert {f"test_output_{k}.npy" for k in ("labels", "masks", "scores")} <= names
    assert "# Validation" in readme
    assert descr.weights.onnx.parent == "torchscript" and descr.weights.torchscript.parent is None
    assert any("IAUNet: Instance-Aware U-Net" in c.text for c in descr.cite)
    assert any(str(c.url) == "https://example.com/iaunet-d2" for c in descr.cite)
    assert [a.name for a in descr.authors] == ["IAUNet tests"] and descr.license
    assert "INPUT.PIXEL_SCALE 0.8" in descr.training_data.description
    assert descr.config.model_extra["iaunet"]["pixel_scale"] == 0.8
    steps = [p.id for p in descr.inputs[0].preprocessing]
    assert steps == ["ensure_dtype", "scale_range", "clip", "scale_linear", "ensure_dtype"]
    assert [o.id for o in descr.outputs] == ["labels", "masks", "scores"]
    instances = descr.outputs[1].axes[1].size  # masks: a data-dependent instance axis
    assert (instances.min, instances.max) == (1, 8)  # at most the 8 queries
    y = descr.inputs[0].axes[2].size  # from the test image's size (half a 64 / 0.8 crop) up
    assert (y.min, y.step) == (40, 1)


def test_bioimageio_core_test_passes(package):
    """bioimageio.core's test (`bioimageio test`): the format is valid, both weights formats
    reproduce the test outputs and run at the described input sizes."""
    _, path = package
    summary = validate_package(path)
    assert summary.status == "passed", summary.format()
    passed = {d.name for d in summary.details if d.status == "passed"}
    for weights in ("torchscript", "onnx"):
        assert f"Reproduce test outputs from test inputs ({weights})" in passed


def test_bioimageio_core_test_fails_on_perturbed_test_output(package, tmp_path):
    """The same package with two instance ids of its test label image swapped (and the rdf's
    sha256 updated, so that only the comparison can fail) does not pass."""
    _, path = package
    with zipfile.ZipFile(path) as z:
        z.extractall(tmp_path)
    name = tmp_path / "test_output_labels.npy"
    labels = np.load(name)
    assert labels.max() >= 2
    swapped = np.where(labels == 1, 2, np.where(labels == 2, 1, labels)).astype(labels.dtype)
    np.save(name, swapped)
    old = load_description(path).outputs[0].test_tensor.sha256
    new = hashlib.sha256(name.read_bytes()).hexdigest()
    rdf = (tmp_path / "rdf.yaml").read_text()
    assert old in rdf
    (tmp_path / "rdf.yaml").write_text(rdf.replace(old, new))
    summary = validate_package(str(tmp_path), weight_format="torchscript")
    assert summary.status != "passed"
    failed = {d.name: d for d in summary.details if d.status == "failed"}
    reproduce = failed.pop("Reproduce test outputs from test inputs (torchscript)")
    assert not failed  # the format and the inference at other sizes are still fine
    assert "'labels'" in reproduce.errors[0].msg


def test_bioimageio_prediction_matches_iaunet_predict(package, tmp_path):
    """An unseen 16-bit scene, predicted by bioimageio.core with each weights format and by
    iaunet-predict (checkpoint, eager model): the same instances (count, mask IoU >= 0.99,
    scores) and label image."""
    weights, path = package
    image = synthetic_test_image((101, 87), "uint16", seed=7)  # the test image's: 40 x 40
    tifffile.imwrite(tmp_path / "unseen.tif", image)
    args = ["--weights", weights, "--input", str(tmp_path / "unseen.tif"), "--output"]
    args += [str(tmp_path / "out"), "--save", "labels,coco", "--score-threshold", str(SCORE_THRESH)]
    assert iaunet_predict(args) == 0
    expected_labels = tifffile.imread(tmp_path / "out" / "unseen_labels.tif")
    expected = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(expected) >= 1
    descr = load_description(path)
    for weights_format in ("torchscript", "onnx"):
        pipeline = create_prediction_pipeline(descr, weight_format=weights_format, devices=["cpu"])
        sample = predict(model=pipeline, inputs={"image": image[None, None]})
        labels = sample.members["labels"].data.values[0, 0]
        masks = sample.members["masks"].data.values[0].astype(bool)
        scores = sample.members["scores"].data.values[0]
        assert len(masks) == len(scores) == len(expected), weights_format
        for mask, score, det in zip(masks, scores, expected):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            iou = mask_util.iou([rle], [det["segmentation"]], [0])[0, 0]
            assert iou >= 0.99 and abs(score - det["score"]) <= 1e-4, weights_format
        assert (labels == expected_labels).mean() >= 0.999, weights_format


def test_quick_config_model_exports_and_passes_bioimageio_test(tmp_path, one_thread):
    """The README's quick-config architecture (random weights: no trained model in CI), exported
    by the tool with its default check: bioimageio.core's test of the package passes."""
    from iaunet.config import load_config

    # INPUT.PIXEL_SCALE 0 (auto) is sized and recorded by training; the synthetic cells give 1.0.
    cfg = load_config(
        os.path.join(ROOT, "configs/synthetic/iaunet_quick.yaml"), ["INPUT.PIXEL_SCALE", 1.0]
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for m in model.modules():  # separate the queries' scores (see `package`)
        if hasattr(m, "class_embed"):
            torch.nn.init.normal_(m.class_embed.weight, std=3.0)
    AtomicCheckpointer(model, str(tmp_path), config=cfg).save("quick")
    out = str(tmp_path / "quick.zip")
    args = ["--weights", str(tmp_path / "quick.pth"), "--format", "bioimageio", "--output", out]
    args += ["--score-threshold", "0.3"]
    assert export_tool.main(args) == 0  # 1 when bioimageio.core's test does not pass
    assert load_description(out).name.startswith("IAUNet")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "64", "64"], "do not apply to --format bioimageio"),
        (["--test-image", "missing.tif"], "missing.tif"),
        (["--score-threshold", "0.99"], "gives no detection scoring >= 0.99"),
        (["--name", "bad/name"], "--name 'bad/name': Value error"),
        (["--license", "MY-LICENSE"], "--license 'MY-LICENSE' is not an SPDX license id"),
    ],
)
def test_cli_errors_are_one_line(package, tmp_path, capsys, extra, message):
    weights, _ = package
    args = ["--weights", weights, "--format", "bioimageio", "--output", str(tmp_path / "p.zip")]
    with pytest.raises(SystemExit) as exit_info:
        export_tool.exit_on_config_error(lambda: export_tool.main(args + extra), "export_model.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "p.zip")


def test_amodal_package_carries_whole_outlines(tmp_path, one_thread):
    """A MODEL.IAUNET.AMODAL model's package: a fourth output, the whole outlines, that passes
    bioimageio.core's test; on an unseen image each weights format gives visible masks inside
    whole outlines, with the areas iaunet-predict's table reports (area_visible, area_whole)."""
    import csv

    weights = _saved_model(tmp_path, **{"MODEL.IAUNET.AMODAL": True})
    path = str(tmp_path / "amodal.zip")
    args = ["--weights", weights, "--format", "bioimageio", "--output", path, "--no-check"]
    args += ["--author", "IAUNet tests", "--score-threshold", str(SCORE_THRESH)]
    assert export_tool.main(args) == 0
    descr = load_description(path)
    assert [o.id for o in descr.outputs] == ["labels", "masks", "scores", "whole_masks"]
    # bioimage.io's test on the ONNX weights (converted from the TorchScript ones, which the
    # prediction below runs too)
    summary = validate_package(path, weight_format="onnx")
    assert summary.status == "passed", summary.format()

    image = synthetic_test_image((101, 87), "uint16", seed=7)
    tifffile.imwrite(tmp_path / "unseen.tif", image)
    args = ["--weights", weights, "--input", str(tmp_path / "unseen.tif"), "--output"]
    args += [str(tmp_path / "out"), "--save", "csv", "--score-threshold", str(SCORE_THRESH)]
    assert iaunet_predict(args) == 0
    with open(tmp_path / "out" / "unseen_objects.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and any(int(r["area_whole"]) > int(r["area_visible"]) for r in rows)
    for weights_format in ("torchscript", "onnx"):
        pipeline = create_prediction_pipeline(descr, weight_format=weights_format, devices=["cpu"])
        sample = predict(model=pipeline, inputs={"image": image[None, None]})
        masks = sample.members["masks"].data.values[0].astype(bool)
        whole = sample.members["whole_masks"].data.values[0].astype(bool)
        assert whole.shape == masks.shape and len(masks) == len(rows), weights_format
        assert not (masks & ~whole).any()  # visible inside whole
        for r, m, w in zip(rows, masks, whole):
            assert abs(int(m.sum()) - int(r["area_visible"])) <= max(2, 0.01 * m.sum())
            assert abs(int(w.sum()) - int(r["area_whole"])) <= max(2, 0.01 * w.sum())


def test_two_channel_package_declares_and_normalizes_its_channels(tmp_path, one_thread):
    """A model of INPUT.CHANNELS ("nuclei", "cyto"): its package takes those two channels (named
    in the rdf, each percentile-normalized on its own), passes bioimageio.core's test, and on an
    unseen two-channel OME-TIFF gives iaunet-predict's label image (which reads the file's named
    channels with no flag)."""
    from iaunet.data.datasets.synthetic_channels import render_two_channel_scene

    two = {"INPUT.CHANNELS": ("nuclei", "cyto"), "MODEL.PIXEL_MEAN": [40.0] * 2}
    weights = _saved_model(tmp_path, **two, **{"MODEL.PIXEL_STD": [30.0] * 2})
    meta = {"axes": "CYX", "Channel": {"Name": ["cyto", "nuclei"]}}
    for name, seed, size in (("test", 1, (48, 48)), ("unseen", 7, (101, 87))):
        image = render_two_channel_scene(seed, size)[0]
        tifffile.imwrite(tmp_path / f"{name}.tif", image, ome=True, metadata=meta)
    path = str(tmp_path / "two.zip")
    args = ["--weights", weights, "--format", "bioimageio", "--output", path, "--no-check"]
    args += ["--author", "IAUNet tests", "--score-threshold", str(SCORE_THRESH)]
    assert export_tool.main(args + ["--test-image", str(tmp_path / "test.tif")]) == 0
    descr = load_description(path)
    axis = descr.inputs[0].axes[1]
    assert [str(n) for n in axis.channel_names] == ["nuclei", "cyto"]
    (scale_range,) = [p for p in descr.inputs[0].preprocessing if p.id == "scale_range"]
    assert [str(a) for a in scale_range.kwargs.axes] == ["y", "x"]  # per channel
    summary = validate_package(path, weight_format="onnx")
    assert summary.status == "passed", summary.format()

    args = ["--weights", weights, "--input", str(tmp_path / "unseen.tif"), "--output"]
    args += [str(tmp_path / "out"), "--save", "labels", "--score-threshold", str(SCORE_THRESH)]
    assert iaunet_predict(args) == 0
    expected = tifffile.imread(tmp_path / "out" / "unseen_labels.tif")
    assert expected.max() >= 1
    unseen = tifffile.imread(tmp_path / "unseen.tif")[::-1]  # the model's order: nuclei, cyto
    pipeline = create_prediction_pipeline(descr, weight_format="torchscript", devices=["cpu"])
    sample = predict(model=pipeline, inputs={"image": unseen[None]})
    labels = sample.members["labels"].data.values[0, 0]
    assert (labels == expected).mean() >= 0.999
