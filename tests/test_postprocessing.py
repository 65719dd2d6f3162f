"""Post-processing steps (iaunet.modeling.postprocessing): duplicate suppression and top-k."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from iaunet.config import load_config
from iaunet.modeling.postprocessing import (
    PostProcessing,
    instances_from_topk,
    mask_overlap,
    suppress_duplicates,
    topk_predictions,
    upsample_masks,
)


def _settings(**changes) -> PostProcessing:
    """The default config's post-processing settings with ``changes``."""
    return dataclasses.replace(PostProcessing.from_config(load_config()), **changes)


def _masks():
    """Four 1/4-res masks: a cell, its near-copy (IoU 0.9), a cell overlapping the first by IoU 1/3,
    and a cell elsewhere."""
    m = torch.zeros(4, 20, 20, dtype=torch.bool)
    m[0, 0:10, 0:10] = True
    m[1, 0:10, 0:9] = True
    m[2, 0:10, 5:15] = True
    m[3, 12:18, 12:18] = True
    return m


def test_mask_iou():
    iou = mask_overlap(_masks())
    assert iou[0, 1] == pytest.approx(0.9) and iou[0, 2] == pytest.approx(1 / 3) and iou[0, 3] == 0


def test_mask_nms_drops_the_copy_and_keeps_overlapping_cells():
    scores, labels = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.zeros(4, dtype=torch.long)
    out = suppress_duplicates(scores, labels, _masks(), "mask", thresh=0.5)
    assert out.tolist() == pytest.approx([0.9, 0.0, 0.7, 0.6])
    # another class never suppresses
    out = suppress_duplicates(scores, torch.tensor([0, 1, 0, 0]), _masks(), "mask", thresh=0.5)
    assert out.tolist() == pytest.approx(scores.tolist())
    assert suppress_duplicates(scores, labels, _masks(), "none").tolist() == scores.tolist()


def test_matrix_nms_decays_by_overlap():
    scores, labels = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.zeros(4, dtype=torch.long)
    out = suppress_duplicates(scores, labels, _masks(), "matrix", sigma=2.0)
    assert out[0] == pytest.approx(0.9) and out[3] == pytest.approx(0.6)  # no overlap: unchanged
    assert out[1] == pytest.approx(0.8 * torch.exp(torch.tensor(-2 * 0.81)).item())
    assert out[1] < 0.2 < 0.5 < out[2] < 0.7  # the copy falls far below the overlapping cell


def test_topk_with_nms_returns_fixed_size_sorted():
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.85, 0.15], [0.8, 0.2], [0.7, 0.3]]))
    masks = torch.where(_masks(), 10.0, -10.0)
    post = _settings(nms="mask", nms_thresh=0.5)
    scores, labels, mask_logits = topk_predictions(
        logits, masks, (80, 80), post, num_classes=1, k=4, stride=4
    )
    assert scores.shape == (4,) and mask_logits.shape == (4, 20, 20)
    assert (scores[:-1] >= scores[1:]).all() and scores[-1] == 0  # the copy sorted last, at 0
    assert torch.equal(mask_logits[-1] > 0, _masks()[1])


def test_settings_come_from_the_config_and_are_checked():
    cfg = load_config(opts=["MODEL.IAUNET.TEST.NMS", "matrix", "TEST.DETECTIONS_PER_IMAGE", 7])
    post = PostProcessing.from_config(cfg)
    assert post.nms == "matrix" and post.detections_per_image == 7
    with pytest.raises(ValueError, match="MODEL.IAUNET.TEST.MASKNESS must be one of"):
        _settings(maskness="pixel")


@pytest.mark.parametrize("stride", [4, 2])
def test_topk_removes_the_padding_at_the_mask_stride(stride):
    """Maskness is measured on the unpadded image at the model's mask stride (a 30x30 input padded
    to 40: logits of 40 / stride): a mask in the padding only scores 0, one in the last image rows
    keeps its score (either fails when the crop uses the other stride)."""
    n = 40 // stride
    inside = -(-30 // stride)  # ceil(30 / stride) rows/columns hold image pixels
    masks = torch.full((2, n, n), -10.0)
    masks[0, inside:, :] = 10.0  # padding rows only
    masks[1, inside - 2 : inside, :2] = 10.0  # the last two rows of the image
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.8, 0.2]]))
    scores, _, _ = topk_predictions(
        logits, masks, (30, 30), _settings(), num_classes=1, k=2, stride=stride
    )
    assert scores[0] == pytest.approx(0.8, abs=1e-3) and scores[1] == 0


