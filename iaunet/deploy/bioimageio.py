"""IAUNet as a bioimage.io model package (https://bioimage.io; docs/deploy.md, "bioimage.io").

A package is a folder or zip with ``rdf.yaml`` (the model description, in the current
``format_version`` of the installed ``bioimageio.spec``), TorchScript weights (the original entry)
and ONNX weights converted from them, test tensors, sample images, a cover and a README. The
graph, :class:`PackagedIAUNet`, is what ``iaunet-predict`` does to an image that fits in one tile:

    image (1, C, H, W): C = 1 (gray) or 3 (RGB), or a model's ``INPUT.CHANNELS`` in its order,
        after the rdf's pre-processing steps, which map it to 0..255 as ``INPUT.INTENSITY_NORM``
        does (:func:`preprocessing`; each of the ``INPUT.CHANNELS`` on its own)
      -> channels as the model takes them (gray repeated), resize by ``INPUT.PIXEL_SCALE``
      -> :class:`~iaunet.deploy.export.ExportableIAUNet` (normalize, pad, network, top-k)
      -> masks resized back to H x W, detections scoring >= the score threshold
      -> labels (1, 1, H, W) int32: instance k (1..N, by decreasing score) where it is the
         highest-scoring mask, 0 = background (``iaunet-predict``'s ``<stem>_labels.tif``)
         masks (1, N, H, W) uint8: the N overlapping masks (0/1), scores (1, N) float32
         whole_masks (1, N, H, W) uint8: a ``MODEL.IAUNET.AMODAL`` model's whole outlines (the
         labels and masks are then the visible parts)

N is data-dependent: the rdf describes it with ``DataDependentSize``. ``labels_only`` leaves out
masks and scores, for consumers that read only fixed-size outputs. Not in the graph: tiling of
images larger than a tile (``iaunet-predict`` tiles and stitches; the package predicts whole
images). The library (``bioimageio.spec``, ``bioimageio.core``, ``onnx``) is the ``bioimageio``
extra and is imported here only when a package is written or tested.
"""

import logging
import os
import shutil
import tempfile
import zipfile
from typing import Optional, Sequence, Tuple

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from pydantic import ValidationError
from torch import nn

from ..data.image_io import to_model_range, to_uint8_rgb
from ..modeling.postprocessing import logit_threshold
from ..outputs.overlay import png_bytes, render_overlay
from ..structures import MaskCrops
from ..utils.atomic import atomic_write
from .bioimageio_rdf import (
    INPUT_ID,
    OUTPUT_IDS,
    WHOLE_OUTPUT_ID,
    PackageFiles,
    PackageInfo,
    check_package_info,
    input_kind,
    model_description,
    package_readme,
)
from .export import CONFIG_EXTRA_FILE, CONFIG_KEY, ONNX_OPSET, ExportableIAUNet, trace

logger = logging.getLogger(__name__)


def _scaled(n, scale: float) -> torch.Tensor:
    """round(n * scale), at least 1, as ``IAUNetPredictor.model_size`` computes it; ``n`` is an
    int, or a traced 0-dim size while tracing (so that the graph resizes any input size)."""
    return torch.as_tensor(n).double().mul(scale).round().clamp(min=1).long()


