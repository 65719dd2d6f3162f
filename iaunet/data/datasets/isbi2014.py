"""ISBI 2014 Overlapping Cervical Cytology (Lu et al.): 945 synthetic gray images, 45 train / 90 val
/ 810 test, classes cytoplasm and nucleus, heavy overlap.

The challenge release is MATLAB files; ``datasets/prepare_isbi2014.py`` converts it to::

    isbi2014/isbi_{train,val,test}/images/*.png
    isbi2014/isbi_{train,val,test}/annotations/isbi_{train,val,test}.json   # RLE, overlaps kept

Registered: ``isbi2014_{train,val,test}`` (2 classes, as the thesis reports) and
``isbi2014_cyto_{train,val,test}`` (cytoplasm only, 1 class: the reference code's single-class
setting).
"""

from .common import keep_classes, register_coco_dataset

SPLITS = ("train", "val", "test")
CLASSES = ["cytoplasm", "nucleus"]
HINT = (
    "convert the challenge files with `python datasets/prepare_isbi2014.py` (see "
    "datasets/README.md)"
)


def register_all_isbi2014(root: str = "isbi2014") -> None:
    """Register ``isbi2014_<split>`` (cytoplasm + nucleus) and ``isbi2014_cyto_<split>`` (cytoplasm
    only)."""
    for split in SPLITS:
        json_file = f"{root}/isbi_{split}/annotations/isbi_{split}.json"
        image_root = f"{root}/isbi_{split}/images"
        register_coco_dataset(
            f"isbi2014_{split}",
            json_file,
            image_root,
            {"thing_classes": CLASSES},
            dataset_dir=root,
            hint=HINT,
        )
        register_coco_dataset(
            f"isbi2014_cyto_{split}",
            json_file,
            image_root,
            {"thing_classes": ["cytoplasm"]},
            dataset_dir=root,
            transform=keep_classes(["cytoplasm"]),
            hint=HINT,
        )


register_all_isbi2014()
