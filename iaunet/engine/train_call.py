"""``iaunet.train``: training on numpy arrays, for notebooks and the napari training widget.

The arrays are written in the README's folder layout under ``<output_dir>/data/`` (``train/`` and,
with validation arrays, ``val/``: ``img_000.tif`` with ``img_000_labels.tif``, or
``img_000_masks.tif`` for label pages of overlapping objects), and the folder is trained exactly
as ``train_net.py`` trains it -- the same small config, auto-sizing, trainer, hooks and final
evaluation; the equivalent command is logged and saved as ``<output_dir>/train_command.txt``, so
the run can be repeated from a terminal. There is no second training loop.

Example::

    import iaunet
    checkpoint = iaunet.train(images, labels, "runs/nuclei", max_iter=300,
                              progress=lambda p: print(p["iteration"], p["eta_s"], p["loss"]))
    predictor = iaunet.inference.IAUNetPredictor.from_checkpoint(checkpoint)
"""

import argparse
import json
import logging
import os
import shlex
import time
import weakref
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import tifffile
from detectron2.engine import HookBase

from ..outputs.masks import pages_tiff_bytes
from ..utils.atomic import atomic_write
from .hooks import PreemptionHook
from .stopping import EXIT_PREEMPTED, TrainingStopped, clear_stop, request_stop
from .trainer import Trainer, setup

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL_CONFIG = os.path.join(REPO, "configs", "custom", "iaunet_small.yaml")


def _check_image(name: str, image: np.ndarray, channels: Sequence[str] = ()) -> np.ndarray:
    image = np.asarray(image)
    if channels and (image.ndim != 3 or image.shape[2] != len(channels)):
        raise ValueError(
            f"{name}: shape {image.shape}; expected (H, W, {len(channels)}): the channels "
            f"{tuple(channels)}, last"
        )
    if image.ndim == 3 and (image.shape[2] in (1, 3, 4) or channels):
        return image
    if image.ndim != 2 or image.dtype == bool or not np.issubdtype(image.dtype, np.number):
        raise ValueError(
            f"{name}: a {image.ndim}-D {image.dtype} array of shape {image.shape}; expected a "
            "2-D gray or (H, W, 1|3|4) image of numbers (one plane of a stack, not the stack)"
        )
    return image