def flatten_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool masks by decreasing score -> (H, W) int64 ids 1..N, a pixel going to its
    highest-scoring mask, 0 = none (``iaunet.outputs.masks.label_image`` as a graph: argmax finds
    the first set plane; a last all-ones plane stands for the background, also when N = 0)."""
    n, h, w = masks.shape
    planes = torch.cat([masks, masks.new_ones((1, h, w))]).to(torch.uint8)
    first = planes.argmax(0)
    return torch.where(first == n, torch.zeros_like(first), first + 1)


class PackagedIAUNet(nn.Module):
    """An eval-mode IAUNet with ``iaunet-predict``'s single-tile path around it (see the module
    docstring for inputs and outputs).

    Args:
        scale: image px -> model px (``INPUT.PIXEL_SCALE``).
        score_thresh: detections scoring at least this are kept (``--score-threshold``).
        mask_thresh: ``MODEL.IAUNET.TEST.MASK_THRESH``.
        channels: 1 (gray, repeated to the model's 3 channels) or 3 (RGB); a model of
            ``INPUT.CHANNELS`` takes its C channels (``len(MODEL.PIXEL_MEAN)``).
        image_format: ``INPUT.FORMAT``: the channel order the model was trained with.
        labels_only: return the label image only.
        whole_outlines: also return the whole outlines of a ``MODEL.IAUNET.AMODAL`` model.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        scale: float,
        score_thresh: float,
        mask_thresh: float,
        channels: int = 1,
        image_format: str = "RGB",
        labels_only: bool = False,
        whole_outlines: bool = False,
    ):
        super().__init__()
        if labels_only and whole_outlines:
            raise ValueError("a labels-only package has no whole outlines")
        self.model_channels = int(model.pixel_mean.numel())
        if self.model_channels != 3 and channels != self.model_channels:
            raise ValueError(
                f"the model takes {self.model_channels} channel(s) (INPUT.CHANNELS): its package "
                f"takes them, not {channels}"
            )
        if self.model_channels == 3 and channels not in (1, 3):
            raise ValueError(f"a package takes 1 (gray) or 3 (RGB) channels, not {channels}")
        self.net = ExportableIAUNet(model)
        self.scale, self.score_thresh = float(scale), float(score_thresh)
        self.mask_logit = logit_threshold(mask_thresh)
        self.channels, self.bgr, self.labels_only = channels, image_format == "BGR", labels_only
        self.whole_outlines = whole_outlines

    @property
    def output_ids(self) -> Tuple[str, ...]:
        """The names of :meth:`forward`'s outputs, in order."""
        if self.labels_only:
            return OUTPUT_IDS[:1]
        return OUTPUT_IDS + ((WHOLE_OUTPUT_ID,) if self.whole_outlines else ())

    def forward(self, image: torch.Tensor):
        """image (1, C, H, W) float, 0..255 -> labels (1, 1, H, W) int32[, masks (1, N, H, W)
        uint8, scores (1, N) float32[, whole_masks (1, N, H, W) uint8]]."""
        h, w = image.shape[-2:]
        gray, rgb = self.channels == 1, self.channels == 3
        x = image.expand(-1, 3, -1, -1) if gray and self.model_channels == 3 else image
        x = x.flip(1) if self.bgr and rgb and self.model_channels == 3 else x
        if self.scale != 1.0:  # the predictor's resize (detectron2 ResizeTransform on floats)
            size = (_scaled(h, self.scale), _scaled(w, self.scale))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        # a MODEL.IAUNET.AMODAL model: labels and masks are the visible parts (one pixel, one
        # cell), its whole outlines a fourth output when asked for
        scores, _, mask_logits, *amodal = self.net(x)
        keep = scores[0] >= self.score_thresh  # iaunet-predict's --score-threshold
        masks = self._masks(mask_logits, keep, (h, w))
        labels = flatten_masks(masks).to(torch.int32)[None, None]
        if self.labels_only:
            return labels
        out = (labels, masks[None].to(torch.uint8), scores[:, keep])
        if self.whole_outlines:
            # visible inside whole holds in the logits (the model's inference), so after the same
            # resize and threshold too
            out += (self._masks(amodal[0], keep, (h, w))[None].to(torch.uint8),)
        return out

    def _masks(self, logits: torch.Tensor, keep: torch.Tensor, size) -> torch.Tensor:
        """(1, k, h', w') logits at the model's size -> (N, H, W) bool masks of the kept rows."""
        if self.scale != 1.0:  # postprocessing.upsample_masks: bilinear to the image size
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[0][keep] > self.mask_logit


