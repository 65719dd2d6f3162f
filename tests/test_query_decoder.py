import pytest
import torch
from conftest import tiny_cfg

from iaunet.modeling.transformer_decoder import QueryDecoder
from iaunet.modeling.transformer_decoder.layers import sine_position_encoding


def _decoder(**overrides):
    cfg = tiny_cfg(**overrides)
    return QueryDecoder(cfg, num_levels=3, in_channels=32)


def _inputs(b=2, h=96, w=160):
    multi_scale_features = [torch.randn(b, 32, h // s, w // s) for s in (32, 16, 8)]
    return multi_scale_features, torch.randn(b, 32, h // 4, w // 4)


def test_outputs_and_deep_supervision():
    dec = _decoder()
    multi_scale_features, e = _inputs()
    out = dec(multi_scale_features, e, deep_supervision=True)
    assert out["pred_logits"].shape == (2, 8, 2)  # K+1 classes
    assert out["pred_masks"].shape == (2, 8, 24, 40)
    assert len(out["aux_outputs"]) == 3 * 3 - 1  # 3 blocks per level, 3 levels
    assert all(a["pred_masks"].shape == (2, 8, 24, 40) for a in out["aux_outputs"])
    assert dec(multi_scale_features, e, deep_supervision=False)["aux_outputs"] == []


def test_block_order_and_param_count():
    seq = _decoder()
    rr = _decoder(**{"MODEL.IAUNET.DECODER_ORDER": "round_robin"})
    assert seq.block_levels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rr.block_levels == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    one = _decoder(**{"MODEL.IAUNET.BLOCKS_PER_LEVEL": 1})
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    block = n(seq.cross_attention[0]) + n(seq.self_attention[0]) + n(seq.ffn[0])
    assert n(seq) - n(one) == 6 * block


def test_last_prediction_independent_of_aux_at_inference():
    torch.manual_seed(0)
    dec = _decoder().eval()
    multi_scale_features, e = _inputs(b=1)
    a = dec(multi_scale_features, e, deep_supervision=False)
    dec.aux_predictions_at_test = True
    b = dec(multi_scale_features, e, deep_supervision=False)
    assert torch.allclose(a["pred_masks"], b["pred_masks"]) and torch.allclose(
        a["pred_logits"], b["pred_logits"]
    )


@pytest.mark.parametrize("pre_norm", [False, True])
def test_pre_and_post_norm_backward(pre_norm):
    dec = _decoder(**{"MODEL.IAUNET.PRE_NORM": pre_norm})
    multi_scale_features, e = _inputs()
    out = dec(multi_scale_features, e)
    out["pred_masks"].mean().backward()
    assert dec.queries.weight.grad is not None and dec.query_pos.weight.grad.abs().sum() > 0


def test_sine_encoding():
    pos = sine_position_encoding(torch.zeros(1, 4, 3, 5), 8)
    assert pos.shape == (1, 15, 8)
    assert pos.abs().max() <= 1.0
    assert len({tuple(p.tolist()) for p in pos[0]}) == 15  # every location encoded differently


def test_bad_order_rejected():
    with pytest.raises(ValueError, match="DECODER_ORDER"):
        _decoder(**{"MODEL.IAUNET.DECODER_ORDER": "zigzag"})
