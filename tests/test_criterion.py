import pytest
import torch

from iaunet.modeling.criterion import SetCriterion
from iaunet.modeling.mask_losses import bce_loss, dice_loss, upsampled_mask_losses
from iaunet.modeling.matcher import HungarianMatcher


def _targets():
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 4:20, 4:32] = True  # aligned to the 4-px grid of the 1/4-resolution logits
    masks[1, 32:60, 8:24] = True
    masks[2, 20:48, 36:60] = True
    return [{"labels": torch.tensor([0, 1, 0]), "masks": masks}]


def _perfect_outputs(targets, num_queries=5, num_classes=2, shuffle=False):
    masks = targets[0]["masks"].float()
    labels = targets[0]["labels"]
    logits = torch.full((1, num_queries, num_classes + 1), -20.0)
    logits[0, :, -1] = 20.0  # unmatched queries: confidently "no object"
    pred = torch.full((1, num_queries, 16, 16), -20.0)
    for i in range(3):
        logits[0, i, -1] = -20.0
        logits[0, i, labels[(i + 1) % 3] if shuffle else labels[i]] = 20.0
        src = masks[(i + 1) % 3] if shuffle else masks[i]
        # 1/4-resolution logits that upsample back to the exact target
        pred[0, i] = torch.nn.functional.avg_pool2d(src[None, None], 4)[0, 0] * 100 - 50
    return {"pred_logits": logits, "pred_masks": pred}


def _criterion(**kw):
    return SetCriterion(2, HungarianMatcher(num_points=1024), **kw)


def test_perfect_prediction_has_near_zero_loss():
    torch.manual_seed(0)
    t = _targets()
    losses = _criterion()(_perfect_outputs(t), t)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    assert losses["loss_ce"] < 1e-3 and losses["loss_dice"] < 0.02
    assert (
        losses["loss_mask"] < 0.1
    )  # only the 4 corner pixels per mask: bilinear upsampling rounds them off


def test_shuffled_prediction_has_larger_loss():
    torch.manual_seed(0)
    t = _targets()
    good = sum(_criterion()(_perfect_outputs(t), t).values())
    # Shuffled class labels with masks that follow them: the matcher pairs by mask, so the class is
    # wrong.
    bad_out = _perfect_outputs(t)
    bad_out["pred_logits"] = _perfect_outputs(t, shuffle=True)["pred_logits"]
    bad = sum(_criterion()(bad_out, t).values())
    assert bad > good + 1.0


def test_aux_losses_and_weights():
    torch.manual_seed(0)
    t = _targets()
    out = _perfect_outputs(t)
    out["pred_masks"] = out["pred_masks"] * 0  # uninformative masks: 0.5 everywhere
    out["aux_outputs"] = [dict(out), dict(out)]
    losses = _criterion(mask_weight=5.0, dice_weight=2.0)(out, t)
    assert {"loss_ce_0", "loss_mask_1", "loss_dice_1"} <= set(losses)
    assert torch.allclose(losses["loss_mask"], losses["loss_mask_0"])
    raw = _criterion(mask_weight=1.0, dice_weight=1.0)(out, t)
    assert torch.allclose(losses["loss_mask"], 5 * raw["loss_mask"])
    assert torch.allclose(losses["loss_dice"], 2 * raw["loss_dice"])


def test_no_object_weight_and_empty_targets():
    out = {
        "pred_logits": torch.zeros(2, 4, 3, requires_grad=True),
        "pred_masks": torch.zeros(2, 4, 8, 8, requires_grad=True),
    }
    empty = [
        {
            "labels": torch.zeros(0, dtype=torch.long),
            "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
        }
    ] * 2
    losses = _criterion()(out, empty)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    assert torch.isclose(
        losses["loss_ce"], torch.log(torch.tensor(3.0))
    )  # uniform over K+1 = 3 classes
    sum(losses.values()).backward()  # zero-instance batches still give a (zero) gradient path


def test_point_sampled_losses():
    torch.manual_seed(0)
    t = _targets()
    good = _criterion(point_sampling=True, num_points=1024)(_perfect_outputs(t), t)
    wrong = _perfect_outputs(t)
    wrong["pred_masks"] = -wrong["pred_masks"]  # inverted masks
    bad = _criterion(point_sampling=True, num_points=1024)(wrong, t)
    # importance sampling concentrates points on the (rounded) mask corners, hence a looser bound
    assert good["loss_mask"] < 1.0 and good["loss_dice"] < 0.2
    assert bad["loss_mask"] > 20 * good["loss_mask"] and bad["loss_dice"] > 1


