"""The few-shot benchmark: its folds, its metrics on known cases, and a smoke run of the tool (one
fold, a few iterations, Otsu and a one-epoch Cellpose) on a generated nuclei image."""

import importlib.util
import json
import os

import numpy as np
import pytest
import tifffile
from conftest import ROOT, TINY_MODEL_OPTS, load_tool

from iaunet.bench import few_shot as fs


def nuclei_image(size=128, seed=0):
    """Bright ellipses on a dim noisy background, 16-bit, with their label image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint16)
    k = 0
    for cy in range(10, size - 5, 21):
        for cx in range(10, size - 5, 21):
            a, b = rng.uniform(5, 8, 2)
            inside = ((y - cy - rng.uniform(-2, 2)) / a) ** 2 + ((x - cx) / b) ** 2 <= 1
            k += 1
            labels[inside & (labels == 0)] = k
    image = 200 + rng.normal(0, 15, labels.shape) + 1800 * (labels > 0)
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def test_folds_cover_each_quadrant_once(tmp_path):
    image, labels = nuclei_image()
    folds = fs.write_folds(image, labels, str(tmp_path))
    assert [f["test"] for f in folds] == list(fs.QUADRANTS)
    for k, fold in enumerate(folds):
        train, val = fs.read_folder(fold["train"]), fs.read_folder(fold["val"])
        assert [s for s, _, _ in val] == [fs.QUADRANTS[k]]
        assert sorted(s for s, _, _ in train) == sorted(set(fs.QUADRANTS) - {fs.QUADRANTS[k]})
        r, c = fs.quadrants(labels.shape)[k]
        stem, img, lab = val[0]
        assert np.array_equal(img, image[r, c]) and lab.dtype == np.uint16
        assert sorted(np.unique(lab))[1:] == list(range(1, lab.max() + 1))  # relabelled 1..N
    with pytest.raises(ValueError, match="differ in size"):
        fs.write_folds(image, labels[:10], str(tmp_path / "bad"))


def test_image_variants_keep_every_object_and_its_outline():
    """--variant: resized (objects scale with the image, none lost), rotated and cut to the square
    inside (no padded corners: every pixel comes from the image), another exposure (gamma, gain) and
    noise in the image's own range and dtype; bad specs name the item."""
    image, labels = nuclei_image(size=128)
    n = len(np.unique(labels)) - 1
    img, lab = fs.image_variant(image, labels, fs.parse_variant("scale=1.5"))
    assert img.shape == lab.shape == (192, 192) and img.dtype == np.uint16
    assert len(np.unique(lab)) - 1 == n
    assert fs.median_diameter([lab]) == pytest.approx(1.5 * fs.median_diameter([labels]), rel=0.05)
    img, lab = fs.image_variant(image, labels, fs.parse_variant("rotate=30"))
    side = int(128 / (np.cos(np.pi / 6) + np.sin(np.pi / 6)))
    assert lab.shape == (side, side) and img.min() >= image.min()  # no zero-padded corner
    assert 0.5 * n < len(np.unique(lab)) - 1 <= n
    assert sorted(np.unique(lab))[1:] == list(range(1, lab.max() + 1))
    img, lab = fs.image_variant(image, labels, fs.parse_variant("gamma=2,gain=0.5"))
    assert np.array_equal(lab, fs.relabel(labels))
    lo, hi = float(image.min()), float(image.max())
    expect = lo + 0.5 * ((image.astype(float) - lo) / (hi - lo)) ** 2 * (hi - lo)
    assert np.abs(img - expect).max() <= 0.5
    noisy = fs.image_variant(image, labels, fs.parse_variant("noise=5,seed=3"))[0]
    assert np.array_equal(noisy, fs.image_variant(image, labels, {"noise": 5, "seed": 3})[0])
    assert 0.03 < np.std(noisy.astype(float) - image) / (hi - lo) < 0.07
    for bad, match in (
        ("scale", "KEY=NUMBER"),
        ("zoom=2", "KEY=NUMBER"),
        ("gain=x", "'x' of gain"),
    ):
        with pytest.raises(ValueError, match=match):
            fs.parse_variant(bad)


