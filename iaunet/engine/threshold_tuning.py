"""The outputs' score threshold, tuned after training (``MODEL.IAUNET.TEST.TUNE_OUTPUT_THRESH``).

Which detections a user gets (the label image, the ROI set, napari's layers) is decided by one
score threshold, ``MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH``. Scores depend on the data and the
training (test-time augmentation, which averages several views, lowers them), so a fixed 0.5 can
drop many objects. As StarDist's ``optimize_thresholds`` does, the threshold with the best matching
F1 at IoU 0.5 is chosen after training on images the model was not trained on -- those held out of
the training sets when ``DATASETS.TEST`` is empty (``folder:X#val``) -- or, when none were held out,
on the training images themselves (``DATASETS.TEST``, which may be the user's test set, is never
used). The value is logged and saved in ``model_final.pth``'s config, which ``iaunet-predict``,
napari and the final evaluation read.
"""

import logging
from typing import List, Tuple

import numpy as np
from detectron2.engine import HookBase
from detectron2.evaluation import inference_on_dataset

from ..evaluation.matching import ScoreThresholdSweep, f1_at_05

logger = logging.getLogger(__name__)


def tuning_datasets(cfg) -> Tuple[List[str], str]:
    """The datasets the threshold is chosen on, and what they are (for the log)."""
    held = [
        name
        for name in cfg.DATASETS.TEST
        if name.endswith("#val") and name[: -len("#val")] + "#train" in cfg.DATASETS.TRAIN
    ]
    if held:
        return held, "the images held out of the training set"
    return list(cfg.DATASETS.TRAIN), "the training images (none were held out)"


def best_threshold(thresholds, f1) -> Tuple[float, float]:
    """(threshold, F1) of the best F1; on a tie, the lowest of the tied thresholds."""
    i = max(range(len(f1)), key=lambda j: (f1[j], -j))
    return float(thresholds[i]), float(f1[i])


def tune_output_threshold(trainer_cls, cfg, model) -> float:
    """Chooses ``OUTPUT_SCORE_THRESH`` (see the module docstring) and logs it with its F1@0.5 and
    the F1@0.5 at the config's threshold. Predictions as in ``trainer_cls.test`` (what a user
    gets: tiles at the training scale, the config's test-time augmentation)."""
    names, what = tuning_datasets(cfg)
    model = trainer_cls.inference_model(cfg, model)
    total = 0
    for name in names:
        sweep = ScoreThresholdSweep(name)
        res = inference_on_dataset(model, trainer_cls.build_test_loader(cfg, name), sweep)
        total = total + np.asarray(res["score_sweep"]["counts"])  # TP, FP, FN per threshold
    thresholds, f1 = sweep.thresholds, f1_at_05(total)
    thresh, best = best_threshold(thresholds, f1)
    old = cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH
    before = f1[int(np.argmin([abs(t - old) for t in thresholds]))]
    if best == 0:  # no threshold finds a single object: nothing to choose from
        logger.warning(
            f"MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH stays {old:g}: no score threshold finds any "
            f"object of {what} ({', '.join(names)}) at IoU 0.5"
        )
        return old
    logger.info(
        f"MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH {thresh:g}: matching F1@0.5 {best:.1f} on {what} "
        f"({', '.join(names)}; {int(total[0][0] + total[0][2])} objects), against {before:.1f} at "
        f"{old:g}; saved with model_final.pth for iaunet-predict and napari"
    )
    return thresh


class TuneOutputThreshold(HookBase):
    """After the last step: :func:`tune_output_threshold`, the value set in the trainer's config
    and ``model_final.pth`` written again with it (before the final evaluation, which then reports
    the matching F1 at that threshold)."""

    def after_train(self):
        t = self.trainer
        if t.iter + 1 < t.max_iter:  # stopped early (an error, a preemption): nothing to tune
            return
        thresh = tune_output_threshold(t.__class__, t.cfg, t.model)  # t: a weakref proxy
        t.cfg.defrost()
        t.cfg.MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH = thresh
        t.cfg.freeze()
        t.checkpointer.save("model_final", iteration=t.iter)