def _reference_mask_losses(logits, targets):
    """The plain formulation: upsample with F.interpolate, then bce_loss / dice_loss, autograd for
    the gradient."""
    up = torch.nn.functional.interpolate(
        logits[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False
    )
    up, t = up[:, 0].flatten(1), targets.float().flatten(1)
    return bce_loss(up, t), dice_loss(up, t)


@pytest.mark.parametrize(
    "low, high, chunk_pixels",
    [
        ((16, 24), (64, 96), None),
        ((7, 5), (28, 20), 28 * 20),
        ((10, 10), (37, 23), 3 * 37 * 23),
        ((32, 32), (128, 128), 1),
    ],
)
def test_upsampled_mask_losses_match_autograd(low, high, chunk_pixels):
    """The fused loss (closed-form gradient, chunks, transposed-upsampling matmuls) gives the values
    and gradients of the plain autograd formulation: factor 4 as in the model, odd sizes,
    non-integer factors, one mask per chunk and several; targets gathered through the row index."""
    # small chunk_pixels force several chunks (and a last partial one)
    torch.manual_seed(0)
    logits = (torch.randn(5, *low) * 4).requires_grad_(True)
    pool = torch.rand(8, *high) > 0.7
    pool[3] = False  # an empty target
    rows = torch.tensor([6, 3, 0, 6, 2])  # a target may be matched twice (different images/outputs)
    bce, dice = upsampled_mask_losses(logits, pool, rows, chunk_pixels)
    (3 * bce + 0.5 * dice).backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_bce, ref_dice = _reference_mask_losses(ref_logits, pool[rows])
    (3 * ref_bce + 0.5 * ref_dice).backward()
    assert torch.allclose(bce, ref_bce, rtol=1e-5) and torch.allclose(dice, ref_dice, rtol=1e-5)
    assert torch.allclose(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-9)
    # separate upstream gradients for the two losses (e.g. other loss weights) stay exact
    logits.grad = ref_logits.grad = None
    upsampled_mask_losses(logits, pool, rows, chunk_pixels)[1].backward()
    _reference_mask_losses(ref_logits, pool[rows])[1].backward()
    assert torch.allclose(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-9)


def test_upsampled_mask_losses_without_grad():
    logits = torch.randn(3, 8, 8)
    targets = torch.rand(3, 32, 32) > 0.5
    with torch.no_grad():
        bce, dice = upsampled_mask_losses(logits, targets)
    ref_bce, ref_dice = _reference_mask_losses(logits, targets)
    assert (
        not bce.requires_grad
        and torch.allclose(bce, ref_bce, rtol=1e-5)
        and torch.allclose(dice, ref_dice, rtol=1e-5)
    )


def test_criterion_pairs_masks_across_images():
    """Two images: each matched query's loss is taken against its own image's target (row offsets of
    the batch's concatenated masks), as computed by hand from the matcher's indices."""
    torch.manual_seed(0)
    targets = []
    for n in (3, 2):
        masks = torch.rand(n, 32, 32) > 0.6
        targets.append({"labels": torch.zeros(n, dtype=torch.long), "masks": masks})
    outputs = {
        "pred_logits": torch.randn(2, 6, 3),
        "pred_masks": torch.randn(2, 6, 8, 8, requires_grad=True),
    }
    crit = _criterion(class_weight=1.0, mask_weight=1.0, dice_weight=1.0)
    torch.manual_seed(1)
    losses = crit(outputs, targets)
    torch.manual_seed(1)  # the same matcher points
    indices = crit.matcher(outputs, targets)
    src = torch.cat([outputs["pred_masks"][b, s] for b, (s, _) in enumerate(indices)])
    tgt = torch.cat([targets[b]["masks"][t] for b, (_, t) in enumerate(indices)])
    ref_bce, ref_dice = _reference_mask_losses(src, tgt)
    assert torch.allclose(losses["loss_mask"], ref_bce / 5, rtol=1e-5)
    assert torch.allclose(losses["loss_dice"], ref_dice / 5, rtol=1e-5)


def test_target_sizes_must_agree():
    out = {"pred_logits": torch.zeros(2, 4, 3), "pred_masks": torch.zeros(2, 4, 8, 8)}
    targets = [
        {
            "labels": torch.zeros(1, dtype=torch.long),
            "masks": torch.ones(1, 32, 32, dtype=torch.bool),
        },
        {
            "labels": torch.zeros(1, dtype=torch.long),
            "masks": torch.ones(1, 32, 28, dtype=torch.bool),
        },
    ]
    with pytest.raises(ValueError, match="padded batch size"):
        _criterion()(out, targets)
