"""train_net.py as a user runs it, on the synthetic cells: a tiny train -> checkpoint -> --eval-only
run, a run killed while saving a checkpoint and resumed, and determinism with a fixed seed (the
"Kill and resume" section of docs/robustness.md)."""

import glob
import json
import os
import signal
import subprocess
import time

import torch
from conftest import ROOT, TINY_RUN_OPTS, run_train_net, train_net_command, train_net_env

import iaunet.data.datasets  # noqa: F401  (registers synthetic_cells_train)

# conftest's tiny run with the final evaluation and checkpoints after iterations 2, 5, ...
E2E_TINY = TINY_RUN_OPTS + ["SOLVER.CHECKPOINT_PERIOD", "3"]
# ... without the final evaluation, seeded.
TINY = TINY_RUN_OPTS + ["DATASETS.TEST", "()", "SEED", "42"]


# -------------------------------------------------------------------------------------------------
# Train, then --eval-only
# -------------------------------------------------------------------------------------------------


def _run(args, datasets_root):
    code, log = run_train_net(datasets_root, *args)
    assert code == 0, log[-6000:]
    return log


def test_train_then_eval_only(tmp_path, _datasets_root):
    out_dir = str(tmp_path / "run")
    log = _run(E2E_TINY + ["SOLVER.MAX_ITER", "6", "OUTPUT_DIR", out_dir], _datasets_root)
    assert "eta:" in log  # progress with ETA
    assert os.path.isfile(os.path.join(out_dir, "model_final.pth"))
    assert os.path.isfile(os.path.join(out_dir, "model_0000002.pth"))
    with open(os.path.join(out_dir, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.json"))]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(v == v and v < 1e4 for v in losses)  # finite

    eval_dir = str(tmp_path / "eval")
    log = _run(
        ["--eval-only"]
        + E2E_TINY
        + ["MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth"), "OUTPUT_DIR", eval_dir],
        _datasets_root,
    )
    assert "Evaluation results for segm" in log and "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    res_file = os.path.join(
        eval_dir, "inference", "synthetic_cells_val", "coco_instances_results.json"
    )
    assert os.path.isfile(res_file)


# -------------------------------------------------------------------------------------------------
# Kill and resume; determinism
# -------------------------------------------------------------------------------------------------


def _train_command(opts, flags=()):
    return train_net_command(*flags, *opts)


def _last_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f][-1]


def test_kill_and_resume(tmp_path, synthetic_ready):
    out = str(tmp_path / "run")
    max_iter = 20
    opts = TINY + ["SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", out]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            _train_command(opts + ["SOLVER.CHECKPOINT_PERIOD", "3"]),
            cwd=ROOT,
            env=train_net_env(synthetic_ready),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:  # checkpoints after iterations 2, 5, 8, ...: kill while the third is being written
            deadline = time.time() + 300
            while not (
                glob.glob(os.path.join(out, ".model_0000008.pth.tmp-*"))
                or os.path.exists(os.path.join(out, "model_0000008.pth"))
            ):
                assert proc.poll() is None and time.time() < deadline, (
                    tmp_path / "killed.log"
                ).read_text()[-3000:]
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = f.read().strip()
    assert last in ("model_0000005.pth", "model_0000008.pth")  # the last complete one
    last_iter = int(last[len("model_") : -len(".pth")])
    partial = glob.glob(os.path.join(out, ".*.tmp-*"))
    for name in os.listdir(out):  # every visible checkpoint is complete and loadable
        if name.endswith(".pth"):
            assert torch.load(os.path.join(out, name), weights_only=False)["iteration"] == int(
                name[6:13]
            )

    code, log = run_train_net(
        synthetic_ready, "--resume", *opts, "SOLVER.CHECKPOINT_PERIOD", "100", timeout=300
    )
    assert code == 0, log[-3000:]
    assert (
        "iaunet.checkpoint]: Saving checkpoint to" in log
    )  # the atomic checkpointer is the one in use
    assert ("Partial files of interrupted checkpoint saves" in log) == bool(partial)
    assert f"Loading trainer from {os.path.join(out, last)}" in log
    assert f"Starting training from iteration {last_iter + 1}" in log
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert final["iteration"] == max_iter - 1
    assert (
        final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == max_iter
    )  # schedule resumed, not restarted
    assert _last_metrics(out)["iteration"] == max_iter - 1
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"


def test_training_is_deterministic_with_a_fixed_seed(tmp_path, synthetic_ready):
    """Two runs, SEED 42, CPU: same losses (metrics.json keeps the median of each loss over the
    run's 4 iterations: PeriodicWriter writes every 20) and bit-identical final weights, i.e. every
    step equal."""
    procs = []
    for run in ("a", "b"):
        opts = TINY + [
            "SOLVER.MAX_ITER",
            "4",
            "SOLVER.CHECKPOINT_PERIOD",
            "100",
            "OUTPUT_DIR",
            str(tmp_path / run),
        ]
        procs.append(
            subprocess.Popen(
                _train_command(opts),
                cwd=ROOT,
                env=train_net_env(synthetic_ready),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    a, b = (_last_metrics(str(tmp_path / run)) for run in ("a", "b"))
    losses = {k for k in a if k.startswith("loss_") or k == "total_loss"}
    assert len(losses) > 3 and {k: a[k] for k in losses} == {k: b[k] for k in losses}
    wa, wb = (
        torch.load(tmp_path / run / "model_final.pth", weights_only=False)["model"]
        for run in ("a", "b")
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