def test_upsample_masks_matches_the_reference():
    """Step 3 (no same-size resize, in-place sigmoid, chunks) equals the plain formulation."""
    torch.manual_seed(0)
    logits = torch.randn(40, 16, 16) * 3  # 1/4 of a padded 64x64 input; 40 masks -> 2 chunks of 32

    def reference(image_size, output_size):
        h, w = image_size
        m = F.interpolate(logits[None], scale_factor=4, mode="bilinear", align_corners=False)
        m = F.interpolate(m[:, :, :h, :w], size=output_size, mode="bilinear", align_corners=False)
        return m[0].sigmoid() > 0.5

    for image_size, output_size in (
        ((64, 64), (64, 64)),
        ((60, 50), (60, 50)),
        ((60, 50), (97, 81)),
    ):
        got = upsample_masks(logits, image_size, output_size, 0.5, stride=4)
        assert torch.equal(got, reference(image_size, output_size))


def test_ios_overlap_catches_a_part_inside_its_object():
    """A nucleus-only mask inside its cell: IoU 0.16 (NMS on IoU keeps it), intersection over the
    smaller 1 (NMS on IoS drops it); two neighbours overlapping by a third of the smaller stay."""
    m = torch.zeros(3, 20, 20, dtype=torch.bool)
    m[0, 0:10, 0:10] = True  # cell
    m[1, 3:7, 3:7] = True  # its nucleus
    m[2, 0:10, 7:16] = True  # a neighbour overlapping the cell by 30 px of its 90
    assert mask_overlap(m, "ios")[0, 1] == 1 and mask_overlap(m)[0, 1] == pytest.approx(0.16)
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long)
    kept = suppress_duplicates(scores, labels, m, "mask", thresh=0.6, overlap="ios")
    assert kept.tolist() == pytest.approx([0.9, 0.0, 0.7])
    assert suppress_duplicates(scores, labels, m, "mask", thresh=0.6).tolist() == pytest.approx(
        [0.9, 0.8, 0.7]
    )


def test_masks_to_boxes_matches_bitmasks():
    from detectron2.structures import BitMasks

    from iaunet.modeling.postprocessing import masks_to_boxes

    m = torch.zeros(6, 20, 30, dtype=torch.bool)
    m[0, 3:7, 5:9] = True
    m[1, 0, 0] = True  # corners
    m[2, 19, 29] = True
    m[4] = True  # full; m[3] stays empty -> zeros
    m[5, 2:18, 29] = True
    sparse = torch.rand(50, 40, 33, generator=torch.Generator().manual_seed(0)) > 0.999
    for masks in (m, sparse, torch.zeros(0, 5, 5, dtype=torch.bool)):
        expected = BitMasks(masks).get_bounding_boxes().tensor
        assert torch.equal(masks_to_boxes(masks).tensor, expected)


@pytest.mark.parametrize("mask_thresh", [0.5, 0.3, 0.9, 0.0, 1.0])
def test_upsample_masks_thresholds_logits_like_probabilities(mask_thresh):
    """x > logit(t) is sigmoid(x) > t (the two differ only within float rounding of t)."""
    import torch.nn.functional as F

    from iaunet.modeling.postprocessing import upsample_masks

    logits = torch.randn(40, 16, 16, generator=torch.Generator().manual_seed(0)) * 4
    up = F.interpolate(logits[None], scale_factor=4, mode="bilinear")[0, :, :60, :50]
    expected = up.sigmoid() > mask_thresh
    assert torch.equal(upsample_masks(logits, (60, 50), (60, 50), mask_thresh, 4), expected)
    # the exported graph's masks: already at the input size (stride 1), then resized
    resized = F.interpolate(up[None], size=(90, 75), mode="bilinear")[0].sigmoid() > mask_thresh
    assert torch.equal(upsample_masks(up, (60, 50), (90, 75), mask_thresh, 1), resized)


