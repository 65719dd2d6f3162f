"""Evaluation of whole (amodal) outlines next to the visible parts (docs/amodal.md).

A dataset whose annotations carry ``amodal_segmentation`` (the whole object; ``segmentation`` is
its visible part) is evaluated three times in one ``--eval-only``, each by detectron2's
``COCOEvaluator`` and by the matching F1 (:class:`.matching.InstanceMatchingEvaluator`):

* ``segm`` / ``matching``: the predicted visible parts (``pred_masks``) against the visible parts;
* ``segm_whole`` / ``matching_whole``: the predicted whole outlines (``pred_amodal_masks``; a model
  without them is scored with its ``pred_masks``) against the whole outlines;
* ``segm_hidden`` / ``matching_hidden``: the same, on the objects at least ``HIDDEN_MIN`` hidden
  (the others become COCO crowd regions: a prediction on them counts neither way).

and ``hidden_fraction`` (:class:`HiddenFractionEvaluator`): how well the predicted share of each
cell that is hidden, 1 - visible / whole, matches the truth on the cells found (whole outlines
matched one-to-one at IoU >= 0.5, score >= 0.5).

The two ground truths are derived datasets, ``<name>_whole`` and ``<name>_hidden``, registered on
demand from the dataset's own dicts; ``COCOEvaluator`` converts them to COCO json as for any
dataset without a json file.
"""

import copy
import itertools
import logging
from typing import Dict, List, Optional

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..data import statistics
from ..data.datasets.common import AMODAL_FIELD
from .matching import match_pairs

logger = logging.getLogger(__name__)

HIDDEN_MIN = 0.2  # share of an object hidden from which it counts as hidden (segm_hidden)
# derived dataset suffix -> result-name suffix
SUBSETS = {"whole": "_whole", "hidden": "_hidden"}


def has_amodal(dataset_name: str) -> bool:
    """Whether any annotation of ``dataset_name`` has a whole outline (``amodal_segmentation``)."""
    return any(
        AMODAL_FIELD in a
        for d in DatasetCatalog.get(dataset_name)
        for a in d.get("annotations", [])
    )


def to_rle(segmentation, height: int, width: int) -> Dict:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE."""
    if isinstance(segmentation, list):
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def hidden_fraction(annotation: Dict, height: int, width: int) -> float:
    """1 - visible area / whole area of one annotation (0 without ``amodal_segmentation``)."""
    if AMODAL_FIELD not in annotation:
        return 0.0
    whole = float(mask_util.area(to_rle(annotation[AMODAL_FIELD], height, width)))
    visible = float(mask_util.area(to_rle(annotation["segmentation"], height, width)))
    return float(np.clip(1.0 - visible / max(whole, 1.0), 0.0, 1.0))


def whole_cell_dicts(dataset_name: str, hidden_min: Optional[float] = None) -> List[Dict]:
    """The dicts of ``dataset_name`` with each annotation's whole outline as its ``segmentation``
    (its visible part when it has none: nothing hidden). With ``hidden_min``, annotations hidden
    less than that become crowd regions (``iscrowd`` 1)."""
    out = []
    for record in DatasetCatalog.get(dataset_name):
        record = copy.copy(record)
        annotations = []
        for a in record.get("annotations", []):
            a = dict(a)
            h, w = record["height"], record["width"]
            hidden = hidden_fraction(a, h, w)
            a["segmentation"] = a.pop(AMODAL_FIELD, a["segmentation"])
            a["bbox"] = mask_util.toBbox(to_rle(a["segmentation"], h, w)).tolist()
            a["bbox_mode"] = BoxMode.XYWH_ABS
            if hidden_min is not None and hidden < hidden_min:
                a["iscrowd"] = 1
            annotations.append(a)
        record["annotations"] = annotations
        out.append(record)
    return out


def register_whole_cells(dataset_name: str, subset: str) -> str:
    """Register ``<dataset_name>_<subset>`` (``subset`` "whole" or "hidden", :data:`SUBSETS`) once;
    returns its name."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {sorted(SUBSETS)}, got {subset!r}")
    name = f"{dataset_name}_{subset}"
    if name not in DatasetCatalog.list():
        hidden_min = HIDDEN_MIN if subset == "hidden" else None
        DatasetCatalog.register(name, lambda: whole_cell_dicts(dataset_name, hidden_min))
        meta = MetadataCatalog.get(dataset_name)
        MetadataCatalog.get(name).set(
            thing_classes=list(meta.thing_classes),
            evaluator_type="coco",
            **(
                {"thing_dataset_id_to_contiguous_id": meta.thing_dataset_id_to_contiguous_id}
                if meta.get("thing_dataset_id_to_contiguous_id") is not None
                else {}
            ),
        )
    return name


