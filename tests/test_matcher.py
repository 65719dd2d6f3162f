from itertools import permutations

import numpy as np
import pytest
import torch

from iaunet.modeling.matcher import HungarianMatcher, batch_bce_cost, batch_dice_cost


def brute_force_min(cost: np.ndarray) -> float:
    q, t = cost.shape
    return min(sum(cost[p[j], j] for j in range(t)) for p in permutations(range(q), t))


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    q, t, k = 6, int(torch.randint(1, 5, (1,), generator=g)), 3
    outputs = {
        "pred_logits": torch.randn(1, q, k + 1, generator=g),
        "pred_masks": torch.randn(1, q, 8, 8, generator=g),
    }
    targets = [
        {
            "labels": torch.randint(0, k, (t,), generator=g),
            "masks": torch.rand(t, 32, 32, generator=g) > 0.5,
        }
    ]
    matcher = HungarianMatcher(num_points=64)
    torch.manual_seed(seed)
    ((qi, ti),) = matcher(outputs, targets)
    torch.manual_seed(seed)  # same sampled points -> same cost matrix
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0],
        outputs["pred_masks"][0],
        targets[0]["labels"],
        targets[0]["masks"],
    ).numpy()
    assert len(qi) == t and sorted(ti.tolist()) == list(range(t)) and len(set(qi.tolist())) == t
    assert cost[qi.numpy(), ti.numpy()].sum() == pytest.approx(brute_force_min(cost), rel=1e-6)


def test_recovers_permutation_of_perfect_predictions():
    torch.manual_seed(0)
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    for i in range(4):
        masks[i, 8 * i : 8 * i + 8, 4:28] = True
    perm = torch.tensor([2, 0, 3, 1])  # query i predicts target perm[i]
    pred = masks[perm].float() * 20 - 10
    logits = torch.tensor([[5.0, -5.0]]).repeat(4, 1)
    ((qi, ti),) = HungarianMatcher(num_points=512)(
        {"pred_logits": logits[None], "pred_masks": pred[None]},
        [{"labels": torch.zeros(4, dtype=torch.long), "masks": masks}],
    )
    assert dict(zip(qi.tolist(), ti.tolist())) == dict(enumerate(perm.tolist()))


def test_empty_targets_and_nonfinite():
    m = HungarianMatcher(num_points=16)
    out = {"pred_logits": torch.randn(1, 3, 2), "pred_masks": torch.randn(1, 3, 4, 4)}
    ((qi, ti),) = m(
        out, [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8)}]
    )
    assert len(qi) == len(ti) == 0
    out["pred_masks"][0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite matching cost"):
        m(out, [{"labels": torch.zeros(1, dtype=torch.long), "masks": torch.ones(1, 8, 8)}])


@pytest.mark.parametrize(
    "binary", [True, False]
)  # point-sampled targets are fractional at mask borders
def test_pairwise_costs_agree_with_elementwise(binary):
    torch.manual_seed(0)
    x, y = torch.randn(3, 50) * 10, torch.rand(2, 50)
    y = (y > 0.5).float() if binary else y
    bce = batch_bce_cost(x, y)
    for i in range(3):
        for j in range(2):
            ref = torch.nn.functional.binary_cross_entropy_with_logits(x[i], y[j])
            assert bce[i, j] == pytest.approx(ref.item(), rel=1e-5)
            s = x[i].sigmoid()
            dice = 1 - (2 * (s * y[j]).sum() + 1) / (s.sum() + y[j].sum() + 1)
            assert batch_dice_cost(x, y)[i, j] == pytest.approx(dice.item(), rel=1e-5)
