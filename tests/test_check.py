"""``iaunet-check`` (iaunet.check) and the command lines' stderr (no fvcore FutureWarning)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT


def _run(args, extra_path: str = "", timeout: int = 300):
    path = os.pathsep.join(p for p in (extra_path, ROOT) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_check_passes_here(tmp_path):
    (tmp_path / "synthetic_cells" / "val").mkdir(parents=True)
    (tmp_path / "synthetic_cells" / "val" / "annotations.json").write_text("{}")
    env_root = {"DETECTRON2_DATASETS": str(tmp_path)}
    os.environ.update(env_root)  # restored by conftest's session fixture
    proc = _run(["-m", "iaunet.check"])
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for expected in ("torch", "detectron2", "timm", "cuDNN", "CPU threads", "All checks passed"):
        assert expected in out
    assert "not needed" in out  # detectron2's compiled ops
    assert "forward on cpu         ok" in out
    present = next(line for line in out.splitlines() if line.strip().startswith("present"))
    assert "synthetic_cells_val" in present and "synthetic_cells_train" not in present
    assert "FutureWarning" not in proc.stderr


def test_check_fails_clearly_without_detectron2(tmp_path):
    """A ``detectron2.py`` that raises ImportError, first on PYTHONPATH, stands for a missing
    detectron2: the check still reports the rest, names the fix and exits 1 without a traceback;
    ``import iaunet`` itself keeps failing with the install instructions."""
    (tmp_path / "detectron2.py").write_text("raise ImportError('No module named detectron2')\n")
    proc = _run(["-m", "iaunet.check"], extra_path=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert "Traceback" not in log
    assert "detectron2             PROBLEM: not importable" in proc.stdout
    assert "git+https://github.com/facebookresearch/detectron2.git" in proc.stderr
    assert "torch " in proc.stdout  # the other checks still ran
    plain = _run(["-c", "import iaunet"], extra_path=str(tmp_path))
    assert plain.returncode == 1 and "IAUNet needs detectron2" in plain.stderr


def test_check_reports_a_failing_forward_pass(capsys):
    from iaunet.check import Report, check_forward

    def broken(device):
        raise RuntimeError("no kernel image is available")

    report = Report()
    check_forward(report, ["cpu"], run=broken)
    assert report.problems and "no kernel image" in report.problems[0]
    assert "fix:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "iaunet.predict", "--help"],
        ["train_net.py", "--help"],
        ["tools/compare_maskrcnn.py", "--help"],  # imports detectron2.data before iaunet
    ],
)
def test_no_jit_script_future_warning(command):
    """fvcore's import-time ``torch.jit.script`` FutureWarning is filtered in the entry points."""
    proc = _run(command)
    assert proc.returncode == 0, proc.stderr
    assert "FutureWarning" not in proc.stderr, proc.stderr
    assert "usage:" in proc.stdout