def synthetic_test_image(size: Tuple[int, int], dtype: str, seed: int = 0) -> np.ndarray:
    """A synthetic scene (``iaunet.data.datasets.synthetic``): the default test image, as 16-bit
    intensities (``float32`` packages) or 8-bit (``uint8`` packages)."""
    from ..data.datasets.synthetic import render_scene

    image, _ = render_scene(seed, size)
    if dtype == "uint8":
        return np.round(image * 255).astype(np.uint8)
    return np.round(500 + image * 30000).astype(np.uint16)


def centre_crop(image: np.ndarray, max_size: int) -> np.ndarray:
    """The centre of ``image``, at most ``max_size`` px along y and x (one tile: the graph
    predicts whole images)."""
    h, w = image.shape[:2]
    y0, x0 = max(0, (h - max_size) // 2), max(0, (w - max_size) // 2)
    return image[y0 : y0 + max_size, x0 : x0 + max_size]


def package_input(image: np.ndarray, channels: int, dtype: str) -> np.ndarray:
    """An (H, W) or (H, W, C) image -> the package's (1, C, H, W) input tensor in ``dtype``."""
    if channels == 1 and image.ndim != 2:
        raise ValueError(
            f"a 1-channel package takes gray (H, W) images, got shape {image.shape} (RGB: "
            "--channels 3)"
        )
    if channels > 1 and (image.ndim != 3 or image.shape[2] != channels):
        raise ValueError(
            f"a {channels}-channel package takes (H, W, {channels}) images, got {image.shape}"
        )
    if dtype == "uint8" and image.dtype != np.uint8:
        raise ValueError(
            f"this package takes 8-bit images (its config does not normalize), got {image.dtype}"
        )
    x = image[None] if channels == 1 else image.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None]).astype(dtype)


def model_input(image: np.ndarray, cfg: CfgNode, channels: int) -> torch.Tensor:
    """What :class:`PackagedIAUNet` gets after the rdf's pre-processing, computed the way
    ``iaunet-predict`` does it (``to_model_range``; RGB order, the graph reorders for BGR):
    (1, C, H, W) float32 on 0..255."""
    x = to_model_range(
        image,
        cfg.INPUT.INTENSITY_NORM,
        cfg.INPUT.PERCENTILES,
        normalize_uint8=cfg.INPUT.NORMALIZE_8BIT,
        channels=len(cfg.INPUT.CHANNELS),
    )
    x = x[:, :, :1] if channels == 1 and not cfg.INPUT.CHANNELS else x
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def _torchscript_to_onnx(
    ts_path: str, onnx_path: str, example: torch.Tensor, outputs: Sequence[str], cfg: CfgNode
) -> None:
    """ONNX weights converted from the TorchScript weights: ``torch.onnx.export`` (its
    TorchScript-based exporter) of the loaded TorchScript module, with the config in the metadata
    as :func:`~iaunet.deploy.export.export_model` writes it."""
    import onnx

    axes = {INPUT_ID: {2: "y", 3: "x"}, "labels": {2: "y", 3: "x"}}
    axes.update({"masks": {1: "instance", 2: "y", 3: "x"}, "scores": {1: "instance"}})
    with torch.no_grad():
        torch.onnx.export(
            torch.jit.load(ts_path),
            (example,),
            onnx_path,
            dynamo=False,
            input_names=[INPUT_ID],
            output_names=list(outputs),
            dynamic_axes={k: v for k, v in axes.items() if k in (INPUT_ID, *outputs)},
            opset_version=ONNX_OPSET,
        )
    proto = onnx.load(onnx_path)
    meta = proto.metadata_props.add()
    meta.key, meta.value = CONFIG_KEY, cfg.dump()
    proto.producer_name = "iaunet"
    onnx.checker.check_model(proto)
    onnx.save(proto, onnx_path)