def test_one_piece_keeps_each_masks_largest_piece():
    """ONE_PIECE: a mask reaching into a neighbour keeps its own object; an 8-connected (diagonal)
    mask stays whole; the score and the other masks are unchanged; off, masks are as predicted."""
    logits = torch.full((3, 24, 24), -10.0)
    logits[0, 2:10, 2:10] = 10.0  # the object (64 px) ...
    logits[0, 15:19, 15:19] = 10.0  # ... and a piece of a neighbour (16 px)
    logits[1, 12, 12] = logits[1, 13, 13] = 10.0  # two pixels touching at a corner: one piece
    logits[2, 0:3, 20:24] = 10.0
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long)

    def run(one_piece, amodal=None):
        post = _settings(one_piece=one_piece, score_thresh=0.0)
        return instances_from_topk(
            scores, labels, logits, (24, 24), (24, 24), post, stride=1, amodal_mask_logits=amodal
        )

    whole = run(False)
    assert whole.pred_masks[0].sum() == 64 + 16
    cut = run(True)
    assert cut.pred_masks[0].sum() == 64 and bool(cut.pred_masks[0, 2:10, 2:10].all())
    assert torch.equal(cut.pred_masks[1:], whole.pred_masks[1:])
    assert torch.equal(cut.scores, whole.scores)
    assert cut.pred_boxes.tensor[0].tolist() == [2, 2, 10, 10]
    # amodal: the whole outline is cut to one piece and the visible part kept inside it; a visible
    # part split by the cell on top keeps both pieces when its whole outline is one piece
    visible = torch.full((1, 24, 24), -10.0)
    visible[0, 2:10, 2:5] = visible[0, 2:10, 7:10] = visible[0, 16:18, 16:18] = 10.0
    amodal = torch.full((1, 24, 24), -10.0)
    amodal[0, 2:10, 2:10] = amodal[0, 16:18, 16:18] = 10.0
    post = _settings(one_piece=True, score_thresh=0.0)
    out = instances_from_topk(
        scores[:1], labels[:1], visible, (24, 24), (24, 24), post, stride=1,
        amodal_mask_logits=amodal,
    )  # fmt: skip
    assert out.pred_amodal_masks[0].sum() == 64
    assert out.pred_masks[0].sum() == 48  # both 24-px pieces of the visible part, not the speck


def test_one_piece_comes_from_the_config():
    cfg = load_config()
    assert PostProcessing.from_config(cfg).one_piece is False
    cfg.MODEL.IAUNET.TEST.ONE_PIECE = True
    assert PostProcessing.from_config(cfg).one_piece is True


def test_min_area_drops_masks_smaller_than_a_fraction_of_the_trained_object():
    """MIN_AREA: a speck and a sliver go, objects stay with their scores in order; the area is in
    model px (an output twice the input's size has 4x the pixels); whole outlines count for amodal
    models; off (0), every mask is kept."""
    logits = torch.full((4, 24, 24), -10.0)
    logits[0, 2:10, 2:10] = 10.0  # 64 px: an object
    logits[1, 12:14, 12:14] = 10.0  # 4 px: a speck
    logits[2, 14:22, 2:9] = 10.0  # 56 px: an object
    logits[3, 0:1, 12:24] = 10.0  # 12 px: a sliver
    scores, labels = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.zeros(4, dtype=torch.long)

    def run(min_area, out_size=(24, 24), amodal=None):
        post = _settings(min_area=min_area, score_thresh=0.0)
        return instances_from_topk(
            scores, labels, logits, (24, 24), out_size, post, stride=1, amodal_mask_logits=amodal
        )

    assert len(run(0.0)) == 4
    kept = run(20.0)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7])
    assert [int(m.sum()) for m in kept.pred_masks] == [64, 56]
    assert kept.pred_boxes.tensor.tolist() == [[2, 2, 10, 10], [2, 14, 9, 22]]
    assert run(20.0, out_size=(48, 48)).scores.tolist() == pytest.approx([0.9, 0.7])
    assert len(run(60.0)) == 1
    # amodal: a hidden cell with a small visible part is kept by its whole outline
    amodal = logits.clone()
    amodal[1, 10:18, 10:18] = 10.0
    assert len(run(20.0, amodal=amodal)) == 3


def test_min_area_comes_from_the_config_as_a_fraction_of_the_object_size():
    cfg = load_config()
    assert PostProcessing.from_config(cfg).min_area == 0
    cfg.INPUT.OBJECT_DIAMETER = 20.0
    cfg.MODEL.IAUNET.TEST.MIN_AREA = 0.1
    assert PostProcessing.from_config(cfg).min_area == pytest.approx(0.1 * 3.14159265 * 100)
    cfg.INPUT.OBJECT_DIAMETER = 0.0
    with pytest.raises(ValueError, match="MIN_AREA.*INPUT.OBJECT_DIAMETER"):
        PostProcessing.from_config(cfg)
