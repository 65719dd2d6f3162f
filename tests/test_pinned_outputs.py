"""Behaviour pinned across refactors: losses, gradients and predictions of a tiny IAUNet with fixed
weights.

The weights are a deterministic function of each tensor's *name as the 0.1 release spelled it* and
are loaded through ``AtomicCheckpointer`` from a checkpoint in that old naming, so this also checks
the legacy-key mapping. The expected numbers were computed with the 0.1 code (before the layout of
docs/architecture.md); any change of the forward pass, the losses or the post-processing moves them.
``MODEL.IAUNET.ALIGN_CORNERS False`` keeps the 0.1 upsampling.
"""

import math
import re
import zlib

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from iaunet.checkpoint import AtomicCheckpointer

# new key -> the 0.1 key (the inverse of iaunet.checkpoint.LEGACY_KEY_RENAMES)
TO_OLD = (
    (r"^pixel_decoder\.mask_head\.lateral\.", "pixel_decoder.lateral."),
    (r"^pixel_decoder\.mask_head\.output\.", "pixel_decoder.output."),
    (r"^pixel_decoder\.stages\.(\d+)\.conv\.", r"pixel_decoder.stages.\1.0."),
    (r"^pixel_decoder\.stages\.(\d+)\.se\.", r"pixel_decoder.stages.\1.1."),
)

PINNED = {
    "losses": {
        "loss_ce": 0.7727195024490356,
        "loss_mask": 7.152200222015381,
        "loss_dice": 1.8252142667770386,
        "loss_ce_0": 0.6776768565177917,
        "loss_mask_0": 7.853391647338867,
        "loss_dice_0": 1.8928059339523315,
        "loss_ce_3": 0.7198740243911743,
        "loss_mask_3": 15.885747909545898,
        "loss_dice_3": 1.892628788948059,
        "loss_ce_7": 1.1873759031295776,
        "loss_mask_7": 2.1360902786254883,
        "loss_dice_7": 1.7142568826675415,
    },
    "num_losses": 27,
    "grad_norms": {
        "backbone": 7361.29180242799,
        "pixel_decoder": 770.2237371964391,
        "query_decoder": 486.8389988418515,
    },
    "scores": [0.10826469, 0.10760798, 0.10640782, 0.10611996, 0.10453397],
    "mask_areas": [1938, 1957, 1889, 1964, 1883],
    "num_instances": 8,
}


def old_name(key: str) -> str:
    for pattern, repl in TO_OLD:
        key = re.sub(pattern, repl, key)
    return key


def pinned_value(name: str, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, well-scaled value for the tensor called ``name`` (0.1 naming)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    r = torch.rand(t.shape, generator=g, dtype=torch.float64)
    if name.endswith("running_var"):
        v = 0.5 + r
    elif name.endswith("running_mean"):
        v = 0.2 * (r - 0.5)
    elif t.dim() <= 1:
        v = 0.8 + 0.4 * r if name.endswith("weight") else 0.1 * (r - 0.5)
    else:
        v = (r - 0.5) * 2 * math.sqrt(3.0 / t[0].numel())
    return v.to(t.dtype)


def _batch():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(2):
        img = rng.normal(40, 8, (64, 64)).astype(np.float32)
        masks = []
        for _ in range(3):
            m = np.zeros((64, 64), np.uint8)
            center = tuple(int(v) for v in rng.uniform(10, 54, 2))
            axes = tuple(int(v) for v in rng.uniform(4, 10, 2))
            cv2.ellipse(m, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            masks.append(m.astype(bool))
            img += m * 80
        inst = Instances((64, 64))
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)))
        inst.gt_classes = torch.zeros(3, dtype=torch.int64)
        image = torch.from_numpy(np.repeat(np.clip(img, 0, 255)[None], 3, 0))
        out.append({"image": image, "instances": inst, "height": 64, "width": 64})
    return out


@pytest.fixture(scope="module")
def pinned_model(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"MODEL.IAUNET.ALIGN_CORNERS": False}))
    old = {}
    for key, t in model.state_dict().items():
        name = old_name(key)
        old[name] = pinned_value(name, t) if t.dtype.is_floating_point else t.clone()
    path = str(tmp_path_factory.mktemp("ckpt") / "model_v01.pth")
    torch.save({"model": old}, path)
    incompatible = AtomicCheckpointer(model)._load_model(torch.load(path))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return model


def test_old_checkpoint_keys_load(pinned_model):
    """Every key of a 0.1 checkpoint maps onto the current model (checked in the fixture), and the
    mapping renames the mask head and U-Net stage keys."""
    keys = list(pinned_model.state_dict())
    assert any(k.startswith("pixel_decoder.mask_head.lateral.") for k in keys)
    assert any(old_name(k).startswith("pixel_decoder.stages.0.1.") for k in keys)


def test_losses_gradients_and_predictions_are_pinned(pinned_model):
    model = pinned_model
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # matcher points and dropout
    losses = model(_batch())
    sum(losses.values()).backward()
    assert len(losses) == PINNED["num_losses"]
    for k, v in PINNED["losses"].items():
        assert losses[k].item() == pytest.approx(v, rel=1e-4), k
    for top, v in PINNED["grad_norms"].items():
        grads = [p.grad.double() for n, p in model.named_parameters() if n.startswith(top + ".")]
        norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
        assert norm == pytest.approx(v, rel=1e-3), top
    model.eval()
    with torch.no_grad():
        inst = model(_batch())[0]["instances"]
    assert len(inst) == PINNED["num_instances"]
    assert inst.scores[:5].tolist() == pytest.approx(PINNED["scores"], rel=1e-4)
    assert inst.pred_masks[:5].sum((1, 2)).tolist() == PINNED["mask_areas"]
