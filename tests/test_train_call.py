"""``iaunet.train``: training on arrays is the command line's training (same folder layout, saved
config and first loss), reports progress, stops with a usable checkpoint, and rejects bad arrays
with a message naming the image."""

import json
import os
import shlex
import subprocess
import sys
import threading

import numpy as np
import pytest
import tifffile
from conftest import ROOT, TINY_MODEL_OPTS

import iaunet
from iaunet.inference import IAUNetPredictor

# a seconds-long run of the small config (what iaunet.train uses) with the tiny model
OPTS = [
    *TINY_MODEL_OPTS,
    *("MODEL.IAUNET.TRAIN.FROM_SCRATCH", "True", "INPUT.IMAGE_SIZE", "64"),
    *("SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "SEED", "7"),
    *("MODEL.IAUNET.NUM_QUERIES", "8", "SOLVER.CHECKPOINT_PERIOD", "1000"),
]


def _nuclei(seed: int, size: int = 96):
    """A 16-bit image of bright ellipses and its label image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint16)
    for k, (cy, cx) in enumerate([(20, 20), (22, 60), (60, 30), (70, 72)], 1):
        a, b = rng.uniform(7, 10, 2)
        labels[(((y - cy) / a) ** 2 + ((x - cx) / b) ** 2 <= 1) & (labels == 0)] = k
    image = 200 + rng.normal(0, 20, labels.shape) + 1500 * (labels > 0)
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if "total_loss" in line]


def test_train_on_arrays_equals_the_command_line(synthetic_ready, tmp_path):
    images, labels = zip(*(_nuclei(s) for s in range(3)))
    out = str(tmp_path / "arrays")
    path = iaunet.train(images, labels, out, weights="", max_iter=2, opts=OPTS)
    assert path == os.path.join(out, "model_final.pth") and os.path.isfile(path)
    train = os.path.join(out, "data", "train")
    assert sorted(os.listdir(train)) == sorted(
        f"img_{i:03d}{s}.tif" for i in range(3) for s in ("", "_labels")
    )
    assert np.array_equal(tifffile.imread(os.path.join(train, "img_001_labels.tif")), labels[1])
    # the command it saved, run from a terminal into another folder: the same run
    command = shlex.split(open(os.path.join(out, "train_command.txt")).read())
    assert command[:2] == ["python", "train_net.py"]
    cli = str(tmp_path / "cli")
    command[command.index("OUTPUT_DIR") + 1] = cli
    env = dict(os.environ, DETECTRON2_DATASETS=synthetic_ready, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def config(run):
        with open(os.path.join(run, "config.yaml")) as f:
            return [line for line in f if not line.startswith("OUTPUT_DIR")]

    assert config(out) == config(cli)
    assert _metrics(out)[0]["total_loss"] == pytest.approx(_metrics(cli)[0]["total_loss"], 1e-4)
    # held out 20 % (no val arrays) and evaluated them at the end
    results = json.load(open(os.path.join(out, "final_results.json")))
    assert "segm" in results and "matching" in results
    predictor = IAUNetPredictor.from_checkpoint(path)
    assert predictor(images[0]).image_size == images[0].shape


def test_progress_stop_and_label_pages(synthetic_ready, tmp_path):
    """Progress after each step; a stop request ends the run after that step with a checkpoint
    that loads; label pages (overlapping objects) are written as _masks.tif."""
    (a, la), (b, lb) = _nuclei(0), _nuclei(1)
    pages = np.stack([lb, np.where(np.roll(lb, 5, axis=1) == 1, 9, 0)]).astype(np.uint16)
    stop, seen = threading.Event(), []

    def progress(p):
        seen.append(p)
        if p["iteration"] == 2:
            stop.set()

    out = str(tmp_path / "run")
    path = iaunet.train(
        [a, b], [la, pages], out, weights="", max_iter=50, opts=OPTS, progress=progress, stop=stop,
        val_images=[a], val_labels=[la],
    )  # fmt: skip
    assert [p["iteration"] for p in seen] == [1, 2]
    assert seen[0]["max_iter"] == 50 and np.isfinite(seen[0]["loss"]) and seen[0]["eta_s"] > 0
    assert os.path.basename(path) == "model_0000001.pth" and not os.path.exists(
        os.path.join(out, "model_final.pth")
    )
    assert IAUNetPredictor.from_checkpoint(path)(a).image_size == a.shape
    written = tifffile.imread(os.path.join(out, "data", "train", "img_001_masks.tif"))
    assert np.array_equal(written, pages)
    assert os.listdir(os.path.join(out, "data", "val")) == ["img_000.tif", "img_000_labels.tif"]
    with pytest.raises(ValueError, match="already holds training data"):
        iaunet.train([a], [la], out, opts=OPTS)


@pytest.mark.parametrize(
    "images,labels,message",
    [
        ([np.zeros((32, 32))], [np.zeros((32, 31), int)], "image 0: labels of shape"),
        ([np.zeros((5, 32, 32))], [np.zeros((32, 32), int)], "image 0: a 3-D"),
        ([np.zeros((32, 32))], [np.zeros((32, 32), int)], "no object in any label image"),
        ([np.zeros((32, 32))], [np.full((32, 32), 0.5)], "image 0: labels of type float"),
        ([np.zeros((32, 32))] * 2, [np.ones((32, 32), int)], "2 images but 1 label images"),
    ],
    ids=["size", "stack", "empty", "float", "count"],
)
def test_bad_arrays_name_the_image(tmp_path, images, labels, message):
    with pytest.raises(ValueError, match=message):
        iaunet.train(images, labels, str(tmp_path / "run"), opts=OPTS)
    assert not os.path.exists(tmp_path / "run" / "model_final.pth")


def test_two_channel_arrays_train_a_model_of_those_channels(tmp_path):
    """(H, W, 2) arrays with ``channels=`` names: written as named OME-TIFFs, the model takes
    those channels (INPUT.CHANNELS) and iaunet-predict's reader gives it them from such a file."""
    from iaunet.checkpoint import read_checkpoint
    from iaunet.config import trained_config
    from iaunet.data.datasets.synthetic_channels import render_two_channel_scene
    from iaunet.data.image_io import read_image

    scenes = [render_two_channel_scene(s, (96, 96)) for s in (0, 1)]
    images = [np.moveaxis(image, 0, -1) for image, _ in scenes]
    out = str(tmp_path / "run")
    path = iaunet.train(
        images, [lab for _, lab in scenes], out, weights="", max_iter=2,
        opts=[*OPTS, "INPUT.PIXEL_SCALE", "1.0"], channels=("cyto", "nuclei"),
    )  # fmt: skip
    cfg = trained_config(read_checkpoint(path)["config"])
    assert tuple(cfg.INPUT.CHANNELS) == ("cyto", "nuclei") and len(cfg.MODEL.PIXEL_MEAN) == 2
    written = os.path.join(out, "data", "train", "img_001.tif")
    np.testing.assert_array_equal(
        read_image(written, channels=("nuclei",))[..., 0], images[1][..., 1]
    )
    predictor = IAUNetPredictor.from_checkpoint(path)
    assert predictor(read_image(written, channels=predictor.channels)).image_size == (96, 96)
    with pytest.raises(ValueError, match=r"image 0: shape \(96, 96\); expected \(H, W, 2\)"):
        iaunet.train([images[0][..., 0]], [scenes[0][1]], str(tmp_path / "b"), channels=("a", "b"))
