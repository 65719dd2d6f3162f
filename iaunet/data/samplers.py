"""A training data stream that a resumed run continues where the interrupted one stopped.

detectron2's training samplers (``TrainingSampler``, ``RepeatFactorTrainingSampler``, ...) are
infinite streams of dataset indices drawn from a seed; each process takes every W-th index. A
resumed run builds them anew, so without help it sees the stream from its start again: the images
of the first iterations twice, the later ones never, and another order than an uninterrupted run.
:class:`ResumableSampler` wraps such a sampler and skips the indices that the interrupted run
consumed; :class:`iaunet.engine.hooks.ExactResume` saves that count and the sampler's seeds in every
checkpoint and sets them back at ``--resume``.

The skip is exact when consecutive indices make consecutive batches: without aspect-ratio grouping
(IAUNet's training crops are all ``INPUT.IMAGE_SIZE`` squares, so ``Base-IAUNet.yaml`` turns it
off), detectron2's loader hands each data-loader worker whole batches of consecutive indices and
returns the batches in stream order, whatever ``DATALOADER.NUM_WORKERS``.
"""

import itertools
import logging
from typing import Any, Dict, Iterator

from detectron2.data import DatasetFromList, build_detection_train_loader
from torch.utils.data import Sampler

from .mosaic import MixingMapper

logger = logging.getLogger(__name__)

# Attribute of the loader built by build_resumable_train_loader that holds its ResumableSampler.
SAMPLER_ATTR = "resumable_sampler"


class ResumableSampler(Sampler):
    """This process's stream of an infinite detectron2 training sampler, from position ``start``.

    ``start`` counts indices of this process's stream (the global stream position divided by the
    number of processes). The seeds (``_seed``, ``_seed_subset``: the attributes detectron2's
    samplers draw their permutations from) are part of :meth:`state_dict`, so that a resumed run
    continues the same permutations even when the seed was drawn at random.
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        # The skipped part is generated and dropped: the samplers' generators have no other way
        # to reach a position (cost ~0.1 s per million indices).
        return itertools.islice(iter(self.sampler), self.start, None)

    def state_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self.sampler).items() if k.startswith("_seed")}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self.sampler, key):
                setattr(self.sampler, key, value)


def build_resumable_train_loader(cfg, mapper):
    """``build_detection_train_loader(cfg, mapper=mapper)`` with its sampler wrapped in a
    :class:`ResumableSampler`, reachable as ``loader.resumable_sampler`` (None when the dataset is
    an iterable dataset without a sampler). A non-zero ``INPUT.MOSAIC`` or ``INPUT.COPY_PASTE``
    wraps ``mapper`` in a :class:`~iaunet.data.mosaic.MixingMapper` that draws its other crops
    from the same dataset."""
    kwargs = build_detection_train_loader.from_config(cfg, mapper=mapper)
    if cfg.INPUT.MOSAIC != 0 or cfg.INPUT.COPY_PASTE != 0:  # [0, 1]: MixingMapper checks
        # serialized once, shared by the loader and the mixing mapper (no copy per worker)
        kwargs["dataset"] = DatasetFromList(kwargs["dataset"], copy=False)
        kwargs["mapper"] = MixingMapper(
            mapper,
            kwargs["dataset"],
            cfg.INPUT.MOSAIC,
            cfg.INPUT.COPY_PASTE,
            cfg.INPUT.MIN_INSTANCE_AREA,
        )
    sampler = ResumableSampler(kwargs["sampler"]) if kwargs["sampler"] is not None else None
    if sampler is not None:
        kwargs["sampler"] = sampler
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        logger.info(
            "DATALOADER.ASPECT_RATIO_GROUPING is on: a resumed run skips the images the "
            "interrupted one consumed, but the images that waited in the aspect-ratio buckets are "
            "not replayed and the order differs from an uninterrupted run (turn it off for exact "
            "resumes)"
        )
    loader = build_detection_train_loader(**kwargs)
    setattr(loader, SAMPLER_ATTR, sampler)
    return loader
