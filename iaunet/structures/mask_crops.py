"""MaskCrops: N instance masks of a large image as tight bool crops (memory follows the objects'
area)."""

from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.structures import Boxes


class MaskCrops:
    """N instance masks of an (H, W) image stored as tight bool crops plus their top-left (y, x)
    corners.

    Supports what ``Instances`` needs (``len``, indexing, ``cat``) and converts to full-size bool
    masks, boxes and COCO RLE without ever holding N full-size masks.
    """

    def __init__(
        self,
        crops: Sequence[np.ndarray],
        offsets: Union[Sequence[Tuple[int, int]], np.ndarray],
        image_size: Tuple[int, int],
    ):
        self.crops = [np.asarray(c, dtype=bool) for c in crops]
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if len(self.crops) != len(self.offsets):
            raise ValueError(f"{len(self.crops)} crops but {len(self.offsets)} offsets")

    def __len__(self) -> int:
        return len(self.crops)

    def __iter__(self) -> Iterator[Tuple[int, int, np.ndarray]]:
        """Yields (y0, x0, crop) per instance."""
        for (y0, x0), crop in zip(self.offsets.tolist(), self.crops):
            yield y0, x0, crop

    def __getitem__(self, item) -> "MaskCrops":
        if isinstance(item, torch.Tensor):
            item = item.cpu().numpy()
        idx = np.arange(len(self))[[item] if isinstance(item, (int, np.integer)) else item]
        return MaskCrops([self.crops[i] for i in idx], self.offsets[idx], self.image_size)

    @staticmethod
    def cat(items: List["MaskCrops"]) -> "MaskCrops":
        crops = [c for m in items for c in m.crops]
        offsets = (
            np.concatenate([m.offsets for m in items]) if items else np.zeros((0, 2), np.int64)
        )
        return MaskCrops(crops, offsets, items[0].image_size)

    @classmethod
    def from_bitmasks(cls, masks: Union[torch.Tensor, np.ndarray]) -> "MaskCrops":
        """(N, H, W) bool masks -> tight crops (an empty mask becomes a 0x0 crop at (0, 0))."""
        masks = torch.as_tensor(masks).bool().cpu()
        rows, cols = masks.any(2).numpy(), masks.any(1).numpy()
        crops, offsets = [], []
        for i in range(masks.shape[0]):
            ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
            if len(ys) == 0:
                crops.append(np.zeros((0, 0), bool))
                offsets.append((0, 0))
                continue
            crops.append(masks[i, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1].numpy().copy())
            offsets.append((ys[0], xs[0]))
        return cls(crops, offsets, masks.shape[1:])

    def to_bitmasks(self) -> torch.Tensor:
        """(N, H, W) bool tensor."""
        out = torch.zeros((len(self), *self.image_size), dtype=torch.bool)
        for i, (y0, x0, crop) in enumerate(self):
            out[i, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = torch.from_numpy(crop)
        return out

    def get_bounding_boxes(self) -> Boxes:
        """Tight XYXY boxes (x2 = last column + 1), as ``BitMasks.get_bounding_boxes``."""
        boxes = np.zeros((len(self), 4), np.float32)
        for i, (y0, x0, crop) in enumerate(self):
            if crop.size:
                boxes[i] = (x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])
        return Boxes(torch.from_numpy(boxes))

    def to_rles(self) -> List[dict]:
        """COCO compressed RLE per instance (``counts`` as str), built from an (H, w) column strip
        each."""
        import pycocotools.mask as mask_util

        h, w = self.image_size
        rles = []
        for y0, x0, crop in self:
            if crop.size == 0:
                counts = [h * w]
            else:
                strip = np.zeros((h, crop.shape[1]), bool)
                strip[y0 : y0 + crop.shape[0]] = crop
                v = strip.ravel(order="F")  # COCO RLE runs go down the columns
                bounds = np.concatenate([[0], np.flatnonzero(v[1:] != v[:-1]) + 1, [v.size]])
                counts = ([0] if v[0] else []) + np.diff(bounds).tolist()
                counts[0] += x0 * h  # empty columns left of the strip
                tail = (w - x0 - crop.shape[1]) * h
                if len(counts) % 2:  # the last run is background
                    counts[-1] += tail
                elif tail:
                    counts.append(tail)
            rle = mask_util.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            rle["counts"] = rle["counts"].decode("ascii")
            rles.append(rle)
        return rles
