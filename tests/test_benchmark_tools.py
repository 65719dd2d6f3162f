"""Smoke tests of tools/benchmark.py and tools/compare_maskrcnn.py on tiny models and inputs."""

import json
import math
import os

import numpy as np
import torch
from conftest import ROOT, TINY_MODEL_OPTS, load_tool
from detectron2.config import CfgNode

from iaunet.bench.benchmark import synthetic_sample

benchmark = load_tool("benchmark")
compare_maskrcnn = load_tool("compare_maskrcnn")

# tests/conftest.py tiny_cfg as command-line overrides
TINY_OPTS = TINY_MODEL_OPTS + ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN"]


def test_synthetic_sample_is_dense():
    image, masks = synthetic_sample(128, 30, np.random.default_rng(0))
    assert image.shape == (3, 128, 128) and masks.shape == (30, 128, 128)
    assert masks.flatten(1).any(1).all()


def test_benchmark_json(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(
        [
            "--config-file",
            os.path.join(ROOT, "configs", "Base-IAUNet.yaml"),
            "--compare",
            "mask_rcnn",
            "--device",
            "cpu",
            "--sizes",
            "64",
            "--batch-sizes",
            "1",
            "2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--throughput-runs",
            "1",
            "--train-batch",
            "1",
            "--instances",
            "4",
            "--output",
            str(out),
            # fewer sampled RoIs keep the Mask R-CNN training step fast; 20 detections fit a 64x64
            # image
            "--maskrcnn-opts",
            "TEST.DETECTIONS_PER_IMAGE",
            "20",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "32",
            # NHWC path of both models (the NCHW default is what every other test runs)
            "--channels-last",
            "--opts",
            *TINY_OPTS,
        ]
    )
    result = json.loads(out.read_text())
    assert result["settings"]["channels_last"]
    assert result["machine"]["load_before"] is not None and result["settings"]["threads"] >= 1
    assert len(result["models"]) == 2
    kinds = {m["kind"]: m for m in result["models"].values()}
    for m in kinds.values():
        inf = m["inference"]["64"]
        for key in ("median_s", "p90_s", "images_per_s", "peak_rss_mb", "detections"):
            assert inf[key] is not None and inf[key] > 0, key
        assert set(m["throughput"]) == {"1", "2"} and m["throughput"]["2"]["images_per_s"] > 0
        assert m["train"]["median_s"] > 0 and m["train"]["instances_per_image"] == 4
        assert m["inference"]["64"]["detections"] == m["expected_detections"]
    rcnn = kinds["mask_rcnn"]
    assert rcnn["expected_detections"] == 20
    assert (
        rcnn["inference"]["64"]["mask_head_rois"] == 20
    )  # every detection went through the mask head
    assert rcnn["inference"]["64"]["proposals"] > 20
    assert kinds["iaunet"]["expected_detections"] == 8  # min(100 detections, 8 queries x 1 class)
    assert any("latency at 64" in k for k in result["ratios"]) and any(
        "train step" in k for k in result["ratios"]
    )
    assert not result["warnings"]


def test_compare_maskrcnn_tiny(tmp_path):
    result = compare_maskrcnn.main(
        [
            "--iters",
            "2",
            "--batch",
            "2",
            "--test-limit",
            "2",
            "--num-workers",
            "0",
            "--output-dir",
            str(tmp_path),
            "--maskrcnn-opts",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "32",
            "--opts",
            *TINY_OPTS,
            "TEST.DETECTIONS_PER_IMAGE",
            "8",
        ]
    )
    saved = json.loads((tmp_path / "compare_maskrcnn.json").read_text())
    for key in ("iaunet", "mask_rcnn"):
        assert saved[key]["images_seen"] == 4
        for metric in ("AP", "AP50", "AP75"):
            value = saved[key]["segm"][metric]
            assert value is None or math.isnan(value) or 0 <= value <= 100
            assert metric in result[key]["segm"]
    assert saved["mask_rcnn"]["backbone"].startswith("R18-FPN")
    assert saved["settings"]["test"] == "synthetic_cells_val_first2"
    assert os.path.isfile(os.path.join(str(tmp_path), "mask_rcnn", "model_final.pth"))
    # The IAUNet checkpoint records its training scale, as train_net.py's: iaunet-predict tiles
    # large images with it (without it, a 1024² mosaic was squeezed into one 128-px tile).
    checkpoint = torch.load(
        tmp_path / "iaunet" / "model_final.pth", map_location="cpu", weights_only=False
    )
    saved_input = CfgNode.load_cfg(checkpoint["config"]).INPUT
    assert saved_input.PIXEL_SCALE > 0 and saved_input.OBJECT_DIAMETER > 0


def test_compare_maskrcnn_equal_time(tmp_path):
    """--equal-time: Mask R-CNN gets the iterations that fit in IAUNet's measured training time."""
    result = compare_maskrcnn.main(
        ["--iters", "3", "--batch", "2", "--test-limit", "2", "--num-workers", "0", "--equal-time"]
        + ["--output-dir", str(tmp_path), "--maskrcnn-opts", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"]
        + ["32", "--opts", *TINY_OPTS, "TEST.DETECTIONS_PER_IMAGE", "8"]
    )
    iters = result["settings"]["maskrcnn_iters"]
    assert iters >= 1 and result["mask_rcnn"]["iterations"] == iters
    assert result["iaunet"]["iterations"] == 3 and result["iaunet"]["train_time_s"] > 0
    assert "F1@0.5" in result["iaunet"]["matching"]


def test_compare_maskrcnn_equal_time_check(caplog):
    """After --equal-time, a Mask R-CNN run that took longer than IAUNet's (its probe was off) is
    reported with the iteration count for an equal-time rerun (--maskrcnn-iters)."""
    result = {
        "settings": {},
        "iaunet": {"train_time_s": 800.0},
        "mask_rcnn": {"train_time_s": 1600.0, "iterations": 240},
    }
    compare_maskrcnn._check_equal_time(result)
    assert result["settings"]["maskrcnn_time_ratio"] == 2.0
    assert "--maskrcnn-iters 120" in caplog.text
    caplog.clear()
    result["mask_rcnn"]["train_time_s"] = 840.0  # within 10 %
    compare_maskrcnn._check_equal_time(result)
    assert caplog.text == ""


def test_compare_maskrcnn_iterations_size_the_whole_schedule():
    """Mask R-CNN's own iteration count (--maskrcnn-iters, or the equal-time estimate) sizes its
    whole schedule: detectron2's lr steps at 2/3 and 8/9 of it, warm-up, one final checkpoint."""
    from iaunet.config import load_config

    args = compare_maskrcnn.parse_args(
        ["--maskrcnn-solver", "detectron2", "--maskrcnn-iters", "120"]
    )
    icfg = load_config(os.path.join(ROOT, "configs", "synthetic", "iaunet_quick.yaml"), [])
    cfg = compare_maskrcnn.maskrcnn_cfg(args, icfg, args.maskrcnn_iters)
    assert cfg.SOLVER.MAX_ITER == 120 and tuple(cfg.SOLVER.STEPS) == (80, 106)
    assert cfg.SOLVER.WARMUP_ITERS == 12 and cfg.SOLVER.CHECKPOINT_PERIOD == 121
    cfg = compare_maskrcnn.maskrcnn_cfg(args, icfg)  # default: IAUNet's iterations
    assert cfg.SOLVER.MAX_ITER == icfg.SOLVER.MAX_ITER == 1250
    assert tuple(cfg.SOLVER.STEPS) == (833, 1111)


def test_profile_table_ranges_and_ops():
    import torch
    from torch.profiler import ProfilerActivity, profile

    from iaunet.bench.measure import module_ranges, profile_table

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    handles = module_ranges(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.randn(4, 8))
    for h in handles:
        h.remove()
    table = profile_table(prof, top=3)
    assert {r["range"] for r in table["ranges"]} == {"module::0", "module::1"}
    assert 0 < len(table["top_ops"]) <= 3 and table["total_self_cpu_ms"] > 0


def test_rss_reader_of_this_and_other_processes():
    """bench.measure.rss_mb, the one /proc reader of the memory benchmarks: another process's
    resident memory, read from outside, grows by what it touches; a gone process is None; this
    process's is its own VmRSS."""
    import subprocess
    import sys

    import pytest

    from iaunet.bench.measure import rss_mb, status_kb

    code = (
        "import sys, numpy as np; print('ready', flush=True); sys.stdin.readline(); "
        "a = np.ones(64 * 2**20, np.uint8); print(a[-1], flush=True); sys.stdin.readline()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        before = rss_mb(child.pid)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "1"  # 64 MB allocated and touched
        assert rss_mb(child.pid) - before > 48
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
    assert rss_mb(child.pid) is None
    assert rss_mb() == pytest.approx(status_kb("VmRSS") / 1024, rel=0.2)
    assert status_kb("VmHWM") >= status_kb("VmRSS") > 0