class WholeOutlineEvaluator(DatasetEvaluator):
    """Runs ``evaluator`` on the predicted whole outlines and renames its results: each task
    ``t`` (``segm``, ``matching``) becomes ``t + suffix``."""

    def __init__(self, evaluator: DatasetEvaluator, suffix: str):
        self.evaluator, self.suffix = evaluator, suffix

    def reset(self) -> None:
        self.evaluator.reset()

    def process(self, inputs, outputs) -> None:
        whole = []
        for out in outputs:
            inst = out["instances"]
            if inst.has("pred_amodal_masks"):  # the caller's instances keep their visible masks
                inst = _with_masks(inst, inst.pred_amodal_masks)
            whole.append({**out, "instances": inst})
        self.evaluator.process(inputs, whole)

    def evaluate(self):
        results = self.evaluator.evaluate()
        if results is None:  # not the main process
            return results
        return {task + self.suffix: res for task, res in results.items()}


def _with_masks(instances, masks):
    """``instances`` (detectron2 ``Instances``) as a new object whose ``pred_masks`` are
    ``masks``."""
    out = type(instances)(instances.image_size)
    for k, v in instances.get_fields().items():
        out.set(k, v)
    out.pred_masks = masks
    return out


class HiddenFractionEvaluator(DatasetEvaluator):
    """Median and mean absolute error of the hidden fraction (1 - visible area / whole area) of the
    predicted cells (score >= ``score_thresh``) matched to true cells by whole-outline IoU >= 0.5
    (:func:`~iaunet.evaluation.matching.match_pairs`). A prediction without whole outlines has
    nothing hidden."""

    def __init__(self, dataset_name: str, score_thresh: float, distributed: bool = True):
        self.dataset_name, self.score_thresh, self.distributed = (
            dataset_name,
            score_thresh,
            distributed,
        )
        self._gt: Optional[Dict] = None

    def reset(self) -> None:
        self._errors: List[tuple] = []  # (absolute error, true hidden fraction) per matched cell

    def process(self, inputs, outputs) -> None:
        if self._gt is None:
            self._gt = {d["image_id"]: d for d in DatasetCatalog.get(self.dataset_name)}
        for inp, out in zip(inputs, outputs):
            record = self._gt[inp["image_id"]]
            h, w = record["height"], record["width"]
            objects = statistics.objects(record)
            gt_whole = [to_rle(a.get(AMODAL_FIELD, a["segmentation"]), h, w) for a in objects]
            gt_hidden = np.array([hidden_fraction(a, h, w) for a in objects])
            inst = out["instances"].to("cpu")
            inst = inst[inst.scores >= self.score_thresh]
            if not len(inst) or not objects:
                continue
            visible = inst.pred_masks.flatten(1).sum(1).double().numpy()
            whole_masks = (
                inst.pred_amodal_masks if inst.has("pred_amodal_masks") else inst.pred_masks
            )
            whole = whole_masks.flatten(1).sum(1).double().numpy()
            pred_hidden = 1 - visible / np.maximum(whole, 1)
            rles = mask_util.encode(
                np.asfortranarray(whole_masks.numpy().astype(np.uint8).transpose(1, 2, 0))
            )
            iou = np.asarray(mask_util.iou(gt_whole, rles, [0] * len(rles)))
            g, p = match_pairs(iou, 0.5)
            self._errors += zip(np.abs(pred_hidden[p] - gt_hidden[g]).tolist(), gt_hidden[g])

    def evaluate(self):
        errors = self._errors
        if self.distributed:
            comm.synchronize()
            errors = list(itertools.chain(*comm.gather(errors, dst=0)))
            if not comm.is_main_process():
                return {}
        if not errors:
            return {}
        e, truth = np.asarray(errors).T
        res = {"median_abs_error": float(np.median(e)), "mean_abs_error": float(e.mean())}
        res["matched"] = len(e)
        # most cells hide nothing, where predicting "nothing hidden" is exact: the same on the
        # cells at least HIDDEN_MIN hidden
        hidden = e[truth >= HIDDEN_MIN]
        res["median_abs_error_hidden"] = float(np.median(hidden)) if len(hidden) else float("nan")
        res["matched_hidden"] = len(hidden)
        logger.info(
            f"Hidden fraction on {self.dataset_name}: median absolute error "
            f"{res['median_abs_error']:.4f}, mean {res['mean_abs_error']:.4f} "
            f"({len(e)} matched cells); median {res['median_abs_error_hidden']:.4f} on the "
            f"{len(hidden)} matched cells >= {HIDDEN_MIN:.0%} hidden"
        )
        return {"hidden_fraction": res}
