"""Datasets named by a path, registered on the fly: ``folder:PATH`` and ``coco:JSON[@IMAGES]``.

``train_net.py ... DATASETS.TRAIN '("folder:my_cells/train",)' DATASETS.TEST
'("folder:my_cells/val",)'`` trains on a folder without any code: ``setup()`` registers every such
name with detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` before anything reads it. The name
is the dataset, so the config saved in a checkpoint says where the model's data came from. Paths
are relative to the working directory (not ``$DETECTRON2_DATASETS``).

**Folder layouts** (docs: README "Train on your own images"). Images are PNG/JPEG/TIFF files
(8/16-bit, float, gray/RGB, as :func:`iaunet.data.read_image` reads them). Either

* flat: ``PATH/img.tif`` with its annotation next to it, ``img_labels.tif|.tiff|.png`` (label
  image), ``img_masks.tif`` (multi-page masks TIFF as ``iaunet-predict`` writes it, or Cellpose's
  one-page ``_masks.tif``) or ``img_rois.zip`` (Fiji ROI set); or
* ``PATH/images/img.tif`` with the annotation in ``PATH/masks/``, ``PATH/labels/`` or
  ``PATH/rois/`` under the image's own name (``img.tif``, ``img.png``, ``img.zip``) or any of the
  names above; or
* whole outlines and visible parts (docs/amodal.md): ``img_masks.tif`` (overlapping whole outlines)
  together with ``img_labels.tif|.png`` (the visible parts, one cell per pixel), read by
  :func:`~iaunet.data.annotations_io.read_whole_and_visible`; or
* z-stacks and time-lapses: ``img.tif`` (a z or t axis) with ``img_labels.tif``, one label plane
  per image plane: one training image per plane (:mod:`.stack_planes`); or
* ``PATH/*.json``: one COCO instances file whose ``file_name`` s are relative to ``PATH`` (or
  ``PATH/images``); the same as ``coco:PATH/that.json``.

Readers and their conventions: :mod:`iaunet.data.annotations_io`. An image without an annotation,
two annotations for one image, an unreadable file or labels of another size is a
:class:`DatasetError` naming the file. An annotation without objects (empty label image, empty ROI
set) is a warning naming it: the image is kept as a picture of background (training drops it while
``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is True); a folder without any object is an error.

**Caching.** A folder is read once: its COCO version (RLE masks) goes to
``$IAUNET_DATASET_CACHE`` (default ``<tmp>/iaunet_dataset_cache``), keyed by the names, sizes and
modification times of its files, written atomically. That file is also the ``json_file`` that
``COCOEvaluator`` evaluates against.

**Hold-out.** ``NAME#train`` / ``NAME#val`` split a dataset into a fixed validation part (20 % of
the images, at least one: those whose SHA-1 of the file name is smallest, so the choice does not
depend on listing order and barely moves when images are added) and the rest. When
``DATASETS.TEST`` is empty, :func:`hold_out_validation` applies this to every training dataset named
by a path and logs which files are held out.
"""

import copy
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ...utils.atomic import atomic_write
from ...utils.file_names import safe_file_name
from ..annotations_io import (
    LABEL_EXTENSIONS,
    DatasetError,
    read_annotation_file,
    read_label_pages,
    read_whole_and_visible,
)
from ..image_io import (
    IMAGE_EXTENSIONS,
    TIFF_EXTENSIONS,
    ImageReadError,
    image_size,
    stack_axis,
)
from .common import AMODAL_FIELD, CACHE_VERSION, cache_dir, load_coco_instances
from .stack_planes import PLANE_KEY, plane_entries

logger = logging.getLogger(__name__)

PREFIXES = ("folder:", "coco:")
SPLITS = ("train", "val")
HOLDOUT_FRACTION = 0.2
CLASS_NAMES = ["object"]  # label images and ROI sets carry no class: one class
ANNOTATION_DIRS = ("masks", "labels", "rois")
_SUFFIXES = ("_labels", "_masks")
# joins the whole-outline masks TIFF and the visible-part label image of one image
WHOLE_VISIBLE_SEP = "|"
_MEMO: Dict[str, Tuple[str, List[Dict]]] = {}  # name -> (cache file, dicts): read once per process
_ANNOUNCED = set()  # hold-outs already listed in the log by this process


