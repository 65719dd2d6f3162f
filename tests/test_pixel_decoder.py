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


def test_mask_stride_2_adds_image_detail_at_half_resolution():
    """MODEL.IAUNET.MASK_STRIDE 2: E at 1/2, and a single input pixel changes E around it (the
    detail stage sees the image at 1/2, E at 1/4 could not place it)."""
    cfg = tiny_cfg(**{"MODEL.IAUNET.MASK_STRIDE": 2})
    backbone = build_backbone(cfg).eval()
    decoder = UNetPixelDecoder(cfg, backbone.output_shape()).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        e = decoder(backbone(x), x)[0]
        x2 = x.clone()
        x2[0, :, 41, 81] += 5.0
        d = (decoder(backbone(x2), x2)[0] - e).abs().amax(1)[0]  # (48, 80)
    assert e.shape == (1, 32, 48, 80)
    near = d[19:22, 39:42].max()
    assert near > 0 and near > 10 * d[:, :30].max()  # local change (the backbone's is tiny)
    with pytest.raises(ValueError, match="MASK_STRIDE 2"):
        decoder(backbone(x))
    with pytest.raises(ValueError, match="MASK_STRIDE"):
        UNetPixelDecoder(tiny_cfg(**{"MODEL.IAUNET.MASK_STRIDE": 8}), backbone.output_shape())


def test_pixel_decoder_rejects_bad_fusion():
    cfg = tiny_cfg(**{"MODEL.IAUNET.SKIP_FUSION": "sum"})
    with pytest.raises(ValueError, match="SKIP_FUSION"):
        UNetPixelDecoder(cfg, build_backbone(cfg).output_shape())
