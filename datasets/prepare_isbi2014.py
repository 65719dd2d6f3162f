#!/usr/bin/env python3
"""Convert the ISBI 2014 Overlapping Cervical Cytology challenge (synthetic set) to COCO JSON.

Input (``--src``), the MATLAB files of the release (cs.adelaide.edu.au/~carneiro/isbi14_challenge),
in either naming:

* challenge files: ``isbi_train.mat`` (``ISBI_Train``, 45 images) + ``isbi_train_GT.mat``
  (``train_Cytoplasm``: per image a cell array of cytoplasm masks; ``train_Nuclei``: per image one
  mask of all nuclei), ``isbi_test90.mat`` + ``isbi_test90_GT.mat`` (``test_*``), and the full test
  set ``testset.mat`` + ``testset_GT.mat`` (900 images, MATLAB v7.3 / HDF5; the first 90 are
  ``test90``);
* the later ``Dataset/Synthetic`` naming: ``trainset.mat`` + ``trainset_GT.mat``, ``testset.mat`` +
  ``testset_GT.mat``.

Output (``--out``, default ``$DETECTRON2_DATASETS/isbi2014``), the thesis split 45 / 90 / 810::

    isbi_train/images/train_000.png ...   isbi_train/annotations/isbi_train.json
    isbi_val/...    (test images 0-89)    isbi_test/...  (test images 90-899)

Each cytoplasm mask is one instance (category 1 "cytoplasm"); nuclei masks are split into connected
components (category 2 "nucleus"). Masks are stored as COCO RLE, so overlapping cells keep their
full extent. The conversion is deterministic. v7.3 files need ``h5py``.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from scipy import ndimage

CATEGORIES = [{"id": 1, "name": "cytoplasm"}, {"id": 2, "name": "nucleus"}]
NUM_VAL = 90  # the first 90 test images are the challenge's "test90" set: the thesis validation split

# image, cytoplasm masks, nucleus masks
Sample = Tuple[np.ndarray, List[np.ndarray], List[np.ndarray]]


def _from_scipy(value):
    """scipy.io.loadmat value -> numpy array, or (nested) list for MATLAB cell arrays (linear
    order)."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_from_scipy(v) for v in value.ravel(order="F")]
    return np.asarray(value)


def _from_h5(f, obj):
    """MATLAB v7.3 (HDF5) dataset -> numpy array in MATLAB orientation, or list for cell arrays."""
    import h5py

    if obj.attrs.get("MATLAB_empty", 0):
        return np.zeros((0, 0))
    data = obj[()]
    if h5py.check_dtype(ref=obj.dtype) is not None:
        # HDF5 stores MATLAB arrays transposed, so C order over the stored shape is MATLAB's linear
        # order.
        return [_from_h5(f, f[ref]) for ref in np.asarray(data).ravel()]
    return np.asarray(data).T


def load_mat(path: str) -> Dict[str, object]:
    """All variables of a .mat file (v5 through scipy, v7.3 through h5py)."""
    from scipy.io import loadmat

    try:
        return {k: _from_scipy(v) for k, v in loadmat(path).items() if not k.startswith("__")}
    except (NotImplementedError, ValueError):  # MATLAB v7.3 is HDF5, which scipy does not read
        try:
            import h5py
        except ImportError:
            sys.exit(f"{path} is not a MATLAB v5 file; if it is v7.3 (HDF5), install h5py: pip install h5py")
        if not h5py.is_hdf5(path):
            raise
        with h5py.File(path, "r") as f:
            return {k: _from_h5(f, f[k]) for k in f.keys() if not k.startswith("#")}


def _variable(variables: Dict[str, object], path: str, suffix: str = "") -> object:
    """The variable whose name ends with ``suffix`` (or the only one when ``suffix`` is empty)."""
    names = [k for k in variables if k.endswith(suffix)] if suffix else list(variables)
    names = [k for k in names if isinstance(variables[k], list)]  # images / masks are cell arrays
    if len(names) != 1:
        raise ValueError(f"{path}: expected one cell-array variable ending with '{suffix}', found {names}")
    return variables[names[0]]


def _as_list(cell) -> List[np.ndarray]:
    """A cell array (possibly nested one level, as loadmat returns N x 1 cells) -> flat list of
    arrays."""
    out = []
    for c in cell if isinstance(cell, list) else [cell]:
        out.extend(_as_list(c) if isinstance(c, list) else [np.asarray(c)])
    return out