@dataclass(frozen=True)
class PathDataset:
    """A parsed dataset name: ``kind`` "folder" | "coco", ``path`` (folder or json), ``images``
    (image root of a COCO json), ``split`` None | "train" | "val", ``base`` (name without split)."""

    kind: str
    path: str
    images: str
    split: Optional[str]
    base: str


def parse_name(name: str) -> Optional[PathDataset]:
    """The dataset a ``folder:`` / ``coco:`` name designates; None for any other name."""
    if not name.startswith(PREFIXES):
        return None
    base, split = name, None
    if "#" in name:
        base, split = name.rsplit("#", 1)
        if split not in SPLITS:
            raise DatasetError(f"dataset {name!r}: the part after '#' must be one of {SPLITS}")
    kind, rest = base.split(":", 1)
    if not rest:
        raise DatasetError(f"dataset {name!r}: no path after '{kind}:'")
    images = ""
    if kind == "coco":
        m = re.match(r"^(.*?\.json)(?:@(.+))?$", rest, flags=re.IGNORECASE)
        if not m:
            raise DatasetError(
                f"dataset {name!r}: expected coco:FILE.json or coco:FILE.json@IMAGES"
            )
        rest, images = m.group(1), m.group(2) or ""
    path = os.path.expanduser(rest)
    images = os.path.expanduser(images) if images else os.path.dirname(os.path.abspath(path))
    return PathDataset(kind, path, images, split, base)


# --- folder scanning --------------------------------------------------------------------------


def _candidates(stem: str, own_dir: bool) -> List[str]:
    names = [f"{stem}{s}{e}" for s in _SUFFIXES for e in LABEL_EXTENSIONS] + [f"{stem}_rois.zip"]
    if not own_dir:  # masks/, labels/, rois/: the image's own name
        names += [f"{stem}{e}" for e in LABEL_EXTENSIONS + (".zip", ".roi")]
    return names


def _image_stem(name: str) -> str:
    """The name an image's annotations start with: ``a`` of ``a.tif`` and of ``a.ome.zarr``."""
    if name.lower().endswith(".zarr"):
        stem = name[: -len(".zarr")]
        return stem[: -len(".ome")] if stem.lower().endswith(".ome") else stem
    return os.path.splitext(name)[0]


def _is_image(name: str) -> bool:
    ext = ".zarr" if name.lower().endswith(".zarr") else os.path.splitext(name)[1].lower()
    return (
        not name.startswith(".")
        and ext in IMAGE_EXTENSIONS + (".zarr",)
        and not _image_stem(name).endswith(_SUFFIXES)  # annotations, not images
    )


def scan_folder(folder: str) -> Tuple[List[Tuple[str, str]], Optional[str]]:
    """(image, annotation) paths of a folder, sorted, or ([], json) for a folder with a COCO json.
    DatasetError for a missing folder, no images, an image without (or with two) annotations."""
    if not os.path.isdir(folder):
        raise DatasetError(f"folder:{folder}: folder {os.path.abspath(folder)} does not exist")
    top = sorted(os.listdir(folder))
    jsons = [f for f in top if f.lower().endswith(".json") and not f.startswith(".")]
    if len(jsons) > 1:
        raise DatasetError(
            f"{folder}: several COCO json files {jsons}; name one as coco:{folder}/FILE.json"
        )
    if jsons:
        return [], os.path.join(folder, jsons[0])
    image_dir = os.path.join(folder, "images")
    if os.path.isdir(image_dir):
        dirs = [image_dir] + [os.path.join(folder, d) for d in ANNOTATION_DIRS]
    else:
        image_dir, dirs = folder, [folder]
    listing = {d: set(os.listdir(d)) for d in dirs if os.path.isdir(d)}
    images = sorted(f for f in listing[image_dir] if _is_image(f))
    if not images:
        raise DatasetError(
            f"{folder}: no images (PNG/JPEG/TIFF/OME-Zarr) in {image_dir}; see README, 'Train on "
            "your own images' for the layout"
        )
    pairs, stems = [], {}
    for name in images:
        stem = _image_stem(name)
        if stem in stems:
            raise DatasetError(
                f"{os.path.join(image_dir, name)}: two images named {stem!r} ({stems[stem]}); "
                "their annotations would be ambiguous"
            )
        stems[stem] = name
        found = [
            os.path.join(d, c)
            for d, files in listing.items()
            for c in _candidates(stem, d == image_dir)
            if c in files and not (d == image_dir and c == name)
        ]
        if not found:
            raise DatasetError(
                f"{os.path.join(image_dir, name)}: image without annotation; expected "
                f"{stem}_labels.tif|.png, {stem}_masks.tif or {stem}_rois.zip next to it"
                + (
                    f", or {stem}.tif|.png|.zip in masks/, labels/ or rois/"
                    if len(dirs) > 1
                    else ""
                )
            )
        whole_and_visible = _whole_and_visible(found)
        if len(found) > 1 and whole_and_visible is None:
            raise DatasetError(
                f"{os.path.join(image_dir, name)}: several annotations {found}; keep one (or a "
                "_masks.tif of whole outlines and a _labels file of visible parts)"
            )
        pairs.append((os.path.join(image_dir, name), whole_and_visible or found[0]))
    used = {os.path.basename(f) for _, a in pairs for f in _files(a)}
    orphans = [
        f
        for f in sorted(listing[image_dir])
        if (os.path.splitext(f)[0].endswith(_SUFFIXES) or f.endswith("_rois.zip")) and f not in used
    ]
    if orphans:
        logger.warning(f"{folder}: annotation files without an image, ignored: {orphans[:10]}")
    return pairs, None


