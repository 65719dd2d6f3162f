"""Fine-tuning from a checkpoint with another number of queries (100 -> 300 and back, in small)."""

import logging

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model

from iaunet.checkpoint import QUERY_KEYS, AtomicCheckpointer, transfer_query_rows
from iaunet.inference import IAUNetPredictor


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


def test_new_queries_start_as_copies_of_trained_ones(tmp_path, caplog):
    """MODEL.IAUNET.TRAIN.NEW_QUERIES copy: rows beyond the checkpoint's are its rows, cycled, with
    a little noise (distinct from each other and from the originals)."""
    torch.manual_seed(0)
    cfg_old = tiny_cfg(**{"MODEL.IAUNET.NUM_QUERIES": 8})
    source = build_model(cfg_old)
    AtomicCheckpointer(source, str(tmp_path), config=cfg_old).save("model")
    cfg = tiny_cfg(**{"MODEL.IAUNET.NUM_QUERIES": 20, "MODEL.IAUNET.TRAIN.NEW_QUERIES": "copy"})
    target = build_model(cfg)
    with caplog.at_level(logging.INFO):
        AtomicCheckpointer(target, config=cfg).load(str(tmp_path / "model.pth"))
    src, got = source.state_dict(), target.state_dict()
    for key in QUERY_KEYS:
        old, new = src[key], got[key]
        assert torch.equal(new[:8], old)
        for i in range(8, 20):
            diff = (new[i] - old[i % 8]).abs().max()
            assert 0 < diff < 0.2 * old.std()  # a copy, slightly moved
        assert not torch.equal(new[8], new[16])  # copies of one row differ from each other
    assert "rows 8..19 start as copies of the trained rows" in caplog.text
    with pytest.raises(ValueError, match="NEW_QUERIES"):
        transfer_query_rows(target, {QUERY_KEYS[0]: src[QUERY_KEYS[0]]}, "random")
