"""IAUNetPredictor: a numpy image of any dtype -> ``Instances``, at the pixel scale of training.

Every image is intensity-normalized as in training (``INPUT.INTENSITY_NORM``), resized by the scale
the model was trained at (``INPUT.PIXEL_SCALE``, recorded in the checkpoint's config; see
:mod:`iaunet.data.statistics`), and predicted whole when it then fits in a tile of
``TEST.TILE_SIZE`` model pixels, or tile by tile otherwise (:mod:`iaunet.inference.tiling`). Masks
come back at the image's own size. The scale can be overridden (``scale=``, or ``diameter=``: the
typical object diameter in the image's pixels, as Cellpose users give it).
"""

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

from ..checkpoint import AtomicCheckpointer, read_checkpoint
from ..config import ConfigError, load_config, merge_config, trained_config
from ..data.auto_config import fill_auto_keys
from ..data.dataset_mapper import scaled_size
from ..data.image_io import intensity_range, to_model_range
from ..modeling.postprocessing import PostProcessing
from ..structures import MaskCrops
from .backends import BACKENDS, exported_config, graph_keys, load_backend
from .tiling import (
    Detection,
    detections_to_instances,
    stitch_detections,
    tile_detections,
    tile_windows,
)

logger = logging.getLogger(__name__)


def config_from_checkpoint(
    checkpoint: dict, config_file: str = "", opts: Sequence[str] = (), weights: str = ""
) -> CfgNode:
    """The config to predict with: ``config_file`` if given, else the one saved in the checkpoint;
    the keys that the file leaves at 0 (auto: ``AUTO_KEYS``) come from the checkpoint; then
    ``opts``."""
    saved = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not config_file and not saved:
        raise ConfigError(
            f"{weights or 'the checkpoint'} holds no config (an older or foreign checkpoint): pass "
            "the config it was trained with (--config-file)"
        )
    cfg = load_config(config_file)
    if saved:
        trained = trained_config(saved, weights)
        if not config_file:
            cfg = trained
        fill_auto_keys(cfg, trained)  # e.g. NUM_QUERIES 0 in configs/custom/iaunet_small.yaml
    return merge_config(cfg, opts=opts)


