"""*Plugins > IAUNet training*: correct, add to the training set, retrain -- without leaving napari.

The human-in-the-loop workflow of Cellpose 2 (Pachitariu & Stringer, Nature Methods 2022): predict
with *IAUNet prediction*, correct the labels layer (or the mask pages of overlapping cells), *Add to
training set* (the image and its corrected labels saved in the training folder, README layout),
*Train* (:func:`iaunet.train` in a worker thread: the same trainer as ``train_net.py``, with a
progress bar, an ETA and the current loss; *Stop* ends it with a usable checkpoint), and the new
model goes to the prediction widget for the next image.
"""

import glob
import json
import logging
import os
import threading
from typing import Dict, List, Optional, Tuple

import napari
import numpy as np
import tifffile
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, SpinBox
from napari.qt.threading import thread_worker

from ..engine.train_call import train, write_pair
from .widget import PredictWidget, _path

logger = logging.getLogger(__name__)

PAGES = "mask pages of the image"  # the labels choice for overlapping cells (<image> masks page k)
START_MODEL = "starting model (the config's)"
PREDICTION_MODEL = "the prediction widget's model"
A_FILE = "a file"


def read_training_folder(folder: str) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """The images of ``folder`` with their ``_labels.tif`` / ``_masks.tif`` (what *Add to training
    set* writes), sorted by name."""
    images, labels = [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.tif"))):
        stem = path[: -len(".tif")]
        if stem.endswith(("_labels", "_masks")):
            continue
        for suffix in ("_labels.tif", "_masks.tif"):
            if os.path.isfile(stem + suffix):
                images.append(tifffile.imread(path))
                labels.append(tifffile.imread(stem + suffix))
    return images, labels


class TrainWidget(Container):
    """Image and labels layers, training folder, starting model, output folder, iterations;
    *Add to training set*, *Train* and *Stop*."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.image = ComboBox(label="image layer", choices=self._layers(napari.layers.Image))
        self.labels = ComboBox(label="labels", choices=self._label_choices)
        self.folder = FileEdit(label="training folder", mode="d", value="iaunet_training")
        self.add_button = PushButton(text="Add to training set")
        self.source = ComboBox(
            label="starting model", choices=[START_MODEL, PREDICTION_MODEL, A_FILE]
        )
        self.weights = FileEdit(label="model file", mode="r", filter="*.pth *.pkl")
        self.output = FileEdit(label="output folder", mode="d", value="iaunet_runs")
        self.iterations = SpinBox(label="iterations (0: auto)", value=0, min=0, max=100_000)
        self.train_button = PushButton(text="Train")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(label="status", value="")
        self.extend(
            [self.image, self.labels, self.folder, self.add_button, self.source, self.weights]
            + [self.output, self.iterations, self.train_button, self.stop_button]
            + [self.progress, self.status]
        )
        self.add_button.changed.connect(self.add_to_training_set)
        self.train_button.changed.connect(self.run)
        self.stop_button.changed.connect(self.stop)
        viewer.layers.events.inserted.connect(self._refresh)
        viewer.layers.events.removed.connect(self._refresh)
        self.worker = None
        self._stop = threading.Event()
        self.last_model = ""  # the checkpoint of the last training

    def _layers(self, kind) -> List[str]:
        return [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]

    def _label_choices(self, *_) -> List[str]:
        return [PAGES] + self._layers(napari.layers.Labels)

    def _refresh(self, *_) -> None:
        self.image.choices = self._layers(napari.layers.Image)
        self.labels.reset_choices()

    def _pair(self) -> Tuple[str, np.ndarray, np.ndarray]:
        """(name, image, labels) of the selected layers; ValueError saying what is wrong."""
        name = self.image.value
        if not name or name not in self.viewer.layers:
            raise ValueError("select an image layer")
        layer = self.viewer.layers[name]
        image = np.asarray(layer.data[0] if layer.multiscale else layer.data)
        if not (image.ndim == 2 or (layer.rgb and image.ndim == 3)):
            raise ValueError(f"IAUNet trains on 2-D images; layer '{name}' has shape {image.shape}")
        if self.labels.value == PAGES:
            pages = sorted(
                (lay for lay in self.viewer.layers if lay.name.startswith(f"{name} masks page ")),
                key=lambda lay: int(lay.name.rsplit(" ", 1)[1]),
            )
            if not pages:
                raise ValueError(f"no '{name} masks page k' layers (IAUNet prediction makes them)")
            labels = np.stack([np.asarray(p.data) for p in pages])
        else:
            if self.labels.value not in self.viewer.layers:
                raise ValueError("select a labels layer")
            labels = np.asarray(self.viewer.layers[self.labels.value].data)
        if labels.shape[-2:] != image.shape[:2] or labels.ndim not in (2, 3):
            raise ValueError(
                f"labels of shape {labels.shape} do not fit image '{name}' of {image.shape[:2]}"
            )
        if not labels.any():
            raise ValueError(f"the labels of '{name}' are empty: annotate the objects first")
        return name, image, labels

    def add_to_training_set(self, *_) -> Optional[str]:
        """Save the image and its labels into the training folder (a name not used yet)."""
        try:
            name, image, labels = self._pair()
            folder = _path(self.folder.value) or "iaunet_training"
            stem, k = "".join(c if c.isalnum() or c in "-_" else "_" for c in name), 1
            while os.path.exists(os.path.join(folder, f"{stem}.tif")):
                k += 1
                stem = f"{stem.rsplit('__', 1)[0]}__{k}"
            path = write_pair(folder, stem, image, labels)
        except (ValueError, OSError) as e:
            self._error(e)
            return None
        count = len(read_training_folder(folder)[0])
        self.status.value = f"added {os.path.basename(path)}: {count} image(s) in {folder}"
        return path

    def _weights(self) -> Optional[str]:
        if self.source.value == START_MODEL:
            return None  # the small config's MODEL.WEIGHTS, as train_net.py uses it
        if self.source.value == PREDICTION_MODEL:
            predict = next(
                (w for w in _dock_widgets(self.viewer) if isinstance(w, PredictWidget)), None
            )
            weights = _path(predict.weights.value) if predict is not None else ""
            if not weights:
                raise ValueError("the prediction widget has no model file")
            return weights
        weights = _path(self.weights.value)
        if not os.path.isfile(weights):
            raise ValueError(f"model file not found: {weights or '(none selected)'}")
        return weights

    def run(self, *_, opts=()) -> None:
        """Train on the training folder's images (no-op while training); ``opts``: config
        overrides (tests)."""
        if self.worker is not None:
            return
        try:
            images, labels = read_training_folder(_path(self.folder.value) or "iaunet_training")
            if not images:
                raise ValueError("the training folder is empty: Add to training set first")
            weights = self._weights()
            root = _path(self.output.value) or "iaunet_runs"
            k = 1
            while os.path.exists(os.path.join(root, f"run_{k:03d}")):
                k += 1
            output = os.path.join(root, f"run_{k:03d}")
        except (ValueError, OSError) as e:
            self._error(e)
            return
        self._stop.clear()
        self.train_button.enabled, self.stop_button.enabled = False, True
        self.progress.value, self.status.value = 0, f"training in {output}..."
        self.worker = self._work(images, labels, output, weights, list(opts))
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._trained)
        self.worker.errored.connect(self._error)
        self.worker.finished.connect(self._done)
        self.worker.start()

    def stop(self, *_) -> None:
        """Stop training after the current step; the checkpoint written then is kept."""
        self._stop.set()
        self.status.value = "stopping after this step..."

    @thread_worker
    def _work(self, images, labels, output: str, weights: Optional[str], opts: List[str]):
        steps: List[Dict] = []
        done = threading.Event()
        result: Dict = {}

        def run():
            try:
                result["path"] = train(
                    images, labels, output, weights=weights, max_iter=self.iterations.value,
                    progress=steps.append, stop=self._stop, opts=opts,
                )  # fmt: skip
            except BaseException as e:  # reported in the widget
                result["error"] = e
            finally:
                done.set()

        # iaunet.train runs in its own thread so that this generator can report its steps
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while not done.wait(0.2):
            while steps:
                yield steps.pop(0)
        thread.join()
        while steps:
            yield steps.pop(0)
        if "error" in result:
            raise result["error"]
        return result["path"]

    def _on_progress(self, p: Dict) -> None:
        self.progress.max = p["max_iter"]
        self.progress.value = p["iteration"]
        self.status.value = (
            f"iteration {p['iteration']}/{p['max_iter']}, loss {p['loss']:.3f}, "
            f"ETA {p['eta_s'] / 60:.1f} min"
        )

    def _trained(self, path: str) -> None:
        self.last_model = path
        summary = f"model: {path}"
        results = os.path.join(os.path.dirname(path), "final_results.json")
        if os.path.isfile(results):  # held-out images (or 20 % of the training set)
            with open(results) as f:
                matching = json.load(f).get("matching", {})
            if matching:
                summary += (
                    f"; held out: F1@0.5 {matching.get('F1@0.5', float('nan')):.1f}, "
                    f"predicted/true {matching.get('count_ratio', float('nan')):.2f}"
                )
        for widget in _dock_widgets(self.viewer):  # the next prediction uses the new model
            if isinstance(widget, PredictWidget):
                widget.weights.value = path
        self.status.value = summary

    def _error(self, e: BaseException) -> None:
        self.status.value = f"error: {e}"
        logger.error(f"IAUNet training: {e}")
        napari.utils.notifications.show_error(f"IAUNet: {e}")

    def _done(self) -> None:
        self.worker = None
        self.train_button.enabled, self.stop_button.enabled = True, False


def _dock_widgets(viewer) -> List:
    """The widgets docked in ``viewer`` (the prediction widget among them): napari's
    ``Window.dock_widgets`` (0.6.2+; the inner widgets), else the docks' magicgui widgets."""
    mapping = getattr(viewer.window, "dock_widgets", None)
    if mapping is not None:
        return list(mapping.values())
    docks = getattr(viewer.window, "_dock_widgets", {}).values()
    return [getattr(d.widget(), "_magic_widget", d.widget()) for d in docks]
