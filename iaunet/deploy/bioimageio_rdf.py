"""The rdf.yaml and README.md of an IAUNet bioimage.io package (:mod:`iaunet.deploy.bioimageio`).

:func:`model_description` builds the ``bioimageio.spec`` ModelDescr (the installed spec's current
``format_version``): typed axes, the pre-processing that ``iaunet-predict`` does as spec steps
(:func:`preprocessing`), the weights, test tensors, citations, training data and pixel scale.
``bioimageio.spec`` is imported inside the functions (the ``bioimageio`` extra).
"""

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode

from .export import ONNX_OPSET

if TYPE_CHECKING:
    from .bioimageio import PackagedIAUNet

logger = logging.getLogger(__name__)

INPUT_ID = "image"
OUTPUT_IDS = ("labels", "masks", "scores")
WHOLE_OUTPUT_ID = "whole_masks"  # a MODEL.IAUNET.AMODAL model's whole outlines
# The input axes' ParameterizedSize: from the test image's size up, in steps of 1 px. The graph
# takes any size, but bioimageio.core refuses sizes off the min + n * step grid, and tools that
# pad an image to the grid (deepImageJ) would add mirrored objects; the minimum keeps bioimage.io's
# test (sizes min + 0, 1, 2 steps: the test image cropped or padded) on an image with objects.
SIZE_STEP = 1
PAPER_CITATION = (
    "Prytula, Tsiporenko, Zeynalli, Fishman. IAUNet: Instance-Aware U-Net. CVPR 2025 Workshops "
    "(CVMI), pp. 4739-4748."
)
PAPER_URL = "https://arxiv.org/abs/2508.01928"
PAPER_CODE_URL = "https://github.com/SlavkoPrytula/IAUNet"
# Mask pixels on a boundary may flip between runtimes (ORT vs TorchScript): 1,000 per million is
# 16 pixels of a 128 x 128 label image. Scores: float32 differences of the two runtimes.
PIXEL_MISMATCH_PPM = 1000
SCORE_ATOL = 1e-4


@dataclass
class PackageInfo:
    """What the rdf says beyond the model itself.

    Attributes:
        name: the model's name (letters, digits, spaces, ``_+-()``; 5-128 characters).
        authors: who trained and packaged the model.
        license: SPDX id of the package's license (weights and test data).
        project_url: this implementation's public repository, cited and linked as ``git_repo``.
        description: a one-paragraph description (default: one from the config).
        tags: tags added to the default ones.
    """

    name: str = "IAUNet instance segmentation"
    authors: Sequence[str] = ()
    license: str = "CC-BY-4.0"
    project_url: str = ""
    description: str = ""
    tags: Sequence[str] = field(default_factory=list)


def check_package_info(info: PackageInfo) -> None:
    """ValueError (one line, naming the field) for a field of ``info`` that the spec refuses,
    checked with the spec's own types before the slow part of an export."""
    from typing import Annotated

    from bioimageio.spec.model import v0_5 as spec
    from pydantic import TypeAdapter, ValidationError

    fields = spec.ModelDescr.model_fields
    values = {"name": info.name, "license": info.license, "git_repo": info.project_url or None}
    for key, value in values.items():
        field_info = fields[key]
        kind = field_info.annotation
        if field_info.metadata:
            kind = Annotated[(kind, *field_info.metadata)]
        try:
            TypeAdapter(kind).validate_python(value)
        except ValidationError as e:
            if key == "license":  # the spec's message lists every SPDX id
                raise ValueError(
                    f"--license {value!r} is not an SPDX license id (https://spdx.org/licenses/, "
                    "e.g. CC-BY-4.0)"
                ) from None
            flag = {"name": "--name", "git_repo": "--project-url"}[key]
            raise ValueError(f"{flag} {value!r}: {e.errors()[0]['msg']}") from None


def input_kind(cfg: CfgNode) -> Tuple[str, bool]:
    """(input dtype, normalized): ``float32`` and True when the package maps each image's
    ``INPUT.PERCENTILES`` to 0..255 (``INPUT.INTENSITY_NORM percentile`` with
    ``INPUT.NORMALIZE_8BIT``); otherwise ``uint8`` images used as they are (what the predictor
    does with 8-bit images when it does not normalize them)."""
    normalized = cfg.INPUT.INTENSITY_NORM == "percentile" and cfg.INPUT.NORMALIZE_8BIT
    return ("float32" if normalized else "uint8"), normalized


