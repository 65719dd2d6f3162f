"""A tiny train -> checkpoint -> --eval-only run of train_net.py on the synthetic cells, as a user
runs it."""

import json
import os
import subprocess
import sys

from conftest import ROOT

TINY = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.IAUNET.HIDDEN_DIM",
    "32",
    "MODEL.IAUNET.MASK_DIM",
    "32",
    "MODEL.IAUNET.DIM_FEEDFORWARD",
    "64",
    "MODEL.IAUNET.NHEADS",
    "4",
    "MODEL.IAUNET.NUM_QUERIES",
    "8",
    "MODEL.IAUNET.TRAIN_NUM_POINTS",
    "256",
    "INPUT.IMAGE_SIZE",
    "64",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.CHECKPOINT_PERIOD",
    "3",
]


def _run(args, env):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train_net.py"),
        "--config-file",
        os.path.join(ROOT, "configs", "synthetic", "iaunet_quick.yaml"),
    ] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_train_then_eval_only(tmp_path, _datasets_root):
    env = dict(os.environ, DETECTRON2_DATASETS=_datasets_root, OMP_NUM_THREADS="2")
    out_dir = str(tmp_path / "run")
    log = _run(TINY + ["SOLVER.MAX_ITER", "6", "OUTPUT_DIR", out_dir], env)
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
        + TINY
        + ["MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth"), "OUTPUT_DIR", eval_dir],
        env,
    )
    assert "Evaluation results for segm" in log and "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    res_file = os.path.join(
        eval_dir, "inference", "synthetic_cells_val", "coco_instances_results.json"
    )
    assert os.path.isfile(res_file)
