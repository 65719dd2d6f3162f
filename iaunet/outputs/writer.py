"""The outputs of one ``iaunet-predict`` run: which files, per image and per run (docs/predict.md).

``PredictionWriter.write_image`` writes one image's requested files (each atomically) and keeps what
the run files need; ``finish`` writes the run files. ``--save`` names the outputs:

=========  ===================================================================================
labels     ``<stem>_labels.tif``: flattened instance ids (overlaps: the higher score wins)
overlay    ``<stem>_overlay.png``: outlines and ids on the 8-bit rendering
rois       ``<stem>_rois.zip``: ImageJ/Fiji ROI set, one ROI per instance (:mod:`.rois`)
masks      ``<stem>_masks.tif``: overlap-preserving label pages (:mod:`.masks`)
csv        ``<stem>_objects.csv`` and ``objects.csv`` for the run (:mod:`.table`)
coco       ``predictions.json`` (COCO results, RLE) and ``images.json`` (:mod:`.coco`)
=========  ===================================================================================

A z-stack or time-lapse (``PredictionWriter.write_stack``, :mod:`.stacks`): ``<stem>_labels.tif`` is
the (N, H, W) label image of the linked objects, ``<stem>_objects.csv`` the stack's table; the
overlay, ROI set and mask pages are written per plane (``<stem>_z000_*`` / ``<stem>_t000_*``).

A model predicting whole outlines too (``MODEL.IAUNET.AMODAL``, docs/amodal.md): the label image,
the overlay and the COCO results are the visible parts (one pixel, one cell); the masks TIFF and
``_rois.zip`` are the whole outlines (overlapping), ``<stem>_rois_visible.zip`` the visible parts
(same ROI names); the CSV measures the whole outlines and adds the ``table.AMODAL_COLUMNS``.
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.image_io import to_uint8_rgb
from ..structures import MaskCrops
from ..utils.atomic import atomic_write
from . import coco, stacks, table
from .masks import instance_overlaps, label_image, mask_pages, pages_tiff_bytes, tiff_bytes
from .overlay import png_bytes, render_overlay
from .rois import instance_rois, rois_zip_bytes

logger = logging.getLogger(__name__)

OUTPUTS = ("labels", "overlay", "rois", "masks", "csv", "coco")
DEFAULT_SAVE = OUTPUTS  # every output: each is cheap next to the prediction itself


def parse_save(text: str) -> Tuple[str, ...]:
    """``"labels,rois"`` -> ("labels", "rois") in the canonical order; ``"all"`` -> every output.
    Raises ValueError naming an unknown output."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return OUTPUTS
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown or not names:
        raise ValueError(
            f"--save {text!r}: unknown output {', '.join(unknown) or '(none given)'}; choose from "
            f"{','.join(OUTPUTS)} or all"
        )
    return tuple(n for n in OUTPUTS if n in names)


@dataclass
class ImagePrediction:
    """One image's prediction, ready to write. ``masks``, ``scores`` and ``classes`` are in
    decreasing score (instance id k = position k - 1); ``image`` is the image as read from the
    file."""

    image_id: int
    path: str
    stem: str
    image: np.ndarray
    masks: MaskCrops
    scores: np.ndarray
    classes: np.ndarray
    whole_masks: Optional[MaskCrops] = None  # whole outlines (MODEL.IAUNET.AMODAL); masks: visible


def image_prediction(
    instances,
    image: np.ndarray,
    score_threshold: float,
    *,
    image_id: int = 1,
    path: str = "",
    stem: str = "image",
) -> ImagePrediction:
    """``Instances`` from :class:`~iaunet.inference.IAUNetPredictor` (``pred_masks`` as
    ``MaskCrops`` or bool masks) -> the instances scoring at least ``score_threshold``, in
    decreasing score: instance id k is the k-th."""
    instances = instances[instances.scores >= score_threshold]
    instances = instances[instances.scores.argsort(descending=True)]
    masks = instances.pred_masks
    whole = instances.pred_amodal_masks if instances.has("pred_amodal_masks") else None
    if not isinstance(masks, MaskCrops):
        masks = MaskCrops.from_bitmasks(masks)
    if whole is not None and not isinstance(whole, MaskCrops):
        whole = MaskCrops.from_bitmasks(whole)
    return ImagePrediction(
        image_id=image_id,
        path=path,
        stem=stem,
        image=image,
        masks=masks,
        scores=instances.scores.numpy(),
        classes=instances.pred_classes.numpy(),
        whole_masks=whole,
    )


