"""Preemption (SIGTERM / SIGUSR1) and exact resumes (docs/robustness.md "Preemption").

A signal stops training after the current step with a checkpoint of that iteration and exit status
75; ``--resume`` then continues with the same LR schedule, images, order and random draws as an
uninterrupted run: on the CPU with ``DATALOADER.NUM_WORKERS 0`` and a fixed seed, the losses after
the resume and the final weights are bit-identical.
"""

import glob
import itertools
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import ROOT, TINY_RUN_OPTS, tiny_cfg, train_net_command, train_net_env
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from iaunet.data.samplers import ResumableSampler
from iaunet.engine import Trainer
from iaunet.engine.stopping import (
    EXIT_PREEMPTED,
    install_signal_handlers,
    received_signal,
    uninstall_signal_handlers,
)

# conftest's tiny train_net.py run, without the final evaluation, seeded
TINY = TINY_RUN_OPTS + [
    *("DATASETS.TEST", "()", "SEED", "42", "SOLVER.CHECKPOINT_PERIOD", "100"),
]


class _Record(HookBase):
    """Per-iteration losses, and an optional signal sent to this process during one step."""

    def __init__(self, signal_at=None):
        self.losses, self.signal_at = {}, signal_at

    def before_step(self):
        if self.trainer.iter == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def after_step(self):
        storage = self.trainer.storage
        self.losses[self.trainer.iter] = {
            k: storage.history(k).latest()
            for k in storage.histories()
            if k.startswith("loss_") or k == "total_loss"
        }


def _train(out, max_iter=6, signal_at=None, resume=False, period=100):
    cfg = tiny_cfg(
        **{
            "SOLVER.MAX_ITER": max_iter,
            "SOLVER.IMS_PER_BATCH": 2,
            "SOLVER.CHECKPOINT_PERIOD": period,
            "DATALOADER.NUM_WORKERS": 0,
            "DATASETS.TEST": "()",
            "OUTPUT_DIR": str(out),
        }
    )
    seed_all_rng(42)  # as default_setup does for SEED 42
    trainer = Trainer(cfg)
    record = _Record(signal_at)
    trainer.register_hooks([record])
    trainer.resume_or_load(resume=resume)
    return trainer, record


