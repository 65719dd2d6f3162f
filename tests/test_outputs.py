"""Prediction outputs (iaunet.outputs): ImageJ ROI sets, overlap-preserving mask pages, per-object
tables, ``--save``; each read back with the reader a user has (roifile, tifffile, csv)."""

import csv
import io

import numpy as np
import pytest
import roifile
import tifffile
from conftest import scene_masks
from scipy import ndimage
from skimage.draw import polygon2mask

from iaunet.inference import MaskCrops
from iaunet.outputs.masks import (
    assign_pages,
    instance_overlaps,
    label_image,
    mask_pages,
    pages_tiff_bytes,
)
from iaunet.outputs.rois import instance_rois, roi_mask, rois_zip_bytes, trace_outlines
from iaunet.outputs.table import csv_bytes, object_rows, table_columns
from iaunet.outputs.writer import OUTPUTS, parse_save


def imagej_raster(roi, shape):
    """ImageJ's rule, independently of iaunet: a pixel is inside when its centre is inside, outlines
    combined even-odd. skimage puts pixel centres at integers, ImageJ at +0.5: shift by -0.5."""
    out = np.zeros(shape, bool)
    polys = roifile.ImagejRoi.path2coords(roi.multi_coordinates) if roi.composite else None
    for poly in polys or [roi.coordinates()]:
        out ^= polygon2mask(shape, np.asarray(poly, np.float64)[:, ::-1] - 0.5)
    return out


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def scene():
    image, masks = scene_masks()
    overlaps = instance_overlaps(MaskCrops.from_bitmasks(masks))
    assert overlaps.pairs, "the test scene must have overlapping cells"
    return image, masks


def test_rois_round_trip_with_overlaps(scene, tmp_path):
    image, masks = scene
    scores = np.linspace(0.99, 0.6, len(masks))
    crops = MaskCrops.from_bitmasks(masks)
    path = tmp_path / "x_rois.zip"
    path.write_bytes(rois_zip_bytes(instance_rois(crops, scores, ["cell"] * len(masks))))
    rois = roifile.roiread(str(path))
    assert len(rois) == len(masks)  # overlapping instances stay separate ROIs
    assert [r.name for r in rois] == [f"{i + 1:04d}_s{s:.2f}" for i, s in enumerate(scores)]
    assert "score: 0.9900" in rois[0].props and "class: cell" in rois[0].props
    for roi, mask in zip(rois, masks):
        assert roi.roitype == roifile.ROI_TYPE.TRACED  # one piece, no hole: an editable polygon
        assert iou(imagej_raster(roi, mask.shape), mask) >= 0.98
        assert (roi_mask(roi, mask.shape) == mask).all()  # pixel-edge outlines: exact


def test_rois_one_pixel_convention():
    """A single pixel at (x=3, y=5) is the square with corners (3, 5)..(4, 6), not a point: outlines
    through pixel centres would give ImageJ masks one pixel smaller."""
    crop = np.ones((1, 1), bool)
    (poly,) = trace_outlines(crop)
    assert sorted(map(tuple, (poly + [3, 5]).tolist())) == [(3, 5), (3, 6), (4, 5), (4, 6)]
    m = np.zeros((10, 10), bool)
    m[5, 3] = True
    (roi,) = instance_rois(MaskCrops.from_bitmasks(m[None]), [0.5])
    assert (roi.left, roi.top, roi.right, roi.bottom) == (3, 5, 4, 6)
    assert (imagej_raster(roi, m.shape) == m).all()


def test_rois_holes_and_pieces_are_one_composite_roi(tmp_path):
    m = np.zeros((30, 40), bool)
    m[2:20, 2:20] = True
    m[6:10, 6:10] = False  # a hole
    m[24:28, 30:38] = True  # a second piece
    m[20, 20] = True  # touches the first piece at a corner only: joined (8-connectivity)
    path = tmp_path / "r.zip"
    path.write_bytes(rois_zip_bytes(instance_rois(MaskCrops.from_bitmasks(m[None]), [0.9])))
    (roi,) = roifile.roiread(str(path))
    assert roi.composite and roi.roitype == roifile.ROI_TYPE.RECT
    assert len(roi.coordinates(multi=True)) == 3  # outer outline, hole, second piece
    assert (imagej_raster(roi, m.shape) == m).all()


