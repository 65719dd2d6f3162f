"""OME-Zarr (NGFF 0.4) output of block-wise prediction: the predicted plane and its instance labels.

``<stem>.ome.zarr/``: the image plane the model saw at ``0`` (y, x; its pixel size when the input
declares one) and the label image at ``labels/cells/0`` (``image-label`` metadata, object ids, 0 =
background, overlaps flattened to the higher score). Both are chunked by the block size's divisor
``chunk``, so that every block writes whole chunks of its own (no two writers share a chunk).
Written with zarr's v2 format and ome-zarr-py's metadata writers: napari (napari-ome-zarr), Fiji
(MoBIE, n5-viewer) and QuPath read it.
"""

import os
from typing import Optional, Tuple

import numpy as np

LABELS_NAME = "cells"


def _axes(unit: str):
    return [dict(name=a, type="space", **({"unit": unit} if unit else {})) for a in "yx"]


def create_ome_zarr(
    path: str,
    shape: Tuple[int, ...],
    image_dtype: np.dtype,
    label_dtype: np.dtype,
    chunk: int,
    pixel_size: Optional[Tuple[float, float]] = None,
    unit: str = "",
) -> None:
    """Create the image (``shape`` (H, W) or (H, W, C)) and label arrays, empty, with their NGFF
    metadata; an existing store of the same layout is kept as it is (a resumed run)."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    h, w = shape[:2]
    if os.path.isdir(path):
        check_ome_zarr(path, shape, label_dtype)
        return
    fmt = FormatV04()
    scale = [{"type": "scale", "scale": list(pixel_size or (1.0, 1.0))}]
    root = zarr.open_group(path, mode="w", zarr_format=2)
    # colour planes are stored as channels (c, y, x), as NGFF wants
    image_shape = (shape[2], h, w) if len(shape) == 3 else (h, w)
    root.create_array(
        "0", shape=image_shape, chunks=image_shape[:-2] + (chunk, chunk), dtype=image_dtype
    )
    image_axes = ([{"name": "c", "type": "channel"}] if len(shape) == 3 else []) + _axes(unit)
    image_scale = [{"type": "scale", "scale": [1.0] * (len(shape) - 2) + scale[0]["scale"]}]
    write_multiscales_metadata(
        root, [{"path": "0", "coordinateTransformations": image_scale}], fmt, image_axes
    )
    labels = root.create_group("labels")
    labels.attrs["labels"] = [LABELS_NAME]
    cells = labels.create_group(LABELS_NAME)
    cells.create_array("0", shape=(h, w), chunks=(chunk, chunk), dtype=label_dtype, fill_value=0)
    write_multiscales_metadata(
        cells, [{"path": "0", "coordinateTransformations": scale}], fmt, _axes(unit)
    )
    write_label_metadata(labels, LABELS_NAME, fmt=fmt)


def check_ome_zarr(path: str, shape: Tuple[int, ...], label_dtype: np.dtype) -> None:
    import zarr

    try:
        labels = zarr.open_array(os.path.join(path, "labels", LABELS_NAME, "0"), mode="r")
    except Exception as e:
        raise ValueError(f"{path} exists and is not an IAUNet labels store ({e})") from None
    if labels.shape != tuple(shape[:2]) or labels.dtype != label_dtype:
        raise ValueError(
            f"{path} holds labels of shape {labels.shape} {labels.dtype}, this run writes "
            f"{tuple(shape[:2])} {label_dtype}: use another --output"
        )


def write_block(
    path: str, core: Tuple[int, int, int, int], image: np.ndarray, labels: np.ndarray
) -> None:
    """Write a block's ``image`` region ((h, w) or (h, w, C)) and ``labels`` at ``core``."""
    import zarr

    y0, x0, y1, x1 = core
    array = zarr.open_array(os.path.join(path, "0"), mode="r+")
    if image.ndim == 3:
        array[:, y0:y1, x0:x1] = np.moveaxis(image, 2, 0)
    else:
        array[y0:y1, x0:x1] = image
    zarr.open_array(os.path.join(path, "labels", LABELS_NAME, "0"), mode="r+")[y0:y1, x0:x1] = (
        labels
    )
