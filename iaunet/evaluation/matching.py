"""Instance matching metrics, the numbers biologists read from a label image (StarDist's
``matching``).

Predictions (score >= a threshold, as a user of ``iaunet-predict`` keeps them) are matched
one-to-one to ground-truth instances: among all assignments, the one with the most pairs of IoU >=
tau, and among those the largest total IoU (Hungarian, scipy). Per tau in 0.5, 0.55, ..., 0.9:

* precision TP / (TP + FP), recall TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN);
* mean matched IoU (over the TP pairs) and panoptic quality PQ = sum(IoU of TP) / (TP + FP/2 +
  FN/2);

plus the predicted / true count ratio. Counts are summed over all images before the ratios are
taken. Masks are compared as COCO RLE (pycocotools), overlapping instances allowed on both sides.
"""

import copy
import itertools
import logging
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from scipy.optimize import linear_sum_assignment

from ..config import DEFAULT_SCORE_THRESH
from ..data.statistics import objects

logger = logging.getLogger(__name__)

TAUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))  # 0.5 ... 0.9


def match_pairs(iou: np.ndarray, tau: float) -> Tuple[np.ndarray, np.ndarray]:
    """(G, P) IoU matrix -> (gt indices, prediction indices) of the matched pairs (IoU >=
    ``tau``), one-to-one, maximising the number of matches first and their total IoU second."""
    none = np.zeros(0, dtype=np.int64)
    if iou.size == 0:
        return none, none
    ok = iou >= tau
    if not ok.any():
        return none, none
    # A match is worth 1 + IoU / (n + 1) < 2: more matches always win, then the higher IoU sum.
    cost = -(ok * (1.0 + iou / (min(iou.shape) + 1)))
    g, p = linear_sum_assignment(cost)
    keep = ok[g, p]
    return g[keep], p[keep]


def match(iou: np.ndarray, tau: float) -> np.ndarray:
    """(G, P) IoU matrix -> the IoU of each matched pair (:func:`match_pairs`)."""
    g, p = match_pairs(iou, tau)
    return iou[g, p] if len(g) else np.zeros(0)


def label_image_rles(labels: np.ndarray) -> List[dict]:
    """One COCO RLE per object id of a label image (0 = background), in increasing id order."""
    return [
        mask_util.encode(np.asfortranarray((labels == i).astype(np.uint8)))
        for i in np.unique(labels)
        if i
    ]


def _iou(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    if not (len(a) and len(b)):
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_util.iou(list(a), list(b), [0] * len(b)))


def image_counts(
    gt: Sequence[dict],
    pred: Sequence[dict],
    taus: Sequence[float] = TAUS,
    ignore: Sequence[dict] = (),
) -> np.ndarray:
    """Counts of one image from COCO RLEs: (len(taus), 4) rows of (TP, FP, FN, sum of matched
    IoU). ``ignore``: objects outside the evaluated subset (COCO's crowd regions): an unmatched
    prediction with IoU >= tau to one of them is neither a TP nor an FP."""
    out = np.zeros((len(taus), 4))
    iou, iou_ignored = _iou(gt, pred), _iou(ignore, pred)
    for i, tau in enumerate(taus):
        g, p = match_pairs(iou, tau)
        tp = len(g)
        unmatched = np.ones(len(pred), dtype=bool)
        unmatched[p] = False
        ignored = unmatched & (iou_ignored >= tau).any(0)
        out[i] = (tp, len(pred) - tp - ignored.sum(), len(gt) - tp, iou[g, p].sum())
    return out


def summarize(counts: np.ndarray, num_gt: int, num_pred: int, taus: Sequence[float] = TAUS) -> Dict:
    """Dataset metrics from summed :func:`image_counts` (in %, as detectron2 reports AP)."""
    res = OrderedDict()
    for i, tau in enumerate(taus):
        tp, fp, fn, iou_sum = counts[i]
        res[f"precision@{tau:g}"] = 100 * tp / max(tp + fp, 1)
        res[f"recall@{tau:g}"] = 100 * tp / max(tp + fn, 1)
        res[f"F1@{tau:g}"] = 100 * 2 * tp / max(2 * tp + fp + fn, 1)
        res[f"mean_matched_iou@{tau:g}"] = 100 * iou_sum / max(tp, 1)
        res[f"PQ@{tau:g}"] = 100 * iou_sum / max(tp + fp / 2 + fn / 2, 1)
    res["F1@0.5:0.9"] = float(np.mean([res[f"F1@{t:g}"] for t in taus]))
    res["count_ratio"] = num_pred / max(num_gt, 1)
    res["num_gt"], res["num_pred"] = num_gt, num_pred
    return res