def test_metrics_on_known_cases():
    _, labels = nuclei_image()
    n = len(np.unique(labels)) - 1
    perfect = fs.score_label_images([labels], [labels])
    assert perfect["AP"] == pytest.approx(100) and perfect["F1"] == pytest.approx(100)
    assert perfect["count_ratio"] == 1
    # drop 4 objects and shift one far away: 1 FP, 5 FN
    pred = labels.copy()
    for i in range(1, 5):
        pred[pred == i] = 0
    moved = np.roll(np.where(labels == 5, 5, 0), 60, axis=1).astype(np.uint16)
    pred[pred == 5] = 0
    pred = np.where(moved > 0, moved, pred)
    m = fs.label_image_matching([labels], [pred])
    tp = n - 5
    assert m["precision"] == pytest.approx(100 * tp / (tp + 1))
    assert m["recall"] == pytest.approx(100 * tp / n)
    assert m["count_ratio"] == pytest.approx((n - 4) / n)
    # scores order the detections for AP: the false positive ranked first costs more
    ids = [i for i in np.unique(pred) if i]
    low = {i: (0.1 if i == 5 else 0.9) for i in ids}
    high = {i: (0.99 if i == 5 else 0.5) for i in ids}
    ap_low = fs.score_label_images([labels], [pred], [[low.get(i, 0) for i in range(1, 99)]])
    ap_high = fs.score_label_images([labels], [pred], [[high.get(i, 0) for i in range(1, 99)]])
    assert ap_low["AP"] > ap_high["AP"]


