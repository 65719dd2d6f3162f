"""A prediction as napari layer data tuples ``(data, kwargs, layer_type)`` (numpy only, no Qt).

Ids are the same as in ``iaunet-predict``'s files: instance k (1..N, decreasing score) has value k
in the flattened labels and on its mask page, and is the k-th point.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..outputs.masks import instance_overlaps, label_image, mask_pages
from ..outputs.writer import ImagePrediction

LayerData = Tuple[Any, Dict[str, Any], str]


def page_layers(
    pages: np.ndarray, name: str, placement: Dict[str, Any], kind: str = "masks"
) -> List[LayerData]:
    """One Labels layer per page (overlapping instances are on different pages, so showing all
    pages at once shows every instance whole), named ``<name> <kind> page <p>``."""
    return [
        (page, dict(placement, name=f"{name} {kind} page {p + 1}", opacity=0.5), "labels")
        for p, page in enumerate(pages)
    ]


def prediction_layers(
    pred: ImagePrediction,
    name: str,
    class_names: Optional[Sequence[str]] = None,
    placement: Optional[Dict[str, Any]] = None,
) -> List[LayerData]:
    """Labels (flattened; overlaps: the higher score), mask pages, and a Points layer at the
    instances' centroids with their id, score and class as features (the score as text).

    A prediction with whole outlines (``MODEL.IAUNET.AMODAL``, docs/amodal.md): the labels are the
    visible parts ("<name> visible"), the pages the whole outlines ("<name> whole page <p>").

    ``placement``: layer kwargs shared with the image layer (``scale``, ``translate``) so that the
    results sit on the image."""
    placement = dict(placement or {})
    masks = pred.masks
    h, w = masks.image_size
    names = list(class_names or [])
    labels = label_image(masks, h, w)
    amodal = pred.whole_masks is not None
    whole = pred.whole_masks if amodal else masks
    pages = mask_pages(whole, h, w, instance_overlaps(whole))
    centroids = np.zeros((len(masks), 2))
    for i, (y0, x0, crop) in enumerate(masks):
        ys, xs = np.nonzero(crop)
        if len(ys):
            centroids[i] = (ys.mean() + y0, xs.mean() + x0)
    classes = [int(c) for c in pred.classes]
    features = {
        "id": np.arange(1, len(masks) + 1),
        "score": np.asarray(pred.scores, np.float64),
        "class": [names[c] if c < len(names) else f"class_{c}" for c in classes],
    }
    points = dict(
        placement,
        name=f"{name} scores",
        features=features,
        size=max(2.0, min(h, w) / 100),
        face_color="white",
        text={"string": "{score:.2f}", "size": 9, "color": "yellow", "anchor": "upper_left"},
    )
    return [
        (labels, dict(placement, name=f"{name} {'visible' if amodal else 'labels'}"), "labels"),
        *page_layers(pages, name, placement, "whole" if amodal else "masks"),
        (centroids, points, "points"),
    ]