def _whole_and_visible(found: Sequence[str]) -> Optional[str]:
    """``masks|labels`` when ``found`` is a ``_masks.tif`` (whole outlines) and a ``_labels`` image
    (visible parts) of one image (docs/amodal.md), else None."""
    if len(found) != 2:
        return None
    masks = [f for f in found if os.path.splitext(f)[0].endswith("_masks")]
    labels = [f for f in found if os.path.splitext(f)[0].endswith("_labels")]
    if len(masks) == len(labels) == 1:
        return f"{masks[0]}{WHOLE_VISIBLE_SEP}{labels[0]}"
    return None


def _files(annotation: str) -> List[str]:
    """The file(s) of an annotation entry: one, or masks and labels (:func:`_whole_and_visible`)."""
    return annotation.split(WHOLE_VISIBLE_SEP)


def _files_key(folder: str, files: Sequence[str]) -> str:
    parts = [str(CACHE_VERSION), os.path.abspath(folder)]
    for f in files:
        st = os.stat(f)
        parts.append(f"{os.path.relpath(f, folder)}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _flat(ann_path: str) -> bool:
    """One label image (not a label stack): a 2-D label file, or ROIs."""
    if not ann_path.lower().endswith(TIFF_EXTENSIONS):
        return True
    try:
        return read_label_pages(ann_path).shape[0] == 1
    except DatasetError:
        return True  # the annotation's own error comes when it is read


def build_folder_coco(folder: str, pairs: Sequence[Tuple[str, str]]) -> Dict:
    """Read every (image, annotation) pair into a COCO dict (RLE masks, category 1; a stack: one
    image per plane, :mod:`.stack_planes`); the warnings raised while reading are kept under
    ``info.warnings`` to be repeated from the cache."""
    images, annotations, warnings = [], [], []
    for image_path, ann_path in pairs:
        try:
            stack = stack_axis(image_path, {})
            if stack and not stack_axis(image_path, {"channels": (0,)}) and _flat(ann_path):
                stack = None  # (C, H, W) without metadata, one label image: channels
            h, w = image_size(image_path)
        except ImageReadError as e:
            raise DatasetError(str(e)) from None
        files = _files(ann_path)
        if stack:
            entries = plane_entries(image_path, ann_path, (h, w), *stack)
        elif len(files) == 2:  # whole outlines and visible parts
            entries = [({}, read_whole_and_visible(*files, (h, w)))]
        else:
            entries = [({}, read_annotation_file(ann_path, (h, w)))]
        if not any(instances for _, instances in entries):
            warnings.append(
                f"{ann_path}: no objects; {image_path} is kept as background only (dropped from "
                "training while DATALOADER.FILTER_EMPTY_ANNOTATIONS is True)"
            )
        for extra, instances in entries:
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": os.path.relpath(image_path, folder),
                    "height": h,
                    "width": w,
                    "annotation_file": WHOLE_VISIBLE_SEP.join(
                        os.path.relpath(f, folder) for f in files
                    ),
                    **extra,
                }
            )
            for inst in instances:
                annotations.append(
                    dict(inst, id=len(annotations) + 1, image_id=image_id, category_id=1, iscrowd=0)
                )
    if not annotations:
        raise DatasetError(f"{folder}: no objects in any of its {len(images)} annotation files")
    return {
        "info": {"source": os.path.abspath(folder), "warnings": warnings},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)],
    }


