"""README "Train on your own images", end to end: the documented commands (train_net.py in a
subprocess, a few iterations of a tiny model) on folders of label TIFFs, of ROI sets and on a COCO
json, written by the test; evaluation, prediction without a config, one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import tifffile
import torch
from conftest import ROOT
from detectron2.modeling import build_model
from own_images import write_folder

from iaunet.checkpoint import AtomicCheckpointer, read_checkpoint
from iaunet.config import load_config, trained_config
from iaunet.predict import main as predict_main

SMALL = os.path.join("configs", "custom", "iaunet_small.yaml")
# The small config's architecture, shrunk for seconds-long CPU runs (not part of the README).
TINY = [
    "MODEL.IAUNET.HIDDEN_DIM", "32", "MODEL.IAUNET.MASK_DIM", "32",
    "MODEL.IAUNET.DIM_FEEDFORWARD", "64", "MODEL.IAUNET.NHEADS", "4",
    "MODEL.IAUNET.TRAIN_NUM_POINTS", "256", "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def train_net(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", SMALL, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory holding configs/ (as a user's checkout), the folders, and a
    "pretrained" tiny checkpoint with 8 queries (the synthetic model's stand-in)."""
    d = tmp_path_factory.mktemp("own")
    os.symlink(os.path.join(ROOT, "configs"), d / "configs")
    write_folder(str(d / "labels"), "labels", seeds=range(5))
    write_folder(str(d / "rois_train"), "rois", seeds=range(10, 13))
    write_folder(str(d / "rois_val"), "rois", seeds=range(20, 22))
    write_folder(str(d / "masks"), "masks", seeds=range(30, 32))
    write_folder(str(d / "coco"), "coco", seeds=range(40, 43))
    cfg = load_config(os.path.join(ROOT, SMALL), TINY + ["MODEL.IAUNET.NUM_QUERIES", "8"])
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), str(d / "pretrained"), config=cfg).save("model")
    return d


def test_label_tiffs_train_evaluate_predict(work, monkeypatch):
    """The README's three commands on a folder of label TIFFs (no validation folder)."""
    out = work / "out_labels"
    proc = train_net(
        "DATASETS.TRAIN", '("folder:labels",)', "MODEL.WEIGHTS", "pretrained/model.pth",
        "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "3", *TINY, cwd=work,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # printed at start: sizes chosen; held-out file; queries 8 -> 10 copied; evaluation ran
    assert (
        "Sized from the training set (0 = auto in the config): MODEL.IAUNET.NUM_QUERIES 10" in log
    )
    assert "folder:labels#val: held out for validation (1 images): img0" in log
    assert "The checkpoint has 8 queries, the model 10" in log
    assert "copypaste: AP,AP50" in log
    saved = trained_config(read_checkpoint(str(out / "model_final.pth"))["config"])
    assert saved.MODEL.IAUNET.NUM_QUERIES == 10 and saved.INPUT.IMAGE_SIZE == 128
    # the outputs' score threshold: tuned on the held-out image (or kept, and said so, when the
    # 3-step model finds nothing there), saved, and used by the final evaluation
    thresh = saved.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH
    assert f"MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH {thresh:g}: matching F1@0.5" in log or (
        f"OUTPUT_SCORE_THRESH stays {thresh:g}: no score threshold finds any object of the "
        "images held out of the training set (folder:labels#val)" in log
    )
    assert f"Matching on folder:labels#val (score >= {thresh:g})" in log
    assert saved.DATASETS.TEST == ("folder:labels#val",) and saved.INPUT.PIXEL_SCALE > 0
    # pictures of the held-out image as the evaluation predicts it (tiles at the training scale)
    assert "Visualization of validation predictions failed" not in log
    assert os.listdir(out / "vis") == ["folder_labels_val_0_iter0000003.png"]

    # Evaluate on another folder (overlap-preserving masks TIFFs): the sizes come from the
    # checkpoint.
    proc = train_net(
        "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
        "DATASETS.TEST", '("folder:masks",)', "OUTPUT_DIR", str(work / "eval"), *TINY, cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "copypaste: AP,AP50" in proc.stdout + proc.stderr
    assert os.path.isfile(
        work / "eval" / "inference" / "folder_masks" / "coco_instances_results.json"
    )
    assert len(os.listdir(work / "eval" / "vis")) == 2  # the two images of the folder

    # Predict without --config-file: the config is in the checkpoint.
    monkeypatch.chdir(work)
    args = ["--weights", str(out / "model_final.pth"), "--input", "rois_val", "--output", "pred"]
    assert predict_main(args) == 0
    for k in range(2):
        assert tifffile.imread(work / "pred" / f"img{k:02d}_labels.tif").shape == (96, 96)


def test_roi_sets_and_coco_json_train_and_evaluate(work):
    out = work / "out_rois"
    proc = train_net(
        "DATASETS.TRAIN", '("folder:rois_train", "coco:coco/annotations.json")',
        "DATASETS.TEST", '("folder:rois_val", "coco:coco/annotations.json")',
        "MODEL.WEIGHTS", "pretrained/model.pth", "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2",
        *TINY, cwd=work,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Training set: 6 images, 36 objects" in log
    assert log.count("copypaste: AP,AP50") == 2  # one evaluation per test set
    for name in ("folder_rois_val", "coco_coco_annotations.json"):
        with open(out / "inference" / name / "coco_instances_results.json") as f:
            assert isinstance(json.load(f), list)


def test_bad_folder_is_one_line(work):
    bad = work / "bad"
    write_folder(str(bad), "labels", seeds=[1, 2])
    os.remove(bad / "img01_labels.tif")
    proc = train_net(
        "DATASETS.TRAIN",
        '("folder:bad",)',
        "MODEL.WEIGHTS",
        "",
        "MODEL.IAUNET.TRAIN.FROM_SCRATCH",
        "True",
        cwd=work,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [
        "train_net.py: error: bad/img01.tif: image without annotation; expected "
        "img01_labels.tif|.png, img01_masks.tif or img01_rois.zip next to it"
    ], proc.stderr[-2000:]
