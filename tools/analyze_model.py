#!/usr/bin/env python
"""Parameters and FLOPs of an IAUNet config, per module (thesis Tables 1-5 count the same way).

    python tools/analyze_model.py --config-file configs/revvity25/iaunet_R50.yaml
    python tools/analyze_model.py --config-file configs/revvity25/iaunet_R50.yaml --thesis-count \
        MODEL.IAUNET.NUM_QUERIES 300

What is counted is described in :mod:`iaunet.bench.analysis`. By default the model is counted as
configured: at inference only the last block's prediction head runs. ``--thesis-count`` sets
``MODEL.IAUNET.TEST.AUX_PREDICTIONS True`` so that all prediction heads (9 with 3 blocks per level)
run, as in the reference code whose FLOPs the thesis reports; ``docs/fidelity.md`` uses it.
"""

import argparse
from typing import Any, Dict, Sequence

import torch
from detectron2.config import CfgNode

from iaunet.bench.analysis import build_eval_model, count_flops, count_parameters
from iaunet.config import exit_on_config_error, load_config

TASKS = ("parameter", "flop")


def setup_cfg(
    config_file: str = "", opts: Sequence[str] = (), thesis_count: bool = False
) -> CfgNode:
    """Config from a YAML file and ``KEY VALUE`` overrides, on the CPU; ``thesis_count`` adds the
    aux heads."""
    cfg = load_config(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if thesis_count:
        cfg.MODEL.IAUNET.TEST.AUX_PREDICTIONS = True
    cfg.freeze()
    return cfg


def _format(params: Dict[str, int], flops: Dict[str, Any]) -> str:
    rows = [
        k
        for k in (params or flops)
        if k not in ("total", "postprocess", "kept", "operators", "unsupported")
    ]
    lines = [
        f"{'module':40s} {'params (M)' if params else '':>11s} "
        f"{'GFLOPs' if flops else '':>9s}".rstrip()
    ]
    for row in rows + ["total"]:
        p = f"{params[row] / 1e6:11.2f}" if params else f"{'':11s}"
        f = f"{flops[row] / 1e9:9.2f}" if flops else ""
        lines.append(f"{row:40s} {p} {f}".rstrip())
    if flops:
        label = f"post-processing, {flops['kept']} masks (not in total)"
        lines.append(f"{label:40s} {'':11s} {flops['postprocess'] / 1e9:9.2f}")
        by_op = ", ".join(f"{op} {v / 1e9:.2f}" for op, v in flops["operators"].most_common())
        lines.append(f"Total GFLOPs by operator: {by_op}")
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(flops["unsupported"].items()))
        lines.append(f"Ops without a FLOP handle (not counted): {ops or 'none'}")
        lines.append(
            "Element-wise ops, softmax and sigmoid are not counted by design (detectron2's ignore "
            "list)."
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASKS),
        metavar="{parameter,flop}",
        help="what to count (default: both)",
    )
    parser.add_argument(
        "--size", type=int, default=512, help="square input side for the FLOP count"
    )
    parser.add_argument(
        "--thesis-count",
        action="store_true",
        help="run every block's prediction head at inference (MODEL.IAUNET.TEST.AUX_PREDICTIONS "
        "True), "
        "as the reference code does and the thesis FLOPs count",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="Modify config options at the end of the command, as 'KEY VALUE' pairs",
    )
    parser.add_argument(
        "--opts", dest="more_opts", nargs=argparse.REMAINDER, default=[], help="same as opts"
    )
    return parser


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    """Parse ``argv``; ``KEY VALUE`` pairs right after ``--tasks ...`` (which takes 1+ words) go to
    ``opts``."""
    parser = get_parser()
    args = parser.parse_args(argv)
    n = next((i for i, t in enumerate(args.tasks) if t not in TASKS), len(args.tasks))
    if n == 0:
        parser.error(f"--tasks: choose from {TASKS}, got {args.tasks[0]!r}")
    args.opts = args.tasks[n:] + list(args.opts or []) + list(args.more_opts)
    args.tasks = args.tasks[:n]
    return args


def main(argv: Sequence[str] = None) -> str:
    args = parse_args(argv)
    opts = args.opts
    torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file, opts, args.thesis_count)
    model = build_eval_model(cfg)
    params = count_parameters(cfg, model) if "parameter" in args.tasks else {}
    flops = count_flops(cfg, args.size, model) if "flop" in args.tasks else {}
    heads = (
        "all prediction heads"
        if cfg.MODEL.IAUNET.TEST.AUX_PREDICTIONS
        else "last prediction head only"
    )
    header = f"{args.config_file or '(defaults)'} {' '.join(opts)}".strip()
    if flops:
        header += (
            f"\nFLOPs: 1 image 3x{args.size}x{args.size}, eval, fvcore (1 multiply-add = 1 "
            f"FLOP), {heads}"
        )
    report = header + "\n" + _format(params, flops)
    print(report)
    return report


if __name__ == "__main__":
    exit_on_config_error(main, "analyze_model.py")
