#!/usr/bin/env python3
"""Cut LIVECell into 256x256 crops with cropped annotations (thesis §3.1: crops, resized to 512 by
the mapper).

Input: the LIVECell tree of ``datasets/README.md`` (``--root``, default
``$DETECTRON2_DATASETS/livecell``). Output (``--out``, default
``$DETECTRON2_DATASETS/livecell_crops``)::

    {train,val,test}/<image stem>_<k>.png    # crops, same dtype as the source
    {train,val,test}.json                    # COCO: RLE masks, bbox, area; image entries keep
                                             # "source_file_name" and "crop" = [x0, y0, w, h]

Crop positions: ``--mode random`` (default) draws ``--crops-per-image`` windows per image from a
generator seeded with (``--seed``, image id), so the result does not depend on file order or on the
other images; ``--mode grid`` tiles every image (the last row/column aligned to the border). Each
instance is rasterized on the crop (pycocotools) and kept when at least ``--min-area`` pixels
remain; overlapping cells stay overlapping.
"""
import argparse
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

SPLITS = {"train": "livecell_train_val_images", "val": "livecell_train_val_images", "test": "livecell_test_images"}


def read_annotations(path: str) -> Dict:
    """LIVECell json with ``annotations`` as a list (some releases store a dict keyed by id)."""
    with open(path) as f:
        data = json.load(f)
    if isinstance(data["annotations"], dict):
        anns = data["annotations"]
        data["annotations"] = [anns[k] for k in sorted(anns, key=lambda k: (len(str(k)), str(k)))]
    return data


def find_image(image_root: str, file_name: str) -> str:
    """Flat layout, or nested by cell type (the file-name prefix) as in the LIVECell README."""
    for path in (os.path.join(image_root, file_name), os.path.join(image_root, file_name.split("_")[0], file_name)):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"image {file_name} not found in {image_root} (flat or <CellType>/ sub-folder)")


def crop_windows(height: int, width: int, size: int, mode: str, count: int, seed: int, image_id: int
                 ) -> List[Tuple[int, int, int, int]]:
    """Windows (x0, y0, w, h) of at most ``size`` x ``size`` inside the image."""
    ch, cw = min(size, height), min(size, width)
    if mode == "grid":
        ys = sorted({min(y, height - ch) for y in range(0, height, ch)})
        xs = sorted({min(x, width - cw) for x in range(0, width, cw)})
        return [(x, y, cw, ch) for y in ys for x in xs]
    rng = np.random.default_rng([seed, image_id])
    return [(int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1)), cw, ch) for _ in range(count)]


def ann_box(ann: Dict) -> Tuple[float, float, float, float]:
    """XYWH box of an annotation, from its ``bbox`` or its polygon coordinates."""
    if len(ann.get("bbox") or []) == 4:
        return tuple(ann["bbox"])
    seg = ann["segmentation"]
    if isinstance(seg, dict):
        rle = mask_util.frPyObjects(seg, *seg["size"]) if isinstance(seg["counts"], list) else seg
        return tuple(mask_util.toBbox(rle))
    pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in seg])
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    return x0, y0, x1 - x0, y1 - y0


def crop_mask(ann: Dict, window: Tuple[int, int, int, int]) -> Optional[Dict]:
    """The annotation inside ``window`` as compressed RLE, or None when its segmentation is
    unusable."""
    x0, y0, w, h = window
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polys = [(np.asarray(p, dtype=np.float64).reshape(-1, 2) - (x0, y0)).ravel().tolist()
                 for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        return mask_util.merge(mask_util.frPyObjects(polys, h, w)) if polys else None
    if isinstance(seg, dict):
        rle = mask_util.frPyObjects(seg, *seg["size"]) if isinstance(seg["counts"], list) else seg
        return mask_util.encode(np.asfortranarray(mask_util.decode(rle)[y0:y0 + h, x0:x0 + w]))
    return None


def crop_split(root: str, out: str, split: str, size: int, mode: str, count: int, seed: int, min_area: int) -> str:
    """Write the crops and the json of one split; return the json path."""
    data = read_annotations(os.path.join(root, f"livecell_coco_{split}.json"))
    image_root = os.path.join(root, "images", SPLITS[split])
    by_image = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    os.makedirs(os.path.join(out, split), exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": data["categories"]}
    for img in sorted(data["images"], key=lambda i: i["id"]):
        image = cv2.imread(find_image(image_root, img["file_name"]), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f"cannot read {img['file_name']} in {image_root}")
        stem = os.path.splitext(img["file_name"])[0]
        boxes = [(ann, ann_box(ann)) for ann in by_image[img["id"]]]
        for k, (x0, y0, w, h) in enumerate(crop_windows(*image.shape[:2], size, mode, count, seed, img["id"])):
            file_name = f"{stem}_{k}.png"
            cv2.imwrite(os.path.join(out, split, file_name), image[y0:y0 + h, x0:x0 + w])
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": file_name, "height": h, "width": w,
                                   "source_file_name": img["file_name"], "crop": [x0, y0, w, h]})
            for ann, (bx, by, bw, bh) in boxes:
                if bx >= x0 + w or by >= y0 + h or bx + bw <= x0 or by + bh <= y0:
                    continue
                rle = crop_mask(ann, (x0, y0, w, h))
                if rle is None or mask_util.area(rle) < max(min_area, 1):
                    continue
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": ann["category_id"],
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": ann.get("iscrowd", 0),
                })
    path = os.path.join(out, f"{split}.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Crop the requested splits; return {split: json path}."""
    datasets = os.environ.get("DETECTRON2_DATASETS", "datasets")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.join(datasets, "livecell"), help="LIVECell folder")
    parser.add_argument("--out", default=os.path.join(datasets, "livecell_crops"), help="output folder")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--size", type=int, default=256, help="crop side in pixels")
    parser.add_argument("--mode", choices=("random", "grid"), default="random")
    parser.add_argument("--crops-per-image", type=int, default=4, help="random mode: crops per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-area", type=int, default=1, help="drop instances with fewer pixels in a crop")
    args = parser.parse_args(argv)
    written = {}
    for split in args.splits:
        written[split] = crop_split(args.root, args.out, split, args.size, args.mode, args.crops_per_image,
                                    args.seed, args.min_area)
        print(f"{split}: {written[split]}")
    return written


if __name__ == "__main__":
    main()
