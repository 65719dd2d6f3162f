"""The training recipe of the authors' code (configs/Base-IAUNet.yaml, docs/fidelity.md) and the
guard against training from random weights on real data."""

import os

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from iaunet.config import ConfigError, load_config
from iaunet.data.dataset_mapper import RandomRotate90, Rot90Transform
from iaunet.engine import check_config
from iaunet.modeling.pixel_decoder import UNetPixelDecoder
from iaunet.solver import build_optimizer

REVVITY = os.path.join(ROOT, "configs", "revvity25", "iaunet_R50.yaml")


def test_unet_upsampling_is_the_references():
    """ALIGN_CORNERS: the U-Net's x2 upsampling is nn.UpsamplingBilinear2d (the reference), which
    maps the corner pixel centres onto each other: CoordConv planes linspace(-1, 1, h) upsample to
    exactly linspace(-1, 1, 2h). align_corners=False (0.1) does not."""
    x = torch.linspace(-1, 1, 5).view(1, 1, 5, 1).expand(1, 1, 5, 5)
    like = torch.zeros(1, 1, 10, 10)

    class Dec:
        align_corners = True

    up = UNetPixelDecoder._up(Dec, x, like)
    torch.testing.assert_close(up, torch.nn.UpsamplingBilinear2d(scale_factor=2)(x))
    torch.testing.assert_close(up[0, 0, :, 0], torch.linspace(-1, 1, 10))
    Dec.align_corners = False
    assert not torch.allclose(
        UNetPixelDecoder._up(Dec, x, like)[0, 0, :, 0], torch.linspace(-1, 1, 10)
    )


def test_base_recipe_is_the_reference():
    cfg = load_config(REVVITY)
    assert cfg.MODEL.IAUNET.ALIGN_CORNERS and cfg.INPUT.ROTATE90 == 0.5
    assert not cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.WARMUP_ITERS == 0
    model = build_model(tiny_cfg(**{"MODEL.RESNETS.NORM": cfg.MODEL.RESNETS.NORM}))
    assert model.pixel_decoder.align_corners
    bn = [m for m in model.backbone.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert bn and all(m.weight.requires_grad for m in bn)  # BatchNorm that trains, not FrozenBN
    cfg.defrost()
    optimizer = build_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.AdamW  # no clipping wrapper
    assert {(g["lr"], g["weight_decay"]) for g in optimizer.param_groups} == {(1e-4, 0.05)}
    # the Mask2Former-style settings stay reachable
    m2f = tiny_cfg(
        **{
            "SOLVER.BACKBONE_MULTIPLIER": 0.1,
            "SOLVER.WEIGHT_DECAY_NORM": 0.0,
            "SOLVER.CLIP_GRADIENTS.ENABLED": True,
        }
    )
    optimizer = build_optimizer(m2f, model)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-4, 1e-5}
    assert 0.0 in {g["weight_decay"] for g in optimizer.param_groups}
    assert type(optimizer).__name__ == "FullModelGradientClippingOptimizer"


def test_training_from_random_weights_on_real_data_is_refused():
    cfg = load_config(REVVITY)
    with pytest.raises(
        ConfigError, match="MODEL.WEIGHTS is empty.*resnet50-11ad3fa6.pth.*FROM_SCRATCH"
    ):
        check_config(cfg, training=True)
    check_config(cfg, training=False)  # evaluation loads its weights itself
    check_config(load_config(REVVITY, ["MODEL.IAUNET.TRAIN.FROM_SCRATCH", "True"]), True)
    check_config(load_config(REVVITY, ["MODEL.WEIGHTS", "R-50.pkl"]), True)
    check_config(tiny_cfg(), True)  # the synthetic cells: from scratch is the point


def test_rotate90_moves_image_and_masks_together():
    img = np.zeros((4, 6, 3), np.float32)
    img[0, 5] = 1  # top-right pixel
    mask = img[..., 0].astype(np.uint8)
    np.random.seed(0)
    seen = set()
    for _ in range(30):
        aug = T.AugInput(img.copy(), sem_seg=mask.copy())
        t = T.AugmentationList([RandomRotate90(prob=1.0)])(aug)
        assert isinstance(t.transforms[0], Rot90Transform)
        assert np.array_equal(aug.image[..., 0], aug.sem_seg)
        seen.add(aug.image.shape[:2])
        k = t.transforms[0].k
        assert np.array_equal(aug.image, np.rot90(img, k))
    assert seen == {(4, 6), (6, 4)}


def test_small_config_fine_tunes_with_the_gradient_norm_capped():
    """configs/custom/iaunet_small.yaml: lr 0.001 and the whole model's gradient norm capped at
    SOLVER.CLIP_GRADIENTS.CLIP_VALUE before each AdamW step (docs/own_images.md)."""
    small = load_config(os.path.join(ROOT, "configs", "custom", "iaunet_small.yaml"))
    assert small.SOLVER.BASE_LR == 0.001 and small.SOLVER.CLIP_GRADIENTS.ENABLED
    cfg = tiny_cfg(
        **{
            "SOLVER.BASE_LR": small.SOLVER.BASE_LR,
            "SOLVER.CLIP_GRADIENTS.ENABLED": True,
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": small.SOLVER.CLIP_GRADIENTS.CLIP_TYPE,
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": small.SOLVER.CLIP_GRADIENTS.CLIP_VALUE,
        }
    )
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = build_optimizer(cfg, net)

    def grad_norm():  # the whole model's gradient norm, as CLIP_TYPE "full_model" measures it
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))

    (net(torch.full((8, 4), 100.0)).square().sum()).backward()
    assert grad_norm() > 1.0
    optimizer.step()  # clips the gradients in place, then steps
    assert grad_norm() == pytest.approx(small.SOLVER.CLIP_GRADIENTS.CLIP_VALUE, rel=1e-3)