def coco_to_dicts(coco: Dict, root: str) -> List[Dict]:
    """detectron2 dataset dicts of a COCO dict built by :func:`build_folder_coco`."""
    by_image: Dict[int, List[Dict]] = {img["id"]: [] for img in coco["images"]}
    for a in coco["annotations"]:
        by_image[a["image_id"]].append(
            {
                "segmentation": a["segmentation"],
                "bbox": a["bbox"],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": a["category_id"] - 1,
                "iscrowd": 0,
                **({AMODAL_FIELD: a[AMODAL_FIELD]} if AMODAL_FIELD in a else {}),
            }
        )
    return [
        {
            "file_name": os.path.join(root, img["file_name"]),
            "image_id": img["id"],
            "height": img["height"],
            "width": img["width"],
            "annotations": by_image[img["id"]],
            **({PLANE_KEY: img[PLANE_KEY]} if PLANE_KEY in img else {}),
        }
        for img in coco["images"]
    ]


def _load_folder(ds: PathDataset) -> Tuple[List[Dict], str]:
    """(dicts, COCO json file) of a folder dataset, read from the cache when up to date."""
    pairs, coco_json = scan_folder(ds.path)
    if coco_json:
        return _load_coco(PathDataset("coco", coco_json, ds.path, None, ds.base))
    key = _files_key(ds.path, [f for image, a in pairs for f in (image, *_files(a))])
    base = os.path.basename(os.path.abspath(ds.path))
    cache = os.path.join(cache_dir(), f"folder_{safe_file_name(base)}_{key}.json")
    if ds.base in _MEMO and _MEMO[ds.base][0] == cache:
        return copy.deepcopy(_MEMO[ds.base][1]), cache
    if os.path.isfile(cache):
        with open(cache) as f:
            coco = json.load(f)
    else:
        logger.info(f"Reading {len(pairs)} annotated images of {ds.path}")
        coco = build_folder_coco(ds.path, pairs)
        atomic_write(cache, json.dumps(coco))
    for message in coco["info"]["warnings"]:
        logger.warning(message)
    dicts = coco_to_dicts(coco, ds.path)
    num = sum(len(d["annotations"]) for d in dicts)
    logger.info(f"{ds.base}: {len(dicts)} images, {num} objects (COCO version: {cache})")
    _MEMO[ds.base] = (cache, dicts)
    return copy.deepcopy(dicts), cache


def _load_coco(ds: PathDataset) -> Tuple[List[Dict], str]:
    """(dicts, json file) of a COCO json; images under ``ds.images`` or its ``images/``."""

    def resolve(root: str, file_name: str) -> str:
        path = os.path.join(root, file_name)
        alt = os.path.join(root, "images", file_name)
        return alt if not os.path.isfile(path) and os.path.isfile(alt) else path

    meta = MetadataCatalog.get(ds.base)
    try:
        dicts = load_coco_instances(ds.path, ds.images, ds.base, resolve_image=resolve)
    except (OSError, ValueError) as e:
        raise DatasetError(str(e).replace("\n", " ")) from None
    with open(meta.json_file) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    if not hasattr(meta, "thing_classes"):
        meta.set(thing_classes=[c["name"] for c in categories])
    return dicts, meta.json_file


def holdout_files(file_names: Sequence[str], root: str = "") -> List[str]:
    """The held-out part of ``file_names``: the ``max(1, round(0.2 n))`` whose SHA-1 of the path
    relative to ``root`` is smallest; none for fewer than 2 images."""
    if len(file_names) < 2:
        return []
    k = max(1, round(HOLDOUT_FRACTION * len(file_names)))
    rel = {f: os.path.relpath(f, root).replace(os.sep, "/") if root else f for f in file_names}
    return sorted(file_names, key=lambda f: hashlib.sha1(rel[f].encode()).hexdigest())[:k]