class PredictionWriter:
    """Writes the outputs named in ``save`` into ``out_dir`` (which must exist)."""

    def __init__(
        self,
        out_dir: str,
        save: Sequence[str] = DEFAULT_SAVE,
        *,
        cat_ids: Sequence[int],
        class_names: Optional[Sequence[str]] = None,
        intensity_norm: str = "percentile",
        percentiles: Sequence[float] = (0.5, 99.5),
        normalize_uint8: bool = False,
    ):
        self.out_dir = out_dir
        self.save = tuple(save)
        self.cat_ids = list(cat_ids)
        self.class_names = list(class_names or [])
        self.intensity_norm = intensity_norm
        self.percentiles = tuple(percentiles)
        self.normalize_uint8 = normalize_uint8
        self.images: List[Dict] = []
        self.results: List[Dict] = []
        self.rows: List[Dict] = []
        self.columns: List[str] = []

    def class_name(self, c: int) -> str:
        return table.class_name(c, self.class_names)

    def _write(self, name: str, content) -> str:
        atomic_write(os.path.join(self.out_dir, name), content)
        return name

    def write_image(
        self, pred: ImagePrediction, save: Optional[Sequence[str]] = None, record: bool = True
    ) -> Dict:
        """Write one image's files (``save``: those outputs only; default the writer's); returns
        its ``images.json`` entry (with the file names), kept for the run files when
        ``record``."""
        save = self.save if save is None else tuple(save)
        masks, (h, w) = pred.masks, pred.masks.image_size
        scores = np.asarray(pred.scores, np.float64)
        names = [self.class_name(int(c)) for c in pred.classes]
        entry = {
            "id": pred.image_id,
            "file_name": os.path.abspath(pred.path),
            "height": h,
            "width": w,
        }
        whole = pred.whole_masks if pred.whole_masks is not None else masks  # overlapping outputs
        overlaps = instance_overlaps(whole) if {"masks", "csv"} & set(save) else None
        stem = pred.stem
        if "labels" in save:
            entry["labels"] = self._write(
                f"{stem}_labels.tif", tiff_bytes(label_image(masks, h, w))
            )
        if "overlay" in save:
            image8 = to_uint8_rgb(
                pred.image, self.intensity_norm, self.percentiles, self.normalize_uint8
            )
            overlay = render_overlay(image8, masks)
            entry["overlay"] = self._write(f"{stem}_overlay.png", png_bytes(overlay))
        if "rois" in save:
            rois = instance_rois(whole, scores, names)
            entry["rois"] = self._write(f"{stem}_rois.zip", rois_zip_bytes(rois))
            if pred.whole_masks is not None:
                rois = instance_rois(masks, scores, names)
                name = f"{stem}_rois_visible.zip"
                entry["rois_visible"] = self._write(name, rois_zip_bytes(rois))
        if "masks" in save:
            pages = mask_pages(whole, h, w, overlaps)
            entry["masks"] = self._write(f"{stem}_masks.tif", pages_tiff_bytes(pages))
        if "csv" in save:
            rows = table.object_rows(whole, scores, names, pred.image, overlaps)
            if pred.whole_masks is not None:
                for row, extra in zip(rows, table.amodal_rows(masks, pred.whole_masks)):
                    row.update(extra)
            columns = table.table_columns(pred.image, amodal=pred.whole_masks is not None)
            entry["objects"] = self._write(f"{stem}_objects.csv", table.csv_bytes(rows, columns))
            run_rows = [dict(r, image=pred.path, image_id=pred.image_id) for r in rows]
            run_rows = run_rows if record else []
            self.rows.extend(run_rows)
            self.columns += [c for c in columns if c not in self.columns]
        if "coco" in save:
            self.results += coco.coco_results(
                masks, scores, pred.classes, pred.image_id, self.cat_ids
            )
        if record:
            self.images.append(entry)
        return entry

    def write_stack(
        self,
        planes: Sequence[ImagePrediction],
        ids: Sequence[np.ndarray],
        info: stacks.StackInfo,
        image_id: int,
        path: str,
        stem: str,
    ) -> Dict:
        """Write a z-stack's or time-lapse's files (:mod:`iaunet.outputs.stacks`): the (N, H, W)
        label image and the stack's table with the object ``ids`` of every plane's instances;
        per plane ``<stem>_z000_*`` (``_t000_``) the overlap-preserving outputs (overlay, ROI
        set, mask pages; ids per plane). A COCO result has no plane: stacks are not in
        predictions.json. Returns the file's ``images.json`` entry."""
        h, w = planes[0].masks.image_size
        entry = {"id": image_id, "file_name": os.path.abspath(path), "height": h, "width": w}
        entry.update(axis=info.axis, planes=len(planes))
        labels = stacks.stack_labels([p.masks for p in planes], ids)
        if "labels" in self.save:
            name = f"{stem}_labels.tif"
            entry["labels"] = self._write(name, stacks.stack_tiff_bytes(labels, info))
        if "csv" in self.save:
            names = [[self.class_name(int(c)) for c in p.classes] for p in planes]
            rows = stacks.stack_rows(labels, [p.scores for p in planes], ids, names, info)
            columns = stacks.Z_COLUMNS if info.axis == "z" else stacks.T_COLUMNS
            entry["objects"] = self._write(f"{stem}_objects.csv", table.csv_bytes(rows, columns))
        per_plane = [s for s in self.save if s in ("overlay", "rois", "masks")]
        entry["plane_files"] = [self.write_image(p, per_plane, record=False) for p in planes]
        self.images.append(entry)
        return entry

    def finish(self) -> List[str]:
        """Write the run files; returns their names."""
        written = []
        if "csv" in self.save:
            amodal = [c for c in table.AMODAL_COLUMNS if c in self.columns]
            fixed = table.BASE_COLUMNS + table.OVERLAP_COLUMNS + table.AMODAL_COLUMNS
            intensity = [c for c in self.columns if c not in fixed]  # gray and colour images
            columns = table.RUN_COLUMNS + table.BASE_COLUMNS + intensity + table.OVERLAP_COLUMNS
            columns += amodal
            written.append(self._write("objects.csv", table.csv_bytes(self.rows, columns)))
        if "coco" in self.save:
            cats = coco.categories(self.cat_ids, self.class_names)
            written.append(self._write("predictions.json", coco.results_json(self.results)))
            written.append(self._write("images.json", coco.images_json(self.images, cats)))
        return written
