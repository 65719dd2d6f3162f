"""AtomicCheckpointer (iaunet/checkpoint.py): weights that are not a checkpoint are named, a
checkpoint with another number of classes loads all but the class head, and an interrupted save
keeps the previous checkpoint (rows and "Kill and resume" of docs/robustness.md; the kill itself is
in test_train_net.py)."""

import os

import pytest
import torch
from conftest import _messages, captured_logs, tiny_cfg
from detectron2.modeling import build_model

from iaunet.checkpoint import AtomicCheckpointer, CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_weights_that_are_not_a_checkpoint_are_named(tmp_path, model):
    (tmp_path / "weights.pth").write_text("this is not a checkpoint\n")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    AtomicCheckpointer(model, str(tmp_path)).save("good")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 3])
    for name in ("weights.pth", "list.pth", "truncated.pth"):
        with pytest.raises(CheckpointError, match=f"cannot load checkpoint {tmp_path / name}: "):
            AtomicCheckpointer(model).load(str(tmp_path / name))
    with pytest.raises(AssertionError, match="missing.pth not found"):
        AtomicCheckpointer(model).load(str(tmp_path / "missing.pth"))


def test_eval_only_with_weights_that_are_not_a_checkpoint(tmp_path, model):
    """What ``train_net.py --eval-only MODEL.WEIGHTS <file>`` runs: resume_or_load names the
    file."""
    (tmp_path / "weights.pth").write_text("this is not a checkpoint\n")
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path / "out"))
    with pytest.raises(
        CheckpointError, match=f"cannot load checkpoint {tmp_path / 'weights.pth'}: "
    ):
        checkpointer.resume_or_load(str(tmp_path / "weights.pth"), resume=False)


def test_checkpoint_with_another_number_of_classes(tmp_path, model):
    """Mismatched shapes are skipped with a warning naming each key; the class head stays freshly
    initialized."""
    AtomicCheckpointer(model, str(tmp_path)).save("one_class")
    torch.manual_seed(1)
    model3 = build_model(tiny_cfg(**{"MODEL.IAUNET.NUM_CLASSES": 3}))
    fresh = {k: v.clone() for k, v in model3.state_dict().items()}
    with captured_logs("fvcore.common.checkpoint") as logs:
        AtomicCheckpointer(model3).load(str(tmp_path / "one_class.pth"))
    text = _messages(logs)
    skipped = {k for k, v in model.state_dict().items() if v.shape != fresh[k].shape}
    assert skipped == {
        "query_decoder.class_embed.weight",
        "query_decoder.class_embed.bias",
        "criterion.empty_weight",
    }
    for key in skipped:
        assert f"Skip loading parameter '{key}'" in text
        assert torch.equal(model3.state_dict()[key], fresh[key])
    loaded = model3.state_dict()
    assert torch.equal(
        loaded["query_decoder.mask_embed.weight"],
        model.state_dict()["query_decoder.mask_embed.weight"],
    )


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, model, monkeypatch):
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes of a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0000003", iteration=3)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000001.pth",
    ]  # no partial or temp file
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert (
        AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 1
    )
