"""COCO outputs of ``iaunet-predict``: ``predictions.json`` (results, RLE) and ``images.json``.

``COCO("images.json").loadRes("predictions.json")`` works (pycocotools); each image's results are
in decreasing score, so label id k is the image's k-th result.
"""

import json
from typing import Dict, List, Optional, Sequence

import pycocotools.mask as mask_util

from ..structures import MaskCrops


def category_ids(metadata, num_classes: int) -> List[int]:
    """Contiguous class -> dataset category id (the metadata's mapping when present, else class +
    1)."""
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None) if metadata else None
    if mapping:
        reverse = {v: k for k, v in mapping.items()}
        return [int(reverse.get(c, c + 1)) for c in range(num_classes)]
    return [c + 1 for c in range(num_classes)]


def categories(cat_ids: Sequence[int], class_names: Optional[Sequence[str]]) -> List[Dict]:
    """COCO ``categories``: the dataset ids with the metadata's class names (``class_<c>`` when
    unnamed)."""
    names = list(class_names or [])
    return [
        {"id": cid, "name": names[c] if c < len(names) else f"class_{c}"}
        for c, cid in enumerate(cat_ids)
    ]


def coco_results(
    masks: MaskCrops,
    scores: Sequence[float],
    classes: Sequence[int],
    image_id: int,
    cat_ids: Sequence[int],
) -> List[Dict]:
    """COCO results ``{image_id, category_id, segmentation (RLE, counts as str), score, bbox}``."""
    results = []
    for rle, score, label in zip(masks.to_rles(), scores, classes):
        results.append(
            {
                "image_id": image_id,
                "category_id": int(cat_ids[int(label)]),
                "segmentation": rle,
                "score": round(float(score), 5),
                "bbox": [round(float(v), 2) for v in mask_util.toBbox(rle)],
            }
        )
    return results


def results_json(results: Sequence[Dict]) -> str:
    return json.dumps(list(results))


def images_json(images: Sequence[Dict], cats: Sequence[Dict]) -> str:
    """A COCO file with the images and categories and no annotations."""
    return json.dumps(
        {"images": list(images), "categories": list(cats), "annotations": []}, indent=1
    )
