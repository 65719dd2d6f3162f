"""Exported IAUNet files (written by :mod:`iaunet.deploy.export`) behind the eager model's call
interface.

``load_backend(path, "onnxruntime" | "torchscript")`` returns an :class:`ExportedModel`: called with
detectron2 inputs (``[{"image": (C, H, W) on the 0..255 scale, "height", "width"}]``) it returns
``[{"instances": Instances}]`` like ``IAUNet.forward`` in eval mode. The exported graph gives the
fixed-size top-k tensors; the score threshold and the resize to ``height`` x ``width`` are
``postprocessing.instances_from_topk``, the same code as the eager model's. So
:class:`iaunet.inference.IAUNetPredictor` (tiling, scale, outputs) and ``tools/benchmark.py`` run
any backend unchanged.
"""

import logging
import zipfile
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode

from ..config import get_key
from ..modeling.postprocessing import PostProcessing, instances_from_topk

logger = logging.getLogger(__name__)

BACKENDS = ("pytorch", "onnxruntime", "torchscript")
# The exported file's format, as the exporter (iaunet.deploy.export) writes it and this module reads
# it: the input's name, and where the config is kept.
INPUT_NAME = "images"
CONFIG_KEY = "iaunet.config"  # ONNX metadata_props key
CONFIG_EXTRA_FILE = "iaunet_config.yaml"  # TorchScript extra file
# Keys whose values are baked into the exported graph: changing them needs a new export.
GRAPH_KEYS = (
    "TEST.DETECTIONS_PER_IMAGE",
    "MODEL.IAUNET.TEST.MASK_THRESH",
    "MODEL.IAUNET.TEST.MASKNESS",
    "MODEL.IAUNET.TEST.NMS",
    "MODEL.IAUNET.TEST.NMS_THRESH",
    "MODEL.IAUNET.TEST.NMS_SIGMA",
    "MODEL.IAUNET.TEST.NMS_OVERLAP",
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
)
# scores, classes, mask logits [, whole-outline mask logits (MODEL.IAUNET.AMODAL)]
Outputs = Tuple[torch.Tensor, ...]


