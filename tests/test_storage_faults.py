"""Full disks, unwritable folders and corrupt checkpoints (docs/robustness.md).

A write that fails (ENOSPC, EROFS, EACCES) leaves the previous checkpoint and ``last_checkpoint``
untouched and no temporary file; training stops with one line naming the file and the cause (exit
status 74), ``iaunet-predict`` stops on such a storage error and skips only the file on a per-file
one. ``--resume`` falls back from a truncated / bit-flipped / missing newest checkpoint to the
newest one that loads, or stops with one line (exit status 66) when none does.
"""

import builtins
import errno
import io
import logging
import os
import time

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_RUN_OPTS, run_train_net, tiny_cfg
from detectron2.modeling import build_model

import iaunet.utils.atomic as atomic
from iaunet.checkpoint import AtomicCheckpointer, CheckpointError
from iaunet.engine import Trainer
from iaunet.engine.stopping import EXIT_NO_CHECKPOINT
from iaunet.predict import main as predict_main
from iaunet.utils.atomic import EXIT_WRITE_ERROR, atomic_write, is_storage_error

TINY = TINY_RUN_OPTS + [
    *("DATASETS.TEST", "()", "SEED", "42"),
]


class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: writes what fits, then ENOSPC (as a full tmpfs
    does; torch.save then reports ``RuntimeError: ... unexpected pos`` on top of it)."""

    def __init__(self, path, mode, room):
        super().__init__(path, mode)
        self.room = room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            super().write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return super().write(data)


def fail_writes(monkeypatch, code, match="", room=None):
    """Make atomic_write's files whose name contains ``match`` fail with ``code``: at open
    (EROFS, EACCES, ENAMETOOLONG, ...) or, with ``room``, after ``room`` bytes (ENOSPC)."""
    real_open = builtins.open

    def fake_open(path, mode="r", *args, **kwargs):
        if match in os.path.basename(str(path)):
            if room is None:
                raise OSError(code, os.strerror(code), str(path))
            return _FullDisk(path, mode, room)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


# -------------------------------------------------------------------------------------------------
# Failing writes
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, room", [(errno.ENOSPC, 4096), (errno.EROFS, None), (errno.EACCES, None)]
)
def test_failed_checkpoint_write_changes_nothing(tmp_path, model, monkeypatch, code, room):
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()
    fail_writes(monkeypatch, code, "model_0000003", room)
    with pytest.raises(OSError) as exc:
        ckpt.save("model_0000003", iteration=3)
    target = tmp_path / "model_0000003.pth"
    assert exc.value.errno == code and is_storage_error(exc.value)
    assert str(exc.value) == f"[Errno {code}] cannot write {target}: {os.strerror(code)}"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before


def test_failed_tag_removes_the_new_checkpoint(tmp_path, model, monkeypatch):
    """The model file was written but ``last_checkpoint`` cannot be: the unnamed file goes."""
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    fail_writes(monkeypatch, errno.ENOSPC, "last_checkpoint", room=0)
    with pytest.raises(OSError, match="No space left on device"):
        ckpt.save("model_0000003", iteration=3)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_error_classes():
    assert all(
        is_storage_error(OSError(c, "x"))
        for c in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)
    )
    assert not any(
        is_storage_error(OSError(c, "x")) for c in (errno.ENAMETOOLONG, errno.EISDIR, errno.EFBIG)
    )
    assert not is_storage_error(ValueError("x")) and not is_storage_error(OSError("no errno"))


def test_write_error_without_errno_names_the_file(tmp_path):
    def fail(f):
        raise OSError("boom")

    with pytest.raises(OSError, match=f"^cannot write {tmp_path / 'x'}: boom$"):
        atomic_write(str(tmp_path / "x"), fail)
    assert os.listdir(tmp_path) == []


# Runs train_net.py with a disk that fills up while the checkpoint of iteration 3 is written.
FULL_DISK_TRAIN_NET = """
import builtins, errno, io, os, runpy, sys
import iaunet.utils.atomic as atomic
real_open = builtins.open
class FullDisk(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
def fake_open(path, mode="r", *args, **kwargs):
    if ".model_0000003.pth" in str(path):
        return FullDisk(path, mode)
    return real_open(path, mode, *args, **kwargs)
atomic.open = fake_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_train_net_stops_on_a_full_disk_with_one_line(tmp_path, synthetic_ready):
    out = tmp_path / "run"
    code, log = run_train_net(
        synthetic_ready,
        *TINY,
        *("SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(out)),
        python_args=("-c", FULL_DISK_TRAIN_NET),
    )
    assert code == EXIT_WRITE_ERROR, log[-3000:]
    assert "Traceback" not in log and "Exception during training" not in log
    errors = [line for line in log.splitlines() if "No space left on device" in line]
    assert len(errors) == 1, log[-3000:]
    assert (
        f"cannot write {out}/model_0000003.pth: No space left on device (ENOSPC); training "
        f"stopped. The last complete checkpoint is {out}/model_0000001.pth" in errors[0]
    )
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(out / "model_0000001.pth", weights_only=True)["iteration"] == 1
    assert not [n for n in os.listdir(out) if "tmp" in n or n == "model_0000003.pth"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_cfg(**{"MODEL.IAUNET.TEST.SCORE_THRESH": 0.0, "INPUT.PIXEL_SCALE": 1.0})
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), str(d), config=cfg).save("model")
    return str(d / "model.pth")


def _predict(weights, tmp_path, names=("a", "b", "c")):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in names:
        img = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
        cv2.imwrite(str(inp / f"{name}.png"), img)
    argv = ["--weights", weights, "--input", str(inp), "--output", str(tmp_path / "out")]
    return predict_main(
        argv + ["--score-threshold", "0", "--device", "cpu", "--save", "labels,overlay"]
    )


def test_predict_per_file_write_error_skips_the_file(weights, tmp_path, monkeypatch, capsys):
    fail_writes(monkeypatch, errno.ENAMETOOLONG, "b_labels.tif")
    assert _predict(weights, tmp_path) == 1
    log, out = capsys.readouterr().err, tmp_path / "out"
    assert (
        f"failed: {tmp_path}/in/b.png: [Errno 36] cannot write {out}/b_labels.tif: File name too "
        "long" in log
    )
    assert "2 images processed, 1 failed" in log
    assert sorted(n for n in os.listdir(out) if n.endswith(".tif")) == [
        "a_labels.tif",
        "c_labels.tif",
    ]


def test_predict_stops_on_a_full_disk(weights, tmp_path, monkeypatch, capsys):
    fail_writes(monkeypatch, errno.ENOSPC, "b_labels.tif", room=100)
    assert _predict(weights, tmp_path) == EXIT_WRITE_ERROR
    out = tmp_path / "out"
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"stopped: cannot write {out}/b_labels.tif: No space left on device (ENOSPC)"
    )
    assert sorted(os.listdir(out)) == ["a_labels.tif", "a_overlay.png"]  # c never started


