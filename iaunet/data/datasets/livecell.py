"""LIVECell (Edlund et al. 2021): 5,239 phase-contrast 520x704 images, one class, official splits.

Layout under ``$DETECTRON2_DATASETS`` (files as downloaded from the LIVECell S3 bucket, see
github.com/sartorius-research/LIVECell)::

    livecell/livecell_coco_{train,val,test}.json            # annotations/LIVECell/*.json
    livecell/images/livecell_train_val_images/*.tif         # images.zip; train and val images
    livecell/images/livecell_test_images/*.tif

The LIVECell README shows the images nested by cell type (``<CellType>/<file>.tif``) while the
zip extracts flat; both are accepted. Some releases store ``annotations`` as a dict keyed by id
(LIVECell issues #4, #9, #23: pycocotools fails on them); those are normalized on loading.

The thesis trains on 256x256 crops: ``datasets/prepare_livecell_crops.py`` writes them to
``livecell_crops/{train,val,test}/`` + ``livecell_crops/{train,val,test}.json``, registered as
``livecell_crops_{train,val,test}`` (loading fails with a pointer to the script until it has run).
"""

import os

from .common import register_coco_dataset

SPLITS = {
    "train": "livecell_train_val_images",
    "val": "livecell_train_val_images",
    "test": "livecell_test_images",
}
METADATA = {"thing_classes": ["cell"]}
CROPS_HINT = "run `python datasets/prepare_livecell_crops.py` to create it (see datasets/README.md)"


def resolve_livecell_image(image_root: str, file_name: str) -> str:
    """``<root>/<file>``, or ``<root>/<CellType>/<file>`` (cell type = file-name prefix) when
    nested."""
    flat = os.path.join(image_root, file_name)
    nested = os.path.join(image_root, file_name.split("_")[0], file_name)
    return nested if not os.path.isfile(flat) and os.path.isfile(nested) else flat


def register_all_livecell(root: str = "livecell", crops_root: str = "livecell_crops") -> None:
    """Register ``livecell_{train,val,test}`` and ``livecell_crops_{train,val,test}``."""
    for split, image_dir in SPLITS.items():
        register_coco_dataset(
            f"livecell_{split}",
            f"{root}/livecell_coco_{split}.json",
            f"{root}/images/{image_dir}",
            METADATA,
            dataset_dir=root,
            resolve_image=resolve_livecell_image,
        )
        register_coco_dataset(
            f"livecell_crops_{split}",
            f"{crops_root}/{split}.json",
            f"{crops_root}/{split}",
            METADATA,
            dataset_dir=crops_root,
            hint=CROPS_HINT,
        )


register_all_livecell()
