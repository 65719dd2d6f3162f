"""Test-time augmentation (MODEL.IAUNET.TEST.TTA, iaunet.modeling.tta): views
that invert exactly, queries aligned across views, merged outputs, the model and the predictor."""

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model

from iaunet.checkpoint import AtomicCheckpointer
from iaunet.config import ConfigError
from iaunet.inference import IAUNetPredictor
from iaunet.modeling.tta import (
    VIEWS,
    align_queries,
    apply_view,
    invert_view,
    merge_views,
    predict_views,
)


def test_views_invert_exactly_and_are_distinct():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    seen = set()
    for view in VIEWS["dihedral"]:
        y = apply_view(x, view)
        assert torch.equal(invert_view(y, view), x)
        seen.add(tuple(y.flatten().tolist()))
    assert len(seen) == 8  # the 8 symmetries of a rectangle's content, none twice
    # the four views of "flip" are the identity and the three flips
    flips = [apply_view(x, v) for v in VIEWS["flip"]]
    for y, want in zip(flips, (x, x.flip(-1), x.flip(-2), x.flip(-1, -2))):
        assert torch.equal(y, want)


def _blobs(q: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(q, size, size) mask logits: one square per query at distinct places, -8 elsewhere."""
    rng = np.random.default_rng(seed)
    masks = torch.full((q, size, size), -8.0)
    for i in range(q):
        y, x = rng.integers(0, size - 4, 2)
        masks[i, y : y + 4, x : x + 4] = 8.0
        masks[i, (i * 3) % size, (i * 5) % size] = 8.0  # distinct even where squares coincide
    return masks


def test_align_queries_recovers_a_permutation():
    masks = _blobs(12).sigmoid()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    index = align_queries(masks, masks[perm])
    assert torch.equal(perm[index], torch.arange(12))


def test_merge_of_permuted_copies_is_the_original():
    """Views that predict the same objects in another query order merge to the identity view's
    output: same class probabilities, same masks."""
    torch.manual_seed(0)
    logits, masks = torch.randn(2, 10, 3), _blobs(10)[None].repeat(2, 1, 1, 1)
    outputs = []
    for v in range(4):
        perm = torch.randperm(10)
        outputs.append({"pred_logits": logits[:, perm], "pred_masks": masks[:, perm]})
    outputs[0] = {"pred_logits": logits, "pred_masks": masks}
    merged = merge_views(outputs)
    assert torch.allclose(merged["pred_logits"].softmax(-1), logits.softmax(-1), atol=1e-5)
    assert torch.allclose(merged["pred_masks"].sigmoid(), masks.sigmoid(), atol=1e-4)


def test_an_object_seen_by_some_views_only_loses_score():
    """Query 0 finds an object in the identity view only: its merged probability is a quarter."""
    logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])  # query 0: object, query 1: no object
    masks = _blobs(2)[None]
    miss = torch.tensor([[[-4.0, 4.0], [-4.0, 4.0]]])
    outputs = [{"pred_logits": logits, "pred_masks": masks}]
    outputs += [{"pred_logits": miss, "pred_masks": masks} for _ in range(3)]
    p = merge_views(outputs)["pred_logits"].softmax(-1)[0, 0, 0]
    assert p == pytest.approx(logits.softmax(-1)[0, 0, 0] / 4 + 3 * miss.softmax(-1)[0, 0, 0] / 4)


def test_predict_views_undoes_each_view():
    """An equivariant 'network' (masks: the image thresholded, in a shuffled query order at every
    call) gives, merged over the 8 views, the identity view's masks."""
    image = torch.zeros(1, 3, 32, 64)
    image[..., 4:12, 6:30] = 1.0  # an asymmetric object
    image[..., 20:30, 40:44] = 2.0

    def network(x):
        gray = x[:, 0]
        masks = torch.stack([(gray > 0.5) * 16.0 - 8, (gray > 1.5) * 16.0 - 8], 1)
        perm = torch.randperm(2)
        return {"pred_logits": torch.tensor([[[3.0, 0.0], [2.0, 0.0]]])[:, perm],
                "pred_masks": masks[:, perm]}  # fmt: skip

    torch.manual_seed(0)
    merged = predict_views(network, image, "dihedral")
    want = torch.stack([image[:, 0] > 0.5, image[:, 0] > 1.5], 1)
    got = merged["pred_masks"].sigmoid() > 0.5
    assert torch.equal(got, want) or torch.equal(got, want.flip(1))
    with pytest.raises(ValueError, match="MODEL.IAUNET.TEST.TTA must be one of"):
        predict_views(network, image, "rotate")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("tta")
    cfg = tiny_cfg(**{"MODEL.IAUNET.TEST.SCORE_THRESH": 0.0, "INPUT.PIXEL_SCALE": 1.0})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    AtomicCheckpointer(model, str(d), config=cfg).save("model")
    return str(d / "model.pth")


def test_model_with_tta_predicts_in_the_image_frame(checkpoint, one_thread):
    """With TTA on, a non-square image gives instances of its size, the same number as without
    scores in [0, 1] that differ from the single view's (the views were merged)."""
    image = np.random.default_rng(0).integers(0, 255, (40, 70), dtype=np.uint8)
    plain = IAUNetPredictor.from_checkpoint(checkpoint).predict(image)
    for mode in ("flip", "dihedral"):
        p = IAUNetPredictor.from_checkpoint(checkpoint, opts=["MODEL.IAUNET.TEST.TTA", mode])
        assert p.model.test_augmentation == mode
        out = p.predict(image)
        assert out.image_size == (40, 70) and out.pred_masks.shape[1:] == (40, 70)
        assert len(out) > 0 and len(plain) > 0
        assert float(out.scores.min()) >= 0 and float(out.scores.max()) <= 1
        assert out.scores.shape != plain.scores.shape or not torch.allclose(
            out.scores, plain.scores
        )
    with pytest.raises(ValueError, match="MODEL.IAUNET.TEST.TTA must be one of"):
        IAUNetPredictor.from_checkpoint(checkpoint, opts=["MODEL.IAUNET.TEST.TTA", "d4"])


def test_predict_tta_flag_overrides_the_model(checkpoint, tmp_path):
    from iaunet.predict import build_parser, build_predictor

    def predictor(*flags):
        args = build_parser().parse_args(
            ["--weights", checkpoint, "--input", "x.tif", "--output", str(tmp_path), *flags]
        )
        return build_predictor(args)

    assert predictor().model.test_augmentation == "none"  # the checkpoint's
    assert predictor("--tta", "dihedral").model.test_augmentation == "dihedral"
    with pytest.raises(SystemExit):
        predictor("--tta", "d4")


def test_exported_models_refuse_tta(checkpoint, tmp_path):
    """The export writes TTA off in the file's config (the graph runs one view); asking an exported
    model for TTA is a one-line error."""
    from conftest import load_tool

    from iaunet.deploy.export import read_exported_config

    path = str(tmp_path / "model.onnx")
    args = ["--weights", checkpoint, "--format", "onnx", "--output", path, "--no-check"]
    assert load_tool("export_model").main(args + ["--opts", "MODEL.IAUNET.TEST.TTA", "flip"]) == 0
    assert "TTA: none" in read_exported_config(path)
    IAUNetPredictor.from_exported(path)
    with pytest.raises(ConfigError, match="TTA flip: test-time augmentation runs in PyTorch"):
        IAUNetPredictor.from_exported(path, opts=["MODEL.IAUNET.TEST.TTA", "flip"])
