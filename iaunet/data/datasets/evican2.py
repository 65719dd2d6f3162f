"""EVICAN2 (Schwendy et al. 2020): partially annotated grayscale images, classes cell and nucleus.

Layout under ``$DETECTRON2_DATASETS``, as released on Edmond (doi:10.17617/3.AJBV1S): the COCO
files at the top and the image zips ``EVICAN_{train,val,eval}2019.zip`` unpacked under ``images/``::

    evican2/instances_train2019_EVICAN2.json                 # 3,714 images
    evican2/instances_val2019_EVICAN2.json                   # 926 images
    evican2/instances_eval2019_{easy,medium,difficult}_EVICAN2.json   # 33 / 33 / 32 images
    evican2/images/EVICAN_{train,val,eval}2019/*.jpg

The evaluation subsets are separate json files over the one ``EVICAN_eval2019`` folder. The release
files carry no usable ``bbox`` / ``area`` (users of detectron2 and the IAUNet authors add them in a
preprocessing step); they are computed from the outlines on loading. Categories: 1 Cell, 2 Nucleus.

Registered: ``evican2_{train,val,eval_easy,eval_medium,eval_difficult}`` (2 classes; thesis AP =
mean over both) and ``evican2_cell_*`` for the same splits (nucleus outlines dropped, 1 class: the
reference code's setting; use with ``MODEL.IAUNET.NUM_CLASSES 1``).
"""

from .common import keep_classes, register_coco_dataset

SPLITS = {
    "train": ("instances_train2019_EVICAN2.json", "EVICAN_train2019"),
    "val": ("instances_val2019_EVICAN2.json", "EVICAN_val2019"),
    "eval_easy": ("instances_eval2019_easy_EVICAN2.json", "EVICAN_eval2019"),
    "eval_medium": ("instances_eval2019_medium_EVICAN2.json", "EVICAN_eval2019"),
    "eval_difficult": ("instances_eval2019_difficult_EVICAN2.json", "EVICAN_eval2019"),
}
CLASSES = ["cell", "nucleus"]


def register_all_evican2(root: str = "evican2") -> None:
    """Register ``evican2_<split>`` (cell + nucleus) and ``evican2_cell_<split>`` (cell only)."""
    for split, (json_name, image_dir) in SPLITS.items():
        json_file, image_root = f"{root}/{json_name}", f"{root}/images/{image_dir}"
        register_coco_dataset(
            f"evican2_{split}", json_file, image_root, {"thing_classes": CLASSES}, dataset_dir=root
        )
        register_coco_dataset(
            f"evican2_cell_{split}",
            json_file,
            image_root,
            {"thing_classes": ["cell"]},
            dataset_dir=root,
            transform=keep_classes(["cell"]),
        )


register_all_evican2()
