"""Revvity-25 (thesis §3.1): 110 brightfield 1080x1080 16-bit images, one class, 55 train / 55 test.

Layout under ``$DETECTRON2_DATASETS`` (the authors' configs, ``configs/dataset/revvity_25.yaml``)::

    revvity25/images/*                      # the 110 images (16-bit)
    revvity25/annotations/train.json        # COCO polygons, category 1 "cell"
    revvity25/annotations/valid.json        # the 55 test images

Registered: ``revvity25_train``, ``revvity25_test`` (modal outlines) and ``revvity25_amodal_train``,
``revvity25_amodal_test``. The authors' code reads only the two files above; how the public release
(huggingface.co/datasets/YaroslavPrytula/Revvity-25) stores the amodal outlines could not be checked
here, so the amodal sets accept either layout:

1. a separate COCO file per split, ``annotations/amodal/{train,valid}.json`` or
   ``annotations/{train,valid}_amodal.json`` (same images and ids), or
2. a per-annotation field ``amodal_segmentation`` (polygons or RLE) in
   ``annotations/{train,valid}.json``;
   an annotation without it is a cell with no hidden part, whose amodal outline is its modal one.
"""

import os
from typing import Dict, List

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
        name = f"revvity25_amodal_{split}"
        register_lazy(name, lambda name=name, stem=stem: load_amodal(name, stem), METADATA)
        DATASET_FILES[name] = (f"{root}/annotations", f"{root}/images")


register_all_revvity25()
