"""Training-only accelerators: query groups (Group DETR), denoising queries (DN-DETR, MaskDINO)."""

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from test_pinned_outputs import _batch

from iaunet.modeling.transformer_decoder.training_queries import (
    MaskDenoising,
    self_attention_mask,
)

ACCEL = {"MODEL.IAUNET.TRAIN.QUERY_GROUPS": 3, "MODEL.IAUNET.TRAIN.DENOISING": True}


@pytest.fixture(scope="module")
def pair():
    """A plain model and one with both accelerators, sharing every weight of the plain one (no
    dropout, 1 block per level: small and deterministic)."""
    extra = {"MODEL.IAUNET.DROPOUT": 0.0, "MODEL.IAUNET.BLOCKS_PER_LEVEL": 1}
    torch.manual_seed(0)
    plain = build_model(tiny_cfg(**extra))
    accel = build_model(tiny_cfg(**ACCEL, **extra))
    missing, unexpected = accel.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(
        k.startswith(("query_decoder.groups.", "query_decoder.denoising.")) for k in missing
    )
    return plain, accel


def test_inference_output_is_unchanged(pair):
    plain, accel = pair
    with torch.no_grad():
        a = plain.eval()(_batch())[0]["instances"]
        b = accel.eval()(_batch())[0]["instances"]
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)


def test_group_zero_does_not_see_the_other_queries_in_training(pair):
    """With dropout off, the first N queries' training outputs are those of the plain model: the
    attention mask hides the extra groups and the denoising queries from them."""
    plain, accel = pair
    plain.train(), accel.train()
    images = plain.preprocess_image(_batch())
    targets = plain.prepare_targets([x["instances"] for x in _batch()], images)
    out_p = plain.forward_network(images.tensor, True, targets)
    out_a = accel.forward_network(images.tensor, True, targets)
    n = plain.query_decoder.queries.num_embeddings
    assert out_a["query_groups"] == 3 and out_a["pred_logits"].shape[1] == 3 * n
    torch.testing.assert_close(out_a["pred_logits"][:, :n], out_p["pred_logits"])
    torch.testing.assert_close(out_a["pred_masks"][:, :n], out_p["pred_masks"])
    # the matcher only ever sees matching queries; denoising ones come with their assignment
    dn = out_a["denoising"]
    q, t = dn["indices"][0]
    assert dn["pred_logits"].shape[1] >= len(q) and torch.equal(
        t, torch.arange(3).repeat(len(q) // 3)
    )


def test_losses_of_every_kind_and_their_gradients(pair):
    accel = pair[1]
    accel.train()
    losses = accel(_batch())
    assert {"loss_ce", "loss_mask_dn", "loss_dice_dn_0"} <= set(losses)
    sum(losses.values()).backward()
    qd = accel.query_decoder
    for p in (
        qd.groups.queries.weight,
        qd.denoising.content_proj.weight,
        qd.denoising.label_embed.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_denoising_queries_are_built_from_the_targets():
    torch.manual_seed(0)
    dn = MaskDenoising(num_classes=2, hidden_dim=16, mask_dim=8, groups=2, box_noise=0.0)
    features = torch.randn(1, 8, 16, 16)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 0:16, 0:16] = True  # top-left 4x4 cells at 1/4
    masks[1, 32:64, 32:64] = True
    targets = [{"labels": torch.tensor([0, 1]), "masks": masks}]
    out = dn(targets, features)
    assert out["queries"].shape == (1, 4, 16) and out["valid"].all()
    assert out["group"].tolist() == [[0, 0, 1, 1]]
    # no noise: the content of object 0 is E averaged over its box, plus its label embedding
    pooled = features[0, :, 0:4, 0:4].mean((1, 2))
    expected = dn.content_proj(pooled) + dn.label_embed.weight[0]
    torch.testing.assert_close(out["queries"][0, 0], expected)
    torch.testing.assert_close(out["queries"][0, 0], out["queries"][0, 2])  # same object, group 1
    moved = [{"labels": torch.tensor([0, 1]), "masks": masks.roll(8, dims=2)}]
    assert not torch.allclose(dn(moved, features)["queries"][0, 0], out["queries"][0, 0])
    assert dn([{"labels": torch.zeros(0, dtype=torch.long), "masks": masks[:0]}], features) is None


def test_self_attention_mask():
    dn = {
        "group": torch.tensor([[0, 0, 1, -1]]),
        "valid": torch.tensor([[True, True, True, False]]),
    }
    mask, length = self_attention_mask(1, 2, 2, dn, num_heads=1)
    allowed = ~mask[0]
    assert length == 8
    assert allowed[:2, :2].all() and not allowed[:2, 2:].any()  # group 0 sees itself only
    assert allowed[2:4, 2:4].all() and not allowed[2:4, :2].any() and not allowed[2:4, 4:].any()
    assert allowed[4, :2].all() and allowed[4, 4:6].all() and not allowed[4, 2:4].any()
    assert not allowed[4, 6] and allowed[6, 6] and allowed[7, 7] and allowed[7].sum() == 1


@pytest.mark.parametrize("groups", [0, -1])
def test_bad_group_count(groups):
    with pytest.raises(ValueError, match="QUERY_GROUPS"):
        build_model(tiny_cfg(**{"MODEL.IAUNET.TRAIN.QUERY_GROUPS": groups}))