class IAUNetPredictor:
    """Like detectron2's ``DefaultPredictor``: builds the model from ``cfg``, loads
    ``cfg.MODEL.WEIGHTS`` (or the already read ``checkpoint`` dict; for an exported model the
    file's ``{"config": YAML}``) and runs single images in eval mode.

    Input: a numpy image as read by :func:`iaunet.data.read_image` -- (H, W) or (H, W, 1|3|4),
    RGB(A) order, any numeric dtype. Output: ``Instances`` of the original (H, W) on the CPU, sorted
    by decreasing score, with ``pred_masks`` (bool (N, H, W), or :class:`MaskCrops` with
    ``full_masks=False``), ``scores``, ``pred_classes`` and ``pred_boxes``.

    Scale (image px -> model px): ``scale`` if given, else the recorded
    ``INPUT.OBJECT_DIAMETER / diameter`` when ``diameter`` (object size in image px) is given, else
    ``INPUT.PIXEL_SCALE``. A config without a recorded scale (older checkpoints) falls back to the
    evaluation transform (longest side ``INPUT.IMAGE_SIZE``) with a warning.

    ``model``: an IAUNet already built and loaded (the trainer's, for evaluation) instead of one
    built from ``cfg`` and its weights.

    Backend: ``"pytorch"`` (the eager model, default) or an exported file (``model_file``, see
    :mod:`iaunet.deploy.export`) run by ``"onnxruntime"`` or ``"torchscript"``; tiling, scale
    and outputs are the same (:mod:`iaunet.inference.backends`).

    ``min_score``: the lowest score the caller keeps (``iaunet-predict --score-threshold``);
    ``MODEL.IAUNET.TEST.SCORE_THRESH`` is lowered to it when above, never raised.

    Example::

        predictor = IAUNetPredictor.from_checkpoint("output/synthetic_quick/model_final.pth")
        instances = predictor(read_image("cells.tif"))
        predictor = IAUNetPredictor.from_exported("model.onnx")  # onnxruntime, no checkpoint
    """

    def __init__(
        self,
        cfg: CfgNode,
        *,
        scale: Optional[float] = None,
        diameter: Optional[float] = None,
        checkpoint: Optional[dict] = None,
        backend: str = "pytorch",
        model_file: str = "",
        threads: Optional[int] = None,
        min_score: Optional[float] = None,
        model: Optional[torch.nn.Module] = None,
    ):
        cfg = self.cfg = cfg.clone()
        cfg.defrost()  # the predictor's own copy
        self.min_score = min_score
        if min_score is not None:  # the model must not drop instances that the caller keeps
            cfg.MODEL.IAUNET.TEST.SCORE_THRESH = min(cfg.MODEL.IAUNET.TEST.SCORE_THRESH, min_score)
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                "--device cuda (MODEL.DEVICE) requested but CUDA is not available; use --device cpu"
            )
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        self.backend = backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if model is not None:  # an IAUNet already built and loaded (evaluation during training)
            self.model = model
        elif backend == "pytorch":
            self.model = build_model(self.cfg).eval()
            checkpointer = AtomicCheckpointer(self.model)
            if checkpoint is not None:
                checkpointer.load_checkpoint(checkpoint)
            else:
                checkpointer.load(cfg.MODEL.WEIGHTS)  # names the file when it is no checkpoint
        else:
            saved = checkpoint.get("config") if checkpoint is not None else None
            self.model = self._load_exported(model_file, threads, saved)
        self.intensity_norm = cfg.INPUT.INTENSITY_NORM
        self.percentiles = tuple(cfg.INPUT.PERCENTILES)
        self.image_format = cfg.INPUT.FORMAT
        self.normalize_uint8 = cfg.INPUT.NORMALIZE_8BIT
        # the file channels the model takes (INPUT.CHANNELS, saved with it); () = gray / RGB
        self.channels = tuple(cfg.INPUT.CHANNELS)
        self.scale = self._resolve_scale(scale, diameter)
        self.tile_size = int(cfg.TEST.TILE_SIZE) or int(cfg.INPUT.IMAGE_SIZE)
        # Half a tile by default: F1 92 on the synthetic mosaics where 2 object diameters (40 px of
        # 128) gave 89-90 (docs/performance.md); it doubles the number of tiles.
        overlap = int(cfg.TEST.TILE_OVERLAP) or self.tile_size // 2
        self.tile_overlap = min(overlap, self.tile_size // 2)
        if cfg.TEST.TILE_OVERLAP > self.tile_overlap:
            logger.warning(
                f"TEST.TILE_OVERLAP {cfg.TEST.TILE_OVERLAP} is more than half a tile "
                f"(TEST.TILE_SIZE {self.tile_size}): {self.tile_overlap} model px used"
            )

    @property
    def output_threshold(self) -> float:
        """The lowest score of the objects a user gets (label images, tables, ROI sets, napari,
        block-wise outputs): the caller's ``min_score``, else the model's
        ``MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH`` (tuned after training where its config says
        so)."""
        if self.min_score is not None:
            return float(self.min_score)
        return float(self.cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH)

    @property
    def test_augmentation(self) -> str:
        """The views merged per image (``MODEL.IAUNET.TEST.TTA``; "none": one view)."""
        return str(self.cfg.MODEL.IAUNET.TEST.TTA)

    @property
    def amodal(self) -> bool:  # whole outlines too (MODEL.IAUNET.AMODAL)
        return bool(self.cfg.MODEL.IAUNET.AMODAL)

    @property
    def one_piece(self) -> bool:  # the largest piece of each mask (MODEL.IAUNET.TEST.ONE_PIECE)
        return bool(self.cfg.MODEL.IAUNET.TEST.ONE_PIECE)

    @property
    def min_area(self) -> float:
        """Masks under this fraction of a disc of ``INPUT.OBJECT_DIAMETER`` model px are dropped
        (``MODEL.IAUNET.TEST.MIN_AREA``; 0: none)."""
        return float(self.cfg.MODEL.IAUNET.TEST.MIN_AREA)

    @classmethod
    def from_checkpoint(
        cls, weights: str, config_file: str = "", opts: Sequence[str] = (), **kwargs
    ) -> "IAUNetPredictor":
        """A predictor for checkpoint ``weights``, configured by the config saved in it (or by
        ``config_file``; see :func:`config_from_checkpoint`) and ``opts``."""
        checkpoint = read_checkpoint(weights)
        cfg = config_from_checkpoint(checkpoint, config_file, opts, weights)
        cfg.MODEL.WEIGHTS = weights
        return cls(cfg, checkpoint=checkpoint, **kwargs)

    @classmethod
    def from_exported(
        cls,
        model_file: str,
        backend: str = "",
        config_file: str = "",
        opts: Sequence[str] = (),
        **kwargs,
    ) -> "IAUNetPredictor":
        """A predictor running exported file ``model_file`` with ``backend`` (default:
        onnxruntime for .onnx, else torchscript), configured by the config saved in the file (or
        ``config_file``) and ``opts``."""
        backend = backend or ("onnxruntime" if model_file.endswith(".onnx") else "torchscript")
        saved = {"config": exported_config(model_file)}
        cfg = config_from_checkpoint(saved, config_file, opts, model_file)
        return cls(cfg, checkpoint=saved, backend=backend, model_file=model_file, **kwargs)

    def _load_exported(self, model_file: str, threads: Optional[int], saved: Optional[str]):
        """The exported model, after checking that the config agrees with the graph (``saved``:
        the file's config YAML when already read)."""
        if not model_file:
            raise ValueError(f"backend {self.backend} needs an exported model file (--model)")
        if self.test_augmentation != "none":
            raise ConfigError(
                f"MODEL.IAUNET.TEST.TTA {self.test_augmentation}: test-time augmentation "
                f"runs in PyTorch only (an exported graph runs one view); use --backend pytorch "
                "with the checkpoint, or MODEL.IAUNET.TEST.TTA none"
            )
        baked = graph_keys(trained_config(saved or exported_config(model_file), model_file))
        changed = {k: v for k, v in graph_keys(self.cfg).items() if baked[k] != v}
        if changed:
            raise ConfigError(
                f"{model_file} was exported with "
                f"{', '.join(f'{k} {baked[k]}' for k in changed)}; the config asks for "
                f"{', '.join(f'{k} {v}' for k, v in changed.items())}: export it again"
            )
        return load_backend(
            model_file,
            self.backend,
            PostProcessing.from_config(self.cfg),
            device=self.cfg.MODEL.DEVICE,
            threads=threads,
            channels=len(self.cfg.MODEL.PIXEL_MEAN),
        )

    def _resolve_scale(self, scale: Optional[float], diameter: Optional[float]) -> Optional[float]:
        """The resize factor image px -> model px; None: per image, longest side IMAGE_SIZE."""
        recorded = self.cfg.INPUT.PIXEL_SCALE
        if scale is not None and diameter is not None:
            raise ValueError("give a scale (--scale) or an object diameter (--diameter), not both")
        if scale is not None:
            if not (scale > 0 and math.isfinite(scale)):
                raise ValueError(f"the scale (--scale) must be a number > 0, got {scale}")
            return float(scale)
        if diameter is not None:
            trained = self.cfg.INPUT.OBJECT_DIAMETER
            if not (diameter > 0 and math.isfinite(diameter)):
                raise ValueError(f"the object diameter (--diameter) must be > 0 px, got {diameter}")
            if trained <= 0:
                raise ValueError(
                    "the model records no object diameter (INPUT.OBJECT_DIAMETER): give --scale"
                )
            return float(trained / diameter)
        if recorded > 0:
            return float(recorded)
        logger.warning(
            "The checkpoint records no training scale (INPUT.PIXEL_SCALE, saved by IAUNet >= 0.2): "
            "every image is resized to a longest side of INPUT.IMAGE_SIZE as in evaluation. For "
            "images larger than the training images, give --scale (image px -> model px) or "
            "--diameter (object size in px)"
        )
        return None

    def __call__(self, image: np.ndarray) -> Instances:
        return self.predict(image)

    def model_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """The (h, w) an image of ``image_size`` has as the model sees it."""
        h, w = image_size
        s = self.scale if self.scale is not None else self.cfg.INPUT.IMAGE_SIZE / max(h, w)
        return scaled_size((h, w), s)

    def will_tile(self, image_size: Tuple[int, int]) -> bool:
        return max(self.model_size(image_size)) > self.tile_size

    def value_range(self, image: np.ndarray):
        """The input values that become 0 and 255 for the model (``INPUT.INTENSITY_NORM``), or
        None where the image is kept as it is (:func:`intensity_range`)."""
        return intensity_range(
            image,
            self.intensity_norm,
            self.percentiles,
            normalize_uint8=self.normalize_uint8,
            channels=len(self.channels),
        )

    def predict(
        self,
        image: np.ndarray,
        tiled: Optional[bool] = None,
        full_masks: bool = True,
        value_range: Union[Tuple[float, float], None, str] = "image",
    ) -> Instances:
        """Predict one image. ``tiled`` None: tiles when the image, resized to the model's scale, is
        larger than a tile (:meth:`will_tile`). ``full_masks`` False: ``pred_masks`` are
        :class:`MaskCrops` (for images too large for N full-size masks). ``value_range``: the
        image's own (:meth:`value_range`, default), or that of what it is part of (the planes of a
        stack are normalized as the stack)."""
        # The intensity range of the whole image; the model input (float32, 3 channels: 12 bytes
        # per pixel) is made per tile from the raw image, never for the whole of a large one.
        if isinstance(value_range, str):
            value_range = self.value_range(image)
        size = image.shape[:2]
        if tiled or (tiled is None and self.will_tile(size)):
            return self._predict_tiled(image, value_range, full_masks)
        result = self._run_model(self._model_range(image, value_range), size)
        return result if full_masks else _as_crops(result)

    def predict_planes(
        self, images: Sequence[np.ndarray], value_range, tiled: Optional[bool] = None
    ) -> List[Instances]:
        """The planes of a stack (one size; normalized with the stack's ``value_range``), with
        ``pred_masks`` as :class:`MaskCrops`: ``TEST.TILE_BATCH`` planes per forward call where
        they are predicted whole, else plane by plane in tiles."""
        size = images[0].shape[:2]
        if tiled or (tiled is None and self.will_tile(size)):
            return [self.predict(im, True, False, value_range) for im in images]
        batch, out = max(1, int(self.cfg.TEST.TILE_BATCH)), []
        for i in range(0, len(images), batch):
            group = [self._model_range(im, value_range) for im in images[i : i + batch]]
            out += [_as_crops(r) for r in self._run_model_batch(group, [size] * len(group))]
        return out

    def _model_range(self, image: np.ndarray, value_range) -> np.ndarray:
        return to_model_range(
            image,
            self.intensity_norm,
            self.percentiles,
            image_format=self.image_format,
            value_range=value_range,
            channels=len(self.channels),
        )

    def tile_geometry(self) -> Tuple[float, int, int]:
        """(scale, tile, overlap) of tiled prediction, tile and overlap in image px."""
        s = self.scale if self.scale is not None else 1.0
        tile = max(1, round(self.tile_size / s))
        return s, tile, min(round(self.tile_overlap / s), tile - 1)

    def _predict_tiled(self, image: np.ndarray, value_range, full_masks: bool) -> Instances:
        """Tiles of ``tile_size`` model px (overlap ``tile_overlap``), in image px, stitched; each
        normalized from the raw ``image`` with the whole image's ``value_range``."""
        size = image.shape[:2]
        _, tile, overlap = self.tile_geometry()
        windows = tile_windows(*size, tile, overlap)
        dets = self.detect_tiles(image, list(enumerate(windows)), value_range, size)
        kept = stitch_detections(dets)
        logger.debug(f"{size}: {len(windows)} tiles, {len(dets)} detections, {len(kept)} kept")
        result = detections_to_instances(kept, size, full_masks)
        if self.amodal and not result.has("pred_amodal_masks"):  # none kept
            result.pred_amodal_masks = result.pred_masks
        return result

    def detect_tiles(
        self,
        image: np.ndarray,
        tiles: Sequence[Tuple[int, Tuple[int, int, int, int]]],
        value_range,
        image_size: Tuple[int, int],
        origin: Tuple[int, int] = (0, 0),
        batch: int = 0,
    ) -> List[Detection]:
        """Detections of the (index, window) ``tiles`` of an image of ``image_size``, in its
        coordinates; ``image`` is the part of it whose top-left pixel is ``origin`` (the whole
        image, or a block of a large one). Tiles go through the model ``batch`` at a time (default
        ``TEST.TILE_BATCH``): one forward call per batch."""
        s, _, _ = self.tile_geometry()
        batch = max(1, batch or int(self.cfg.TEST.TILE_BATCH))
        dets: List[Detection] = []
        for i in range(0, len(tiles), batch):
            group = tiles[i : i + batch]
            crops = []
            for _, (y0, x0, y1, x1) in group:
                raw = image[y0 - origin[0] : y1 - origin[0], x0 - origin[1] : x1 - origin[1]]
                crops.append(self._model_range(raw, value_range))
            sizes = [(y1 - y0, x1 - x0) for _, (y0, x0, y1, x1) in group]
            for (index, window), inst in zip(group, self._run_model_batch(crops, sizes, s)):
                dets += tile_detections(index, window, image_size, inst)
        return dets

    def _run_model(
        self, image: np.ndarray, out_size: Tuple[int, int], scale: Optional[float] = None
    ) -> Instances:
        """(h, w, 3) float image on the 0..255 scale, resized by ``scale`` (default: the
        predictor's) -> CPU Instances at ``out_size``."""
        return self._run_model_batch([image], [out_size], scale)[0]

    def _run_model_batch(
        self,
        images: Sequence[np.ndarray],
        out_sizes: Sequence[Tuple[int, int]],
        scale: Optional[float] = None,
    ) -> List[Instances]:
        """:meth:`_run_model` of several images in one forward call (the model pads them to a
        common size; tiles of one image share theirs)."""
        inputs = []
        for image, out_size in zip(images, out_sizes):
            h, w = image.shape[:2]
            new = self.model_size((h, w)) if scale is None else scaled_size((h, w), scale)
            if new != (h, w):
                image = T.ResizeTransform(h, w, *new).apply_image(np.ascontiguousarray(image))
            tensor = torch.as_tensor(
                np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32
            )
            inputs.append({"image": tensor, "height": out_size[0], "width": out_size[1]})
        with torch.inference_mode():
            out = self.model(inputs)
        return [o["instances"].to("cpu") for o in out]


def _as_crops(result: Instances) -> Instances:
    for field in ("pred_masks", "pred_amodal_masks"):
        if result.has(field):
            result.set(field, MaskCrops.from_bitmasks(result.get(field)))
    return result


@dataclass(frozen=True)
class PredictorSpec:
    """What a predictor is built from, the one way every front end builds one (``iaunet-predict``
    in process and its Dask workers, napari, the benchmark tools): a checkpoint (``weights``) or an
    exported file (``model``, run by ``backend``), a config file and overrides, the scale or object
    diameter, the lowest score kept. Hashable and picklable: a Dask worker gets the spec and loads
    the model itself."""

    weights: str = ""
    model: str = ""
    backend: str = "pytorch"
    config_file: str = ""
    opts: Tuple[str, ...] = ()
    scale: Optional[float] = None
    diameter: Optional[float] = None
    min_score: Optional[float] = None

    def build(self, threads: Optional[int] = 1) -> IAUNetPredictor:
        """The predictor (``threads``: of an exported model's runtime; None = its default)."""
        kwargs = dict(scale=self.scale, diameter=self.diameter, min_score=self.min_score)
        if self.backend != "pytorch":
            return IAUNetPredictor.from_exported(
                self.model, self.backend, self.config_file, list(self.opts), threads=threads,
                **kwargs,
            )  # fmt: skip
        return IAUNetPredictor.from_checkpoint(
            self.weights, self.config_file, list(self.opts), **kwargs
        )
