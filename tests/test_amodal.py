"""Whole outlines next to visible parts (MODEL.IAUNET.AMODAL, docs/amodal.md): the occluded
synthetic scenes, targets of both kinds, matching and losses over both masks, visible inside whole
at inference, and the three evaluations (segm, segm_whole, segm_hidden)."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances, polygons_to_bitmask

from iaunet.data import IAUNetDatasetMapper
from iaunet.data.datasets.synthetic import render_occluded_scene
from iaunet.data.mosaic import combine_mosaic
from iaunet.evaluation.amodal import (
    HIDDEN_MIN,
    WholeOutlineEvaluator,
    hidden_fraction,
    register_whole_cells,
    whole_cell_dicts,
)
from iaunet.evaluation.matching import image_counts
from iaunet.modeling.criterion import SetCriterion
from iaunet.modeling.matcher import HungarianMatcher

pytestmark = pytest.mark.usefixtures("one_thread")
VAL = "synthetic_occluded_val"


def _rle(mask: np.ndarray) -> dict:
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_occluded_scene_visible_is_whole_minus_cells_above():
    image, polygons, visible = render_occluded_scene(4)
    assert image.shape == (128, 128) and len(polygons) == len(visible) >= 4
    whole = [polygons_to_bitmask([p.ravel()], 128, 128) for p in polygons]
    for i, (w, v) in enumerate(zip(whole, visible)):
        above = np.logical_or.reduce(whole[i + 1 :]) if i + 1 < len(whole) else np.zeros_like(w)
        np.testing.assert_array_equal(v, w & ~above)
        assert v.sum() >= 0.25 * w.sum()  # MIN_VISIBLE: no cell vanishes
    assert any(v.sum() < w.sum() for w, v in zip(whole, visible))  # something is hidden


def test_occluded_dataset_has_both_truths():
    dicts = DatasetCatalog.get(VAL)
    assert len(dicts) == 32
    fractions = []
    for d in dicts[:8]:
        for a in d["annotations"]:
            vis = mask_util.decode(a["segmentation"]).astype(bool)
            whole = polygons_to_bitmask(a["amodal_segmentation"], d["height"], d["width"])
            assert vis.any() and not (vis & ~whole).any()  # visible part inside the whole cell
            fractions.append(hidden_fraction(a, d["height"], d["width"]))
    assert 0.1 < np.mean(np.array(fractions) >= HIDDEN_MIN) < 0.6


def test_mapper_targets_of_each_mask_kind():
    record = DatasetCatalog.get(VAL)[0]
    out = {}
    for name, overrides in {
        "visible": {},
        "whole": {"INPUT.MASK_KIND": "amodal"},
        "both": {"MODEL.IAUNET.AMODAL": True},
    }.items():
        cfg = tiny_cfg(**overrides)
        mapper = IAUNetDatasetMapper(cfg, is_train=True)
        np.random.seed(0)  # the same augmentations for each
        out[name] = mapper(record)["instances"]
    both = out["both"]
    assert not out["visible"].has("gt_amodal_masks")
    assert torch.equal(both.gt_masks.tensor, out["visible"].gt_masks.tensor)
    assert torch.equal(both.gt_amodal_masks.tensor, out["whole"].gt_masks.tensor)
    assert not (both.gt_masks.tensor & ~both.gt_amodal_masks.tensor).any()
    assert (both.gt_amodal_masks.tensor.sum() > both.gt_masks.tensor.sum()).item()
    with pytest.raises(ValueError, match="INPUT.MASK_KIND"):
        IAUNetDatasetMapper(tiny_cfg(**{"INPUT.MASK_KIND": "modal"}), is_train=True)
    with pytest.raises(ValueError, match="MASK_KIND must stay 'visible'"):
        IAUNetDatasetMapper(
            tiny_cfg(**{"INPUT.MASK_KIND": "amodal", "MODEL.IAUNET.AMODAL": True}), is_train=True
        )


def test_mosaic_carries_whole_outlines():
    def part(value):
        inst = Instances((8, 8))
        vis, whole = torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool)
        vis[0, 2:6, 2:4], whole[0, 2:6, 2:6] = True, True
        inst.gt_masks, inst.gt_amodal_masks = BitMasks(vis), BitMasks(whole)
        inst.gt_classes = torch.zeros(1, dtype=torch.int64)
        return {"file_name": str(value), "image": torch.full((3, 8, 8), value), "instances": inst}

    # window columns 3..11 of the 16 x 16 canvas: the first cell keeps one visible column of two
    # and three whole columns of four, the second (canvas columns 10..14) one of each
    out = combine_mosaic([part(v) for v in range(4)], 0, 3)["instances"]
    assert out.gt_masks.tensor.flatten(1).sum(1).tolist() == [4, 4]
    assert out.gt_amodal_masks.tensor.flatten(1).sum(1).tolist() == [12, 4]


def _two_cells():
    """Two targets with the same visible part but different whole outlines (the one below is
    hidden on the right), and two queries predicting them in the wrong order by index."""
    vis = torch.zeros(2, 32, 32, dtype=torch.bool)
    vis[:, 8:24, 4:12] = True
    whole = vis.clone()
    whole[1, 8:24, 4:28] = True
    targets = [{"labels": torch.zeros(2, dtype=torch.long), "masks": vis, "amodal_masks": whole}]
    logits = torch.tensor([[[5.0, -5.0], [5.0, -5.0]]])
    outputs = {
        "pred_logits": logits,
        "pred_masks": (vis.float() * 20 - 10)[None],
        "pred_amodal_masks": (whole[[1, 0]].float() * 20 - 10)[None],  # query 0 -> target 1
    }
    return outputs, targets


def test_matching_uses_both_masks():
    outputs, targets = _two_cells()
    matcher = HungarianMatcher(num_points=2048)
    torch.manual_seed(0)
    ((q, t),) = matcher(outputs, targets)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 1, 1: 0}
    # the joint cost is the sum of the per-kind costs on the same points (class cost once)
    args = outputs["pred_logits"][0], targets[0]["labels"]
    pairs = [(outputs["pred_masks"][0], vis := targets[0]["masks"])]
    pairs.append((outputs["pred_amodal_masks"][0], targets[0]["amodal_masks"]))
    costs = []
    for kinds in (pairs, pairs[:1], pairs[1:]):
        torch.manual_seed(1)
        costs.append(
            matcher.cost_matrix(args[0], [p for p, _ in kinds], args[1], [g for _, g in kinds])
        )
    class_cost = -args[0].softmax(-1)[:, args[1]]
    torch.testing.assert_close(costs[0], costs[1] + costs[2] - class_cost)
    assert vis.shape == (2, 32, 32)


def test_losses_cover_both_masks_and_every_block():
    outputs, targets = _two_cells()
    outputs["aux_outputs"] = [{k: v.clone() for k, v in outputs.items()}]
    outputs["pred_amodal_masks"].requires_grad_(True)
    criterion = SetCriterion(1, HungarianMatcher(num_points=1024))
    losses = criterion(outputs, targets)
    kinds = {"loss_ce", "loss_mask", "loss_dice", "loss_mask_amodal", "loss_dice_amodal"}
    assert set(losses) == kinds | {k + "_0" for k in kinds}
    # perfect predictions after matching on both masks: near-zero losses
    assert losses["loss_dice_amodal"] < 0.05 and losses["loss_mask_amodal"] < 0.05
    sum(losses.values()).backward()
    assert outputs["pred_amodal_masks"].grad.abs().sum() > 0
    # a wrong whole outline costs only the amodal losses
    outputs["pred_amodal_masks"] = outputs["pred_amodal_masks"].detach().flip(-1)
    worse = criterion(outputs, targets)
    assert worse["loss_dice_amodal"] > 0.3 and worse["loss_dice"] < 0.05


@pytest.fixture(scope="module")
def amodal_model():
    torch.manual_seed(0)
    return build_model(tiny_cfg(**{"MODEL.IAUNET.AMODAL": True})).eval()


def test_second_mask_embedding_is_the_only_new_parameter(amodal_model):
    torch.manual_seed(0)
    plain = build_model(tiny_cfg())
    names = {n for n, _ in amodal_model.named_parameters()} - {
        n for n, _ in plain.named_parameters()
    }
    assert names == {
        "query_decoder.amodal_mask_embed.weight",
        "query_decoder.amodal_mask_embed.bias",
    }
    assert not any("amodal" in n for n in plain.state_dict())


def test_visible_masks_stay_inside_whole_masks(amodal_model):
    torch.manual_seed(0)
    image = torch.rand(3, 80, 72) * 255
    with torch.no_grad():
        # the whole outlines shifted down so that visible and whole logits differ
        amodal_model.query_decoder.amodal_mask_embed.bias.fill_(0.5)
        inst = amodal_model([{"image": image, "height": 100, "width": 90}])[0]["instances"]
    assert inst.pred_masks.shape == inst.pred_amodal_masks.shape == (len(inst), 100, 90)
    assert inst.pred_masks.any() and (inst.pred_amodal_masks & ~inst.pred_masks).any()
    assert not (inst.pred_masks & ~inst.pred_amodal_masks).any()


def _tile_instances(window, visible, whole, score):
    """The Instances one tile ``window`` (y0, x0, y1, x1) gives for one object whose image-size
    ``visible`` and ``whole`` masks are known."""
    from detectron2.structures import Instances

    y0, x0, y1, x1 = window
    inst = Instances((y1 - y0, x1 - x0))
    inst.pred_masks = torch.from_numpy(visible[None, y0:y1, x0:x1].copy())
    inst.pred_amodal_masks = torch.from_numpy(whole[None, y0:y1, x0:x1].copy())
    inst.scores, inst.pred_classes = torch.tensor([score]), torch.tensor([0])
    return inst


def _stitched(windows, visible, whole, scores):
    from iaunet.inference.tiling import (
        detections_to_instances,
        stitch_detections,
        tile_detections,
    )

    dets = []
    for t, (window, score) in enumerate(zip(windows, scores)):
        dets += tile_detections(
            t, window, visible.shape, _tile_instances(window, visible, whole, score)
        )
    return detections_to_instances(stitch_detections(dets), visible.shape)


def test_tiles_carry_whole_outlines():
    """Stitching tiles of an amodal model: a view whose visible part lies inside its tile but whose
    whole outline is cut by the tile edge loses to a view that saw the whole outline, though it
    scores higher; an object larger than the overlap is joined, both of its masks."""
    visible, whole = np.zeros((20, 40), bool), np.zeros((20, 40), bool)
    visible[5:10, 10:20], whole[5:15, 10:28] = True, True
    out = _stitched([(0, 0, 20, 24), (0, 8, 20, 40)], visible, whole, [0.9, 0.8])
    assert len(out) == 1 and float(out.scores[0]) == pytest.approx(0.8)
    assert np.array_equal(out.pred_masks[0].numpy(), visible)
    assert np.array_equal(out.pred_amodal_masks[0].numpy(), whole)
    # larger than the overlap: seen cut by both tiles, joined
    visible, whole = np.zeros((20, 40), bool), np.zeros((20, 40), bool)
    visible[5:10, 10:30], whole[5:15, 10:36] = True, True
    out = _stitched([(0, 0, 20, 24), (0, 16, 20, 40)], visible, whole, [0.9, 0.8])
    assert len(out) == 1
    assert np.array_equal(out.pred_masks[0].numpy(), visible)
    assert np.array_equal(out.pred_amodal_masks[0].numpy(), whole)


def test_tiled_prediction_keeps_whole_outlines(amodal_model):
    """An image of several tiles: every stitched detection has its whole outline, at the image's
    size, with its visible part inside it."""
    from iaunet.inference import IAUNetPredictor

    cfg = tiny_cfg(**{"MODEL.IAUNET.AMODAL": True, "MODEL.IAUNET.TEST.SCORE_THRESH": 0.0})
    predictor = IAUNetPredictor(cfg, model=amodal_model, scale=1.0)
    image = np.random.default_rng(0).integers(0, 255, (100, 90), dtype=np.uint8)
    assert predictor.will_tile(image.shape)
    inst = predictor.predict(image)
    assert len(inst) > 0
    assert inst.pred_masks.shape == inst.pred_amodal_masks.shape == (len(inst), 100, 90)
    assert not (inst.pred_masks & ~inst.pred_amodal_masks).any()


def test_image_counts_ignore_regions():
    a, b = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    a[2:8, 2:8], b[10:18, 10:18] = True, True
    gt, ignore, pred = [_rle(a)], [_rle(b)], [_rle(a), _rle(b)]
    tp, fp, fn, _ = image_counts(gt, pred, taus=(0.5,))[0]
    assert (tp, fp, fn) == (1, 1, 0)
    tp, fp, fn, _ = image_counts(gt, pred, taus=(0.5,), ignore=ignore)[0]
    assert (tp, fp, fn) == (1, 0, 0)


def test_whole_cell_ground_truth_and_hidden_subset():
    whole = whole_cell_dicts(VAL)
    hidden = DatasetCatalog.get(register_whole_cells(VAL, "hidden"))
    for d, w, h in zip(DatasetCatalog.get(VAL)[:4], whole, hidden):
        for a, aw, ah in zip(d["annotations"], w["annotations"], h["annotations"]):
            assert aw["segmentation"] == a["amodal_segmentation"] == ah["segmentation"]
            assert "amodal_segmentation" not in aw
            hf = hidden_fraction(a, d["height"], d["width"])
            assert ah["iscrowd"] == int(hf < HIDDEN_MIN) and aw["iscrowd"] == 0


def _true_instances():
    """The first validation scene and its true visible and whole masks as predictions (score 1):
    (dataset dict, visible (N, H, W), whole (N, H, W), Instances)."""
    d = DatasetCatalog.get(VAL)[0]
    h, w = d["height"], d["width"]
    whole = np.stack(
        [polygons_to_bitmask(a["amodal_segmentation"], h, w) for a in d["annotations"]]
    )
    visible = np.stack([mask_util.decode(a["segmentation"]).astype(bool) for a in d["annotations"]])
    inst = Instances((h, w))
    inst.pred_masks, inst.pred_amodal_masks = torch.from_numpy(visible), torch.from_numpy(whole)
    inst.scores = torch.ones(len(whole))
    return d, visible, whole, inst


def test_whole_outline_evaluator_scores_the_whole_masks():
    from iaunet.evaluation.matching import InstanceMatchingEvaluator

    d, visible, whole, inst = _true_instances()
    results = {}
    for suffix, subset in (("", None), ("_whole", "whole"), ("_hidden", "hidden")):
        name = VAL if subset is None else register_whole_cells(VAL, subset)
        ev = InstanceMatchingEvaluator(name, distributed=False, ignore_crowd=subset == "hidden")
        ev = WholeOutlineEvaluator(ev, suffix) if subset else ev
        ev.reset()
        ev.process([{"image_id": d["image_id"]}], [{"instances": inst}])
        results.update(ev.evaluate())
    assert set(results) == {"matching", "matching_whole", "matching_hidden"}
    for key in results:  # each kind of predicted mask against its own truth: perfect
        assert results[key]["F1@0.9"] == 100, key
    assert inst.pred_masks.numpy().sum() == visible.sum()  # the caller's masks are untouched
    # the visible parts scored as whole cells miss the hidden cells
    inst.pred_amodal_masks = torch.from_numpy(visible)
    ev = WholeOutlineEvaluator(
        InstanceMatchingEvaluator(
            register_whole_cells(VAL, "hidden"), distributed=False, ignore_crowd=True
        ),
        "_hidden",
    )
    ev.reset()
    ev.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    assert ev.evaluate()["matching_hidden"]["F1@0.9"] < 100


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_carries_both_outputs_and_matches_eager(amodal_model, tmp_path, fmt):
    from test_export import _images, assert_same_detections

    from iaunet.deploy.export import ExportableIAUNet, export_model
    from iaunet.inference.backends import load_backend

    cfg = tiny_cfg(**{"MODEL.IAUNET.AMODAL": True})
    path = export_model(amodal_model, cfg, str(tmp_path / f"m.{fmt}"), fmt, size=(64, 64))
    backend = "onnxruntime" if fmt == "onnx" else "torchscript"
    run = load_backend(path, backend, amodal_model.postprocessing)
    if fmt == "onnx":
        import onnx

        names = [o.name for o in onnx.load(path).graph.output]
        assert names == ["scores", "classes", "mask_logits", "amodal_mask_logits"]
    images = _images(2, 50, 77, 1)
    with torch.no_grad():
        expected = ExportableIAUNet(amodal_model)(images)
    got = run.run(images)
    assert len(got) == len(expected) == 4 and got[3].shape == (2, 8, 50, 77)
    for i in range(2):
        for masks in (2, 3):  # visible parts, then whole outlines, of the same detections
            assert_same_detections(
                [got[0][i], got[1][i], got[masks][i]],
                [t[i] for t in expected[:2]] + [expected[masks][i]],
            )
    # the backend's instances: both kinds of mask, visible inside whole, as the eager model's
    out = run([{"image": images[0]}])[0]["instances"]
    with torch.no_grad():
        ref = amodal_model([{"image": images[0]}])[0]["instances"]
    assert not (out.pred_masks & ~out.pred_amodal_masks).any()
    for field in ("pred_masks", "pred_amodal_masks"):
        assert_same_detections(
            (out.scores, out.pred_classes, out.get(field)),
            (ref.scores, ref.pred_classes, ref.get(field)),
        )


def _hand_made_prediction():
    """Three cells on a 20 x 30 image: 1 lies on top of 2 and 3; 3 is also under 2."""
    from iaunet.structures import MaskCrops

    whole = np.zeros((3, 20, 30), bool)
    whole[0, 2:10, 2:12] = True  # 80 px, on top
    whole[1, 6:16, 8:20] = True  # 120 px
    whole[2, 8:18, 16:28] = True  # 120 px, at the bottom
    visible = whole.copy()
    visible[1] &= ~whole[0]
    visible[2] &= ~(whole[0] | whole[1])
    return MaskCrops.from_bitmasks(visible), MaskCrops.from_bitmasks(whole), visible, whole


def test_csv_amodal_columns_from_hand_made_masks():
    from iaunet.outputs.table import amodal_rows

    visible, whole, vis, who = _hand_made_prediction()
    rows = amodal_rows(visible, whole)
    assert [r["area_whole"] for r in rows] == [80, 120, 120]
    hidden_2 = int((who[1] & who[0]).sum())  # rows 6:10, cols 8:12 -> 16 px
    hidden_3 = int((who[2] & (who[0] | who[1])).sum())  # rows 8:16, cols 16:20 -> 32 px
    assert [r["area_visible"] for r in rows] == [80, 120 - hidden_2, 120 - hidden_3]
    assert rows[1]["hidden_fraction"] == round(hidden_2 / 120, 4)
    assert rows[2]["hidden_fraction"] == round(hidden_3 / 120, 4)
    assert [r["on_top_ids"] for r in rows] == ["", "1", "2"]


def test_writer_outputs_visible_labels_and_whole_outlines(tmp_path):
    import csv
    import zipfile

    import tifffile

    from iaunet.outputs.writer import PredictionWriter, image_prediction

    _, _, vis, who = _hand_made_prediction()
    inst = Instances((20, 30))
    inst.pred_masks, inst.pred_amodal_masks = torch.from_numpy(vis), torch.from_numpy(who)
    inst.scores = torch.tensor([0.9, 0.8, 0.7])
    inst.pred_classes = torch.zeros(3, dtype=torch.int64)
    image = np.zeros((20, 30), np.uint8)
    pred = image_prediction(inst, image, 0.5, stem="s")
    writer = PredictionWriter(str(tmp_path), cat_ids=[1], class_names=["cell"])
    writer.write_image(pred)
    writer.finish()
    labels = tifffile.imread(tmp_path / "s_labels.tif")
    expected = np.zeros((20, 30), int)
    for k in range(3):
        expected[vis[k]] = k + 1
    np.testing.assert_array_equal(labels, expected)  # visible parts: one pixel, one cell
    pages = tifffile.imread(tmp_path / "s_masks.tif")
    for k in range(3):  # every whole outline on some page
        assert any(
            np.array_equal(p == k + 1, who[k]) for p in np.atleast_3d(pages).reshape(-1, 20, 30)
        )
    for name in ("s_rois.zip", "s_rois_visible.zip"):
        assert len(zipfile.ZipFile(tmp_path / name).namelist()) == 3
    with open(tmp_path / "s_objects.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["area"] for r in rows] == ["80", "120", "120"]  # measured on the whole outlines
    assert [r["on_top_ids"] for r in rows] == ["", "1", "2"]
    with open(tmp_path / "objects.csv") as f:
        assert "hidden_fraction" in next(csv.reader(f))


def test_napari_layers_show_visible_labels_and_whole_pages():
    from iaunet.napari_plugin.layers import prediction_layers
    from iaunet.outputs.writer import ImagePrediction

    visible, whole, vis, who = _hand_made_prediction()
    pred = ImagePrediction(
        1, "", "s", np.zeros((20, 30)), visible, np.array([0.9, 0.8, 0.7]), np.zeros(3, int), whole
    )
    layers = prediction_layers(pred, "img")
    names = [kw["name"] for _, kw, _ in layers]
    assert names[0] == "img visible" and all("whole page" in n for n in names[1:-1])
    labels = layers[0][0]
    for k in range(3):
        np.testing.assert_array_equal(labels == k + 1, vis[k])
        assert any(np.array_equal(page == k + 1, who[k]) for page, _, _ in layers[1:-1])


def test_folder_dataset_with_whole_outlines_and_visible_parts(tmp_path, monkeypatch):
    import cv2
    import tifffile

    from iaunet.data.datasets.folder import register_path_datasets

    monkeypatch.setenv("IAUNET_DATASET_CACHE", str(tmp_path / "cache"))
    _, _, vis, who = _hand_made_prediction()
    root = tmp_path / "cells"
    root.mkdir()
    cv2.imwrite(str(root / "img.png"), np.zeros((20, 30), np.uint8))
    pages = np.zeros((2, 20, 30), np.uint16)  # overlapping whole outlines on two pages
    pages[0][who[0]] = 1
    pages[0][who[2]] = 3
    pages[1][who[1]] = 7
    tifffile.imwrite(root / "img_masks.tif", pages)
    labels = np.zeros((20, 30), np.uint16)
    for k, v in zip((5, 6, 9), vis):  # other ids than the pages'
        labels[v] = k
    tifffile.imwrite(root / "img_labels.tif", labels)
    name = f"folder:{root}"
    register_path_datasets([name])
    (d,) = DatasetCatalog.get(name)
    got = {
        (
            mask_util.decode(a["segmentation"]).sum(),
            mask_util.decode(a["amodal_segmentation"]).sum(),
        )
        for a in d["annotations"]
    }
    assert got == {(int(v.sum()), int(w.sum())) for v, w in zip(vis, who)}
    for a in d["annotations"]:
        v, w = (
            mask_util.decode(a[k]).astype(bool) for k in ("segmentation", "amodal_segmentation")
        )
        assert not (v & ~w).any()
    # a visible part outside its cell is an error naming the label file
    labels[0, 29] = 5
    tifffile.imwrite(root / "img_labels.tif", labels)
    bad = f"folder:{root}#train"
    with pytest.raises(Exception, match="img_labels.tif: label 5 reaches outside"):
        register_path_datasets([bad])
        DatasetCatalog.get(bad)


def test_hidden_fraction_error_of_matched_cells():
    from iaunet.evaluation.amodal import HiddenFractionEvaluator

    d, visible, whole, inst = _true_instances()
    h, w = d["height"], d["width"]
    truth = np.array([hidden_fraction(a, h, w) for a in d["annotations"]])
    ev = HiddenFractionEvaluator(VAL, 0.5, distributed=False)
    for pred_masks, expected in ((visible, 0.0), (whole, np.median(truth))):
        inst.pred_masks = torch.from_numpy(pred_masks)  # whole as visible: nothing hidden
        ev.reset()
        ev.process([{"image_id": d["image_id"]}], [{"instances": inst}])
        r = ev.evaluate()["hidden_fraction"]
        assert r["matched"] == len(whole)
        assert r["median_abs_error"] == pytest.approx(expected, abs=1e-9)
        assert r["matched_hidden"] == (truth >= HIDDEN_MIN).sum() > 0
        assert r["median_abs_error_hidden"] == pytest.approx(
            0.0 if expected == 0 else np.median(truth[truth >= HIDDEN_MIN]), abs=1e-9
        )
