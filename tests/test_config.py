"""Config errors as train_net.py, the tools and iaunet.engine.setup meet them: unknown keys, missing
config files, odd override lists, an unknown backbone, a bad loss weight, an OUTPUT_DIR that cannot
be created. Each error names the key or the path (rows of docs/robustness.md)."""

import os
import subprocess
import sys

import pytest
from conftest import QUICK_CONFIG, ROOT, tiny_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

from iaunet.config import ConfigError
from iaunet.engine import setup as train_setup

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(*opts, config_file=QUICK_CONFIG):
    return default_argument_parser().parse_args(["--config-file", config_file, *opts])


def test_unknown_config_key_is_named(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"_BASE_: {QUICK_CONFIG}\nMODEL:\n  IAUNET:\n    NUM_QUERYS: 5\n")
    with pytest.raises(
        ConfigError, match=f"cannot use config file {bad_yaml}: .*MODEL.IAUNET.NUM_QUERYS"
    ):
        train_setup(_args(config_file=str(bad_yaml)))
    with pytest.raises(
        ConfigError, match="invalid config override MODEL.IAUNET.NUM_QUERYS 5: Non-existent key"
    ):
        train_setup(_args("MODEL.IAUNET.NUM_QUERYS", "5"))
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        train_setup(_args(config_file=str(tmp_path / "missing.yaml")))
    with pytest.raises(ConfigError, match="odd length"):
        train_setup(_args("SOLVER.BASE_LR"))


@pytest.mark.parametrize("script", ["train_net.py", "tools/analyze_model.py", "tools/benchmark.py"])
def test_command_line_config_errors_are_one_line(script):
    """A bad key on the command line ends the script with exit status 2 and one line naming the key,
    before any worker or model starts, and without a traceback."""
    extra = ["--opts"] if script == "tools/benchmark.py" else []
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, script),
            "--config-file",
            QUICK_CONFIG,
            *extra,
            "MODEL.IAUNET.NUM_QUERYS",
            "5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"{os.path.basename(script)}: error: invalid config override MODEL.IAUNET.NUM_QUERYS 5: "
        "Non-existent key: MODEL.IAUNET.NUM_QUERYS"
    ], proc.stderr


def test_unknown_backbone_and_bad_loss_weight_are_named():
    message = r"MODEL.BACKBONE.NAME 'resnet50' is not a registered backbone.*build_resnet_backbone"
    with pytest.raises(KeyError, match=message):
        build_model(tiny_cfg(**{"MODEL.BACKBONE.NAME": "resnet50"}))
    with pytest.raises(
        ValueError, match="MODEL.IAUNET.DICE_WEIGHT must be a finite number >= 0, got inf"
    ):
        build_model(tiny_cfg(**{"MODEL.IAUNET.DICE_WEIGHT": "1e999"}))


def test_output_dir_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file.txt").write_text("a regular file")
    out = tmp_path / "file.txt" / "out"
    with pytest.raises(NotADirectoryError, match=str(out)):
        train_setup(_args("OUTPUT_DIR", str(out)))
