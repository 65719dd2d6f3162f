"""Export (tools/export_model.py, iaunet.deploy.export) and the exported-model backends: the
ONNX and TorchScript files give the eager model's detections at several input sizes."""

import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tifffile
import torch
from conftest import ROOT, load_tool, tiny_cfg
from detectron2.modeling import build_model

from iaunet.bench.benchmark import synthetic_sample
from iaunet.checkpoint import AtomicCheckpointer
from iaunet.config import ConfigError
from iaunet.deploy.export import CONFIG_KEY, ExportableIAUNet, export_model, graph_config
from iaunet.inference import IAUNetPredictor
from iaunet.inference.backends import load_backend
from iaunet.modeling.postprocessing import mask_overlap

export_tool = load_tool("export_model")

# (batch, H, W): multiples of 32 and not, portrait and landscape (dynamic axes); 32 x 20 pads to
# 32 x 32, whose res5 map is 1 x 1 (ONNX once wrote its coordinate planes as NaN)
SIZES = [(1, 64, 64), (2, 50, 77), (1, 96, 40), (1, 32, 20)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny model (training-style checkpoint, INPUT.PIXEL_SCALE 1) exported by the tool in
    both formats, traced at 64 x 64 with dynamic axes. Returns (model, checkpoint, files)."""
    d = tmp_path_factory.mktemp("export")
    cfg = tiny_cfg(**{"MODEL.IAUNET.TEST.SCORE_THRESH": 0.0, "INPUT.PIXEL_SCALE": 1.0})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    AtomicCheckpointer(model, str(d), config=cfg).save("model")
    files = {"onnx": str(d / "model.onnx"), "torchscript": str(d / "model.pt")}
    for fmt, path in files.items():
        args = ["--weights", str(d / "model.pth"), "--format", fmt, "--output", path]
        assert export_tool.main(args + ["--size", "64", "64", "--dynamic"]) == 0
    return model, str(d / "model.pth"), files


def _images(batch: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Half random noise, half synthetic cells (ellipses), (B, 3, H, W) on the 0..255 scale."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(batch):
        if (seed + i) % 2:
            out.append(torch.from_numpy(rng.uniform(0, 255, (3, h, w)).astype(np.float32)))
        else:
            image, _ = synthetic_sample(max(h, w), 6, rng)
            out.append(image[:, :h, :w])
    return torch.stack(out)


def assert_same_detections(got, expected, score_tol=1e-4, min_iou=0.99):
    """Same detections (the same top-k queries) in the same order: scores within ``score_tol``,
    same classes, masks (logits > 0, or bool) with IoU >= ``min_iou``. Detections whose scores tie
    within ``score_tol`` may come in either order, so each is matched within its tie group; the
    masks of detections scoring below ``score_tol`` are not compared."""
    s1, c1, m1 = got
    s2, c2, m2 = expected
    assert s1.shape == s2.shape and m1.shape == m2.shape
    assert torch.allclose(s1, s2, atol=score_tol, rtol=0)
    b1 = m1 if m1.dtype == torch.bool else m1 > 0
    b2 = m2 if m2.dtype == torch.bool else m2 > 0
    if b1.numel() == 0:
        return
    iou = mask_overlap(torch.cat([b1, b2]))[: len(b1), len(b1) :]
    empty = b1.flatten(1).any(1)[:, None] == b2.flatten(1).any(1)[None, :]
    iou = torch.where(empty & ~b1.flatten(1).any(1)[:, None], 1.0, iou)  # two empty masks agree
    close = (s1[:, None] - s2[None, :]).abs() <= score_tol
    # a detection scoring ~0 (an empty mask at 1/4 resolution) passes no threshold: score only
    ok = close & (c1[:, None] == c2[None, :]) & ((iou >= min_iou) | (s1[:, None] <= score_tol))
    used = set()
    for i in range(len(s1)):
        # the same position first, then any other member of its tie group
        candidates = [i] + [j for j in torch.nonzero(ok[i]).flatten().tolist() if j != i]
        j = next((j for j in candidates if ok[i, j] and j not in used), None)
        assert j is not None, f"detection {i} (score {float(s1[i]):.6f}) has no eager match"
        used.add(j)


def test_onnx_file_is_valid_and_carries_the_config(exported):
    _, _, files = exported
    proto = onnx.load(files["onnx"])
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["scores", "classes", "mask_logits"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert "NUM_QUERIES: 8" in meta[CONFIG_KEY]


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_exported_matches_eager(exported, backend):
    model, _, files = exported
    run = load_backend(
        files["onnx" if backend == "onnxruntime" else "torchscript"], backend, model.postprocessing
    )
    for seed, (batch, h, w) in enumerate(SIZES):
        images = _images(batch, h, w, seed)
        with torch.no_grad():
            expected = ExportableIAUNet(model)(images)
        got = run.run(images)
        assert got[0].shape == (batch, 8) and got[2].shape == (batch, 8, h, w)
        assert got[1].dtype == torch.int64 and got[2].dtype == torch.float32
        for i in range(batch):
            assert_same_detections([t[i] for t in got], [t[i] for t in expected])
        # ... and the eager model's own inference path (all k detections kept, bool masks)
        outputs = run([{"image": images[i]} for i in range(batch)])
        with torch.no_grad():
            eager = model([{"image": images[i]} for i in range(batch)])
        for out, ref in zip(outputs, eager):
            out, ref = out["instances"], ref["instances"]
            assert len(out) == len(ref) > 0
            assert_same_detections(
                (out.scores, out.pred_classes, out.pred_masks),
                (ref.scores, ref.pred_classes, ref.pred_masks),
            )


def test_torchscript_runs_without_iaunet(exported, tmp_path):
    """torch.jit.load in a fresh process where iaunet (and detectron2) cannot be imported."""
    model, _, files = exported
    images = _images(1, 72, 56, 3)
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['iaunet'] = sys.modules['detectron2'] = None  # importing them would fail\n"
        f"module = torch.jit.load({files['torchscript']!r})\n"
        f"images = torch.load({str(tmp_path / 'images.pt')!r})\n"
        "with torch.inference_mode():\n"
        "    out = module(images)\n"
        f"torch.save([t.clone() for t in out], {str(tmp_path / 'out.pt')!r})\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path), env=env)
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = ExportableIAUNet(model)(images)
    assert_same_detections([t[0] for t in got], [t[0] for t in expected])


def test_deploy_doc_snippets_run_without_iaunet(exported, tmp_path):
    """The two Python snippets of docs/deploy.md, run as written in a fresh process (paths
    replaced), give the eager model's label image."""
    model, _, files = exported
    doc = open(os.path.join(ROOT, "docs", "deploy.md")).read()
    snippets = re.findall(r"<!-- tested snippet -->\n```python\n(.*?)```", doc, re.S)
    assert len(snippets) == 2
    image = _images(1, 80, 60, 0)[0, 0].round().numpy().astype(np.uint8)  # gray 8-bit
    tifffile.imwrite(tmp_path / "cells.tif", image)
    with torch.no_grad():
        expected = model([{"image": torch.from_numpy(image).float()[None].expand(3, -1, -1)}])
    inst = expected[0]["instances"]
    scores = inst.scores.tolist()  # the threshold: the middle of the widest gap between scores
    gap, thresh = max((a - b, (a + b) / 2) for a, b in zip(scores, scores[1:]))
    assert gap > 1e-3
    inst = inst[inst.scores > thresh]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    for snippet in snippets:
        code = snippet.replace("model.onnx", files["onnx"]).replace(
            "model.pt", files["torchscript"]
        )
        code = code.replace("SCORE_THRESHOLD = 0.5", f"SCORE_THRESHOLD = {thresh!r}")
        code = "import sys\nsys.modules['iaunet'] = sys.modules['detectron2'] = None\n" + code
        code += "\nnp.save('labels.npy', labels)\n"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env=env)
        labels = np.load(tmp_path / "labels.npy")
        assert labels.shape == image.shape and 0 < labels.max() <= len(inst)
        for k in range(len(inst)):  # label k+1: the k-th detection, where no higher one is
            mine = torch.from_numpy(labels == k + 1)
            claimed = inst.pred_masks[:k].any(0) if k else torch.zeros_like(mine)
            want = inst.pred_masks[k] & ~claimed
            iou = (mine & want).sum() / max(int((mine | want).sum()), 1)
            assert iou >= 0.99 or int((mine ^ want).sum()) <= 2, k


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_predictor_backend_matches_pytorch(exported, backend):
    """Tiling, a scale other than 1 and masks resized back to the image: same instances."""
    _, weights, files = exported
    opts = ["INPUT.IMAGE_SIZE", 64]
    eager = IAUNetPredictor.from_checkpoint(weights, opts=opts, scale=0.8)
    model_file = files["onnx" if backend == "onnxruntime" else "torchscript"]
    other = IAUNetPredictor.from_exported(model_file, opts=opts, scale=0.8)
    assert other.backend == backend and other.scale == eager.scale == 0.8
    image = np.random.default_rng(1).integers(0, 255, (90, 130), dtype=np.uint8)
    for tiled in (False, True):
        a, b = other.predict(image, tiled=tiled), eager.predict(image, tiled=tiled)
        assert len(a) == len(b) > 0 and a.image_size == b.image_size == (90, 130)
        assert_same_detections(
            (a.scores, a.pred_classes, a.pred_masks), (b.scores, b.pred_classes, b.pred_masks)
        )


