"""StarDist 2D, the nuclei specialist, as a peer of the few-shot benchmark, in a process of its own
(``python -m iaunet.bench.stardist_peer DATA.npz WORK CPU_SECONDS MAX_EPOCHS``, run by
:func:`iaunet.bench.few_shot.run_stardist`): trained from scratch on the training images of
``DATA.npz`` for ``CPU_SECONDS`` of CPU time, then run on its test images; writes
``WORK/predictions.npz`` (label images) and ``WORK/info.json`` (epochs, CPU seconds of training,
CPU seconds per predicted image). ``stardist==0.9.2`` on ``tensorflow-cpu`` (the ``fewshot``
extra).

"""

import contextlib
import io
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .few_shot import relabel, units_for_budget

# StarDist 2D from scratch as in its example notebook for DSB2018 (stardist/examples/2D/2_training):
# 32 rays, grid 2, patches of 256 px (at most the image), flips / 90-degree rotations and intensity
# jitter, images normalized to their 1-99.8 percentiles, thresholds optimized after training.
STARDIST_STEPS = 25  # steps of a batch of 4 per epoch (its default 100, shortened for budgets)


def _stardist_normalize(image: np.ndarray) -> np.ndarray:
    from csbdeep.utils import normalize

    return normalize(np.asarray(image, np.float32), 1, 99.8, axis=(0, 1))


def _stardist_augment(x: np.ndarray, y: np.ndarray):
    k, flip = np.random.randint(4), np.random.rand() < 0.5
    x, y = np.rot90(x, k), np.rot90(y, k)
    if flip:
        x, y = x[:, ::-1], y[:, ::-1]
    x = x * np.random.uniform(0.6, 2) + np.random.uniform(-0.2, 0.2)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def train_stardist(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    cpu_seconds: float,
    work: str,
    probe_epochs: Tuple[int, int] = (1, 3),
    max_epochs: Optional[int] = None,
) -> Tuple[object, Dict]:
    """StarDist 2D (``stardist==0.9.2``, TensorFlow on the CPU) trained from scratch on the
    images for ``cpu_seconds`` of CPU time (epochs of :data:`STARDIST_STEPS` steps from
    :func:`units_for_budget`), its probability / NMS thresholds optimized on the training images
    (none are held out). Returns (model, {"epochs", "cpu_s", "wall_s"})."""
    import tensorflow as tf
    from stardist.models import Config2D, StarDist2D

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads and not tf.config.threading.get_intra_op_parallelism_threads():
        with contextlib.suppress(RuntimeError):  # already initialized in this process
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
    x = [_stardist_normalize(i) for i in images]
    y = [np.asarray(m, np.int32) for m in labels]
    patch = min(256, *(min(i.shape[:2]) for i in x))
    patch -= patch % 8
    os.makedirs(work, exist_ok=True)

    def run(epochs: int, name: str):
        c0, t0 = time.process_time(), time.time()
        conf = Config2D(
            n_rays=32, grid=(2, 2), n_channel_in=1, train_patch_size=(patch, patch),
            train_batch_size=4, train_steps_per_epoch=STARDIST_STEPS, train_epochs=epochs,
        )  # fmt: skip
        model = StarDist2D(conf, name=name, basedir=work)
        with contextlib.redirect_stdout(io.StringIO()):  # Keras' progress bars
            model.train(x, y, validation_data=(x, y), augmenter=_stardist_augment, epochs=epochs)
            model.optimize_thresholds(x, y)
        return model, time.process_time() - c0, time.time() - t0

    epochs, _, _ = units_for_budget(lambda n: run(n, "probe")[1], cpu_seconds, probe_epochs)
    if max_epochs:
        epochs = min(epochs, max_epochs)
    model, cpu, wall = run(epochs, "stardist_scratch")
    return model, {"epochs": epochs, "cpu_s": cpu, "wall_s": wall}


def stardist_labels(model, image: np.ndarray) -> np.ndarray:
    """StarDist's label image of ``image`` (its optimized thresholds)."""
    return relabel(model.predict_instances(_stardist_normalize(image))[0])


def main(argv: Sequence[str]) -> int:
    data, work, cpu_seconds, max_epochs = argv
    with np.load(data) as z:
        count = lambda prefix: sum(k.startswith(prefix) for k in z.files)  # noqa: E731
        images = [z[f"image_{i}"] for i in range(count("image_"))]
        labels = [z[f"labels_{i}"] for i in range(count("labels_"))]
        tests = [z[f"test_{i}"] for i in range(count("test_"))]
    model, info = train_stardist(
        images, labels, float(cpu_seconds), work, max_epochs=int(max_epochs) or None
    )
    stardist_labels(model, tests[0])  # warm-up: graph building
    c0 = time.process_time()
    predicted = [stardist_labels(model, image) for image in tests]
    info["pred_cpu_s"] = (time.process_time() - c0) / len(tests)
    np.savez(
        os.path.join(work, "predictions.npz"), **{f"labels_{i}": p for i, p in enumerate(predicted)}
    )
    with open(os.path.join(work, "info.json"), "w") as f:
        json.dump(info, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
