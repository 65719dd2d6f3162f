"""COCO-JSON datasets under ``$DETECTRON2_DATASETS``: lazy registration and validation of the files.

Parsing is detectron2's :func:`load_coco_json`; this module adds the checks that make a broken or
misplaced download fail with a message naming the file (or key) at fault:

* the dataset folder is missing -> ``FileNotFoundError`` naming the expected path and
  ``DETECTRON2_DATASETS``;
* the annotation json is missing, not JSON, or lacks ``images`` / ``annotations`` / ``categories``;
* an image listed in the json is missing -> ``FileNotFoundError`` naming the json and the image
  path;
* duplicate image ids or annotation ids, an annotation whose ``category_id`` is not in
  ``categories``, or category ids that are not ``1..K`` for the K registered classes ->
  ``ValueError`` naming the json;
* a polygon with fewer than 3 points (< 6 coordinates, or an odd count) is **dropped with a
  warning** naming the json and the annotation ids (detectron2 drops them too, reporting only a
  count); an annotation left without any valid polygon, or without a ``segmentation``, is dropped
  the same way. Dropping rather than failing keeps official releases with a few degenerate outlines
  usable.

Images without annotations stay in the list; ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` removes them
for training (the standard detectron2 switch), evaluation keeps them. A json without any image is an
error (``ValueError`` naming it); one without any annotation loads with a warning naming it.

Files that are valid COCO are loaded as they are. Files that need normalizing first (annotations
stored as a dict keyed by id, as in some LIVECell releases; missing ``bbox`` / ``area``, as in
EVICAN; dropped polygons; a class subset or another per-dataset transform) are rewritten once to a
cache file (``$IAUNET_DATASET_CACHE``, default ``<tmp>/iaunet_dataset_cache``) that is valid COCO,
and that file is what detectron2 loads and what ``COCOEvaluator`` evaluates against
(metadata ``json_file``), so evaluation and training see the same annotations.
"""

import copy
import hashlib
import json
import logging
import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from ...utils.atomic import atomic_write
from ...utils.file_names import safe_file_name

logger = logging.getLogger(__name__)

ENV_ROOT = "DETECTRON2_DATASETS"
ENV_CACHE = "IAUNET_DATASET_CACHE"
# Registered name -> the paths (relative to the datasets root) it reads; ``iaunet-check`` reports
# which are on disk without loading anything.
DATASET_FILES: Dict[str, Tuple[str, ...]] = {}
# Part of every cache key (normalized COCO files here, folder datasets in folder.py): bump it when
# the normalization or the folder reading changes, so that old cache files are not reused.
CACHE_VERSION = 1
# The whole (amodal) outline of an annotation whose ``segmentation`` is its visible part (COCO
# amodal convention, as in KINS/COCOA): kept in the dataset dicts when present (docs/amodal.md).
AMODAL_FIELD = "amodal_segmentation"

CocoDict = Dict
Transform = Callable[[CocoDict, str], CocoDict]
ImageResolver = Callable[[str, str], str]


def datasets_root() -> str:
    """The datasets root, read now (not at import): ``$DETECTRON2_DATASETS``, default
    ``./datasets``."""
    return os.path.expanduser(os.environ.get(ENV_ROOT, "datasets"))


def resolve_path(path: str) -> str:
    """A path relative to the datasets root (absolute paths are returned unchanged)."""
    return path if os.path.isabs(path) else os.path.join(datasets_root(), path)


def check_dataset_dir(name: str, subdir: str, hint: str = "see datasets/README.md") -> str:
    """Return ``<root>/<subdir>``; raise a ``FileNotFoundError`` that says how to fix a missing
    one."""
    path = resolve_path(subdir)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Dataset '{name}': folder {os.path.abspath(path)} does not exist. Put the data there "
            "or set "
            f"{ENV_ROOT} to the folder that contains '{subdir}/' (now {ENV_ROOT}="
            f"{os.environ.get(ENV_ROOT, '<unset>, default ./datasets')}); {hint}."
        )
    return path