def write_package_files(
    module: PackagedIAUNet,
    cfg: CfgNode,
    image: np.ndarray,
    folder: str,
    info: PackageInfo,
) -> PackageFiles:
    """Weights, test tensors (the TorchScript weights' outputs on ``image``, pre-processed as
    ``iaunet-predict`` does), sample images, cover and README in staging ``folder``."""
    example = model_input(image, cfg, module.channels)
    traced = trace(module, example)
    with torch.no_grad():
        out = traced(example)
    outputs = module.output_ids
    test_outputs = {k: t.numpy() for k, t in zip(outputs, [out] if module.labels_only else out)}
    labels = test_outputs["labels"][0, 0]
    if labels.max() == 0:
        raise ValueError(
            f"the test image gives no detection scoring >= {module.score_thresh}: pass a test "
            "image with objects the model finds (--test-image), or a lower --score-threshold"
        )
    ts_path = os.path.join(folder, "weights.pt")
    torch.jit.save(traced, ts_path, {CONFIG_EXTRA_FILE: cfg.dump()})
    _torchscript_to_onnx(ts_path, os.path.join(folder, "weights.onnx"), example, outputs, cfg)
    if module.labels_only:
        masks = labels[None] == np.arange(1, labels.max() + 1)[:, None, None]
    else:
        masks = test_outputs["masks"][0].astype(bool)
    arrays = {
        "test_input.npy": package_input(image, module.channels, input_kind(cfg)[0]),
        **{f"test_output_{k}.npy": a for k, a in test_outputs.items()},
        "sample_input.tif": image,
        "sample_labels.tif": labels,
    }
    if not module.labels_only:
        arrays["sample_masks.tif"] = test_outputs["masks"][0]
        arrays["sample_scores.tif"] = test_outputs["scores"]
    if module.whole_outlines:
        arrays[f"sample_{WHOLE_OUTPUT_ID}.tif"] = test_outputs[WHOLE_OUTPUT_ID][0]
    for name, array in arrays.items():
        if name.endswith(".npy"):
            np.save(os.path.join(folder, name), array)
        else:
            tifffile.imwrite(os.path.join(folder, name), array)
    # The cover: the test image and iaunet-predict's overlay of the instances found in it.
    image8 = to_uint8_rgb(
        image, cfg.INPUT.INTENSITY_NORM, cfg.INPUT.PERCENTILES, cfg.INPUT.NORMALIZE_8BIT
    )
    overlay = render_overlay(image8, MaskCrops.from_bitmasks(masks))
    with open(os.path.join(folder, "cover.png"), "wb") as f:
        f.write(png_bytes(np.hstack([image8, overlay])))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(package_readme(cfg, info, module, len(masks), labels.shape))
    names = {"test_input": "test_input.npy", "cover": "cover.png", "readme": "README.md"}
    names.update({f"test_{k}": f"test_output_{k}.npy" for k in test_outputs})
    names.update({f"sample_{n[7:-4]}": n for n in arrays if n.startswith("sample_")})
    return PackageFiles(folder, names, test_outputs, labels.shape)