def test_exported_config_must_match_the_graph(exported):
    _, _, files = exported
    with pytest.raises(ConfigError, match="TEST.DETECTIONS_PER_IMAGE 100.*export it again"):
        IAUNetPredictor.from_exported(files["onnx"], opts=["TEST.DETECTIONS_PER_IMAGE", 50])
    with pytest.raises(ValueError, match="holds no IAUNet config"):
        bare = os.path.join(os.path.dirname(files["onnx"]), "bare.onnx")
        proto = onnx.load(files["onnx"])
        del proto.metadata_props[:]
        onnx.save(proto, bare)
        IAUNetPredictor.from_exported(bare)


def test_exporters_read_the_predictors_settings(exported):
    """The exporter takes the trained model's settings from its predictor: the graph's config is
    the predictor's, less test-time augmentation (and, in a bioimage.io package, the piece and
    size filters its graph does not run); a predictor on the exported file then applies the
    kept settings as the checkpoint's does."""
    _, checkpoint, _ = exported
    opts = ["MODEL.IAUNET.TEST.TTA", "flip", "MODEL.IAUNET.TEST.ONE_PIECE", True]
    opts += ["MODEL.IAUNET.TEST.MIN_AREA", 0.2, "INPUT.OBJECT_DIAMETER", 12.0]
    opts += ["MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH", 0.7]
    predictor = IAUNetPredictor.from_checkpoint(checkpoint, opts=opts)
    assert (predictor.test_augmentation, predictor.one_piece) == ("flip", True)
    assert (predictor.min_area, predictor.output_threshold) == (0.2, 0.7)
    cfg = graph_config(predictor)
    test = cfg.MODEL.IAUNET.TEST
    assert test.TTA == "none" and test.ONE_PIECE and test.MIN_AREA == 0.2
    assert test.OUTPUT_SCORE_THRESH == 0.7
    package = graph_config(predictor, package=True)
    assert not package.MODEL.IAUNET.TEST.ONE_PIECE and package.MODEL.IAUNET.TEST.MIN_AREA == 0
    assert predictor.test_augmentation == "flip" and predictor.min_area == 0.2  # its own, untouched

    path = os.path.join(os.path.dirname(checkpoint), "settings.onnx")
    args = ["--weights", checkpoint, "--format", "onnx", "--output", path, "--no-check"]
    assert export_tool.main(args + ["--opts", *map(str, opts)]) == 0
    onnx_predictor = IAUNetPredictor.from_exported(path)
    assert onnx_predictor.test_augmentation == "none"
    assert (onnx_predictor.one_piece, onnx_predictor.min_area) == (True, 0.2)
    assert onnx_predictor.output_threshold == 0.7