def test_segm_ap_with_more_than_100_predictions():
    """Over 100 predictions in an image (a crowded image, or every query kept): AP is still read
    (pycocotools' first summary figure is -1 unless maxDets holds 100); low-scoring extras after
    the exact masks cost nothing."""
    _, labels = nuclei_image()
    gt = fs.label_rles(labels)
    blank = np.zeros_like(labels, dtype=np.uint8)
    extra = []
    for i in range(120):
        speck = blank.copy()
        speck[i % 100, (7 * i) % 128] = 1
        extra.append((fs.mask_util.encode(np.asfortranarray(speck)), 0.01))
    exact = [(rle, 0.9) for rle in gt]
    assert fs.segm_ap([gt], [exact + extra]) == pytest.approx(
        {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
    )
    half = fs.segm_ap([gt], [exact[::2] + extra])
    assert 0 < half["AP"] < 60 and half["AP"] == pytest.approx(half["AP75"])


def test_otsu_watershed_splits_touching_nuclei():
    _, labels = nuclei_image()
    two = np.zeros((40, 60), np.uint16)
    y, x = np.mgrid[:40, :60]
    two[(y - 20) ** 2 + (x - 20) ** 2 <= 100] = 1
    two[((y - 20) ** 2 + (x - 37) ** 2 <= 100) & (two == 0)] = 2  # touching discs
    image = (100 + 1000 * (two > 0)).astype(np.uint16)
    pred = fs.otsu_watershed(image, diameter=20)
    assert len(np.unique(pred)) - 1 == 2
    assert fs.label_image_matching([two], [pred])["F1"] == pytest.approx(100)
    assert fs.median_diameter([two]) == pytest.approx(2 * np.sqrt((two == 1).sum() / np.pi), 0.1)


def test_units_for_budget_keeps_the_fixed_cost_apart():
    """Probes of a run costing 30 + 2 n CPU-s: 2 per unit, 30 fixed, (600 - 30) / 2 units."""
    calls = []

    def cost(n):
        calls.append(n)
        return 30 + 2.0 * n

    assert fs.units_for_budget(cost, 600, (5, 20)) == (285, pytest.approx(2.0), pytest.approx(30))
    assert calls == [5, 20]
    assert fs.units_for_budget(cost, 10, (5, 20))[0] == 1  # never less than one unit
    assert fs.cellpose_final_lr(500) == pytest.approx(0.005 / 1024)
    assert fs.cellpose_final_lr(50) == pytest.approx(0.005)


def test_benchmark_tool_smoke(tmp_path, monkeypatch, capsys):
    """The tool end to end on one fold with a CPU budget: IAUNet (tiny; its iterations from two
    probes, here of a known cost; trained, evaluated and predicted with one and four views through
    the README commands), Otsu + watershed, Cellpose (1 epoch, one view and augment) and StarDist
    (1 epoch); every method scored from its label image, table printed and results.json
    written."""
    image, labels = nuclei_image()
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    spec = importlib.util.spec_from_file_location(
        "benchmark_few_shot", os.path.join(ROOT, "tools", "benchmark_few_shot.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    real_train = tool.train_iaunet
    probes = []

    def train(args, fold, out, opts):  # the probes cost 10 + 0.5 n CPU-s, and do not run
        if "_probe" in out:
            probes.append(int(opts[opts.index("SOLVER.MAX_ITER") + 1]))
            return 10 + 0.5 * probes[-1]
        return real_train(args, fold, out, opts)

    monkeypatch.setattr(tool, "train_iaunet", train)
    work = tmp_path / "work"
    argv = [
        "--work", str(work), "--image", str(tmp_path / "img.tif"),
        "--labels", str(tmp_path / "lab.tif"), "--folds", "3", "--weights", "",
        "--budget", "11.5", "--peer-max-epochs", "1", "--cellpose-cpu-s", "5",
        "--variant", "gain=0.9",
        "--opts", "MODEL.IAUNET.TRAIN.FROM_SCRATCH", "True",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", *TINY_MODEL_OPTS,
    ]  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    assert tool.main(argv) == 0
    assert probes == list(tool.IAUNET_PROBE)
    assert "SOLVER.MAX_ITER 3" in capsys.readouterr().out  # (11.5 - 10) / 0.5 iterations
    saved = json.loads((work / "results.json").read_text())
    res = saved["results"]
    assert saved["budget"] == 11.5 and saved["variant"] == "gain=0.9"
    names = [tool.IAUNET, tool.IAUNET_1, tool.CELLPOSE, tool.CELLPOSE_AUG, tool.STARDIST]
    assert set(res) == {n + " @11.5 CPU-s" for n in names} | {tool.OTSU}
    for method, per_fold in res.items():
        r = per_fold["fold3"]
        assert 0 <= r["AP"] <= 100 and 0 <= r["F1"] <= 100, method
        assert r["pred_cpu_s"] > 0, method
    iaunet = res["IAUNet @11.5 CPU-s"]["fold3"]
    assert iaunet["cpu_s"] > 0 and 0 <= iaunet["eval_AP"] <= 100
    assert res["Cellpose 3 (scratch) @11.5 CPU-s"]["fold3"]["epochs"] == 1
    assert res["StarDist 2D (scratch) @11.5 CPU-s"]["fold3"]["epochs"] == 1
    assert res["Otsu + watershed"]["fold3"]["F1"] > 90  # easy, well separated blobs
    for folder in ("predictions", "predictions_1view"):
        assert (work / "fold3" / "iaunet" / folder / "bottom_right_labels.tif").is_file()
    assert tool.main(["--collect", str(work)]) == 0  # the table again, from results.json
    rows = [r for r in capsys.readouterr().out.splitlines() if "fold3 (bottom_right)" in r]
    assert len(rows) == 6 and rows[2].startswith("| Otsu + watershed |")
    # the saved model scored again with an override (--reuse: not trained again): its rows are
    # replaced, the peers' rows of the first run are kept
    before = json.loads((work / "results.json").read_text())["results"]
    k = argv.index("--opts")
    again = [*argv[:k], "--reuse", "--no-cellpose", "--no-stardist", *argv[k:],
             "MODEL.IAUNET.TEST.MIN_AREA", "0.5"]  # fmt: skip
    assert tool.main(again) == 0
    after = json.loads((work / "results.json").read_text())["results"]
    assert set(after) == set(before)
    assert after["Cellpose 3 (scratch) @11.5 CPU-s"] == before["Cellpose 3 (scratch) @11.5 CPU-s"]
    assert after["IAUNet @11.5 CPU-s"]["fold3"]["cpu_s"] == iaunet["cpu_s"]  # not trained again
    capsys.readouterr()
    assert tool.main(["--collect", str(work)]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if "fold3 (bottom_right)" in r]
    assert len(rows) == 6 and rows[2].startswith("| Otsu + watershed |")


def test_train_call_rows_equal_the_command_line(tmp_path, monkeypatch):
    """``--train-call``: IAUNet trained through ``iaunet.train`` on the fold's arrays gives the
    rows of the README command on the same fold (same seed: the same model, the same AP), named
    ``[iaunet.train]``; the arrays are written in the folder layout under the run."""
    image, labels = nuclei_image()
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    tool = load_tool("benchmark_few_shot")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    found = {}
    for extra in ([], ["--train-call"]):
        work = tmp_path / f"work{len(extra)}"
        argv = [
            "--work", str(work), "--image", str(tmp_path / "img.tif"),
            "--labels", str(tmp_path / "lab.tif"), "--folds", "3", "--weights", "",
            "--no-cellpose", "--no-stardist", *extra,
            "--opts", "MODEL.IAUNET.TRAIN.FROM_SCRATCH", "True", "SEED", "7",
            "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
            *TINY_MODEL_OPTS,
        ]  # fmt: skip
        assert tool.main(argv) == 0
        found.update(json.loads((work / "results.json").read_text())["results"])
    iaunet = tmp_path / "work1" / "fold3" / "iaunet"
    assert (iaunet / "data" / "train" / "img_000_labels.tif").is_file()
    assert (iaunet / "train_command.txt").is_file()
    import torch

    models = [
        torch.load(tmp_path / w / "fold3" / "iaunet" / "model_final.pth", weights_only=True)
        for w in ("work0", "work1")
    ]
    assert models[0]["iteration"] == models[1]["iteration"] == 4
    for key, value in models[0]["model"].items():  # trained the same: the same weights
        assert torch.equal(value, models[1]["model"][key]), key
    for name in (tool.IAUNET, tool.IAUNET_1):
        cli, call = found[name]["fold3"], found[name + " [iaunet.train]"]["fold3"]
        for key in ("AP", "AP75", "F1", "count_ratio", "eval_AP"):
            assert call[key] == pytest.approx(cli[key], abs=1e-6), (name, key)
