"""Parameters and FLOPs of an IAUNet model, per component (thesis Tables 1-5 count the same way).

* Parameters: every parameter of the model, backbone included (buffers such as FrozenBN statistics
  are not parameters).
* FLOPs: fvcore, through detectron2's ``FlopCountAnalysis`` as for detectron2's and the thesis'
  tables (one fused multiply-add = one FLOP; convolutions, linear layers, matmuls/einsum, norms and
  bilinear upsampling are counted, element-wise ops and softmax are not), for one ``size x size``
  image in eval mode on the CPU. fvcore has no handle for ``aten::scaled_dot_product_attention``
  (what ``nn.MultiheadAttention`` and timm's Swin call), so one is added: ``Q @ K^T`` and
  ``attn @ V`` are counted as the matmuls they are, as fvcore counts ``aten::bmm`` in the reference
  code's attention.
* The total is the network (``IAUNet.forward_network`` on a normalized image). Inference
  post-processing (top-k, maskness, upsampling the kept masks, ``IAUNet.instance_inference``) is
  reported on its own and excluded: it depends on how many detections are kept, and the thesis
  counts the network.
* With ``MODEL.IAUNET.TEST.AUX_PREDICTIONS`` every block's prediction head runs (9 with 3 blocks per
  level), as in the reference code whose FLOPs the thesis reports; otherwise only the last one.
"""

import warnings
from collections import Counter
from math import prod
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

# Submodules of the query decoder that make its "attention + FFN blocks" row (see
# ``breakdown_groups``).
DECODER_BLOCK_MODULES = ("cross_attention", "self_attention", "ffn", "memory_proj")


def build_eval_model(cfg: CfgNode) -> nn.Module:
    return build_model(cfg).eval()


def breakdown_groups(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """Breakdown rows as (label, submodule names of ``model``); a ``-`` prefix subtracts a
    submodule.

    The U-Net row is the whole pixel decoder minus the mask head (``pixel_decoder.mask_head``, eq.
    16), so the upsampling that runs in the pixel decoder's own ``forward`` lands there. With
    ``LIGHT_MASK_HEAD False`` the extra 1/4 U-Net level belongs to the mask head. The
    prediction-heads row is the query decoder minus its attention/FFN blocks, so the mask einsum of
    ``QueryDecoder.predict`` lands there.
    """
    pd = model.pixel_decoder
    mask_head = ["pixel_decoder.mask_head"]
    if not pd.light_mask_head:
        last = len(pd.in_features) - 1
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
    return {
        label: sum(-values.get(n[1:], 0) if n[0] == "-" else values.get(n, 0) for n in names)
        for label, names in groups
    }


def count_parameters(cfg: CfgNode, model: Optional[nn.Module] = None) -> Dict[str, int]:
    """All parameters (model built from ``cfg`` unless given): ``{"total": n, <breakdown row>: n,
    ...}``."""
    model = model or build_eval_model(cfg)
    per_module = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules()}
    return {"total": per_module[""], **_sum_groups(per_module, breakdown_groups(model))}


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::scaled_dot_product_attention``: ``Q K^T`` plus ``attn V`` multiply-adds.

    q: (..., L, E), k: (..., S, E), v: (..., S, Ev) -> (..., L) * S * (E + Ev).
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


class _Network(nn.Module):
    """``IAUNet.forward_network`` on a raw image, returning every prediction computed at
    inference."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = (image - self.model.pixel_mean) / self.model.pixel_std
        # The tracer drops work whose result is not returned, so the auxiliary predictions that
        # TEST.AUX_PREDICTIONS computes (and the model then discards) are returned to be counted.
        aux = self.model.query_decoder.aux_predictions_at_test
        out = self.model.forward_network(x, deep_supervision=aux)
        preds = [out] + out["aux_outputs"]
        # every prediction tensor: class logits, masks and, with MODEL.IAUNET.AMODAL, whole outlines
        return tuple(v for p in preds for k, v in p.items() if k.startswith("pred_"))


class _PostProcess(nn.Module):
    """``IAUNet.instance_inference`` for one image, as a module returning tensors (for tracing)."""

    def __init__(self, model: nn.Module, image_size: Tuple[int, int]):
        super().__init__()
        self.model = model
        self.image_size = image_size

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        size = self.image_size
        r = self.model.instance_inference(logits[0], masks[0], size, size)
        return r.pred_masks, r.scores, r.pred_classes, r.pred_boxes.tensor


def _analysis(module: nn.Module, inputs) -> FlopCountAnalysis:
    flops = FlopCountAnalysis(module, inputs)
    flops.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    return flops


def count_flops(cfg: CfgNode, size: int = 512, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """fvcore FLOPs of one ``size x size`` image (see the module docstring for what is counted).

    Returns ``{"total": f, <breakdown row>: f, ..., "postprocess": f, "kept": n, "operators":
    Counter, "unsupported": Counter}``. ``total`` is the network and ``operators`` splits it by op;
    ``postprocess`` is ``instance_inference`` on its output (``kept`` detections survive the score
    threshold with these weights); ``unsupported`` counts the calls of ops without a FLOP handle.
    """
    model = (model or build_eval_model(cfg)).eval()
    padded = -(-size // model.size_divisibility) * model.size_divisibility
    image = torch.zeros(1, 3, padded, padded)
    image[..., :size, :size] = torch.rand(1, 3, size, size) * 255
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes
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
        **_sum_groups(per_module, breakdown_groups(model)),
        "postprocess": post_total,
        "kept": kept,
        "operators": operators,
        "unsupported": unsupported,
    }
