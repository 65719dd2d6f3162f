"""Fine-tuning from a checkpoint with another number of queries (100 -> 300 and back, in small)."""

import logging

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model

from iaunet.checkpoint import AtomicCheckpointer
from iaunet.inference import IAUNetPredictor
from iaunet.utils.query_transfer import QUERY_KEYS


@pytest.mark.parametrize("n_old,n_new", [(8, 24), (24, 8)])
def test_query_count_change_loads_both_ways(tmp_path, caplog, n_old, n_new):
    torch.manual_seed(0)
    cfg_old = tiny_cfg(**{"MODEL.IAUNET.NUM_QUERIES": n_old})
    source = build_model(cfg_old)
    AtomicCheckpointer(source, str(tmp_path), config=cfg_old).save("model")
    torch.manual_seed(1)
    target = build_model(tiny_cfg(**{"MODEL.IAUNET.NUM_QUERIES": n_new}))
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k in QUERY_KEYS}
    with caplog.at_level(logging.INFO):
        AtomicCheckpointer(target).load(str(tmp_path / "model.pth"))
    n = min(n_old, n_new)
    src, got = source.state_dict(), target.state_dict()
    for key in QUERY_KEYS:
        assert got[key].shape[0] == n_new
        assert torch.equal(got[key][:n], src[key][:n])  # trained rows copied
        assert torch.equal(got[key][n:], fresh[key][n:])  # new rows: the model's own init
    for key in ("query_decoder.class_embed.weight", "query_decoder.mask_embed.weight"):
        assert torch.equal(got[key], src[key])
    warning = [r.getMessage() for r in caplog.records if "queries, the model" in r.getMessage()]
    assert len(warning) == 1 and all(k in warning[0] for k in QUERY_KEYS), caplog.text
    assert f"The checkpoint has {n_old} queries, the model {n_new}" in warning[0]
    assert "Skip loading parameter" not in caplog.text  # nothing else was dropped


def test_predictor_loads_a_checkpoint_with_another_query_count(tmp_path):
    cfg = tiny_cfg(**{"MODEL.IAUNET.NUM_QUERIES": 8, "INPUT.PIXEL_SCALE": 1.0})
    AtomicCheckpointer(build_model(cfg), str(tmp_path), config=cfg).save("model")
    predictor = IAUNetPredictor.from_checkpoint(
        str(tmp_path / "model.pth"), opts=["MODEL.IAUNET.NUM_QUERIES", 12]
    )
    assert predictor.model.query_decoder.queries.weight.shape[0] == 12