def preprocessing(cfg: CfgNode) -> List[Any]:
    """The rdf's pre-processing steps: ``iaunet.data.image_io.to_model_range`` in spec terms.
    Percentiles of the whole image (all channels, as ``intensity_range``; each channel on its own
    for a model of ``INPUT.CHANNELS``) to 0 and 1, clipped, times 255; then float32, which the
    graph takes (without a last ``ensure_dtype`` the spec casts back to the input's dtype)."""
    from bioimageio.spec.model import v0_5

    steps: List[Any] = []
    if input_kind(cfg)[1]:
        lo, hi = cfg.INPUT.PERCENTILES
        steps += [
            v0_5.ScaleRangeDescr(
                kwargs=v0_5.ScaleRangeKwargs(
                    axes=[v0_5.AxisId(a) for a in ("y", "x")]
                    if cfg.INPUT.CHANNELS
                    else [v0_5.AxisId(a) for a in ("channel", "y", "x")],
                    min_percentile=float(lo),
                    max_percentile=float(hi),
                )
            ),
            v0_5.ClipDescr(kwargs=v0_5.ClipKwargs(min=0.0, max=1.0)),
            v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(gain=255.0)),
        ]
    steps.append(v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")))
    return steps


@dataclass
class PackageFiles:
    """The files of a package in a staging folder, and what the rdf needs to know about them."""

    folder: str
    names: Dict[str, str]  # role -> file name
    test_outputs: Dict[str, np.ndarray]
    input_size: Tuple[int, int]  # (H, W) of the test input: the smallest size described


def max_detections(cfg: CfgNode) -> int:
    """k: the graph's top-k (``postprocessing.topk_predictions``), the most instances per image."""
    queries = cfg.MODEL.IAUNET.NUM_QUERIES * cfg.MODEL.IAUNET.NUM_CLASSES
    return min(int(cfg.TEST.DETECTIONS_PER_IMAGE), int(queries))


def _rdf_name(text: str) -> str:
    """``text`` with the characters that rdf names may not have (all but letters, digits, spaces
    and ``_+-()``) replaced by "-": dataset names such as ``folder:my_cells/train``."""
    return re.sub(r"[^A-Za-z0-9_+\- ()]", "-", text)


def channel_names(cfg: CfgNode, module: "PackagedIAUNet") -> List[str]:
    """The input's channel names: the model's ``INPUT.CHANNELS`` (an index as ``channelK``;
    characters other than letters, digits and ``_`` as ``_``), or gray / red, green, blue."""
    if not cfg.INPUT.CHANNELS:
        return ["gray"] if module.channels == 1 else ["red", "green", "blue"]
    names = [
        f"channel{c}" if str(c).isdigit() else re.sub(r"\W", "_", str(c))
        for c in cfg.INPUT.CHANNELS
    ]
    return [n if n[0].isalpha() else f"c{n}" for n in names]


def _model_text(cfg: CfgNode, module: "PackagedIAUNet") -> Dict[str, str]:
    """Phrases shared by the rdf and the README."""
    dtype, normalized = input_kind(cfg)
    lo, hi = cfg.INPUT.PERCENTILES
    diameter = cfg.INPUT.OBJECT_DIAMETER / module.scale if cfg.INPUT.OBJECT_DIAMETER > 0 else 0
    return {
        "channels": (
            f"{module.channels}-channel ({', '.join(channel_names(cfg, module))})"
            if cfg.INPUT.CHANNELS
            else "gray (1 channel)"
            if module.channels == 1
            else "RGB (3 channels)"
        ),
        "dtype": dtype,
        "inside": (
            "the channels as the model takes them"
            if cfg.INPUT.CHANNELS
            else "gray repeated to the model's 3 channels"
        ),
        "norm": (
            f"each image's {lo:g}th and {hi:g}th percentiles "
            f"({'of each channel' if cfg.INPUT.CHANNELS else 'all channels'}) mapped to 0 and 255, "
            "clipped (rdf steps scale_range, clip, scale_linear)"
            if normalized
            else "8-bit images used as they are (0..255)"
        ),
        "size": (
            f"objects about {diameter:.0f} px across, as in the training images"
            if diameter
            else "the pixel size of the training images"
        ),
        "datasets": ", ".join(cfg.DATASETS.TRAIN) or "unknown",
    }


def package_readme(
    cfg: CfgNode,
    info: PackageInfo,
    module: "PackagedIAUNet",
    n_test: int,
    input_size: Tuple[int, int],
) -> str:
    """The package's README.md (the rdf's ``documentation``), with its "# Validation" section;
    ``n_test`` instances in the test image of ``input_size`` (H, W)."""
    from ..version import __version__

    t = _model_text(cfg, module)
    outputs = [
        "- `labels` (batch, channel 1, y, x) int32: one id per instance, 1..N by decreasing "
        "score, a pixel of several instances going to the highest-scoring one; 0 = background. "
        "The same as `iaunet-predict`'s `<image>_labels.tif`."
    ]
    if not module.labels_only:
        outputs += [
            "- `masks` (batch, instance N, y, x) uint8: the N instance masks (0/1), overlaps kept; "
            "N depends on the image (a data-dependent axis).",
            "- `scores` (batch, instance N) float32: their scores, decreasing.",
        ]
    if module.whole_outlines:
        outputs[0] += " Of the visible parts: the model also predicts whole outlines."
        outputs += [
            f"- `{WHOLE_OUTPUT_ID}` (batch, instance N, y, x) uint8: each instance's whole "
            "outline (0/1), including what the cells on top of it hide; `masks` are the visible "
            "parts, inside them."
        ]
    return f"""# {info.name}

{info.description or default_description(cfg, module)}

IAUNet (Instance-Aware U-Net; {PAPER_CITATION}) is a query-based instance segmentation model for
microscopy: a U-Net pixel decoder and a query decoder in which each of
{cfg.MODEL.IAUNET.NUM_QUERIES} learnable queries predicts a class and a mask. This package was
written by IAUNet for detectron2 {__version__} (`tools/export_model.py --format bioimageio`).

## Input

`{INPUT_ID}` (batch 1, channel, y, x): {t["channels"]} images with {t["size"]}, {t["dtype"]}.
Pre-processing: {t["norm"]}. Inside the model: {t["inside"]}, a resize by
{module.scale:g} (the training pixel scale, `INPUT.PIXEL_SCALE`), normalization, padding, and the
masks resized back to the input size.

## Outputs

{chr(10).join(outputs)}

Detections scoring at least {module.score_thresh:g} are kept (`iaunet-predict --score-threshold`);
a pixel belongs to a mask where its probability exceeds {cfg.MODEL.IAUNET.TEST.MASK_THRESH:g}; at
most {max_detections(cfg)} instances per image ({cfg.MODEL.IAUNET.NUM_QUERIES} queries).

## Limits

- Whole images, no tiling: `iaunet-predict` tiles images larger than
  {int(cfg.TEST.TILE_SIZE or cfg.INPUT.IMAGE_SIZE)} model px (one tile) and stitches the tiles;
  this package predicts the whole image at once: at most {max_detections(cfg)} instances, and
  memory growing with the image size. Give it images of about one tile, or use `iaunet-predict`.
- Input size: at least {input_size[0]} x {input_size[1]} px (the test image's size), any size
  above; pad smaller images.
- Objects of another size than in the training images: resize your images first by (training
  object size / your object size); `iaunet-predict --diameter` does it for you.
- An image without detections gives N = 0, below the minimum of 1 that the spec allows for a
  data-dependent axis.

# Validation

`bioimageio test rdf.yaml` (bioimageio.core) runs the model with each weights format
(TorchScript, and ONNX converted from it) on the test input and compares the outputs with the
packaged test outputs ({n_test} instances; tolerances in `config.bioimageio`). The test outputs
were computed by the TorchScript weights from the test input pre-processed the way
`iaunet-predict` does it. IAUNet for detectron2's test suite checks that bioimageio.core's
prediction with a package equals `iaunet-predict`'s on images the package has not seen (same
instances, each mask IoU >= 0.99).

To validate the model on your own data, annotate a few images (label images or ImageJ ROI sets)
and compare: COCO AP with `python train_net.py --eval-only MODEL.WEIGHTS <checkpoint>
DATASETS.TEST '("folder:<your annotated folder>",)'` in IAUNet for detectron2, or the matching F1
of this package's label images against your annotations (IoU 0.5). Training data:
{t["datasets"]}.
"""


def default_description(cfg: CfgNode, module: "PackagedIAUNet") -> str:
    t = _model_text(cfg, module)
    return (
        f"IAUNet instance segmentation of {t['channels']} microscopy images (cells, overlapping "
        f"cells), trained on {t['datasets']}: a label image"
        + ("" if module.labels_only else " and the overlapping masks with their scores")
        + "."
    )


def model_description(
    files: PackageFiles, cfg: CfgNode, info: PackageInfo, module: "PackagedIAUNet"
):
    """The ``bioimageio.spec`` ModelDescr of the files (format: the installed spec's current)."""
    from bioimageio.spec.model import v0_5 as spec

    from ..version import __version__

    def file(role: str):
        return spec.FileDescr(source=Path(files.folder, files.names[role]))

    t = _model_text(cfg, module)
    h, w = files.input_size
    y, x = spec.AxisId("y"), spec.AxisId("x")
    image = spec.TensorId(INPUT_ID)
    batch = spec.BatchAxis(size=1)  # N differs per image: no batch of several
    names = channel_names(cfg, module)
    inputs = [
        spec.InputTensorDescr(
            id=image,
            description=f"{t['channels']} image; {t['size']}"[:128],
            axes=[
                batch,
                spec.ChannelAxis(channel_names=[spec.Identifier(n) for n in names]),
                spec.SpaceInputAxis(id=y, size=spec.ParameterizedSize(min=h, step=SIZE_STEP)),
                spec.SpaceInputAxis(id=x, size=spec.ParameterizedSize(min=w, step=SIZE_STEP)),
            ],
            test_tensor=file("test_input"),
            sample_tensor=file("sample_input"),
            data=spec.IntervalOrRatioDataDescr(type=t["dtype"]),
            preprocessing=preprocessing(cfg),
        )
    ]
    space = [
        spec.SpaceOutputAxis(id=a, size=spec.SizeReference(tensor_id=image, axis_id=a))
        for a in (y, x)
    ]
    k = max_detections(cfg)
    instances = spec.IndexOutputAxis(
        id=spec.AxisId("instance"), size=spec.DataDependentSize(min=1, max=k if k > 1 else None)
    )
    outputs = [
        spec.OutputTensorDescr(
            id=spec.TensorId("labels"),
            description="instance ids 1..N by decreasing score (overlaps: the higher score), 0 = "
            "background",
            axes=[batch, spec.ChannelAxis(channel_names=[spec.Identifier("instance_id")]), *space],
            test_tensor=file("test_labels"),
            sample_tensor=file("sample_labels"),
            data=spec.IntervalOrRatioDataDescr(type="int32", range=(0, k)),
        )
    ]
    if not module.labels_only:
        outputs += [
            spec.OutputTensorDescr(
                id=spec.TensorId("masks"),
                description="the N instance masks (0/1, overlaps kept), by decreasing score",
                axes=[batch, instances, *space],
                test_tensor=file("test_masks"),
                sample_tensor=file("sample_masks"),
                data=spec.NominalOrOrdinalDataDescr(values=[0, 1], type="uint8"),
            ),
            spec.OutputTensorDescr(
                id=spec.TensorId("scores"),
                description="the N detection scores, decreasing",
                axes=[batch, instances],
                test_tensor=file("test_scores"),
                sample_tensor=file("sample_scores"),
                data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            ),
        ]
    if module.whole_outlines:
        outputs.append(
            spec.OutputTensorDescr(
                id=spec.TensorId(WHOLE_OUTPUT_ID),
                description="the N whole outlines (0/1, hidden parts included); masks: the "
                "visible parts",
                axes=[batch, instances, *space],
                test_tensor=file(f"test_{WHOLE_OUTPUT_ID}"),
                sample_tensor=file(f"sample_{WHOLE_OUTPUT_ID}"),
                data=spec.NominalOrOrdinalDataDescr(values=[0, 1], type="uint8"),
            )
        )
    pixels = [k for k in module.output_ids if k != "scores"]
    exact = [
        spec.ReproducibilityTolerance(
            output_ids=[spec.TensorId(k) for k in pixels],
            relative_tolerance=0.0,
            absolute_tolerance=0.0,
            mismatched_elements_per_million=PIXEL_MISMATCH_PPM,
        ),
        spec.ReproducibilityTolerance(
            output_ids=[spec.TensorId("scores")],
            relative_tolerance=0.0,
            absolute_tolerance=SCORE_ATOL,
            mismatched_elements_per_million=0,
        ),
    ]
    cite = [
        spec.CiteEntry(text=PAPER_CITATION, url=PAPER_URL),
        spec.CiteEntry(text="IAUNet, the authors' code", url=PAPER_CODE_URL),
    ]
    if info.project_url:
        cite.append(
            spec.CiteEntry(
                text=f"IAUNet for detectron2 {__version__}, which trained and exported this model",
                url=info.project_url,
            )
        )
    else:
        logger.warning("no project URL (--project-url): the rdf cites the paper and its code only")
    if not info.authors:
        logger.warning("no --author: the rdf names no author (bioimage.io asks for one)")
    tags = ["instance-segmentation", "cells", "2d", "pytorch", "torchscript", "onnx", "unet"]
    tags += ["iaunet", "detectron2", *map(_rdf_name, cfg.DATASETS.TRAIN), *info.tags]
    n_params = sum(p.numel() for p in module.parameters())
    return spec.ModelDescr(
        name=info.name,
        description=info.description or default_description(cfg, module),
        authors=[spec.Author(name=a) for a in info.authors],
        cite=cite,
        license=info.license,
        git_repo=info.project_url or None,
        tags=list(dict.fromkeys(tags)),
        documentation=file("readme"),
        covers=[file("cover")],
        inputs=inputs,
        outputs=outputs,
        weights=spec.WeightsDescr(
            torchscript=spec.TorchscriptWeightsDescr(
                source=os.path.join(files.folder, "weights.pt"),
                pytorch_version=spec.Version(torch.__version__.split("+")[0]),
                comment="torch.jit.trace of iaunet.deploy.bioimageio.PackagedIAUNet",
            ),
            onnx=spec.OnnxWeightsDescr(
                source=os.path.join(files.folder, "weights.onnx"),
                opset_version=ONNX_OPSET,
                parent="torchscript",
                comment="torch.onnx.export (TorchScript-based exporter) of the TorchScript weights",
            ),
        ),
        training_data=spec.DatasetDescr(
            name=_rdf_name(f"Training data ({t['datasets']})")[:128],
            description=(
                f"Datasets {t['datasets']} (IAUNet for detectron2 names). Pixel scale "
                f"INPUT.PIXEL_SCALE {module.scale:g}: one training image px is {module.scale:g} "
                f"model px; typical object diameter INPUT.OBJECT_DIAMETER "
                f"{cfg.INPUT.OBJECT_DIAMETER:g} model px."
            ),
        ),
        config=spec.Config(
            bioimageio=spec.BioimageioConfig(
                reproducibility_tolerance=exact,
                architecture_type="IAUNet (query-based U-Net)",
                task="instance segmentation",
                model_parameter_count=n_params,
            ),
            iaunet={
                "version": __version__,
                "training_datasets": list(cfg.DATASETS.TRAIN),
                "pixel_scale": module.scale,
                "object_diameter": float(cfg.INPUT.OBJECT_DIAMETER),
                "score_threshold": module.score_thresh,
                "mask_threshold": float(cfg.MODEL.IAUNET.TEST.MASK_THRESH),
                "detections_per_image": k,
                "intensity_norm": cfg.INPUT.INTENSITY_NORM,
                "percentiles": [float(p) for p in cfg.INPUT.PERCENTILES],
            },
        ),
    )
