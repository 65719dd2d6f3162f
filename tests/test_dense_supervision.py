"""The dense probe on E: its targets, its loss, and that it is a training aid only."""

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from iaunet.modeling.dense_supervision import DenseHead, dense_loss, dense_targets


def _disc(h, w, cy, cx, r):
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((y - cy) ** 2 + (x - cx) ** 2) <= r * r).float()


def test_targets_foreground_and_centreness():
    a, b = _disc(32, 32, 10, 10, 6), _disc(32, 32, 22, 22, 4)
    masks = torch.stack([a, b, _disc(32, 32, 16, 16, 5)])
    fg, centre = dense_targets(masks, counts=[2, 1], size=(32, 32))
    assert fg.shape == centre.shape == (2, 32, 32)
    assert torch.equal(fg[0], torch.maximum(a, b)) and torch.equal(fg[1], masks[2])
    # 1 at each object's centre, 0 outside, smaller towards the border
    assert centre[0, 10, 10] == 1 and centre[0, 22, 22] == 1 and centre[1, 16, 16] == 1
    assert centre[0][fg[0] == 0].abs().max() == 0
    assert 0 < centre[0, 10, 15] < centre[0, 10, 12] < 1
    # at half resolution the foreground is the covered share of each pixel
    fg2, _ = dense_targets(masks, counts=[2, 1], size=(16, 16))
    assert fg2.shape == (2, 16, 16) and 0 < fg2[0][(fg2[0] > 0) & (fg2[0] < 1)].numel()
    # an image without objects: all background
    fg0, c0 = dense_targets(masks[:1], counts=[0, 1], size=(32, 32))
    assert fg0[0].sum() == 0 and c0[0].sum() == 0 and c0[1].max() == 1


def test_probe_learns_the_targets():
    torch.manual_seed(0)
    masks = torch.stack([_disc(32, 32, 10, 10, 6), _disc(32, 32, 22, 20, 5)])
    # features that carry the answer linearly: the probe must find it
    fg, centre = dense_targets(masks, [2], (32, 32))
    feats = torch.cat([fg[:, None], centre[:, None], torch.randn(1, 6, 32, 32)], 1)
    head = DenseHead(8)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    losses = []
    for _ in range(60):
        loss = dense_loss(head(feats), masks, [2])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def _batch():
    inst = Instances((64, 64))
    inst.gt_masks = BitMasks(torch.stack([_disc(64, 64, 20, 20, 8), _disc(64, 64, 40, 44, 7)]) > 0)
    inst.gt_classes = torch.zeros(2, dtype=torch.int64)
    image = 40 + 150 * inst.gt_masks.tensor.any(0).float()
    return [{"image": image.expand(3, -1, -1).clone(), "instances": inst}]


def test_model_trains_the_probe_and_inference_ignores_it():
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"MODEL.IAUNET.DENSE_WEIGHT": 0.5})
    model = build_model(cfg)
    assert model.dense_head is not None
    model.train()
    losses = model(_batch())
    assert "loss_dense" in losses and losses["loss_dense"].item() > 0
    losses["loss_dense"].backward()
    assert model.dense_head.proj.weight.grad.abs().sum() > 0
    assert model.pixel_decoder.mask_head.output[0].weight.grad.abs().sum() > 0  # reaches E

    # Without the probe: same weights otherwise, same predictions (the probe is training-only).
    plain = build_model(tiny_cfg())
    assert plain.dense_head is None and "loss_dense" not in plain.train()(_batch())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("dense_head.")}
    plain.load_state_dict(state)
    model.eval(), plain.eval()
    x = [{"image": _batch()[0]["image"]}]
    with torch.no_grad():
        a, b = model(x)[0]["instances"], plain(x)[0]["instances"]
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)
    with pytest.raises(ValueError, match="DENSE_WEIGHT"):
        build_model(tiny_cfg(**{"MODEL.IAUNET.DENSE_WEIGHT": -1.0}))