def _check_labels(name: str, labels: np.ndarray, size) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or labels.shape[-2:] != tuple(size):
        raise ValueError(
            f"{name}: labels of shape {labels.shape} for an image of {tuple(size)}; expected "
            "a label image (H, W) or label pages (P, H, W) of the image's size"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool:
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
            raise ValueError(
                f"{name}: labels of type {labels.dtype}; expected integer object ids "
                "(0 = background), e.g. a napari Labels layer"
            )
    if labels.min() < 0:
        raise ValueError(f"{name}: negative label ids")
    return labels.astype(np.uint32 if labels.max() > 65535 else np.uint16)


def write_training_folder(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    folder: str,
    what: str = "image",
    channels: Sequence[str] = (),
) -> List[str]:
    """Write ``images`` and their ``labels`` (label images (H, W), or label pages (P, H, W) of
    overlapping objects, as ``iaunet-predict`` writes ``_masks.tif``) into ``folder`` in the
    README's layout; the paths of the images. With ``channels`` (names), (H, W, C) images are
    written as OME-TIFF ``CYX`` with those channel names. ValueError naming the image at fault
    (sizes, types, no object in any of them)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} {what}s but {len(labels)} label images")
    if not len(images):
        raise ValueError(f"no {what}s to train on")
    checked = []
    for i, (image, lab) in enumerate(zip(images, labels)):
        image = _check_image(f"{what} {i}", image, channels)
        checked.append((image, _check_labels(f"{what} {i}", lab, image.shape[:2])))
    if not any(lab.any() for _, lab in checked):
        raise ValueError(f"no object in any label image of the {what}s: annotate some first")
    return [
        _write(folder, f"img_{i:03d}", image, lab, channels)
        for i, (image, lab) in enumerate(checked)
    ]


def write_pair(folder: str, stem: str, image: np.ndarray, labels: np.ndarray) -> str:
    """``<folder>/<stem>.tif`` and its annotation, ``_labels.tif`` (a label image) or
    ``_masks.tif`` (label pages), each written atomically; the image's path. Checks as
    :func:`write_training_folder`."""
    image = _check_image(stem, image)
    return _write(folder, stem, image, _check_labels(stem, labels, image.shape[:2]))


def _write(
    folder: str, stem: str, image: np.ndarray, labels: np.ndarray, channels: Sequence[str] = ()
) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, stem)
    if channels:
        meta = {"axes": "CYX", "Channel": {"Name": [str(c) for c in channels]}}
        cyx = np.ascontiguousarray(np.moveaxis(image, -1, 0))
        atomic_write(path + ".tif", lambda f: tifffile.imwrite(f, cyx, ome=True, metadata=meta))
    else:
        atomic_write(path + ".tif", lambda f: tifffile.imwrite(f, image))
    if labels.ndim == 3:
        atomic_write(path + "_masks.tif", pages_tiff_bytes(labels))
    else:
        atomic_write(path + "_labels.tif", lambda f: tifffile.imwrite(f, labels))
    return path + ".tif"


class CallbackHook(HookBase):
    """Reports each step to ``progress({"iteration", "max_iter", "eta_s", "loss"})`` and turns
    ``stop`` (a callable returning True, or an object with ``is_set()`` such as a
    ``threading.Event``) into a stop request: a checkpoint of that iteration, then the run ends
    (``PreemptionHook``)."""

    def __init__(self, progress: Optional[Callable[[Dict], None]], stop=None):
        self.progress, self.stop = progress, stop

    def before_train(self):
        self._t0, self._start = time.perf_counter(), self.trainer.iter + 1

    def after_step(self):
        it, total = self.trainer.iter + 1, self.trainer.max_iter
        if self.progress is not None:
            per = (time.perf_counter() - self._t0) / max(1, it - self._start + 1)
            history = self.trainer.storage.histories().get("total_loss")
            loss = float(history.latest()) if history is not None else float("nan")
            self.progress(
                {"iteration": it, "max_iter": total, "eta_s": per * (total - it), "loss": loss}
            )
        if self.stop is not None and (
            self.stop.is_set() if hasattr(self.stop, "is_set") else self.stop()
        ):
            request_stop()


def train(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    output_dir: str,
    *,
    weights: Optional[str] = None,
    val_images: Optional[Sequence[np.ndarray]] = None,
    val_labels: Optional[Sequence[np.ndarray]] = None,
    max_iter: int = 0,
    progress: Optional[Callable[[Dict], None]] = None,
    stop=None,
    config_file: str = SMALL_CONFIG,
    opts: Sequence[str] = (),
    channels: Sequence[str] = (),
) -> str:
    """Train IAUNet on ``images`` and their ``labels`` (module docstring) into ``output_dir``; the
    path of the checkpoint, which loads wherever a checkpoint loads (``iaunet-predict``,
    ``IAUNetPredictor``, napari).

    ``weights``: the starting model (default: the config's, the model of
    ``configs/synthetic/iaunet_start.yaml``). ``val_images`` / ``val_labels``: held-out images,
    evaluated at the end (AP, F1, count); without them 20 % of the images are held out, as with
    ``train_net.py``. ``max_iter``: 0 sizes
    the run from the data (``SOLVER.MAX_ITER`` auto). ``progress``: called after each step with
    ``{"iteration", "max_iter", "eta_s", "loss"}``. ``stop``: a ``threading.Event`` (or a callable)
    that, once set, ends training after the current step with a checkpoint, whose path is
    returned. ``config_file`` / ``opts``: the config and ``KEY VALUE`` overrides, as on the command
    line. ``channels``: the names of the channels of (H, W, C) images, in order (e.g. ``("cyto",
    "nuclei")``): the images are written with those names and the model takes them
    (``INPUT.CHANNELS``), from any file that names its channels so. Raises ValueError (bad
    arrays), ConfigError (bad key, missing starting model) or CheckpointError, each naming what is
    at fault."""
    output_dir = os.path.abspath(output_dir)
    data = os.path.join(output_dir, "data")
    if os.path.isdir(data) and os.listdir(data):
        raise ValueError(f"{output_dir} already holds training data ({data}): give a new folder")
    if (val_images is None) != (val_labels is None):
        raise ValueError("val_images and val_labels go together")
    channels = tuple(str(c) for c in channels)
    write_training_folder(images, labels, os.path.join(data, "train"), channels=channels)
    names = [f"folder:{os.path.join(data, 'train')}"]
    if val_images is not None:
        val = os.path.join(data, "val")
        write_training_folder(val_images, val_labels, val, "val image", channels)
        tests = [f"folder:{os.path.join(data, 'val')}"]
    else:
        tests = []
    overrides = ["OUTPUT_DIR", output_dir, "DATASETS.TRAIN", repr(tuple(names))]
    overrides += ["DATASETS.TEST", repr(tuple(tests))]
    if weights is not None:
        overrides += ["MODEL.WEIGHTS", weights]
    if max_iter:
        overrides += ["SOLVER.MAX_ITER", str(int(max_iter))]
    if channels:
        overrides += ["INPUT.CHANNELS", repr(channels)]
    args = argparse.Namespace(
        config_file=config_file, opts=[*opts, *overrides], eval_only=False, resume=False,
        num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto",
    )  # fmt: skip
    command = shlex.join(["python", "train_net.py", "--config-file", config_file, *args.opts])
    os.makedirs(output_dir, exist_ok=True)
    atomic_write(os.path.join(output_dir, "train_command.txt"), command + "\n")
    logger.info(f"The same training from a terminal: {command}")
    cfg = setup(args)  # ConfigError naming a bad key, file or missing starting model
    clear_stop()
    trainer = Trainer(cfg)
    # before the preemption hook, so that a stop acts after the step that saw it
    hook = CallbackHook(progress, stop)
    hook.trainer = weakref.proxy(trainer)
    at = next(i for i, h in enumerate(trainer._hooks) if isinstance(h, PreemptionHook))
    trainer._hooks.insert(at, hook)
    trainer.resume_or_load(resume=False)
    try:
        trainer.train()
    except TrainingStopped as e:
        if e.code != EXIT_PREEMPTED:
            raise
        logger.warning(f"Training stopped: {e.reason}")
        return trainer.checkpointer.get_checkpoint_file()
    finally:
        clear_stop()
    final = os.path.join(output_dir, "model_final.pth")
    results = getattr(trainer, "_last_eval_results", None)  # the final evaluation's (EvalHook)
    if results:
        atomic_write(os.path.join(output_dir, "final_results.json"), json.dumps(results, indent=1))
    return final