class ExportedModel:
    """A runtime function ``images (B, C, H, W) -> (scores, classes, mask_logits[,
    amodal_mask_logits])`` (the exported graph's outputs) with the eager model's post-processing
    after it.

    Args:
        run: the exported graph.
        postprocessing: the settings; what is left after the graph uses the score and mask
            thresholds (``MODEL.IAUNET.TEST.SCORE_THRESH`` / ``MASK_THRESH``).
        name: the backend's name (logs, benchmark tables).
        channels: C, the image channels the graph takes (``len(MODEL.PIXEL_MEAN)``).
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor], Outputs],
        postprocessing: PostProcessing,
        name: str,
        channels: int = 3,
    ):
        self.run, self.name, self.channels = run, name, channels
        self.postprocessing = postprocessing

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        """Consecutive inputs of one size go through the graph as one batch (tiles of an image)."""
        for x in batched_inputs:
            image = x["image"]
            if image.dim() != 3 or image.shape[0] != self.channels:
                raise ValueError(
                    f"expected a ({self.channels}, H, W) image tensor, got shape "
                    f"{tuple(image.shape)} for "
                    f"{x.get('file_name', 'an input')}"
                )
        results = []
        start = 0
        while start < len(batched_inputs):
            size = tuple(batched_inputs[start]["image"].shape[-2:])
            end = start + 1
            while end < len(batched_inputs) and (
                tuple(batched_inputs[end]["image"].shape[-2:]) == size
            ):
                end += 1
            group = batched_inputs[start:end]
            scores, classes, mask_logits, *amodal = self.run(
                torch.stack([x["image"] for x in group]).float()
            )
            for i, x in enumerate(group):
                output_size = (x.get("height", size[0]), x.get("width", size[1]))
                instances = instances_from_topk(
                    scores[i],
                    classes[i],
                    mask_logits[i],
                    size,
                    output_size,
                    self.postprocessing,
                    stride=1,  # the graph's masks are at the input size already
                    amodal_mask_logits=amodal[0][i] if amodal else None,
                )
                results.append({"instances": instances})
            start = end
        return results

    # The eager model's mode switches (detectron2's inference_context, the benchmark), so that
    # callers may treat both alike.
    training = False

    def eval(self) -> "ExportedModel":
        return self

    def train(self, mode: bool = True) -> "ExportedModel":
        if mode:
            raise RuntimeError(f"an exported model ({self.name}) cannot be trained")
        return self

    def to(self, *args, **kwargs) -> "ExportedModel":
        return self


def onnxruntime_session(path: str, threads: Optional[int] = None, optimize: str = "all"):
    """An onnxruntime CPU session for ``path``: graph optimizations ``optimize`` ("all",
    "extended", "basic", "none"), ``threads`` intra-op threads (default: torch's thread count, so
    that ``--threads`` / OMP_NUM_THREADS apply to both runtimes)."""
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimize]
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own errors: not an ONNX file, unsupported op, ...
        raise ValueError(f"cannot load ONNX model {path}: {str(e).strip()}") from None


def onnxruntime_runner(session) -> Callable[[torch.Tensor], Outputs]:
    def run(images: torch.Tensor) -> Outputs:
        feed = {INPUT_NAME: np.ascontiguousarray(images.detach().cpu().numpy(), np.float32)}
        return tuple(torch.from_numpy(a) for a in session.run(None, feed))

    return run


def torchscript_runner(path: str, device: str = "cpu") -> Callable[[torch.Tensor], Outputs]:
    try:
        module = torch.jit.load(path, map_location=device).eval()
    except Exception as e:
        raise ValueError(f"cannot load TorchScript model {path}: {str(e).strip()}") from None
    if torch.device(device).type == "cpu":
        # Weights as constants, conv + BN folded, oneDNN layouts: ~12 % less CPU time (R50,
        # 512²). Done here, not in the file, which stays device-independent.
        try:
            module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
        except Exception as e:  # an op the passes do not handle: run the graph as traced
            logger.warning(f"TorchScript inference optimizations skipped for {path}: {e}")

    def run(images: torch.Tensor) -> Outputs:
        with torch.inference_mode():
            out = module(images.to(device))
        return tuple(t.cpu() for t in out)

    return run


def load_backend(
    path: str,
    backend: str,
    postprocessing: PostProcessing,
    device: str = "cpu",
    threads: Optional[int] = None,
    channels: int = 3,
) -> ExportedModel:
    """An :class:`ExportedModel` running exported file ``path`` (a graph of ``channels`` input
    channels) with ``backend`` ("onnxruntime": CPU; "torchscript": on ``device``), finishing with
    ``postprocessing``."""
    if backend == "onnxruntime":
        run = onnxruntime_runner(onnxruntime_session(path, threads))
    elif backend == "torchscript":
        run = torchscript_runner(path, device)
    else:
        raise ValueError(f"an exported model runs with onnxruntime or torchscript, not {backend!r}")
    return ExportedModel(run, postprocessing, backend, channels)


def exported_config(path: str) -> str:
    """The config YAML stored in exported file ``path``; ValueError naming the file if it has
    none."""
    try:
        config = read_exported_config(path)
    except Exception as e:  # not an ONNX / TorchScript (zip) file
        raise ValueError(f"cannot read exported model {path}: {str(e).strip()}") from None
    if not config:
        raise ValueError(
            f"{path} holds no IAUNet config: export it with tools/export_model.py, or pass the "
            "checkpoint (--weights) it was exported from"
        )
    return config


def graph_keys(cfg: CfgNode) -> Dict[str, object]:
    """The values of :data:`GRAPH_KEYS` in ``cfg``."""
    values = {}
    for key in GRAPH_KEYS:
        value = get_key(cfg, key)
        values[key] = list(value) if isinstance(value, (list, tuple)) else value
    return values


def read_exported_config(path: str) -> Optional[str]:
    """The config YAML stored in an exported file (None when it has none)."""
    if path.endswith(".onnx"):
        import onnx

        proto = onnx.load(path, load_external_data=False)
        return next((p.value for p in proto.metadata_props if p.key == CONFIG_KEY), None)
    with zipfile.ZipFile(path) as archive:  # a TorchScript file is a zip: <name>/extra/<file>
        names = [n for n in archive.namelist() if n.endswith("/extra/" + CONFIG_EXTRA_FILE)]
        return archive.read(names[0]).decode() if names else None
