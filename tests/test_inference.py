import dataclasses
import math

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model


@pytest.fixture(scope="module")
def model():
    cfg = tiny_cfg(**{"MODEL.IAUNET.NUM_CLASSES": 2, "TEST.DETECTIONS_PER_IMAGE": 4})
    return build_model(cfg).eval()


def _logits(rows):
    """rows of class probabilities (K+1 incl. no-object) -> logits."""
    return torch.tensor(rows).log()


def test_scoring_topk_and_padding_removal(model):
    # Padded input 64x64 -> mask logits 16x16; the real image is 48x40 (h x w) -> 12x10 at 1/4.
    masks = torch.full((3, 16, 16), -10.0)
    masks[0, :, :5] = 10.0  # left half of the real image, fully confident
    masks[1, 2:10, 2:8] = 0.5  # a soft blob: prob sigmoid(0.5) = 0.62 -> maskness 0.62
    masks[2, :, 10:] = 10.0  # only in the padding (columns >= 10): must vanish
    logits = _logits([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]])
    out = model.instance_inference(logits, masks, image_size=(48, 40), output_size=(96, 80))
    assert out.image_size == (96, 80) and out.pred_masks.shape[1:] == (96, 80)
    # query 0 class 0: 0.9 x maskness ~1; query 1 class 1: 0.8 x 0.62; query 2 has an empty mask ->
    # score 0 -> dropped
    assert out.pred_classes.tolist()[:2] == [0, 1]
    assert out.scores[0] == pytest.approx(0.9, abs=1e-3)
    assert out.scores[1] == pytest.approx(0.8 / (1 + math.exp(-0.5)), abs=1e-3)
    assert (out.scores[:-1] >= out.scores[1:]).all()
    # top-4 (TEST.DETECTIONS_PER_IMAGE) of the 6 query x class pairs are q0c0, q1c1, q2c0, q2c1;
    # both q2 entries die with their empty mask, q1c0 (0.1) never made the top-4
    assert len(out) == 2
    # query 0 covers the left half of the real image = columns [0, 40) of 80 at output scale
    m = out.pred_masks[0]
    assert m[:, :36].all() and not m[:, 44:].any()
    box = out.pred_boxes.tensor[0].tolist()
    assert box[0] == 0 and box[1] == 0 and box[3] == 96 and 38 <= box[2] <= 42


def test_maskness_modes(model):
    masks = torch.full((1, 16, 16), -10.0)
    masks[0, :4, :4] = 10.0
    logits = _logits([[0.5, 0.25, 0.25]])
    out = model.instance_inference(logits, masks, (64, 64), (64, 64))
    assert out.scores.max() == pytest.approx(0.5, abs=1e-3)  # mean prob inside the mask ~ 1
    settings = model.postprocessing
    model.postprocessing = dataclasses.replace(settings, maskness="image")
    try:
        out = model.instance_inference(logits, masks, (64, 64), (64, 64))
        assert out.scores.max() == pytest.approx(
            0.5 * 16 / 256, abs=1e-3
        )  # mean over the whole image
    finally:
        model.postprocessing = settings


def test_forward_odd_sizes_returns_original_size(model):
    inputs = [
        {"image": torch.rand(3, 75, 50) * 255, "height": 150, "width": 100},
        {"image": torch.rand(3, 33, 61) * 255},
    ]
    with torch.no_grad():
        outs = model(inputs)
    assert outs[0]["instances"].image_size == (150, 100)
    assert outs[1]["instances"].image_size == (33, 61)
    for o in outs:
        inst = o["instances"]
        assert inst.pred_masks.dtype == torch.bool and len(inst) <= 4
        assert inst.pred_masks.shape[0] == inst.scores.shape[0] == inst.pred_boxes.tensor.shape[0]


def test_bad_input_shape_is_named(model):
    with pytest.raises(ValueError, match=r"expected a \(3, H, W\) image tensor.*x.png"):
        model([{"image": torch.rand(1, 32, 32), "file_name": "x.png"}])


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_channels_last_matches_contiguous(backbone, tmp_path):
    """MODEL.CHANNELS_LAST: NHWC weights and input, the same predictions and losses (to rounding) as
    NCHW with the same weights; a checkpoint of either layout loads into the other."""
    from detectron2.checkpoint import DetectionCheckpointer

    opts = {"TEST.DETECTIONS_PER_IMAGE": 4, "MODEL.IAUNET.TEST.SCORE_THRESH": -1.0}
    if backbone == "swin":
        opts.update(
            {
                "MODEL.BACKBONE.NAME": "D2SwinTransformer",
                "MODEL.SWIN.EMBED_DIM": 24,
                "MODEL.SWIN.DEPTHS": [1, 1, 1, 1],
                "MODEL.SWIN.NUM_HEADS": [1, 1, 1, 1],
                "MODEL.SWIN.WINDOW_SIZE": 4,
            }
        )
    torch.manual_seed(0)
    ref = build_model(tiny_cfg(**opts, **{"MODEL.CHANNELS_LAST": False})).eval()
    DetectionCheckpointer(ref, save_dir=str(tmp_path)).save("ref")
    nhwc = build_model(tiny_cfg(**opts, **{"MODEL.CHANNELS_LAST": True})).eval()
    DetectionCheckpointer(nhwc).load(str(tmp_path / "ref.pth"))
    conv_weights = [p for p in nhwc.parameters() if p.dim() == 4]
    assert conv_weights and all(
        p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights
    )
    inputs = [{"image": torch.rand(3, 64, 96) * 255}]
    with torch.no_grad():
        a, b = ref(inputs)[0]["instances"], nhwc(inputs)[0]["instances"]
    assert torch.allclose(a.scores, b.scores, atol=1e-4)
    assert (a.pred_masks != b.pred_masks).float().mean() < 0.01
    # training: same losses, and every gradient flows
    from detectron2.structures import BitMasks, Instances

    inst = Instances(
        (64, 96),
        gt_classes=torch.tensor([0]),
        gt_masks=BitMasks(torch.zeros(1, 64, 96, dtype=torch.bool)),
    )
    inst.gt_masks.tensor[0, 10:30, 20:50] = True
    batch = [{"image": inputs[0]["image"], "instances": inst}]
    ref.train(), nhwc.train()
    torch.manual_seed(1)
    la = ref(batch)
    torch.manual_seed(1)
    lb = nhwc(batch)
    for k in la:
        assert torch.allclose(la[k], lb[k], rtol=1e-3, atol=1e-5), k
    sum(lb.values()).backward()
    assert all(p.grad is not None for p in nhwc.parameters() if p.requires_grad)
