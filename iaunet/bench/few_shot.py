"""Few-shot benchmark on real nuclei: folds, a classical baseline, a peer trained the same way, and
the metrics users read from a label image (``tools/benchmark_few_shot.py``).

The image is the DSB2018 fluorescence-nuclei image (512 x 512, with its label mask) that the
StarDist wheel ships as example data (CC0; ``stardist/data/images/img2d.tif`` and ``mask2d.tif``).
It is split into four 256 x 256 quadrants; fold ``k`` trains on the other three and tests on
quadrant ``k``. Each method is scored on the test quadrant by

* COCO segm AP / AP50 / AP75 (pycocotools, the label image's objects as ground truth);
* matching precision, recall and F1 at IoU 0.5 and the predicted / true count
  (:mod:`iaunet.evaluation.matching`), from the label image the method writes.

Otsu + watershed (scikit-image) is the no-training baseline; Cellpose 3 (``cellpose==3.1.*``) and
StarDist 2D (``stardist==0.9.2`` on ``tensorflow-cpu``), each trained from scratch on the same three
images for the same CPU seconds, are the peers (the ``fewshot`` extra).
"""

import contextlib
import glob
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import tifffile

from ..evaluation.matching import image_counts, summarize
from ..evaluation.matching import label_image_rles as label_rles

logger = logging.getLogger(__name__)