def _nuclei_instances(nuclei) -> List[np.ndarray]:
    """One mask with all nuclei (release format) -> one mask per connected component; lists pass
    through."""
    masks = _as_list(nuclei)
    if len(masks) != 1:
        return [m > 0 for m in masks]
    labels, n = ndimage.label(masks[0] > 0, structure=np.ones((3, 3)))
    return [labels == i for i in range(1, n + 1)]


def read_set(src: str, images_file: str, gt_file: str) -> List[Sample]:
    """Images and ground truth of one .mat pair."""
    images = _as_list(_variable(load_mat(os.path.join(src, images_file)), images_file))
    gt = load_mat(os.path.join(src, gt_file))
    cyto = _variable(gt, gt_file, "_Cytoplasm")
    nuclei = _variable(gt, gt_file, "_Nuclei")
    if not (len(images) == len(cyto) == len(nuclei)):
        raise ValueError(f"{images_file}/{gt_file}: {len(images)} images, {len(cyto)} cytoplasm and "
                         f"{len(nuclei)} nuclei entries")
    return [(img, [m > 0 for m in _as_list(c)], _nuclei_instances(n)) for img, c, n in zip(images, cyto, nuclei)]


def read_release(src: str) -> Dict[str, List[Sample]]:
    """The three thesis splits from whichever file naming ``src`` holds."""
    exists = lambda name: os.path.isfile(os.path.join(src, name))  # noqa: E731
    if exists("isbi_train.mat"):
        splits = {"train": read_set(src, "isbi_train.mat", "isbi_train_GT.mat")}
    elif exists("trainset.mat"):
        splits = {"train": read_set(src, "trainset.mat", "trainset_GT.mat")}
    else:
        raise FileNotFoundError(f"{src}: neither isbi_train.mat nor trainset.mat found (see the script docstring)")
    if exists("testset.mat"):
        test = read_set(src, "testset.mat", "testset_GT.mat")
        splits["val"], splits["test"] = test[:NUM_VAL], test[NUM_VAL:]
    elif exists("isbi_test90.mat"):
        splits["val"] = read_set(src, "isbi_test90.mat", "isbi_test90_GT.mat")
        print(f"warning: {src} has no testset.mat; only train and val are written", file=sys.stderr)
    return splits


def to_png_array(img: np.ndarray) -> np.ndarray:
    """uint8/uint16 stay; floats in [0, 1] are scaled to 0..255; other floats are clipped to
    0..255."""
    img = np.asarray(img)
    if img.dtype in (np.uint8, np.uint16):
        return img
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    img = img.astype(np.float64)
    if img.max() <= 1.0:
        img = img * 255.0
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def encode(mask: np.ndarray) -> Dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_split(samples: Sequence[Sample], split: str, out: str) -> str:
    """Write images and the COCO json of one split; return the json path."""
    image_dir = os.path.join(out, f"isbi_{split}", "images")
    ann_dir = os.path.join(out, f"isbi_{split}", "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": CATEGORIES}
    for idx, (img, cytoplasm, nuclei) in enumerate(samples):
        file_name = f"{split}_{idx:03d}.png"
        img = to_png_array(img)
        cv2.imwrite(os.path.join(image_dir, file_name), img)
        image_id = idx + 1
        coco["images"].append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})
        for category_id, masks in ((1, cytoplasm), (2, nuclei)):
            for mask in masks:
                if mask.shape != img.shape[:2]:
                    raise ValueError(f"{split} image {idx}: mask shape {mask.shape} != image shape {img.shape[:2]}")
                if not mask.any():
                    continue
                rle = encode(mask)
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": rle,
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": 0,
                })
    path = os.path.join(ann_dir, f"isbi_{split}.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Convert ``--src`` into ``--out``; return {split: json path}."""
    default_out = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "isbi2014")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="folder with the challenge .mat files")
    parser.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    args = parser.parse_args(argv)
    written = {}
    for split, samples in read_release(args.src).items():
        written[split] = write_split(samples, split, args.out)
        print(f"{split}: {len(samples)} images -> {written[split]}")
    return written


if __name__ == "__main__":
    main()
