#!/usr/bin/env python
"""Parameters and FLOPs of an IAUNet config, per module (thesis Tables 1-5 count the same way).

    python tools/analyze_model.py --config-file configs/revvity25/iaunet_R50.yaml
    python tools/analyze_model.py --config-file configs/revvity25/iaunet_R50.yaml --thesis-count \
        MODEL.IAUNET.NUM_QUERIES 300

How things are counted:

* Parameters: every parameter of the model, backbone included (buffers such as FrozenBN statistics are not
  parameters).
* FLOPs: fvcore, through detectron2's ``FlopCountAnalysis`` as for detectron2's and the thesis' tables
  (one fused multiply-add = one FLOP; convolutions, linear layers, matmuls/einsum, norms and bilinear
  upsampling are counted, element-wise ops and softmax are not), for one ``size x size`` image in eval mode
  on the CPU. fvcore has no handle for ``aten::scaled_dot_product_attention`` (what ``nn.MultiheadAttention``
  and timm's Swin call), so one is added here: ``Q @ K^T`` and ``attn @ V`` are counted as the matmuls they
  are, the same work fvcore counts as ``aten::bmm`` / ``aten::matmul`` in the reference code's attention.
* The total is the network: preprocessing, backbone, pixel decoder, query decoder and the prediction heads.
  Inference post-processing (top-k, maskness, upsampling the kept masks to the image) is reported on its own
  line and excluded: it depends on how many detections are kept, and the thesis counts the network.
* By default the model is counted as configured: at inference only the last block's prediction head runs.
  ``--thesis-count`` sets ``MODEL.IAUNET.TEST.AUX_PREDICTIONS True`` so that all prediction heads (9 with 3
  blocks per level) run, as in the reference code whose FLOPs the thesis reports; ``docs/fidelity.md`` uses it.

The module can be imported (``count_parameters``, ``count_flops``, ``setup_cfg``), e.g. by tests.
"""

import argparse
import os
import sys
import warnings
from collections import Counter
from math import prod
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.config import CfgNode  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.analysis import FlopCountAnalysis  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402

from iaunet.config import exit_on_config_error, load_config  # noqa: E402

# Submodules of the pixel decoder and the query decoder that the breakdown rows are made of (see ``_groups``).
MASK_HEAD_MODULES = ("lateral", "output")  # F (1x1 + norm) and M (3x3 + norm + ReLU) of eq. (16)
DECODER_BLOCK_MODULES = ("cross_attention", "self_attention", "ffn", "memory_proj")
TASKS = ("parameter", "flop")


