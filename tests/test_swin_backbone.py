"""Tests of the timm-backed Swin backbone and of tools/convert_pretrained.py (tiny models, no
downloads)."""

import importlib.util
import re
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import ShapeSpec, build_resnet_backbone
from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import nn

from iaunet.config import add_iaunet_config
from iaunet.modeling.backbone.swin import D2SwinTransformer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on 1 thread; restored so that other test modules are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_pretrained.py"
_spec = importlib.util.spec_from_file_location("convert_pretrained", _TOOL)
convert_pretrained = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_pretrained)

# Two blocks per stage so that shifted windows are exercised too.
TINY = dict(EMBED_DIM=32, DEPTHS=[2, 2, 2, 2], NUM_HEADS=[1, 2, 4, 8], WINDOW_SIZE=7)


def tiny_swin(drop_path: float = 0.0, **overrides) -> D2SwinTransformer:
    """A tiny backbone built from a detectron2 cfg, in eval mode, with a fixed seed."""
    cfg = get_cfg()
    add_iaunet_config(cfg)
    for key, value in {**TINY, "DROP_PATH_RATE": drop_path, **overrides}.items():
        setattr(cfg.MODEL.SWIN, key, value)
    torch.manual_seed(0)
    return D2SwinTransformer(cfg, ShapeSpec(channels=3)).eval()


def timm_tiny_swin(window_size: int = 7) -> SwinTransformer:
    """timm's own Swin with the tiny architecture and a classifier head (the layout of timm
    checkpoints).

    ``always_partition``: shift windows even on a 7x7 map, as detection Swin (and our backbone)
    does.
    """
    torch.manual_seed(1)
    return SwinTransformer(
        embed_dim=TINY["EMBED_DIM"],
        depths=TINY["DEPTHS"],
        num_heads=TINY["NUM_HEADS"],
        window_size=window_size,
        num_classes=10,
        drop_path_rate=0.0,
        always_partition=True,
    ).eval()


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (128, 128), (224, 160)])
def test_output_shapes(size):
    model = tiny_swin()
    assert model.size_divisibility == 32
    shapes = model.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res2": (32, 4),
        "res3": (64, 8),
        "res4": (128, 16),
        "res5": (256, 32),
    }
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    for name, spec in shapes.items():
        assert out[name].shape == (2, spec.channels, size[0] // spec.stride, size[1] // spec.stride)
        assert out[name].is_contiguous()


def test_out_features_subset():
    model = tiny_swin(OUT_FEATURES=["res3", "res5"])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert set(out) == set(model.output_shape()) == {"res3", "res5"}
    assert not hasattr(model, "norm0")


def test_matches_timm_when_no_padding_is_needed():
    """At 224x224 every stage (56, 28, 14, 7) is a multiple of the window: timm's forward is the
    reference."""
    model, ref = tiny_swin(), timm_tiny_swin()
    state = convert_pretrained.convert_swin(ref.state_dict(), prefix="")
    model.load_state_dict(state, strict=False)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model(x)
        feats = ref.forward_intermediates(x, intermediates_only=True)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        norm = getattr(model, f"norm{i}")
        expected = norm(feats[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-5)


def test_padding_precedes_the_shift():
    """With padding, a block attends over the zero-padded map exactly as over an unpadded map of
    that size."""
    block = tiny_swin().layers[1].blocks[1]  # shifted block of stage 2
    assert any(block.shift_size)
    x = torch.randn(2, 9, 13, block.dim)  # padded to 14 x 14
    with torch.no_grad():
        ours = block._attn(x)
        padded = SwinTransformerBlock._attn(
            block, F.pad(x, (0, 0, 0, 1, 0, 5))
        )  # timm path, no padding needed
    torch.testing.assert_close(ours, padded[:, :9, :13], rtol=0, atol=1e-6)


def test_backward_and_drop_path():
    model = tiny_swin(drop_path=0.2).train()
    blocks = [b for s in model.layers for b in s.blocks]
    assert not isinstance(blocks[0].drop_path1, DropPath)  # rate 0 for the first block
    rates = [b.drop_path1.drop_prob for b in blocks[1:]]
    assert rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    torch.manual_seed(0)
    out = model(torch.randn(2, 3, 64, 96))
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert not any(isinstance(m, DropPath) for m in tiny_swin(drop_path=0.0).modules())


class _Wrapper(nn.Module):
    """Stands in for IAUNet: the backbone is the ``backbone`` attribute."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone


def _to_official_layout(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm layout -> microsoft/Swin-Transformer layout (downsample at the end of the previous
    stage)."""

    def rename(key: str) -> str:
        key = re.sub(
            r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key
        )
        return key.replace("head.fc.", "head.")

    return {rename(k): v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["timm", "official"])
@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_swin_conversion_round_trip(tmp_path, layout, suffix):
    source = timm_tiny_swin().state_dict()
    if layout == "official":
        source = _to_official_layout(source)
    path = str(tmp_path / f"swin{suffix}")
    convert_pretrained.save(convert_pretrained.convert_swin(source), path, author="test")

    model = _Wrapper(tiny_swin())
    DetectionCheckpointer(model).load(path)
    ours = model.backbone.state_dict()
    expected = convert_pretrained.convert_swin(timm_tiny_swin().state_dict(), prefix="")
    assert set(ours) - set(expected) == {
        f"norm{i}.{p}" for i in range(3) for p in ("weight", "bias")
    }
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


def test_swin_window_resize():
    source = timm_tiny_swin(window_size=7).state_dict()
    state = convert_pretrained.convert_swin(source, window_size=12, prefix="")
    model = tiny_swin(WINDOW_SIZE=12)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(
        re.match(r"norm[012]\.", k) for k in result.missing_keys
    )
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (23 * 23, 1)
    # bicubic resize keeps the centre (zero offset) of the table: entry (6, 6) of 13x13 -> (11, 11)
    # of 23x23
    source_table = source["layers.0.blocks.0.attn.relative_position_bias_table"]
    torch.testing.assert_close(table[11 * 23 + 11], source_table[6 * 13 + 6], rtol=0, atol=1e-6)


def test_torchvision_resnet50_conversion():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics so that a misplaced norm would show
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    converted = convert_pretrained.convert_torchvision_resnet(tv.state_dict(), prefix="")

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision puts the stride on the 3x3 conv
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    d2_state = d2.state_dict()
    assert set(converted) == set(d2_state)
    assert all(converted[k].shape == d2_state[k].shape for k in converted)

    d2.load_state_dict(converted)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = d2(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, layer in enumerate([tv.layer1, tv.layer2, tv.layer3, tv.layer4]):
            y = layer(y)
            torch.testing.assert_close(out[f"res{i + 2}"], y, rtol=1e-4, atol=1e-4)