STARDIST = "stardist==0.9.2"
STARDIST_FILES = ("stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif")
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def stardist_nuclei(cache: str) -> Tuple[np.ndarray, np.ndarray]:
    """The DSB2018 image and its label mask from the StarDist wheel, downloaded (``pip download
    --no-deps``) into ``cache`` once. Returns (image uint16 (512, 512), labels (512, 512))."""
    os.makedirs(cache, exist_ok=True)
    paths = [os.path.join(cache, os.path.basename(f)) for f in STARDIST_FILES]
    if not all(os.path.isfile(p) for p in paths):
        wheels = glob.glob(os.path.join(cache, "stardist-0.9.2-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", cache, STARDIST]
            logger.info("$ " + " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = glob.glob(os.path.join(cache, "stardist-0.9.2-*.whl"))
            if proc.returncode or not wheels:
                raise RuntimeError(
                    f"cannot download {STARDIST} (pip download, exit {proc.returncode}): "
                    f"{proc.stderr.strip()[-500:]}; or give --image and --labels"
                )
        with zipfile.ZipFile(wheels[0]) as z:
            for member, path in zip(STARDIST_FILES, paths):
                with open(path + ".tmp", "wb") as f:
                    f.write(z.read(member))
                os.replace(path + ".tmp", path)
    return tifffile.imread(paths[0]), tifffile.imread(paths[1])


def quadrants(shape: Tuple[int, int]) -> List[Tuple[slice, slice]]:
    """The four quadrants (top left, top right, bottom left, bottom right) of an image."""
    h, w = shape[:2]
    rows, cols = (slice(0, h // 2), slice(h // 2, h)), (slice(0, w // 2), slice(w // 2, w))
    return [(r, c) for r in rows for c in cols]


def relabel(labels: np.ndarray) -> np.ndarray:
    """Ids 1..N in order of first appearance (uint16)."""
    ids = [i for i in np.unique(labels) if i]
    out = np.zeros(labels.shape, np.uint16)
    for new, old in enumerate(ids, 1):
        out[labels == old] = new
    return out


VARIANT_KEYS = ("scale", "rotate", "gamma", "gain", "noise", "seed")


def parse_variant(spec: str) -> Dict[str, float]:
    """``"scale=1.5,gamma=1.4"`` -> {"scale": 1.5, "gamma": 1.4}; unknown keys and values that are
    no numbers are errors naming them."""
    out: Dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in VARIANT_KEYS:
            raise ValueError(
                f"--variant {spec!r}: {item!r} is not KEY=NUMBER, KEY one of {VARIANT_KEYS}"
            )
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--variant {spec!r}: {value!r} of {key} is not a number") from None
    return out


def image_variant(
    image: np.ndarray, labels: np.ndarray, spec: Dict[str, float]
) -> Tuple[np.ndarray, np.ndarray]:
    """Another version of an annotated image, for checking that settings chosen on one image carry
    to images they were not chosen on: resized by ``scale`` (image bilinear, labels nearest),
    rotated by ``rotate`` degrees and cut to the largest axis-aligned square inside the rotated
    image (no padded corners), intensities of the image's own range mapped by ``gamma`` and
    ``gain`` (another exposure), Gaussian noise of ``noise`` (in units of 1 % of the range, seeded
    by ``seed``). Returns the image in its dtype and the relabelled label image (uint16)."""
    from scipy import ndimage as ndi

    img = image.astype(np.float32)
    lab = labels.astype(np.int64)
    scale = spec.get("scale", 1.0)
    if scale != 1.0:
        img = ndi.zoom(img, (scale, scale) + (1,) * (img.ndim - 2), order=1)
        lab = ndi.zoom(lab, scale, order=0)
    angle = spec.get("rotate", 0.0)
    if angle % 360:
        h, w = lab.shape
        img = ndi.rotate(img, angle, axes=(1, 0), reshape=True, order=1)
        lab = ndi.rotate(lab, angle, axes=(1, 0), reshape=True, order=0)
        t = np.deg2rad(angle % 90)
        side = int(min(h, w) / (np.cos(t) + np.sin(t)))  # the square inside a rotated square
        y0, x0 = (lab.shape[0] - side) // 2, (lab.shape[1] - side) // 2
        img, lab = img[y0 : y0 + side, x0 : x0 + side], lab[y0 : y0 + side, x0 : x0 + side]
    lo, hi = float(image.min()), float(image.max())
    norm = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    norm = spec.get("gain", 1.0) * norm ** spec.get("gamma", 1.0)
    if spec.get("noise", 0.0):
        rng = np.random.default_rng(int(spec.get("seed", 0)))
        norm = norm + rng.normal(0, spec["noise"] / 100, norm.shape)
    out = lo + np.clip(norm, 0, 1) * (hi - lo)
    if np.issubdtype(image.dtype, np.integer):
        out = np.round(out)
    return out.astype(image.dtype), relabel(lab)


def write_folds(image: np.ndarray, labels: np.ndarray, root: str) -> List[Dict[str, str]]:
    """``root/fold<k>/{train,val}/<quadrant>.tif`` + ``<quadrant>_labels.tif``: fold ``k`` tests
    on quadrant ``k`` and trains on the other three (the README's folder layout)."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in size")
    parts = [(image[s], relabel(labels[s])) for s in quadrants(labels.shape)]
    folds = []
    for k in range(len(parts)):
        fold = {"name": f"fold{k}", "test": QUADRANTS[k]}
        for split in ("train", "val"):
            folder = os.path.join(root, fold["name"], split)
            os.makedirs(folder, exist_ok=True)
            for q, (img, lab) in enumerate(parts):
                if (q == k) == (split == "val"):
                    tifffile.imwrite(os.path.join(folder, f"{QUADRANTS[q]}.tif"), img)
                    tifffile.imwrite(os.path.join(folder, f"{QUADRANTS[q]}_labels.tif"), lab)
            fold[split] = folder
        folds.append(fold)
    return folds


def read_folder(folder: str) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """(stem, image, labels) of every ``<stem>.tif`` + ``<stem>_labels.tif`` in ``folder``."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.tif"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        if not stem.endswith("_labels"):
            labels = tifffile.imread(os.path.join(folder, f"{stem}_labels.tif"))
            out.append((stem, tifffile.imread(path), labels))
    return out


def segm_ap(gt: Sequence[Sequence[dict]], pred: Sequence[Sequence[Tuple[dict, float]]]) -> Dict:
    """COCO segm AP, AP50, AP75 (in %) of per-image predictions ``(rle, score)`` against per-image
    ground-truth RLEs, with pycocotools (max detections: enough for every prediction)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, (g, p) in enumerate(zip(gt, pred)):
        h, w = g[0]["size"] if g else p[0][0]["size"]
        images.append({"id": i, "height": h, "width": w})
        for rle in g:
            box = mask_util.toBbox(rle).tolist()
            area = float(mask_util.area(rle))
            anns.append(
                {"id": len(anns) + 1, "image_id": i, "category_id": 1, "segmentation": rle,
                 "area": area, "bbox": box, "iscrowd": 0}
            )  # fmt: skip
        for rle, score in p:
            results.append(
                {"image_id": i, "category_id": 1, "segmentation": rle, "score": float(score)}
            )
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), iouType="segm")
        ev.params.maxDets = [1, 10, max(max(len(p) for p in pred), 100)]
        ev.evaluate()
        ev.accumulate()
    # From the precision table, not ev.stats: summarize()'s first figure is read at maxDets 100
    # and is -1 whenever the last maxDets is not 100 (more than 100 predictions in an image).
    prec = ev.eval["precision"][:, :, 0, 0, -1]  # IoU thresholds x recall points (all areas)

    def ap(rows: np.ndarray) -> float:
        valid = rows[rows > -1]
        return 100 * float(valid.mean()) if valid.size else -100.0

    return {"AP": ap(prec), "AP50": ap(prec[0]), "AP75": ap(prec[5])}


def label_image_matching(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> Dict:
    """Precision, recall, F1 at IoU 0.5 and predicted / true count of label images (one id per
    object, 0 = background), counts summed over the images."""
    counts, n_gt, n_pred = 0, 0, 0
    for g, p in zip(gt, pred):
        if g.shape != p.shape:
            raise ValueError(f"label images differ in size: {g.shape} and {p.shape}")
        g_rles, p_rles = label_rles(g), label_rles(p)
        counts = counts + image_counts(g_rles, p_rles, taus=(0.5,))
        n_gt, n_pred = n_gt + len(g_rles), n_pred + len(p_rles)
    res = summarize(np.asarray(counts, float).reshape(1, 4), n_gt, n_pred, taus=(0.5,))
    return {
        "precision": res["precision@0.5"],
        "recall": res["recall@0.5"],
        "F1": res["F1@0.5"],
        "count_ratio": res["count_ratio"],
    }


def score_label_images(
    gt: Sequence[np.ndarray], pred: Sequence[np.ndarray], scores: Optional[Sequence] = None
) -> Dict:
    """AP (objects of ``pred`` scored by ``scores[i][id - 1]``, or all 1) and matching metrics."""
    pairs = []
    for k, p in enumerate(pred):
        ids = [i for i in np.unique(p) if i]
        s = [1.0] * len(ids) if scores is None else [scores[k][i - 1] for i in ids]
        pairs.append(list(zip(label_rles(p), s)))
    return {**segm_ap([label_rles(g) for g in gt], pairs), **label_image_matching(gt, pred)}


def otsu_watershed(image: np.ndarray, diameter: float) -> np.ndarray:
    """Classical nuclei segmentation (no training): Gaussian smoothing (sigma 1), Otsu threshold,
    holes filled and specks below a tenth of the typical object removed, then a watershed of the
    distance transform seeded at its maxima at least ``diameter / 4`` apart."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    img = gaussian(image.astype(np.float32), sigma=1, preserve_range=True)
    fg = ndi.binary_fill_holes(img > threshold_otsu(img))
    blobs, _ = ndi.label(fg)
    fg &= (np.bincount(blobs.ravel()) >= 0.1 * np.pi * diameter**2 / 4)[blobs]
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=max(1, int(diameter / 4)), labels=ndi.label(fg)[0])
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return relabel(watershed(-dist, markers, mask=fg))


def median_diameter(labels: Sequence[np.ndarray]) -> float:
    """Median equivalent-circle diameter of the objects of label images."""
    areas = [np.bincount(lab.ravel())[1:] for lab in labels]
    areas = np.concatenate([a[a > 0] for a in areas])
    return float(np.median(2 * np.sqrt(areas / np.pi)))


def available(module: str) -> bool:
    """``module`` is installed (a peer's optional package: the ``fewshot`` extra); found, not
    imported (StarDist would bring TensorFlow into this process)."""
    return importlib.util.find_spec(module) is not None


def units_for_budget(
    cost: Callable[[int], float], cpu_seconds: float, probe: Tuple[int, int]
) -> Tuple[int, float, float]:
    """How many units (epochs, iterations) of a training run fit in ``cpu_seconds``: ``cost(n)``
    runs n units and returns its CPU seconds; two short runs of ``probe`` units time one unit by
    their difference, so that the fixed cost of a run (set-up, data, thresholds, saving) is kept
    apart. Returns (units, CPU seconds per unit, fixed CPU seconds of a run)."""
    a, b = probe
    ca, cb = cost(a), cost(b)
    per = max(cb - ca, 1e-3) / (b - a)
    fixed = max(ca - a * per, 0.0)
    return max(1, int(round((cpu_seconds - fixed) / per))), per, fixed


CELLPOSE_LR = 0.005  # train_seg's default learning rate


def cellpose_final_lr(epochs: int) -> float:
    """The learning rate at the end of ``train_seg``'s schedule for ``epochs`` epochs (halved ten
    times over the last 100 epochs beyond 300, over the last 50 beyond 100; cellpose/train.py)."""
    return CELLPOSE_LR * (0.5**10 if epochs > 100 else 1.0)


def train_cellpose(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    cpu_seconds: float,
    work: str,
    probe_epochs: Tuple[int, int] = (1, 4),
    max_epochs: Optional[int] = None,
) -> Tuple[object, Dict]:
    """Cellpose 3 trained from scratch (its ``train_seg`` with its defaults) for ``cpu_seconds`` of
    CPU time: epochs from :func:`units_for_budget`; a fresh network trains them (its learning-rate
    schedule follows the epoch count), and when that run spent less than 95 % of the budget the
    trained network goes on for the epochs left at its final learning rate (a top-up). Returns
    (model, {"epochs", "topup_epochs", "cpu_s", "wall_s"})."""
    from cellpose import models, train

    data, masks = [np.asarray(i, np.float32) for i in images], [np.asarray(m) for m in labels]
    os.makedirs(work, exist_ok=True)

    def run(epochs: int, name: str, start: str = "", lr: float = CELLPOSE_LR):
        model = models.CellposeModel(
            gpu=False, pretrained_model=start or False, model_type=None
        )  # fresh unless ``start``
        c0, t0 = time.process_time(), time.time()
        path = train.train_seg(
            model.net, train_data=data, train_labels=masks, channels=[0, 0], n_epochs=epochs,
            save_path=work, model_name=name, min_train_masks=1, learning_rate=lr,
        )  # fmt: skip
        path = path[0] if isinstance(path, tuple) else path
        return str(path), time.process_time() - c0, time.time() - t0

    epochs, per, fixed = units_for_budget(lambda n: run(n, "probe")[1], cpu_seconds, probe_epochs)
    if max_epochs:
        epochs = min(epochs, max_epochs)
    path, cpu, wall = run(epochs, "cellpose_scratch")
    topup = int((cpu_seconds - cpu - fixed) / per) if not max_epochs else 0
    if cpu < 0.95 * cpu_seconds and topup >= 1:
        path, c, w = run(topup, "cellpose_scratch_topup", path, cellpose_final_lr(epochs))
        cpu, wall = cpu + c, wall + w
    else:
        topup = 0
    model = models.CellposeModel(gpu=False, pretrained_model=path)
    return model, {"epochs": epochs, "topup_epochs": topup, "cpu_s": cpu, "wall_s": wall}


def cellpose_labels(model, image: np.ndarray, augment: bool = False) -> np.ndarray:
    """Cellpose's label image of ``image`` (the diameter it learned, its default thresholds;
    ``augment``: its overlapping flipped tiles)."""
    masks = model.eval(
        np.asarray(image, np.float32), channels=[0, 0], diameter=None, augment=augment
    )[0]
    return relabel(masks)


def run_stardist(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    tests: Sequence[np.ndarray],
    cpu_seconds: float,
    work: str,
    max_epochs: Optional[int] = None,
) -> Tuple[List[np.ndarray], Dict]:
    """StarDist 2D trained from scratch for ``cpu_seconds`` and run on ``tests``, in its own
    process (:mod:`iaunet.bench.stardist_peer`: TensorFlow stays out of this one, where it may
    clash with what is loaded already). Returns (label images of ``tests``, {"epochs", "cpu_s",
    "wall_s", "pred_cpu_s"})."""
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data.npz")
    arrays = {f"image_{i}": a for i, a in enumerate(images)}
    arrays.update({f"labels_{i}": a for i, a in enumerate(labels)})
    arrays.update({f"test_{i}": a for i, a in enumerate(tests)})
    np.savez(data, **arrays)
    cmd = [sys.executable, "-m", "iaunet.bench.stardist_peer", data, work, str(cpu_seconds)]
    cmd += [str(max_epochs or 0)]
    with open(os.path.join(work, "stardist.log"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"StarDist failed (exit {proc.returncode}): see {work}/stardist.log")
    with np.load(os.path.join(work, "predictions.npz")) as z:
        predicted = [z[f"labels_{i}"] for i in range(len(tests))]
    with open(os.path.join(work, "info.json")) as f:
        return predicted, json.load(f)
