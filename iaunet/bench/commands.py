"""The project's commands run by the benchmark tools as a user runs them: a subprocess in the
repository with its output in a log, and the figures read back from detectron2's log lines."""

import os
import re
import resource
import subprocess
import sys
from typing import Dict, List


def children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes: a command's CPU time is the
    difference around :func:`run_logged`."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_logged(cmd: List[str], log: str, root: str) -> str:
    """Run ``cmd`` in ``root`` (on ``PYTHONPATH``), its output to ``log``; returns the output.
    Exits the tool with the log's tail when the command fails."""
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
    with open(log) as f:
        out = f.read()
    if proc.returncode:
        sys.exit(f"command failed (exit {proc.returncode}), see {log}:\n{out[-3000:]}")
    return out


def last_segm_ap(log: str) -> Dict[str, float]:
    """AP, AP50, AP75 of the last ``copypaste: Task: segm`` block of a detectron2 log (the
    matching evaluator prints its own rows after it)."""
    rows = re.findall(r"copypaste: Task: segm\n.*copypaste: AP,.*\n.*copypaste: ([\d.naN,-]+)", log)
    if not rows:
        raise RuntimeError("no segm evaluation in the log")
    ap, ap50, ap75 = (float(v) for v in rows[-1].split(",")[:3])
    return {"AP": ap, "AP50": ap50, "AP75": ap75}