def read_coco_json(json_file: str) -> Tuple[CocoDict, bool]:
    """Read a COCO instances json. Annotations stored as a dict keyed by id (some LIVECell releases,
    which pycocotools cannot read) become a list ordered by id; the bool says whether that
    happened."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file not found: {json_file}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: expected a COCO json object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_file}: missing the COCO key '{key}'")
    if isinstance(data["annotations"], dict):
        anns = data["annotations"]
        data["annotations"] = [anns[k] for k in sorted(anns, key=lambda k: (len(str(k)), str(k)))]
        return data, True
    return data, False


def keep_classes(names: Sequence[str]) -> Transform:
    """A transform keeping only the categories ``names`` (case-insensitive), renumbered
    1..len(names)."""
    wanted = [n.lower() for n in names]

    def transform(data: CocoDict, json_file: str) -> CocoDict:
        by_name = {c["name"].lower(): c for c in data["categories"]}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(f"{json_file}: categories {missing} not found in {sorted(by_name)}")
        new_id = {by_name[n]["id"]: i + 1 for i, n in enumerate(wanted)}
        data["categories"] = [dict(by_name[n], id=i + 1) for i, n in enumerate(wanted)]
        data["annotations"] = [
            dict(a, category_id=new_id[a["category_id"]])
            for a in data["annotations"]
            if a["category_id"] in new_id
        ]
        return data

    return transform


def _segmentation_bbox_area(seg, height: int, width: int) -> Tuple[List[float], float]:
    """Box (XYWH) and pixel area of a polygon list or RLE, via pycocotools."""
    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_util.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_util.toBbox(rle).tolist(), float(mask_util.area(rle))


def validate_coco(data: CocoDict, json_file: str, num_classes: int) -> bool:
    """Check ``data`` in place (see the module docstring); return True when it had to be changed."""
    changed = False
    images = {}
    for img in data["images"]:
        if img["id"] in images:
            raise ValueError(
                f"{json_file}: duplicate image id {img['id']} ({images[img['id']]['file_name']} "
                f"and {img['file_name']})"
            )
        images[img["id"]] = img
    cat_ids = sorted(c["id"] for c in data["categories"])
    if cat_ids != list(range(1, num_classes + 1)):
        raise ValueError(
            f"{json_file}: category ids {cat_ids} ({[c['name'] for c in data['categories']]}); "
            "expected "
            f"1..{num_classes} for the {num_classes} registered classes"
        )
    ann_ids, dropped, kept = set(), [], []
    for ann in data["annotations"]:
        if "id" not in ann:
            raise ValueError(
                f"{json_file}: an annotation of image {ann.get('image_id')} has no 'id'"
            )
        if ann["id"] in ann_ids:
            raise ValueError(f"{json_file}: duplicate annotation id {ann['id']}")
        ann_ids.add(ann["id"])
        if ann.get("category_id") not in cat_ids:
            raise ValueError(
                f"{json_file}: annotation {ann['id']} has category_id={ann.get('category_id')}, "
                f"which is not in 'categories' {cat_ids}"
            )
        img = images.get(ann.get("image_id"))
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            good = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            if len(good) != len(seg):
                dropped.append(ann["id"])
                changed = True
                if not good:
                    continue
                ann["segmentation"] = seg = good
        elif isinstance(seg, dict):
            if img is not None and list(seg.get("size", [])) != [img["height"], img["width"]]:
                raise ValueError(
                    f"{json_file}: annotation {ann['id']}: RLE size {seg.get('size')} differs from "
                    f"its image size {[img['height'], img['width']]}"
                )
        else:
            dropped.append(ann["id"])
            changed = True
            continue
        if img is not None and (len(ann.get("bbox") or []) != 4 or "area" not in ann):
            ann["bbox"], ann["area"] = _segmentation_bbox_area(seg, img["height"], img["width"])
            changed = True
        kept.append(ann)
    data["annotations"] = kept
    if dropped:
        logger.warning(
            f"{json_file}: dropped degenerate polygons (< 3 points) or missing segmentations of "
            f"{len(dropped)} annotation(s), ids {dropped[:10]}{' ...' if len(dropped) > 10 else ''}"
        )
    orphans = [a["id"] for a in kept if a.get("image_id") not in images]
    if orphans:
        logger.warning(
            f"{json_file}: {len(orphans)} annotation(s) refer to image ids not in 'images'; they "
            "are ignored "
            f"(annotation ids {orphans[:10]}{' ...' if len(orphans) > 10 else ''})"
        )
    return changed


def cache_dir() -> str:
    """The dataset cache folder (created): ``$IAUNET_DATASET_CACHE``, default
    ``<tmp>/iaunet_dataset_cache``."""
    path = os.environ.get(ENV_CACHE, os.path.join(tempfile.gettempdir(), "iaunet_dataset_cache"))
    os.makedirs(path, exist_ok=True)
    return path


def _cache_file(json_file: str, dataset_name: str) -> str:
    st = os.stat(json_file)
    parts = (CACHE_VERSION, os.path.abspath(json_file), st.st_size, st.st_mtime_ns, dataset_name)
    key = hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"{safe_file_name(dataset_name)}_{key}.json")


def default_image_resolver(image_root: str, file_name: str) -> str:
    return os.path.join(image_root, file_name)


def load_coco_instances(
    json_file: str,
    image_root: str,
    dataset_name: str,
    *,
    num_classes: Optional[int] = None,
    transform: Optional[Transform] = None,
    resolve_image: ImageResolver = default_image_resolver,
) -> List[Dict]:
    """Validate a COCO instances json and load it with detectron2's ``load_coco_json``.

    Args:
        json_file, image_root: paths (already resolved against the datasets root).
        dataset_name: registered name; used in messages and for the cache file name.
        num_classes: expected number of categories (default: the metadata's ``thing_classes``).
        transform: ``f(coco_dict, json_file) -> coco_dict`` applied after the category check and
            before the remaining checks (e.g. :func:`keep_classes`, or Revvity-25's amodal
            outlines).
        resolve_image: ``f(image_root, file_name) -> path`` for layouts with sub-folders.

    Returns:
        detectron2 dataset dicts; ``category_id`` is contiguous (json id - 1), ``file_name`` the
        resolved image path. Sets metadata ``json_file`` (the file actually loaded) and
        ``image_root`` unless already set.
    """
    meta = MetadataCatalog.get(dataset_name)
    registered = meta.get("thing_classes")
    data, changed = read_coco_json(json_file)
    if not data["images"]:
        raise ValueError(
            f"Dataset '{dataset_name}': {json_file} lists no images ('images' is empty)"
        )
    if not data["annotations"]:
        logger.warning(
            f"Dataset '{dataset_name}': {json_file} has no annotations at all; training on it "
            "finds no valid "
            "data while DATALOADER.FILTER_EMPTY_ANNOTATIONS is True, and its AP is NaN"
        )
    num_classes = num_classes or (len(registered) if registered else len(data["categories"]))
    cat_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann.get("category_id") not in cat_ids:
            raise ValueError(
                f"{json_file}: annotation {ann.get('id')} has "
                f"category_id={ann.get('category_id')}, "
                f"which is not in 'categories' {sorted(cat_ids)}"
            )
    if transform is not None:
        data = transform(data, json_file)
        changed = True
    changed = validate_coco(data, json_file, num_classes) or changed

    names = [c["name"].lower() for c in sorted(data["categories"], key=lambda c: c["id"])]
    if registered and names != [n.lower() for n in registered]:
        logger.warning(
            f"{json_file}: category names {names} differ from the registered {registered}"
        )

    paths, missing = {}, []
    for img in data["images"]:
        paths[img["id"]] = path = resolve_image(image_root, img["file_name"])
        if not os.path.isfile(path):
            missing.append(path)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{json_file} lists image {missing[0]}, which does not exist{more}")

    load_file = json_file
    if changed:
        load_file = _cache_file(json_file, dataset_name)
        if not os.path.isfile(load_file):
            # concurrent workers never read a partial file
            atomic_write(load_file, json.dumps(data))
        logger.info(f"{dataset_name}: loading a normalized copy of {json_file}: {load_file}")
    dicts = load_coco_json(
        load_file, image_root, dataset_name=None, extra_annotation_keys=[AMODAL_FIELD]
    )
    for record in dicts:
        record["file_name"] = paths[record["image_id"]]
        for obj in record["annotations"]:
            obj["category_id"] -= 1  # json ids are 1..K (checked above)

    for key, value in (("json_file", load_file), ("image_root", image_root)):
        if not hasattr(meta, key):
            meta.set(**{key: value})
        elif getattr(meta, key) != value:
            logger.warning(
                f"{dataset_name}: metadata {key} stays {getattr(meta, key)} (first load), not "
                f"{value}"
            )
    return dicts


def register_lazy(name: str, load: Callable[[], List[Dict]], metadata: Dict) -> None:
    """Register a loader plus COCO-evaluator metadata: ``evaluator_type="coco"``, the given metadata
    (at least ``thing_classes``) and ``thing_dataset_id_to_contiguous_id`` = {1: 0, ..., K: K-1}."""
    metadata = copy.deepcopy(metadata)
    num_classes = len(metadata["thing_classes"])
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        evaluator_type="coco",
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(num_classes)},
        **metadata,
    )


def register_coco_dataset(
    name: str,
    json_file: str,
    image_root: str,
    metadata: Dict,
    *,
    dataset_dir: Optional[str] = None,
    transform: Optional[Transform] = None,
    resolve_image: ImageResolver = default_image_resolver,
    hint: str = "see datasets/README.md",
) -> None:
    """Register ``name`` lazily: nothing is read (not even the env var) until
    ``DatasetCatalog.get(name)``.

    Args:
        json_file, image_root: paths relative to the datasets root (or absolute).
        metadata: at least ``thing_classes``; see :func:`register_lazy`.
        dataset_dir: folder (relative to the root) checked first so that a missing download gets a
            clear message; default: the first component of ``json_file`` (its folder if absolute).
        transform, resolve_image: see :func:`load_coco_instances`.
        hint: how to obtain the data, appended to the missing-folder message.
    """
    dataset_dir = dataset_dir or (
        os.path.dirname(json_file) if os.path.isabs(json_file) else json_file.split("/")[0]
    )

    def load() -> List[Dict]:
        check_dataset_dir(name, dataset_dir, hint)
        path = resolve_path(json_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Dataset '{name}': annotation file not found: {path}; {hint}")
        return load_coco_instances(
            path, resolve_path(image_root), name, transform=transform, resolve_image=resolve_image
        )

    register_lazy(name, load, metadata)
    DATASET_FILES[name] = (json_file, image_root)