def save_package(descr, output: str) -> str:
    """Write the package: a zip when ``output`` ends with .zip (one ``atomic_write``), else a
    folder (each file atomically, ``rdf.yaml`` last, so that a folder with an rdf is complete)."""
    from bioimageio.spec import save_bioimageio_package_as_folder, save_bioimageio_package_to_stream

    if output.lower().endswith(".zip"):
        # Stored, not deflated: weights hardly compress, and every reader (bioimage.io's test
        # loads them once per check) would inflate them again.
        atomic_write(
            output,
            lambda f: save_bioimageio_package_to_stream(
                descr, output_stream=f, compression=zipfile.ZIP_STORED
            ),
        )
        return output
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output} exists and is not a folder")
    os.makedirs(output, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        save_bioimageio_package_as_folder(descr, output_path=staging)
        names = sorted(os.listdir(staging), key=lambda n: n == "rdf.yaml")
        for name in names:
            with open(os.path.join(staging, name), "rb") as src:
                atomic_write(os.path.join(output, name), lambda f: shutil.copyfileobj(src, f))
    return output


def export_bioimageio(
    model: nn.Module,
    cfg: CfgNode,
    output: str,
    info: PackageInfo,
    *,
    score_thresh: float = 0.5,
    channels: Optional[int] = None,
    test_image: Optional[np.ndarray] = None,
    labels_only: bool = False,
) -> str:
    """Write eval-mode IAUNet ``model`` (built from ``cfg``) as a bioimage.io package to
    ``output`` (a folder, or a .zip).

    Args:
        score_thresh: detections scoring at least this are kept (in the graph).
        channels: 1 (gray images, the default) or 3 (RGB); a model of ``INPUT.CHANNELS`` takes
            its channels (the default; another count is an error).
        test_image: (H, W), (H, W, 3) or (H, W, C: the ``INPUT.CHANNELS``) image whose
            prediction the package records as its test (the centre of one tile at most); default
            a synthetic scene of half a training crop (``INPUT.IMAGE_SIZE`` model px). Its size is
            the smallest input the rdf describes: the package and ``iaunet-predict`` agree from
            there up to one tile.
        labels_only: only the label image as output (no data-dependent axes).
    A ``MODEL.IAUNET.AMODAL`` model's package also gives the whole outlines (``whole_masks``),
    unless ``labels_only``.
    Returns:
        ``output``. ValueError (one line) when the config has no pixel scale or the test image
        gives no detection.
    """
    check_package_info(info)
    scale = float(cfg.INPUT.PIXEL_SCALE)
    if scale <= 0:
        raise ValueError(
            "the checkpoint records no training pixel scale (INPUT.PIXEL_SCALE): give it with "
            "--opts INPUT.PIXEL_SCALE S (image px -> model px)"
        )
    dtype = input_kind(cfg)[0]
    if channels is None:
        channels = len(cfg.INPUT.CHANNELS) or 1
    if test_image is None:
        side = max(1, round(cfg.INPUT.IMAGE_SIZE / scale / 2))
        test_image = synthetic_test_image((side, side), dtype)
        if channels > 1:
            test_image = np.repeat(test_image[:, :, None], channels, axis=2)
    elif not cfg.INPUT.CHANNELS and test_image.ndim == 3 and test_image.shape[2] in (1, 4):
        # one channel; RGBA (a model of INPUT.CHANNELS: read with them, tools/export_model.py)
        test_image = test_image[:, :, 0] if test_image.shape[2] == 1 else test_image[:, :, :3]
    tile = int(cfg.TEST.TILE_SIZE) or int(cfg.INPUT.IMAGE_SIZE)
    test_image = centre_crop(test_image, max(1, round(tile / scale)))
    module = PackagedIAUNet(
        model,
        scale=scale,
        score_thresh=score_thresh,
        mask_thresh=cfg.MODEL.IAUNET.TEST.MASK_THRESH,
        channels=channels,
        image_format=cfg.INPUT.FORMAT,
        labels_only=labels_only,
        whole_outlines=bool(cfg.MODEL.IAUNET.AMODAL) and not labels_only,
    ).eval()
    with tempfile.TemporaryDirectory() as folder:
        files = write_package_files(module, cfg, test_image, folder, info)
        try:
            descr = model_description(files, cfg, info, module)
        except ValidationError as e:  # a field that check_package_info does not cover
            problems = [f"{'.'.join(map(str, x['loc']))}: {x['msg'][:200]}" for x in e.errors()]
            raise ValueError(f"invalid package description: {'; '.join(problems)}") from None
        return save_package(descr, output)


def validate_package(path: str, weight_format: Optional[str] = None):
    """bioimageio.core's own test of the package at ``path`` (a folder or zip; ``bioimageio
    test``) on the CPU: its ``ValidationSummary`` (``.status`` "passed" when the format is valid
    and every weights format reproduces the test outputs and runs at the described sizes)."""
    from bioimageio.core import test_description

    source = os.path.join(path, "rdf.yaml") if os.path.isdir(path) else path
    return test_description(source, weight_format=weight_format, devices=["cpu"])
