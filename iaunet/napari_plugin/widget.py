"""*Plugins > IAUNet prediction*: run a checkpoint on an image layer (magicgui dock widget).

The model runs in a worker thread (``napari.qt.threading``), so the viewer stays responsive; a
progress bar follows the steps (load the model, predict, build the layers). Scale and tiling are
those of ``iaunet-predict`` (:class:`~iaunet.inference.IAUNetPredictor`): the scale the model was
trained at unless a scale or an object diameter is given, tiles when the image is larger than a
tile at that scale. A loaded model is kept for the next run with the same settings.
"""

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import napari
import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
)
from napari.qt.threading import thread_worker

from ..checkpoint import read_checkpoint
from ..config import trained_config
from ..data.image_io import resolve_channels
from ..inference import IAUNetPredictor
from ..inference.predictor import PredictorSpec
from ..modeling.tta import VIEWS
from ..outputs.writer import image_prediction
from .layers import LayerData, prediction_layers

logger = logging.getLogger(__name__)

STEPS = ("loading the model", "predicting", "building the layers")
AS_TRAINED = "as trained"  # the model's MODEL.IAUNET.TEST.TTA


def _path(value) -> str:
    """A FileEdit value as a path, '' when empty."""
    text = str(value or "")
    return "" if text in ("", ".") else text


