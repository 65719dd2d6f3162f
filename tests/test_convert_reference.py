"""tools/convert_pretrained.py iaunet-ref: the authors' IAUNet state dict (github
SlavkoPrytula/IAUNet) in our model gives the authors' outputs.

The test builds a state dict in the authors' naming (torchvision ResNet-18 ``encoder.*``, their
``decoder.*`` names and shapes, random weights and BatchNorm statistics) and computes the authors'
forward pass from it with a functional re-statement of their decoder (thesis §3.4-3.5 as their code
runs it: coordinates concatenated before the x2 ``nn.UpsamplingBilinear2d``, biased convolutions
before BN in the mask branch and mask head, post-norm blocks, sequence-first attention).
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import load_tool, tiny_cfg
from detectron2.modeling import build_model

from iaunet.checkpoint import AtomicCheckpointer, read_checkpoint

convert = load_tool("convert_pretrained")

D, Q, K, HEADS, FFN, BLOCKS = (
    32,
    8,
    1,
    4,
    64,
    3,
)  # hidden dim, queries, classes, heads, FFN, per level
ENC = [512, 256, 128, 64]  # ResNet-18 res5..res2 channels


def _bn(sd, name, c, g):
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
    sd[f"{name}.num_batches_tracked"] = torch.tensor(7)


def _w(sd, name, *shape, g, bias=True):
    fan_in = math.prod(shape[1:])
    sd[f"{name}.weight"] = torch.randn(*shape, generator=g) / math.sqrt(fan_in)
    if bias:
        sd[f"{name}.bias"] = 0.1 * torch.randn(shape[0], generator=g)


def authors_state_dict():
    g = torch.Generator().manual_seed(0)
    encoder = torchvision.models.resnet18().eval()
    sd = {}
    for k, v in encoder.state_dict().items():
        if k.startswith("fc."):
            continue
        if k.endswith("running_mean"):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        sd[f"encoder.{k}"] = v
    d = "decoder."
    for i in range(3):
        _w(sd, f"{d}skip_conv_layers.{i}", D, ENC[i], 1, 1, g=g)
        c_in = D + 2 if i == 0 else 2 * D + 2
        u = f"{d}up_conv_layers.{i}.0"
        _w(sd, f"{u}.depthwise_conv1", c_in, 1, 3, 3, g=g)
        _w(sd, f"{u}.pointwise_conv1", D, c_in, 1, 1, g=g)
        _bn(sd, f"{u}.norm_relu1.0", D, g)
        _w(sd, f"{u}.depthwise_conv2", D, 1, 3, 3, g=g)
        _w(sd, f"{u}.pointwise_conv2", D, D, 1, 1, g=g)
        _bn(sd, f"{u}.norm_relu2.0", D, g)
        _w(sd, f"{u}.projection", D, c_in, 1, 1, g=g)
        _w(sd, f"{d}up_conv_layers.{i}.1.excite.0", D // 2, D, g=g)
        _w(sd, f"{d}up_conv_layers.{i}.1.excite.2", D, D // 2, g=g)
        for j in (0, 3):
            _w(sd, f"{d}mask_branch.{i}.mask_convs.{j}", D, D, 3, 3, g=g)
            _bn(sd, f"{d}mask_branch.{i}.mask_convs.{j + 1}", D, g)
    _w(sd, f"{d}lateral_conv.0", D, ENC[3], 1, 1, g=g)
    _bn(sd, f"{d}lateral_conv.1", D, g)
    _w(sd, f"{d}output_conv.0", D, D, 3, 3, g=g)
    _bn(sd, f"{d}output_conv.1", D, g)
    for k in range(3 * BLOCKS):
        for kind, attn in (("cross", "multihead_attn"), ("self", "self_attn")):
            p = f"{d}transformer_instance_{kind}_attention_layers.{k}"
            _w(sd, f"{p}.{attn}.in_proj", 3 * D, D, g=g)
            sd[f"{p}.{attn}.in_proj_bias"] = sd.pop(f"{p}.{attn}.in_proj.bias")
            sd[f"{p}.{attn}.in_proj_weight"] = sd.pop(f"{p}.{attn}.in_proj.weight")
            _w(sd, f"{p}.{attn}.out_proj", D, D, g=g)
            _bn(sd, f"{p}.norm", D, g)
            for stat in ("running_mean", "running_var", "num_batches_tracked"):
                del sd[f"{p}.norm.{stat}"]  # LayerNorm
        p = f"{d}transformer_instance_ffn_layers.{k}"
        _w(sd, f"{p}.linear1", FFN, D, g=g)
        _w(sd, f"{p}.linear2", D, FFN, g=g)
        sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"] = (
            1 + 0.1 * torch.randn(D),
            0.1 * torch.randn(D),
        )
    sd[f"{d}query_feat.weight"] = torch.randn(Q, D, generator=g)
    sd[f"{d}query_embed.weight"] = torch.randn(Q, D, generator=g)
    sd[f"{d}decoder_norm.weight"], sd[f"{d}decoder_norm.bias"] = torch.ones(D), torch.zeros(D)
    for name, out in (
        ("fc", D),
        ("class_embed", K + 1),
        ("mask_embed", D),
        ("objectness", 1),
        ("bbox_pred", 4),
    ):
        _w(sd, f"{d}{name}", out, D, g=g)
    sd["criterion.empty_weight"] = torch.tensor([1.0, 0.1])
    return {f"model.{k}": v for k, v in sd.items()}  # a Lightning module's "model." prefix


def _coords(x):
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([xx, yy])[None].expand(x.shape[0], -1, -1, -1)


def authors_forward(sd, image):
    """The authors' network in eval mode (their code, restated): every block's (logits, masks)."""
    sd = {k[len("model.") :]: v for k, v in sd.items()}
    enc = torchvision.models.resnet18()
    enc.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")}, strict=False)
    enc.eval()
    x = enc.maxpool(enc.relu(enc.bn1(enc.conv1(image))))
    feats = []
    for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4):
        x = layer(x)
        feats.append(x)
    p = {k[8:]: v for k, v in sd.items() if k.startswith("decoder.")}

    def conv(x, name, **kw):
        return F.conv2d(x, p[f"{name}.weight"], p.get(f"{name}.bias"), **kw)

    def bn(x, name):
        return F.batch_norm(
            x,
            p[f"{name}.running_mean"],
            p[f"{name}.running_var"],
            p[f"{name}.weight"],
            p[f"{name}.bias"],
        )

    def up2(x):
        return torch.nn.UpsamplingBilinear2d(scale_factor=2)(x)

    src, m = [], None
    for i in range(3):
        skip = conv(feats[-(i + 1)], f"skip_conv_layers.{i}")
        x = (
            torch.cat([_coords(skip), skip], 1)
            if i == 0
            else torch.cat([up2(torch.cat([_coords(x), x], 1)), skip], 1)
        )
        u = f"up_conv_layers.{i}.0"
        out = conv(x, f"{u}.depthwise_conv1", padding=1, groups=x.shape[1])
        out = F.relu(bn(conv(out, f"{u}.pointwise_conv1"), f"{u}.norm_relu1.0"))
        out = conv(out, f"{u}.depthwise_conv2", padding=1, groups=out.shape[1])
        out = F.relu(bn(conv(out, f"{u}.pointwise_conv2"), f"{u}.norm_relu2.0"))
        x = out + conv(x, f"{u}.projection")
        e = f"up_conv_layers.{i}.1.excite"
        s = torch.sigmoid(
            F.linear(
                F.relu(F.linear(x.mean((2, 3)), p[f"{e}.0.weight"], p[f"{e}.0.bias"])),
                p[f"{e}.2.weight"],
                p[f"{e}.2.bias"],
            )
        )
        x = x * s[:, :, None, None]
        m = x if i == 0 else up2(m) + x
        for j in (0, 3):
            m = F.relu(
                bn(
                    conv(m, f"mask_branch.{i}.mask_convs.{j}", padding=1),
                    f"mask_branch.{i}.mask_convs.{j + 1}",
                )
            )
        src.append(m)
    y = bn(conv(feats[0], "lateral_conv.0"), "lateral_conv.1") + F.interpolate(
        src[-1], size=feats[0].shape[-2:], mode="bilinear", align_corners=False
    )
    mask_features = F.relu(bn(conv(y, "output_conv.0", padding=1), "output_conv.1"))

    def pos_embed(x):
        h, w = x.shape[-2:]
        y_embed = torch.arange(1, h + 1.0)[:, None].expand(h, w) / (h + 1e-6) * 2 * math.pi
        x_embed = torch.arange(1, w + 1.0)[None].expand(h, w) / (w + 1e-6) * 2 * math.pi
        dim_t = 10000 ** (2 * (torch.arange(D // 2) // 2) / (D // 2))
        px, py = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=3).flatten(2)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=3).flatten(2)
        return torch.cat((py, px), dim=2).flatten(0, 1)[:, None]  # (HW, 1, D)

    def mha(q, k, v, name):
        return F.multi_head_attention_forward(
            q,
            k,
            v,
            D,
            HEADS,
            p[f"{name}.in_proj_weight"],
            p[f"{name}.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            p[f"{name}.out_proj.weight"],
            p[f"{name}.out_proj.bias"],
            training=False,
            need_weights=False,
        )[0]

    def ln(x, name):
        return F.layer_norm(x, (D,), p[f"{name}.weight"], p[f"{name}.bias"])

    b = image.shape[0]
    qpos = p["query_embed.weight"][:, None].expand(-1, b, -1)
    tgt = p["query_feat.weight"][:, None].expand(-1, b, -1)
    preds = []
    for i, x in enumerate(src):
        for j in range(BLOCKS):
            k = i * BLOCKS + j
            pos, mem = pos_embed(x), x.flatten(2).permute(2, 0, 1)
            c = f"transformer_instance_cross_attention_layers.{k}"
            tgt = ln(tgt + mha(tgt + qpos, mem + pos, mem, f"{c}.multihead_attn"), f"{c}.norm")
            s = f"transformer_instance_self_attention_layers.{k}"
            tgt = ln(tgt + mha(tgt + qpos, tgt + qpos, tgt, f"{s}.self_attn"), f"{s}.norm")
            f = f"transformer_instance_ffn_layers.{k}"
            h = F.linear(
                F.relu(F.linear(tgt, p[f"{f}.linear1.weight"], p[f"{f}.linear1.bias"])),
                p[f"{f}.linear2.weight"],
                p[f"{f}.linear2.bias"],
            )
            tgt = ln(tgt + h, f"{f}.norm")
            out = ln(tgt, "decoder_norm").transpose(0, 1)
            logits = F.linear(out, p["class_embed.weight"], p["class_embed.bias"])
            embed = F.linear(out, p["mask_embed.weight"], p["mask_embed.bias"])
            preds.append((logits, torch.einsum("bqc,bchw->bqhw", embed, mask_features)))
    return preds


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    sd = authors_state_dict()
    path = tmp_path_factory.mktemp("ref") / "iaunet_ref.pth"
    convert.save(convert.convert_iaunet_reference(sd), str(path), author="test")
    return sd, str(path)


def test_reference_model_reproduced(converted):
    sd, path = converted
    cfg = tiny_cfg(
        **{
            "MODEL.IAUNET.HIDDEN_DIM": D,
            "MODEL.IAUNET.MASK_DIM": D,
            "MODEL.IAUNET.NHEADS": HEADS,
            "MODEL.IAUNET.DIM_FEEDFORWARD": FFN,
            "MODEL.IAUNET.NUM_QUERIES": Q,
            "MODEL.IAUNET.BLOCKS_PER_LEVEL": BLOCKS,
            "MODEL.IAUNET.ALIGN_CORNERS": True,
            "MODEL.IAUNET.TEST.AUX_PREDICTIONS": True,
        }
    )
    model = build_model(cfg).eval()
    incompatible = AtomicCheckpointer(model)._load_model(read_checkpoint(path))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    torch.manual_seed(1)
    image = torch.randn(2, 3, 64, 64)  # normalized, as both models see it
    with torch.no_grad():
        ours = model.forward_network(image, deep_supervision=True)
        theirs = authors_forward(sd, image)
    ours = [(o["pred_logits"], o["pred_masks"]) for o in ours["aux_outputs"] + [ours]]
    assert len(ours) == len(theirs) == 3 * BLOCKS
    for (lo, mo), (lt, mt) in zip(ours, theirs):
        torch.testing.assert_close(lo, lt, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(mo, mt, atol=1e-3, rtol=1e-3)


def test_bare_state_dict_and_foreign_keys(converted):
    sd, _ = converted
    bare = {k[len("model.") :]: v for k, v in sd.items()}
    assert (
        convert.convert_iaunet_reference(bare).keys() == convert.convert_iaunet_reference(sd).keys()
    )
    with pytest.raises(ValueError, match="unknown decoder keys"):
        convert.convert_iaunet_reference({**bare, "decoder.new_layer.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no encoder"):
        convert.convert_iaunet_reference(
            {k: v for k, v in bare.items() if k.startswith("decoder.")}
        )