class InstanceMatchingEvaluator(DatasetEvaluator):
    """detectron2 evaluator of :mod:`iaunet.evaluation.matching` metrics for a registered dataset:
    ground truth from its dataset dicts (polygons or RLE, at the original image size), predictions
    of ``outputs["instances"]`` scoring at least ``score_thresh`` (the CLI's default threshold)."""

    def __init__(
        self,
        dataset_name: str,
        score_thresh: float = DEFAULT_SCORE_THRESH,
        distributed: bool = True,
        ignore_crowd: bool = False,
    ):
        self.dataset_name = dataset_name
        self.score_thresh = score_thresh
        self.distributed = distributed
        # crowd annotations as regions whose predictions are not counted (image_counts' ignore);
        # off: they are not objects, and predictions on them are false positives
        self.ignore_crowd = ignore_crowd
        self._gt = None

    def reset(self) -> None:
        self._counts: List[np.ndarray] = []
        self._num_gt = self._num_pred = 0

    def _ground_truth(self) -> Dict:
        if self._gt is None:
            self._gt = {d["image_id"]: d for d in DatasetCatalog.get(self.dataset_name)}
        return self._gt

    @staticmethod
    def gt_rles(record: dict, crowd: bool = False) -> List[dict]:
        """COCO RLEs of the objects of ``record`` (of its crowd regions with ``crowd``)."""
        h, w = record["height"], record["width"]
        rles = []
        annotations = objects(record)
        if crowd:
            annotations = [a for a in record.get("annotations", []) if a.get("iscrowd", 0)]
        for a in annotations:
            seg = a["segmentation"]
            if isinstance(seg, list):
                rles.append(mask_util.merge(mask_util.frPyObjects(seg, h, w)))
            elif isinstance(seg["counts"], list):
                rles.append(mask_util.frPyObjects(seg, h, w))
            else:
                rles.append(seg)
        return rles

    def predictions(self, output: dict) -> Tuple[list, np.ndarray]:
        """COCO RLEs and scores of the instances of a model output scoring at least
        ``score_thresh``."""
        inst = output["instances"].to("cpu")
        inst = inst[inst.scores >= self.score_thresh]
        masks = np.asfortranarray(inst.pred_masks.numpy().astype(np.uint8).transpose(1, 2, 0))
        return (mask_util.encode(masks) if len(inst) else []), inst.scores.numpy()

    def process(self, inputs, outputs) -> None:
        gt = self._ground_truth()
        for inp, out in zip(inputs, outputs):
            pred, _ = self.predictions(out)
            record = gt[inp["image_id"]]
            gts = self.gt_rles(record)
            ignore = self.gt_rles(record, crowd=True) if self.ignore_crowd else ()
            self._counts.append(image_counts(gts, pred, ignore=ignore))
            self._num_gt += len(gts)
            self._num_pred += len(pred)

    def evaluate(self) -> Dict:
        counts, num_gt, num_pred = self._counts, self._num_gt, self._num_pred
        if self.distributed:
            comm.synchronize()
            counts = list(itertools.chain(*comm.gather(counts, dst=0)))
            num_gt, num_pred = sum(comm.gather(num_gt, dst=0)), sum(comm.gather(num_pred, dst=0))
            if not comm.is_main_process():
                return {}
        if not counts:
            logger.warning(f"[InstanceMatchingEvaluator] no predictions for {self.dataset_name}")
            return {}
        res = summarize(np.sum(counts, axis=0), num_gt, num_pred)
        logger.info(
            f"Matching on {self.dataset_name} (score >= {self.score_thresh:g}): "
            f"F1@0.5 {res['F1@0.5']:.1f}, precision {res['precision@0.5']:.1f}, recall "
            f"{res['recall@0.5']:.1f}, F1@0.5:0.9 {res['F1@0.5:0.9']:.1f}, PQ@0.5 "
            f"{res['PQ@0.5']:.1f}, "
            f"predicted/true {res['count_ratio']:.2f} ({num_pred}/{num_gt})"
        )
        return {"matching": copy.deepcopy(res)}


SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95


class ScoreThresholdSweep(InstanceMatchingEvaluator):
    """Matching counts at IoU 0.5 for each score threshold of ``thresholds``, from one inference
    pass (the IoU of every prediction scoring at least the lowest threshold with every object is
    computed once): ``{"score_sweep": {"thresholds": [...], "counts": [[TP, FP, FN], ...]}}``, what
    ``MODEL.IAUNET.TEST.TUNE_OUTPUT_THRESH`` chooses from (:mod:`iaunet.engine.threshold_tuning`).
    Every process gets the result."""

    def __init__(self, dataset_name: str, thresholds: Sequence[float] = SWEEP_THRESHOLDS):
        super().__init__(dataset_name, min(thresholds))
        self.thresholds = tuple(thresholds)

    def process(self, inputs, outputs) -> None:
        gt = self._ground_truth()
        for inp, out in zip(inputs, outputs):
            pred, scores = self.predictions(out)
            gts = self.gt_rles(gt[inp["image_id"]])
            iou = _iou(gts, pred)
            counts = np.zeros((len(self.thresholds), 3))
            for i, t in enumerate(self.thresholds):
                kept = scores >= t
                tp = len(match_pairs(iou[:, kept], 0.5)[0])
                counts[i] = (tp, kept.sum() - tp, len(gts) - tp)
            self._counts.append(counts)

    def evaluate(self) -> Dict:
        counts = list(itertools.chain(*comm.all_gather(self._counts)))
        total = np.sum(counts, axis=0) if counts else np.zeros((len(self.thresholds), 3))
        return {"score_sweep": {"thresholds": list(self.thresholds), "counts": total.tolist()}}


def f1_at_05(counts: Sequence[Sequence[float]]) -> List[float]:
    """F1 (%) of [TP, FP, FN] rows."""
    return [100 * 2 * tp / max(2 * tp + fp + fn, 1) for tp, fp, fn in counts]