def test_signal_saves_the_current_iteration_and_resume_is_exact(tmp_path, synthetic_ready):
    """In-process: SIGTERM during step 2 -> model_0000002.pth, exit status 75; resuming gives the
    uninterrupted run's losses at iterations 3-5 and its final weights, bit for bit. Checkpoint
    period 2 (a periodic checkpoint at iteration 1) checks that the state set back after a
    periodic checkpoint does not change an uninterrupted run either."""
    full, record = _train(tmp_path / "full", period=2)
    full.train()
    expected = record.losses

    stopped, _ = _train(tmp_path / "run", signal_at=2, period=2)
    with pytest.raises(SystemExit) as exc:
        stopped.train()
    assert exc.value.code == EXIT_PREEMPTED
    assert received_signal() is None  # the hook put the previous handlers back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    out = tmp_path / "run"
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    saved = torch.load(out / "model_0000002.pth", weights_only=True)
    assert saved["iteration"] == 2
    state = saved["trainer"]["hooks"]["ExactResume"]
    assert state["consumed_images"] == 3 * 2 and len(state["rng"]) == 1
    assert not glob.glob(str(out / ".*tmp*"))

    resumed, record = _train(out, resume=True, period=2)
    assert resumed.start_iter == 3
    resumed.train()
    assert sorted(record.losses) == [3, 4, 5]
    assert len(record.losses[3]) > 3
    assert {i: expected[i] for i in (3, 4, 5)} == record.losses
    a = torch.load(tmp_path / "full" / "model_final.pth", weights_only=True)
    b = torch.load(out / "model_final.pth", weights_only=True)
    assert b["trainer"]["hooks"]["LRScheduler"] == a["trainer"]["hooks"]["LRScheduler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_signal_during_setup_stops_before_the_first_step(tmp_path, synthetic_ready):
    """train_net.py installs the handlers before its setup: a signal then stops at once."""
    trainer, record = _train(tmp_path)
    assert install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(SystemExit) as exc:
            trainer.train()
    finally:
        uninstall_signal_handlers()
    assert exc.value.code == EXIT_PREEMPTED and record.losses == {}
    assert not list(tmp_path.glob("*.pth"))


def test_resumable_sampler_continues_the_stream():
    from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler

    for make in (
        lambda seed: TrainingSampler(7, seed=seed),
        lambda seed: RepeatFactorTrainingSampler(torch.tensor([1.0, 2.5, 0.5, 1.0]), seed=seed),
    ):
        stream = list(itertools.islice(iter(make(3)), 40))
        sampler = ResumableSampler(make(3))
        sampler.start = 13
        assert list(itertools.islice(iter(sampler), 27)) == stream[13:]
        other = ResumableSampler(make(99))
        other.load_state_dict(sampler.state_dict())  # the seed travels with the checkpoint
        other.start = 13
        assert list(itertools.islice(iter(other), 27)) == stream[13:]


def _command(out, max_iter, flags=(), extra=()):
    return train_net_command(
        *flags, *TINY, *("SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", str(out)), *extra
    )


def _wait_for(path, text, proc, timeout=300):
    deadline = time.time() + timeout
    while True:
        log = open(path).read() if os.path.exists(path) else ""
        if text in log:
            return log
        assert proc.poll() is None and time.time() < deadline, log[-3000:]
        time.sleep(0.1)


def test_train_net_sigusr1_exit_status_and_resume(tmp_path, synthetic_ready):
    """train_net.py: SIGUSR1 during training -> checkpoint of that iteration, exit status 75, no
    traceback; ``--resume`` continues at the next iteration and ends with the weights of an
    uninterrupted run (run alongside)."""
    max_iter = 8
    env = train_net_env(synthetic_ready)
    full = subprocess.Popen(
        _command(tmp_path / "full", max_iter),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _command(tmp_path / "run", max_iter),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for(log_path, "SIGTERM/SIGUSR1 stop training", proc)
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=300) == EXIT_PREEMPTED, log_path.read_text()[-3000:]
        finally:
            proc.kill()
    text = log_path.read_text()
    assert "Traceback" not in text
    out = tmp_path / "run"
    last = (out / "last_checkpoint").read_text()
    it = int(last[len("model_") : -len(".pth")])
    assert it < max_iter - 1
    assert f"SIGUSR1: stopped after iteration {it} with checkpoint {out}/{last}" in text

    resumed = subprocess.run(
        _command(out, max_iter, ["--resume"]),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert f"Starting training from iteration {it + 1}" in resumed.stdout + resumed.stderr
    assert full.wait(timeout=300) == 0
    a = torch.load(tmp_path / "full" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_two_workers_stop_after_the_same_iteration(tmp_path, synthetic_ready):
    """Two CPU worker processes; SIGUSR1 reaches only one of them: both stop after the same step
    (all-gather of the flag), rank 0 writes the checkpoint, the launcher exits with 75."""
    out = tmp_path / "run"
    log_path = tmp_path / "log"
    cmd = _command(out, 40, ["--num-gpus", "2", "--dist-url", "auto"], ["MODEL.DEVICE", "cpu"])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=train_net_env(synthetic_ready), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_for(log_path, "SIGTERM/SIGUSR1 stop training", proc)
            _wait_for(out / "log.txt.rank1", "SIGTERM/SIGUSR1 stop training", proc)
            workers = []
            for child in _children(proc.pid):  # the spawned workers, not the resource tracker
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    if b"spawn_main" in f.read():
                        workers.append(child)
            assert len(workers) == 2, workers
            os.kill(workers[-1], signal.SIGUSR1)
            assert proc.wait(timeout=300) == EXIT_PREEMPTED, log_path.read_text()[-3000:]
        finally:
            proc.kill()
    last = (out / "last_checkpoint").read_text()
    it = int(last[len("model_") : -len(".pth")])
    assert torch.load(out / last, weights_only=True)["iteration"] == it
    for log in (out / "log.txt", out / "log.txt.rank1"):
        assert f"stopped after iteration {it} with checkpoint" in log.read_text()
    assert "exited with status 75" in log_path.read_text()