@pytest.mark.parametrize(
    "config, opts",
    [
        ("configs/synthetic/iaunet_quick.yaml", []),
        ("configs/synthetic/iaunet_quick.yaml", ["MODEL.IAUNET.MASK_STRIDE", 4]),
        ("configs/revvity25/iaunet_R50.yaml", []),
    ],
)
def test_export_real_configs(config, opts, tmp_path):
    """The quick config (both mask strides) and the thesis R50 (random weights) export in both
    formats and run."""
    from iaunet.config import load_config

    cfg = load_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = _images(1, 64, 96, 0)
    with torch.no_grad():
        expected = ExportableIAUNet(model)(images)
    for fmt, backend in (("onnx", "onnxruntime"), ("torchscript", "torchscript")):
        path = str(tmp_path / f"model.{fmt}")
        export_model(model, cfg, path, fmt, size=(64, 64))
        got = load_backend(path, backend, model.postprocessing).run(images)
        assert_same_detections([t[0] for t in got], [t[0] for t in expected])


def test_cli_onnxruntime_reproduces_pytorch_outputs(exported, tmp_path, capsys):
    """iaunet-predict --backend onnxruntime --model FILE (config from the file) against the
    checkpoint: the same label images, detections and COCO results (a wide image is tiled)."""
    import json

    import cv2
    import pycocotools.mask as mask_util

    from iaunet.predict import main

    _, weights, files = exported
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(inp / "a16.tif", rng.integers(0, 4000, (40, 48), dtype=np.uint16))
    cv2.imwrite(str(inp / "rgb.png"), rng.integers(0, 255, (56, 40, 3), dtype=np.uint8))
    cv2.imwrite(str(inp / "wide.png"), rng.integers(0, 255, (60, 150), dtype=np.uint8))
    common = ["--input", str(inp), "--score-threshold", "0.02", "--tile", "64"]
    assert main(["--weights", weights, "--output", str(tmp_path / "pt")] + common) == 0
    args = ["--backend", "onnxruntime", "--model", files["onnx"], "--output", str(tmp_path / "ort")]
    assert main(args + common) == 0
    for name in ("a16", "rgb", "wide"):
        a = tifffile.imread(tmp_path / "ort" / f"{name}_labels.tif")
        b = tifffile.imread(tmp_path / "pt" / f"{name}_labels.tif")
        assert a.shape == b.shape and (a == b).mean() >= 0.99, name
    images = [json.loads((tmp_path / d / "images.json").read_text()) for d in ("ort", "pt")]
    assert images[0]["images"] == images[1]["images"]
    res = [json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("ort", "pt")]
    assert len(res[0]) == len(res[1]) > 0
    for r1, r2 in zip(*res):
        assert r1["image_id"] == r2["image_id"] and r1["category_id"] == r2["category_id"]
        assert abs(r1["score"] - r2["score"]) <= 2e-4
        iou = mask_util.iou([r1["segmentation"]], [r2["segmentation"]], [0])[0, 0]
        assert iou >= 0.99 or mask_util.area(r1["segmentation"]) <= 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "onnxruntime"], "needs --model"),
        ([], "--weights is required"),
        (["--backend", "torchscript", "--model", "missing.pt"], "model file not found"),
    ],
)
def test_cli_backend_usage_errors(tmp_path, capsys, args, message):
    from iaunet.predict import main

    (tmp_path / "x.png").write_bytes(b"")
    base = ["--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "out")]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err