# -------------------------------------------------------------------------------------------------
# Corrupt checkpoints at --resume
# -------------------------------------------------------------------------------------------------


def _three_checkpoints(model, folder):
    ckpt = AtomicCheckpointer(model, str(folder))
    for it in (2, 5, 8):
        ckpt.save(f"model_{it:07d}", iteration=it)
        os.utime(folder / f"model_{it:07d}.pth", (time.time() + it, time.time() + it))
    return ckpt


def _flip_bit(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _truncate(p), "the file is truncated"),
        (lambda p: _flip_bit(p, p.stat().st_size // 2), "fails the CRC-32 check"),
        (lambda p: _flip_bit(p, 100), "fails the CRC-32 check"),  # in the pickled dict
        (lambda p: p.unlink(), "names {newest}, which does not exist"),
    ],
    ids=["truncated", "bit-flip-tensor", "bit-flip-pickle", "missing"],
)
def test_resume_falls_back_to_the_newest_loadable(tmp_path, model, damage, message, caplog):
    _three_checkpoints(model, tmp_path)
    newest = tmp_path / "model_0000008.pth"
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="iaunet.checkpoint"):
        loaded = AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert loaded["iteration"] == 5
    warning = [r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage()]
    assert len(warning) == 1 and str(tmp_path / "model_0000005.pth") in warning[0]
    assert str(newest) in warning[0] and message.format(newest=newest) in warning[0]


def test_resume_without_last_checkpoint_uses_the_newest_file(tmp_path, model, caplog):
    _three_checkpoints(model, tmp_path)
    (tmp_path / "last_checkpoint").write_text("")  # as detectron2's non-atomic write can leave it
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 8
    (tmp_path / "last_checkpoint").unlink()
    assert checkpointer.has_checkpoint()  # not a silent restart from iteration 0
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 8


def test_resume_with_no_loadable_checkpoint_names_every_file(tmp_path, model):
    _three_checkpoints(model, tmp_path)
    for it in (2, 5, 8):
        _truncate(tmp_path / f"model_{it:07d}.pth")
    with pytest.raises(CheckpointError) as exc:
        AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    text = str(exc.value)
    assert text.startswith(f"cannot resume from {tmp_path}: no checkpoint there loads")
    assert all(str(tmp_path / f"model_{it:07d}.pth") in text for it in (2, 5, 8))


def test_trainer_resumes_after_the_fallback_checkpoint(tmp_path, synthetic_ready):
    cfg = tiny_cfg(**{"OUTPUT_DIR": str(tmp_path), "DATALOADER.NUM_WORKERS": 0})
    trainer = Trainer(cfg)
    for it in (2, 5):
        trainer.iter = it
        trainer.checkpointer.save(f"model_{it:07d}", iteration=it)
    _flip_bit(tmp_path / "model_0000005.pth", 100)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3


def test_train_net_resume_with_no_loadable_checkpoint_is_one_line(tmp_path, synthetic_ready):
    (tmp_path / "model_0000004.pth").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    code, log = run_train_net(
        synthetic_ready, "--resume", *TINY, *("SOLVER.MAX_ITER", "6", "OUTPUT_DIR", str(tmp_path))
    )
    assert code == EXIT_NO_CHECKPOINT, log[-3000:]
    assert "Traceback" not in log and "Starting training" not in log
    errors = [line for line in log.splitlines() if "train_net.py: error:" in line]
    assert len(errors) == 1 and f"cannot resume from {tmp_path}" in errors[0], log[-3000:]
    assert str(tmp_path / "model_0000004.pth") in errors[0]