def _select(ds: PathDataset, dicts: List[Dict], json_file: str) -> Tuple[List[Dict], str]:
    """The ``ds.split`` part of ``dicts`` and a COCO json of just that part."""
    root = ds.path if ds.kind == "folder" else ds.images
    held = set(holdout_files(sorted({d["file_name"] for d in dicts}), root))  # stacks: whole
    if not held:
        raise DatasetError(
            f"{ds.base}: {len(dicts)} image(s), too few to hold one out for validation; add "
            "images or give a validation set (DATASETS.TEST)"
        )
    keep = [d for d in dicts if (d["file_name"] in held) == (ds.split == "val")]
    ids = {d["image_id"] for d in keep}
    stem, _ = os.path.splitext(os.path.basename(json_file))
    key = hashlib.sha1(f"{os.path.abspath(json_file)}|{sorted(ids)}".encode()).hexdigest()[:16]
    out = os.path.join(cache_dir(), f"{safe_file_name(stem)}_{ds.split}_{key}.json")
    if not os.path.isfile(out):
        with open(json_file) as f:
            coco = json.load(f)
        coco["images"] = [img for img in coco["images"] if img["id"] in ids]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
        atomic_write(out, json.dumps(coco))
    return keep, out


def load_path_dataset(name: str) -> List[Dict]:
    """detectron2 dataset dicts of a ``folder:`` / ``coco:`` name (see the module docstring); sets
    the metadata ``json_file`` (what ``COCOEvaluator`` reads), ``image_root`` and classes."""
    ds = parse_name(name)
    dicts, json_file = _load_folder(ds) if ds.kind == "folder" else _load_coco(ds)
    if ds.split:
        dicts, json_file = _select(ds, dicts, json_file)
        if ds.split == "val" and name not in _ANNOUNCED:
            _ANNOUNCED.add(name)
            files = ", ".join(os.path.basename(d["file_name"]) for d in dicts)
            logger.info(f"{name}: held out for validation ({len(dicts)} images): {files}")
    meta = MetadataCatalog.get(name)
    base = MetadataCatalog.get(ds.base)
    classes = base.get("thing_classes", CLASS_NAMES)
    for key, value in (
        ("json_file", json_file),
        ("image_root", ds.path if ds.kind == "folder" else ds.images),
        ("thing_classes", classes),
        ("thing_dataset_id_to_contiguous_id", {i + 1: i for i in range(len(classes))}),
    ):
        if meta.get(key, None) is None:
            meta.set(**{key: value})
    return dicts


def register_path_datasets(names: Sequence[str]) -> List[str]:
    """Register every ``folder:`` / ``coco:`` name of ``names`` not yet registered (lazily: nothing
    is read until ``DatasetCatalog.get``); returns the path datasets among ``names``. A name that is
    neither registered nor a path dataset but names an existing folder or json gets a DatasetError
    saying how to name it."""
    found = []
    for name in names:
        ds = parse_name(name)
        if ds is None:
            if name not in DatasetCatalog.list() and os.path.exists(name):
                prefix = "coco:" if name.lower().endswith(".json") else "folder:"
                raise DatasetError(
                    f"dataset {name!r} is a path: name it {prefix}{name} (DATASETS.TRAIN/TEST)"
                )
            continue
        found.append(name)
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda name=name: load_path_dataset(name))
            MetadataCatalog.get(name).set(evaluator_type="coco")
    return found


def hold_out_validation(train: Sequence[str], test: Sequence[str]) -> Tuple[tuple, tuple]:
    """With no test set, every path dataset ``X`` without a split in ``train`` becomes ``X#train``
    in the training sets and ``X#val`` in the test sets; other names are unchanged."""
    if test:
        return tuple(train), tuple(test)
    new_train, new_test = [], []
    for name in train:
        ds = parse_name(name)
        if ds is None or ds.split:
            new_train.append(name)
            continue
        new_train.append(f"{name}#train")
        new_test.append(f"{name}#val")
    return tuple(new_train), tuple(new_test)