def setup_cfg(
    config_file: str = "", opts: Sequence[str] = (), thesis_count: bool = False
) -> CfgNode:
    """Config from a YAML file and ``KEY VALUE`` overrides, on the CPU; ``thesis_count`` adds the aux heads."""
    cfg = load_config(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if thesis_count:
        cfg.MODEL.IAUNET.TEST.AUX_PREDICTIONS = True
    cfg.freeze()
    return cfg


def _build(cfg: CfgNode) -> nn.Module:
    model = build_model(cfg)
    model.eval()
    return model


def _groups(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """Breakdown rows as (label, submodule names of ``model``).

    The U-Net row is the whole pixel decoder minus the mask head, so the bilinear upsampling that runs in the
    pixel decoder's own ``forward`` lands there. With ``LIGHT_MASK_HEAD False`` the extra 1/4 level is the
    mask head. The prediction-heads row is the query decoder minus its attention/FFN blocks, so the mask
    einsum of ``QueryDecoder.predict`` (a method, not a submodule) lands there.
    """
    pd = model.pixel_decoder
    mask_head = [f"pixel_decoder.{n}" for n in MASK_HEAD_MODULES if hasattr(pd, n)]
    if not pd.light_mask_head:
        last = len(pd.level_names) - 1
        mask_head += [f"pixel_decoder.{n}.{last}" for n in ("skip_proj", "stages")]
        if pd.use_mask_branch:
            mask_head.append(f"pixel_decoder.mask_branch.{last}")
    blocks = [f"query_decoder.{n}" for n in DECODER_BLOCK_MODULES]
    return [
        ("backbone", ["backbone"]),
        ("pixel decoder: U-Net levels", ["pixel_decoder", *(f"-{n}" for n in mask_head)]),
        ("pixel decoder: mask head", mask_head),
        ("query decoder: attention + FFN blocks", blocks),
        ("query decoder: prediction heads", ["query_decoder", *(f"-{n}" for n in blocks)]),
    ]


def _sum_groups(values: Dict[str, float], groups: List[Tuple[str, List[str]]]) -> Dict[str, float]:
    """Sum per-module values over each group; names prefixed with ``-`` are subtracted."""
    out = {}
    for label, names in groups:
        out[label] = sum(
            -values.get(n[1:], 0) if n.startswith("-") else values.get(n, 0) for n in names
        )
    return out


def _module_params(model: nn.Module) -> Dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_modules()}


def count_parameters(cfg: CfgNode, model: Optional[nn.Module] = None) -> Dict[str, int]:
    """All parameters of the model (built from ``cfg`` unless given): ``{"total": n, <breakdown row>: n, ...}``."""
    model = model or _build(cfg)
    per_module = _module_params(model)
    return {"total": per_module[""], **_sum_groups(per_module, _groups(model))}


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::scaled_dot_product_attention``: ``Q K^T`` plus ``attn V`` multiply-adds.

    q: (..., L, E), k: (..., S, E), v: (..., S, Ev) -> (..., L) * S * (E + Ev).
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


class _Network(nn.Module):
    """The model's inference path without post-processing: image tensor -> the query decoder's outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(1, 3, H, W) padded image -> every prediction the query decoder computes at inference."""
        x = (image - self.model.pixel_mean) / self.model.pixel_std
        features = self.model.backbone(x)
        mask_features, memories = self.model.pixel_decoder(features)
        # The tracer drops work whose result is not returned, so the auxiliary predictions that
        # TEST.AUX_PREDICTIONS computes (and the model then discards) are returned here to be counted.
        aux = self.model.query_decoder.aux_predictions_at_test
        out = self.model.query_decoder(memories, mask_features, deep_supervision=aux)
        preds = [out] + out["aux_outputs"]
        return tuple(t for p in preds for t in (p["pred_logits"], p["pred_masks"]))


def _analysis(module: nn.Module, inputs) -> FlopCountAnalysis:
    flops = FlopCountAnalysis(module, inputs)
    flops.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    return flops


class _PostProcess(nn.Module):
    """``IAUNet.instance_inference`` for one image, as a module returning tensors (for tracing)."""

    def __init__(self, model: nn.Module, image_size: Tuple[int, int]):
        super().__init__()
        self.model = model
        self.image_size = image_size

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        r = self.model.instance_inference(logits[0], masks[0], self.image_size, self.image_size)
        return r.pred_masks, r.scores, r.pred_classes, r.pred_boxes.tensor


def count_flops(cfg: CfgNode, size: int = 512, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """fvcore FLOPs of one ``size x size`` image (see the module docstring for what is counted).

    Returns ``{"total": f, <breakdown row>: f, ..., "postprocess": f, "kept": n, "operators": Counter,
    "unsupported": Counter}``. ``total`` is the network and ``operators`` splits it by op (``conv``,
    ``einsum``, ``scaled_dot_product_attention``, ...); ``postprocess`` is ``instance_inference`` on its output
    (``kept`` detections survive the score threshold with these random weights, at most
    ``TEST.DETECTIONS_PER_IMAGE``); ``unsupported`` counts the calls of ops without a FLOP handle.
    """
    model = (model or _build(cfg)).eval()
    padded = -(-size // model.size_divisibility) * model.size_divisibility
    image = torch.zeros(1, 3, padded, padded)
    image[..., :size, :size] = torch.rand(1, 3, size, size) * 255
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter(
            "ignore"
        )  # tracer warnings about data-dependent shapes in post-processing
        network = _Network(model).eval()
        net = _analysis(network, (image,))
        prefix = "model.model."  # TracingAdapter.model -> _Network.model
        per_module = {
            k[len(prefix) :]: v for k, v in net.by_module().items() if k.startswith(prefix)
        }
        per_module[""] = total = net.total()
        operators = net.by_operator()
        logits, masks = network(image)[:2]
        postprocess = _PostProcess(model, (size, size)).eval()
        kept = len(postprocess(logits, masks)[1])
        post = _analysis(postprocess, (logits, masks))
        post_total = post.total()
        unsupported = Counter(net.unsupported_ops()) + Counter(post.unsupported_ops())
    return {
        "total": total,
        **_sum_groups(per_module, _groups(model)),
        "postprocess": post_total,
        "kept": kept,
        "operators": operators,
        "unsupported": unsupported,
    }


def _format(params: Dict[str, int], flops: Dict[str, Any]) -> str:
    rows = [
        k
        for k in (params or flops)
        if k not in ("total", "postprocess", "kept", "operators", "unsupported")
    ]
    lines = [
        f"{'module':40s} {'params (M)' if params else '':>11s} {'GFLOPs' if flops else '':>9s}".rstrip()
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
            "Element-wise ops, softmax and sigmoid are not counted by design (detectron2's ignore list)."
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
        help="run every block's prediction head at inference (MODEL.IAUNET.TEST.AUX_PREDICTIONS True), "
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
    """Parse ``argv``; ``KEY VALUE`` pairs right after ``--tasks ...`` (which takes 1+ words) go to ``opts``."""
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
    model = _build(cfg)
    params = count_parameters(cfg, model) if "parameter" in args.tasks else {}
    flops = count_flops(cfg, args.size, model) if "flop" in args.tasks else {}
    heads = (
        "all prediction heads"
        if cfg.MODEL.IAUNET.TEST.AUX_PREDICTIONS
        else "last prediction head only"
    )
    header = f"{args.config_file or '(defaults)'} {' '.join(opts)}".strip()
    if flops:
        header += f"\nFLOPs: 1 image 3x{args.size}x{args.size}, eval, fvcore (1 multiply-add = 1 FLOP), {heads}"
    report = header + "\n" + _format(params, flops)
    print(report)
    return report


if __name__ == "__main__":
    exit_on_config_error(main, "analyze_model.py")
