import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_backbone

from iaunet.modeling.pixel_decoder import UNetPixelDecoder
from iaunet.modeling.pixel_decoder.blocks import coord_planes


def test_coord_planes_span_minus_one_to_one():
    c = coord_planes(torch.zeros(2, 5, 7, 11))
    assert c.shape == (2, 2, 7, 11)
    assert torch.allclose(c[0, 0, 0], torch.linspace(-1, 1, 11))  # x varies along W
    assert torch.allclose(c[0, 1, :, 0], torch.linspace(-1, 1, 7))  # y varies along H
    assert c.min() == -1 and c.max() == 1


@pytest.mark.parametrize("fusion", ["concat", "add", "full"])
@pytest.mark.parametrize("light", [True, False])
def test_pixel_decoder_shapes(fusion, light):
    cfg = tiny_cfg(**{"MODEL.IAUNET.SKIP_FUSION": fusion, "MODEL.IAUNET.LIGHT_MASK_HEAD": light})
    backbone = build_backbone(cfg)
    decoder = UNetPixelDecoder(cfg, backbone.output_shape())
    x = torch.randn(2, 3, 96, 160)  # padded size of an odd input (e.g. 75x150)
    mask_features, multi_scale_features = decoder(backbone(x))
    assert mask_features.shape == (2, 32, 24, 40)
    assert [tuple(m.shape[-2:]) for m in multi_scale_features] == [(3, 5), (6, 10), (12, 20)]
    assert all(m.shape[:2] == (2, decoder.out_channels) for m in multi_scale_features)
    (mask_features.mean() + sum(m.mean() for m in multi_scale_features)).backward()


def test_pixel_decoder_rejects_bad_fusion():
    cfg = tiny_cfg(**{"MODEL.IAUNET.SKIP_FUSION": "sum"})
    with pytest.raises(ValueError, match="SKIP_FUSION"):
        UNetPixelDecoder(cfg, build_backbone(cfg).output_shape())
