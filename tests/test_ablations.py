"""Every ablation switch of thesis Tables 3-5 builds the full model, trains one step and infers."""

import math

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from iaunet.modeling.pixel_decoder.blocks import SqueezeExcite

M = "MODEL.IAUNET."


def _stage_in_channels(model):
    """Input channels of each U-Net stage (the first depthwise conv of G_x), coarse to fine."""
    return [stage.conv.body[0].in_channels for stage in model.pixel_decoder.stages]


def _modules(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


# (overrides, check of the built model). tiny_cfg: ResNet-18 (res2..res5 = 64, 128, 256, 512 ch), D
# = 32.
CASES = {
    "defaults": (  # concat skips, CoordConv, SE, mask branch, light head, "seq" order
        {},
        lambda m: (
            _stage_in_channels(m) == [34, 66, 66]
            and len(_modules(m, SqueezeExcite)) == 3
            and len(m.pixel_decoder.mask_branch) == 3
            and m.pixel_decoder.mask_head.lateral is not None
            and m.query_decoder.block_levels == [0] * 3 + [1] * 3 + [2] * 3
        ),
    ),
    "skip_fusion_add": (
        {M + "SKIP_FUSION": "add"},
        lambda m: _stage_in_channels(m) == [34, 34, 34],
    ),
    "skip_fusion_full": (
        {M + "SKIP_FUSION": "full"},
        lambda m: (
            _stage_in_channels(m) == [514, 32 + 2 + 256, 32 + 2 + 128]
            and all(isinstance(p, torch.nn.Identity) for p in m.pixel_decoder.skip_proj)
        ),
    ),
    "heavy_mask_head": (
        {M + "LIGHT_MASK_HEAD": False},
        lambda m: len(m.pixel_decoder.stages) == 4 and m.pixel_decoder.mask_head.lateral is None,
    ),
    "no_mask_branch": ({M + "MASK_BRANCH": False}, lambda m: len(m.pixel_decoder.mask_branch) == 0),
    "dim_feedforward": (
        {M + "DIM_FEEDFORWARD": 128},
        lambda m: m.query_decoder.ffn[0].linear1.out_features == 128,
    ),
    "no_se": ({M + "SE": False}, lambda m: not _modules(m, SqueezeExcite)),
    "no_coord_conv": ({M + "COORD_CONV": False}, lambda m: _stage_in_channels(m) == [32, 64, 64]),
    "one_block_per_level": (
        {M + "BLOCKS_PER_LEVEL": 1},
        lambda m: m.query_decoder.block_levels == [0, 1, 2] and len(m.query_decoder.ffn) == 3,
    ),
    "round_robin": (
        {M + "DECODER_ORDER": "round_robin"},
        lambda m: m.query_decoder.block_levels == [0, 1, 2] * 3,
    ),
    "no_deep_supervision": ({M + "DEEP_SUPERVISION": False}, lambda m: not m.deep_supervision),
    "num_queries": (
        {M + "NUM_QUERIES": 12},
        lambda m: m.query_decoder.queries.num_embeddings == 12,
    ),
    "pre_norm": ({M + "PRE_NORM": True}, lambda m: m.query_decoder.ffn[0].pre_norm),
    "aux_predictions_at_test": (
        {M + "TEST.AUX_PREDICTIONS": True},
        lambda m: m.query_decoder.aux_predictions_at_test,
    ),
}


def _inputs(size: int = 64, num_instances: int = 2):
    """One image with rectangle instances, in the detectron2 training format (batching is tested
    elsewhere)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(num_instances, size, size, dtype=torch.bool)
    for j in range(num_instances):
        y, x = torch.randint(0, size - 20, (2,), generator=g).tolist()
        masks[j, y : y + 16, x : x + 12] = True
    inst = Instances(
        (size, size),
        gt_masks=BitMasks(masks),
        gt_classes=torch.zeros(num_instances, dtype=torch.int64),
    )
    return [{"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst}]


@pytest.mark.parametrize("case", list(CASES))
def test_ablation_switch_trains_and_infers(case):
    overrides, check = CASES[case]
    torch.manual_seed(0)
    cfg = tiny_cfg(**overrides)
    model = build_model(cfg)
    assert check(model), f"{case}: {overrides} did not change the model as expected"

    model.train()
    losses = model(_inputs())
    num_blocks = 3 * cfg.MODEL.IAUNET.BLOCKS_PER_LEVEL  # 3 pixel-decoder levels
    num_aux = num_blocks - 1 if cfg.MODEL.IAUNET.DEEP_SUPERVISION else 0
    assert len(losses) == 3 * (1 + num_aux)
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert torch.isfinite(
        torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    ).all()

    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 48, 64) * 255, "height": 96, "width": 128}])[0][
            "instances"
        ]
    assert out.image_size == (96, 128)
    assert out.pred_masks.shape[1:] == (96, 128) and out.pred_masks.dtype == torch.bool
    assert len(out) <= cfg.TEST.DETECTIONS_PER_IMAGE and torch.isfinite(out.scores).all()