def test_trace_outlines_random_masks():
    rng = np.random.default_rng(0)
    for t in range(200):
        m = rng.random(tuple(rng.integers(1, 25, 2))) < rng.uniform(0.2, 0.8)
        if t % 2:
            m = ndimage.binary_opening(m)
        if not m.any():
            continue
        (roi,) = instance_rois(MaskCrops.from_bitmasks(m[None]), [1.0])
        roi = roifile.ImagejRoi.frombytes(roi.tobytes())
        assert (imagej_raster(roi, m.shape) == m).all()
        assert (roi_mask(roi, m.shape) == m).all()
        pieces = ndimage.label(m, np.ones((3, 3)))[1]
        holes = ndimage.label(~np.pad(m, 1))[1] - 1
        assert roi.composite == (pieces + holes > 1)


def test_mask_pages_keep_every_instance_whole(scene):
    image, masks = scene
    crops = MaskCrops.from_bitmasks(masks)
    overlaps = instance_overlaps(crops)
    pages = mask_pages(crops, *image.shape, overlaps)
    assert pages.dtype == np.uint16 and 2 <= len(pages) <= 4
    on = assign_pages(len(masks), list(overlaps.pairs))
    for (i, j), n in overlaps.pairs.items():
        assert on[i] != on[j] and n == (masks[i] & masks[j]).sum()
    data = tifffile.TiffFile(io.BytesIO(pages_tiff_bytes(pages)))
    assert data.is_imagej and data.series[0].axes == "ZYX"
    read = data.asarray()
    for k, mask in enumerate(masks, start=1):
        assert ((read[on[k - 1]] == k) == mask).all()  # id k keeps all its pixels on its page
    flat = label_image(crops, *image.shape)
    assert set(np.unique(flat)) <= set(range(len(masks) + 1))


def test_object_table(scene):
    image, masks = scene
    crops = MaskCrops.from_bitmasks(masks)
    scores = np.linspace(0.9, 0.5, len(masks))
    rows = object_rows(crops, scores, ["cell"] * len(masks), image)
    text = csv_bytes(rows, table_columns(image)).decode()
    read = list(csv.DictReader(io.StringIO(text)))
    assert len(read) == len(masks)
    for row, mask in zip(read, masks):
        assert int(row["area"]) == mask.sum()
        ys, xs = np.nonzero(mask)
        assert float(row["centroid_x"]) == pytest.approx(xs.mean(), abs=1e-3)
        assert (int(row["bbox_x"]), int(row["bbox_width"])) == (xs.min(), np.ptp(xs) + 1)
        assert float(row["mean_intensity"]) == pytest.approx(image[mask].mean(), rel=1e-4)
        assert int(row["max_intensity"]) == image[mask].max()  # uint16 values, not 0..255
        others = [int(j) for j in row["overlap_ids"].split(";") if j]
        union = np.zeros_like(mask)
        for j in others:
            union |= masks[j - 1]
            assert str(int(row["id"])) in read[j - 1]["overlap_ids"].split(";")
        assert int(row["overlap_px"]) == (mask & union).sum()
        assert (union & mask).sum() == (mask & masks.sum(0).__gt__(1)).sum()
    rgb = np.stack([image] * 3, -1)
    columns = table_columns(rgb)
    assert "mean_intensity_g" in columns and "max_intensity_b" in columns
    row = object_rows(crops, scores, ["cell"] * len(masks), rgb)[0]
    assert row["max_intensity_r"] == image[masks[0]].max()


def test_parse_save():
    assert parse_save("all") == OUTPUTS
    assert parse_save("csv, rois") == ("rois", "csv")
    for bad in ("roi", "", "labels,xml"):
        with pytest.raises(ValueError, match="choose from"):
            parse_save(bad)
