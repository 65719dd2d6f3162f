"""Revvity-25 (thesis §3.1): 110 brightfield 1080x1080 16-bit images, one class, 55 train / 55 test.

Layout under ``$DETECTRON2_DATASETS`` (the authors' configs, ``configs/dataset/revvity_25.yaml``)::

    revvity25/images/*                      # the 110 images (16-bit)
    revvity25/annotations/train.json        # COCO polygons, category 1 "cell"
    revvity25/annotations/valid.json        # the 55 test images

Registered: ``revvity25_train``, ``revvity25_test`` (modal outlines), ``revvity25_amodal_train``,
``revvity25_amodal_test`` (amodal outlines) and ``revvity25_both_{train,test}`` (both, below). The
authors' code reads only the two files above; how the public release
(huggingface.co/datasets/YaroslavPrytula/Revvity-25) stores the amodal outlines could not be checked
here, so the amodal sets accept either layout:

1. a separate COCO file per split, ``annotations/amodal/{train,valid}.json`` or
   ``annotations/{train,valid}_amodal.json`` (same images and ids), or
2. a per-annotation field ``amodal_segmentation`` (polygons or RLE) in
   ``annotations/{train,valid}.json``;
   an annotation without it is a cell with no hidden part, whose amodal outline is its modal one.

``revvity25_both_train`` / ``revvity25_both_test`` carry both outlines per cell for a model that
predicts both (``MODEL.IAUNET.AMODAL``, docs/amodal.md): ``segmentation`` = modal (visible part),
``amodal_segmentation`` = amodal (whole cell), from either layout (a separate amodal file is
matched by annotation id).
"""

import json
import os
from typing import Callable, Dict, List

from .common import (
    AMODAL_FIELD,
    DATASET_FILES,
    check_dataset_dir,
    load_coco_instances,
    register_coco_dataset,
    register_lazy,
)

DATASET_DIR = "revvity25"
SPLITS = {"train": "train", "test": "valid"}  # registered split -> json stem
AMODAL_FILES = ("annotations/amodal/{stem}.json", "annotations/{stem}_amodal.json")
METADATA = {"thing_classes": ["cell"]}


def amodal_from_field(data: Dict, json_file: str) -> Dict:
    """Use each annotation's ``amodal_segmentation`` as its outline (box and area are
    recomputed)."""
    anns = data["annotations"]
    if anns and not any(AMODAL_FIELD in a for a in anns):
        raise ValueError(
            f"{json_file}: no annotation has an '{AMODAL_FIELD}' field and no separate amodal file "
            f"({', '.join(AMODAL_FILES)}) exists next to it; cannot build the amodal dataset"
        )
    for ann in anns:
        if AMODAL_FIELD in ann:
            ann["segmentation"] = ann.pop(AMODAL_FIELD)
            ann.pop("bbox", None)
            ann.pop("area", None)
    return data


def load_amodal(name: str, stem: str) -> List[Dict]:
    """Load the amodal outlines of one split from whichever of the supported layouts is present."""
    root = check_dataset_dir(name, DATASET_DIR)
    images = os.path.join(root, "images")
    for pattern in AMODAL_FILES:
        path = os.path.join(root, pattern.format(stem=stem))
        if os.path.isfile(path):
            return load_coco_instances(path, images, name)
    return load_coco_instances(
        os.path.join(root, "annotations", f"{stem}.json"), images, name, transform=amodal_from_field
    )


def amodal_from_file(amodal_json: str) -> Callable[[Dict, str], Dict]:
    """A ``load_coco_instances`` transform: each modal annotation gets the outline of the
    annotation with its id in ``amodal_json`` as ``amodal_segmentation``."""

    def attach(data: Dict, json_file: str) -> Dict:
        with open(amodal_json) as f:
            amodal = {a["id"]: a["segmentation"] for a in json.load(f)["annotations"]}
        missing = [a["id"] for a in data["annotations"] if a["id"] not in amodal]
        if missing:
            raise ValueError(
                f"{amodal_json}: no amodal outline for annotation id {missing[0]} of {json_file} "
                f"({len(missing)} missing); the two files must share annotation ids"
            )
        for ann in data["annotations"]:
            ann[AMODAL_FIELD] = amodal[ann["id"]]
        return data

    return attach


def load_both(name: str, stem: str) -> List[Dict]:
    """Modal and amodal outlines of one split (``segmentation`` and ``amodal_segmentation``)."""
    root = check_dataset_dir(name, DATASET_DIR)
    images = os.path.join(root, "images")
    modal = os.path.join(root, "annotations", f"{stem}.json")
    for pattern in AMODAL_FILES:
        path = os.path.join(root, pattern.format(stem=stem))
        if os.path.isfile(path):
            return load_coco_instances(modal, images, name, transform=amodal_from_file(path))
    dicts = load_coco_instances(modal, images, name)
    if not any(AMODAL_FIELD in a for d in dicts for a in d["annotations"]):
        raise ValueError(
            f"{modal}: no annotation has an '{AMODAL_FIELD}' field and no separate amodal file "
            f"({', '.join(AMODAL_FILES)}) exists next to it; cannot build {name}"
        )
    return dicts


def register_all_revvity25(root: str = DATASET_DIR) -> None:
    """Register the modal and amodal Revvity-25 splits (``root`` is relative to
    ``$DETECTRON2_DATASETS``)."""
    for split, stem in SPLITS.items():
        register_coco_dataset(
            f"revvity25_{split}",
            f"{root}/annotations/{stem}.json",
            f"{root}/images",
            METADATA,
            dataset_dir=root,
        )
        for kind, load in (("amodal", load_amodal), ("both", load_both)):
            name = f"revvity25_{kind}_{split}"
            register_lazy(name, lambda name=name, stem=stem, load=load: load(name, stem), METADATA)
            DATASET_FILES[name] = (f"{root}/annotations", f"{root}/images")


register_all_revvity25()