class PredictWidget(Container):
    """Image layer, weights (+ optional config), scale or diameter, score threshold, test-time
    augmentation, device; *Run* adds ``<image> labels``, ``<image> masks page k`` and ``<image>
    scores``."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.image = ComboBox(label="image layer", choices=self._image_layers)
        self.weights = FileEdit(label="weights", mode="r", filter="*.pth *.pkl")
        self.config = FileEdit(label="config (optional)", mode="r", filter="*.yaml")
        self.scale = FloatSpinBox(
            label="scale (0: as trained)", value=0.0, min=0.0, max=100.0, step=0.05
        )
        self.diameter = FloatSpinBox(
            label="object diameter px (0: -)", value=0.0, min=0.0, max=10000.0, step=1.0
        )
        self.score_threshold = FloatSlider(
            label="score threshold", value=0.5, min=0.0, max=1.0, step=0.01
        )
        self.tta = ComboBox(
            label="test-time augmentation", choices=[AS_TRAINED, *VIEWS], value=AS_TRAINED
        )
        self.device = ComboBox(label="device", choices=devices, value=devices[-1])
        self.run_button = PushButton(text="Run")
        self.progress = ProgressBar(label="progress", value=0, min=0, max=len(STEPS))
        self.status = Label(label="status", value="")
        self.extend(
            [
                self.image,
                self.weights,
                self.config,
                self.scale,
                self.diameter,
                self.score_threshold,
                self.tta,
                self.device,
                self.run_button,
                self.progress,
                self.status,
            ]
        )
        self.run_button.changed.connect(self.run)
        self.weights.changed.connect(self._threshold_of_model)
        viewer.layers.events.inserted.connect(self._refresh)
        viewer.layers.events.removed.connect(self._refresh)
        self._predictors: Dict[Tuple, IAUNetPredictor] = {}
        self.worker = None
        # the last prediction, every instance above the model's SCORE_THRESH: (layer name, image,
        # placement, predictor key, instances, class names); moving the slider filters it again
        self._last: Optional[Tuple] = None
        # the file channels the chosen model takes (INPUT.CHANNELS) and the last (H, W, C) image
        # made of them (the same array while its layers are unchanged)
        self._channels: Tuple = ()
        self._stacked: Tuple = ((), None)
        self.score_threshold.changed.connect(self._refilter)

    def _threshold_of_model(self, *_) -> None:
        """A newly chosen checkpoint sets the score threshold to its own
        ``MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH`` (tuned after training where its config says so),
        as ``iaunet-predict`` uses it; the slider stays as it is for a file without one."""
        weights = _path(self.weights.value)
        if not os.path.isfile(weights):
            return
        self._channels = ()
        try:
            saved = trained_config(read_checkpoint(weights).get("config"), weights)
            value = float(saved.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH)
        except Exception:  # not a checkpoint, no config, an older config: Run reports problems
            return
        self._channels = tuple(saved.INPUT.CHANNELS)
        self.score_threshold.value = value

    def _image_layers(self, *_) -> List[str]:
        return [
            layer.name for layer in self.viewer.layers if isinstance(layer, napari.layers.Image)
        ]

    def _refresh(self, *_) -> None:
        self.image.reset_choices()

    def _predictor(self, key: Tuple) -> IAUNetPredictor:
        """A cached predictor for (weights, config, scale, diameter, device, TTA); the score
        threshold is not part of it: it filters the instances (:meth:`_refilter`)."""
        if key not in self._predictors:
            weights, config, scale, diameter, device, tta = key
            opts = ["MODEL.DEVICE", device]
            if tta != AS_TRAINED:
                opts += ["MODEL.IAUNET.TEST.TTA", tta]
            spec = PredictorSpec(weights, config_file=config, opts=tuple(opts), scale=scale,
                                 diameter=diameter)  # fmt: skip
            self._predictors = {key: spec.build()}  # keep one model in memory
        return self._predictors[key]

    def _inputs(self) -> Tuple[np.ndarray, str, Dict[str, Any], Tuple]:
        """The image, its layer name, placement and the predictor key; ValueError when unusable."""
        name = self.image.value
        if not name or name not in self.viewer.layers:
            raise ValueError("select an image layer")
        layer = self.viewer.layers[name]
        data = layer.data[0] if layer.multiscale else layer.data
        image = np.asarray(data)
        if self._channels:
            image = self._channel_image(layer, image)
        elif not (image.ndim == 2 or (layer.rgb and image.ndim == 3)):
            raise ValueError(f"IAUNet predicts 2-D images; layer '{name}' has shape {image.shape}")
        weights = _path(self.weights.value)
        if not os.path.isfile(weights):
            raise ValueError(f"weights file not found: {weights or '(none selected)'}")
        key = (
            weights,
            _path(self.config.value),
            self.scale.value or None,
            self.diameter.value or None,
            self.device.value,
            self.tta.value,
        )
        placement = {"scale": tuple(layer.scale[-2:]), "translate": tuple(layer.translate[-2:])}
        return image, name, placement, key

    def _channel_image(self, layer, data: np.ndarray) -> np.ndarray:
        """(H, W, C): the channels the model takes (``INPUT.CHANNELS``) of a (C, H, W) image
        layer (by index, or by the names in its ``metadata["channel_names"]``), or the image
        layers named as the channels (a file opened channel by channel); a 2-D layer for a
        one-channel model. ValueError naming what is missing."""
        channels = self._channels
        if data.ndim == 3 and not layer.rgb:
            names = layer.metadata.get("channel_names")
            where = f"layer '{layer.name}'"
            sources = [(layer, k) for k in resolve_channels(where, channels, len(data), names)]
        elif data.ndim == 2 and all(str(c) in self.viewer.layers for c in channels):
            sources = [(self.viewer.layers[str(c)], None) for c in channels]
        elif data.ndim == 2 and len(channels) == 1:
            sources = [(layer, None)]
        else:
            raise ValueError(
                f"the model takes the channels {channels} (INPUT.CHANNELS): select a (C, H, W) "
                f"image layer, or open the channels as image layers named "
                f"{', '.join(map(repr, map(str, channels)))}"
            )
        key = tuple((id(src.data), k) for src, k in sources)
        if key != self._stacked[0]:
            planes = [np.asarray(src.data if k is None else src.data[k]) for src, k in sources]
            if len({p.shape for p in planes}) != 1 or planes[0].ndim != 2:
                shapes = ", ".join(
                    f"'{src.name}' {p.shape}" for (src, _), p in zip(sources, planes)
                )
                raise ValueError(f"the channels are not 2-D images of one size: {shapes}")
            self._stacked = (key, np.stack(planes, axis=-1))
        return self._stacked[1]

    def run(self, *_) -> None:
        """Start a prediction on the selected layer (no-op while one is running)."""
        if self.worker is not None:
            return
        try:
            image, name, placement, key = self._inputs()
        except ValueError as e:
            self._error(e)
            return
        self.run_button.enabled = False
        self.progress.value = 0
        self.worker = self._work(image, name, placement, key)
        self.worker.yielded.connect(self._on_step)
        self.worker.returned.connect(self._add_layers)
        self.worker.errored.connect(self._error)
        self.worker.finished.connect(self._done)
        self.worker.start()

    @thread_worker
    def _work(self, image: np.ndarray, name: str, placement: Dict, key: Tuple):
        yield 0
        predictor = self._predictor(key)
        yield 1
        instances = predictor.predict(image, full_masks=False)
        class_names = getattr(predictor.metadata, "thing_classes", None)
        self._last = (name, image, placement, key, instances, class_names)
        yield 2
        return self._layers()

    def _layers(self) -> List[LayerData]:
        """The last prediction's layers at the slider's score threshold."""
        name, image, placement, _, instances, class_names = self._last
        threshold = float(self.score_threshold.value)
        prediction = image_prediction(instances, image, threshold, stem=name)
        return prediction_layers(prediction, name, class_names, placement)

    def _refilter(self, *_) -> None:
        """The slider moved: the last prediction's layers again at the new threshold, without
        running the model (while its image layer and settings are unchanged)."""
        if self.worker is not None or self._last is None:
            return
        try:
            image, name, _, key = self._inputs()
        except ValueError:
            return
        if (name, key) != (self._last[0], self._last[3]) or image is not self._last[1]:
            return  # another image or model: Run predicts it
        self._add_layers(self._layers())

    def _on_step(self, step: int) -> None:
        self.progress.value = step
        self.status.value = f"{STEPS[step]}..."

    def _add_layers(self, layers: List[LayerData]) -> None:
        for data, kwargs, layer_type in layers:
            if kwargs["name"] in self.viewer.layers:  # a re-run replaces its results
                self.viewer.layers.remove(kwargs["name"])
            getattr(self.viewer, f"add_{layer_type}")(data, **kwargs)
        self.progress.value = len(STEPS)
        count = len(layers[-1][0])
        pages = len(layers) - 2
        self.status.value = f"{count} instances, {pages} mask page(s)"

    def _error(self, e: Exception) -> None:
        self.status.value = f"error: {e}"
        logger.error(f"IAUNet prediction: {e}")
        napari.utils.notifications.show_error(f"IAUNet: {e}")

    def _done(self) -> None:
        self.worker = None
        self.run_button.enabled = True
