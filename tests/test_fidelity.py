"""Model size against the thesis (Tables 1-5) and a smoke test of tools/analyze_model.py
(docs/fidelity.md)."""

import os

import pytest
from conftest import ROOT, load_tool, tiny_cfg

analyze_model = load_tool("analyze_model")


@pytest.mark.parametrize(
    "config, thesis_params",
    [
        ("iaunet_R50.yaml", 39e6),
        ("iaunet_R101.yaml", 58e6),
        ("iaunet_swin_s.yaml", 64e6),
        ("iaunet_swin_b.yaml", 102e6),
    ],
)
def test_parameter_count_matches_thesis(config, thesis_params):
    cfg = analyze_model.setup_cfg(os.path.join(ROOT, "configs", "revvity25", config))
    params = analyze_model.count_parameters(cfg)
    assert abs(params["total"] / thesis_params - 1) <= 0.03, (
        f"{config}: {params['total'] / 1e6:.2f}M"
    )
    assert (
        sum(v for k, v in params.items() if k != "total") == params["total"]
    )  # the breakdown is complete


def test_flop_count_tiny_model():
    # tiny_cfg: D = 32, 8 queries, 3 blocks per level; a 64x64 image gives multi-scale features of
    # 2x2, 4x4, 8x8.
    d, q, blocks_per_level, memory_lengths = 32, 8, 3, (4, 16, 64)
    default = analyze_model.count_flops(tiny_cfg(), size=64)
    thesis = analyze_model.count_flops(
        tiny_cfg(**{"MODEL.IAUNET.TEST.AUX_PREDICTIONS": True}), size=64
    )

    assert "aten::scaled_dot_product_attention" not in default["unsupported"]
    # Q K^T and attn V: 2 Q L D multiply-adds per cross-attention, 2 Q Q D per self-attention.
    attention = (
        blocks_per_level * sum(2 * q * n * d for n in memory_lengths)
        + 3 * blocks_per_level * 2 * q * q * d
    )
    assert default["operators"]["scaled_dot_product_attention"] == attention
    assert default["operators"]["einsum"] == pytest.approx(
        q * d * 16 * 16, rel=1e-3
    )  # one mask prediction at 1/4
    # The thesis count runs the prediction head after each of the 9 blocks, nothing else changes.
    heads = "query decoder: prediction heads"
    assert thesis[heads] == pytest.approx(9 * default[heads])
    assert thesis["total"] - thesis[heads] == pytest.approx(default["total"] - default[heads])
    rows = [
        k for k in default if k not in ("total", "postprocess", "kept", "operators", "unsupported")
    ]
    assert sum(default[k] for k in rows) == pytest.approx(default["total"])
    assert default["postprocess"] > 0


def test_command_line_opts_after_tasks():
    args = analyze_model.parse_args(
        ["--config-file", "x.yaml", "--tasks", "flop", "MODEL.IAUNET.NUM_QUERIES", "300"]
    )
    assert args.tasks == ["flop"] and args.opts == ["MODEL.IAUNET.NUM_QUERIES", "300"]
    args = analyze_model.parse_args(
        ["--config-file", "x.yaml", "--opts", "MODEL.IAUNET.NUM_QUERIES", "300"]
    )
    assert args.tasks == ["parameter", "flop"] and args.opts == ["MODEL.IAUNET.NUM_QUERIES", "300"]
