"""Training hooks for long runs on shared clusters: exact resumes and preemption.

* :class:`ExactResume` makes ``--resume`` continue as the uninterrupted run would have: same images
  in the same order (the sampler position and seeds) and the same random draws (every process's
  python / numpy / torch RNG states) after the checkpointed step. With ``DATALOADER.NUM_WORKERS 0``
  the losses after a resume are bit-identical to an uninterrupted run on the CPU; with loader
  workers the images and their order are, the augmentation draws are not (they happen in the
  worker processes, whose RNG states are not checkpointed).
* :class:`PreemptionHook` turns SIGTERM / SIGUSR1 (SLURM ``--signal``, Kubernetes pod deletion)
  into a checkpoint of the current iteration and exit status 75
  (:data:`iaunet.engine.stopping.EXIT_PREEMPTED`). All processes agree on the iteration to stop
  after (one small all-gather per step), rank 0 writes the checkpoint, every process exits.

Both are registered by ``Trainer.build_hooks`` right after the LR scheduler (and PreciseBN), before
the periodic checkpointer: a checkpoint holds the state of the step it was written after.
"""

import logging
import random
from typing import Any, Dict, List, Optional

import detectron2.utils.comm as comm
import numpy as np
import torch
from detectron2.engine import HookBase

from ..data.samplers import ResumableSampler
from .stopping import (
    EXIT_PREEMPTED,
    TrainingStopped,
    install_signal_handlers,
    received_signal,
    signal_name,
    uninstall_signal_handlers,
)

logger = logging.getLogger(__name__)


def rng_state() -> Dict[str, Any]:
    """This process's RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(HookBase):
    """Checkpointed data position and RNG states (see the module docstring).

    State (in the checkpoint under ``trainer/hooks/ExactResume``): ``consumed_images``, the
    number of images of the global stream the run has trained on (``(iteration + 1) x
    SOLVER.IMS_PER_BATCH`` for a run that never changed its batch), ``sampler`` (its seeds) and
    ``rng`` (the RNG states of every process after the step, gathered at each checkpoint
    iteration: one all-gather of ~10 KB per process and checkpoint).

    In an uninterrupted run the RNG states gathered after a checkpointed step are also set back
    before the next step, so that what runs between the two (evaluation, visualization: they may
    draw random numbers) does not change the training's draws: a resumed run, which skips them,
    then draws the same numbers.
    """

    def __init__(self, sampler: Optional[ResumableSampler], images_per_batch: int, period: int):
        self.sampler = sampler
        self.images_per_batch = int(images_per_batch)
        self.period = int(period)
        self._loaded: Optional[Dict[str, Any]] = None
        self._consumed_at_start = 0
        self._snapshot: Optional[List[Dict[str, Any]]] = None
        self._snapshot_iter = -1
        self._restore: Optional[Dict[str, Any]] = None  # this rank's states, set at before_step
        if sampler is None:
            logger.warning(
                "The training loader has no resumable sampler: a resumed run restarts the data "
                "stream (images seen again, another order than an uninterrupted run)"
            )

    # -- checkpoint state ------------------------------------------------------------------------
    def consumed_images(self, iteration: int) -> int:
        """Images of the global stream consumed once step ``iteration`` is done."""
        return (
            self._consumed_at_start
            + (iteration + 1 - self.trainer.start_iter) * self.images_per_batch
        )

    def state_dict(self) -> Dict[str, Any]:
        it = self.trainer.iter
        return {
            "consumed_images": self.consumed_images(it),
            "sampler": self.sampler.state_dict() if self.sampler is not None else {},
            "rng": self._snapshot if self._snapshot_iter == it else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._loaded = state

    # -- hook ------------------------------------------------------------------------------------
    def before_train(self):
        start, world = self.trainer.start_iter, comm.get_world_size()
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            # A fresh run, or a checkpoint written before this hook existed: assume the run
            # consumed start_iter batches of the current size.
            self._consumed_at_start = start * self.images_per_batch
        else:
            self._consumed_at_start = int(loaded["consumed_images"])
            if self.sampler is not None:
                self.sampler.load_state_dict(loaded.get("sampler", {}))
            states = loaded.get("rng")
            if states is not None and len(states) == world:
                self._restore = states[comm.get_rank()]
            elif states is not None:
                logger.warning(
                    f"The checkpoint holds the random states of {len(states)} processes, this run "
                    f"has {world}: random draws (augmentation, sampled points) differ from an "
                    "uninterrupted run"
                )
        if self.sampler is not None:
            if self._consumed_at_start % world:
                logger.warning(
                    f"{self._consumed_at_start} images consumed do not split over {world} "
                    "processes: the data order after resuming is shifted by a few images"
                )
            self.sampler.start = self._consumed_at_start // world
        if start > 0:
            logger.info(
                f"Resuming the data stream after {self._consumed_at_start} images"
                + (" and the random states of the checkpoint" if self._restore else "")
            )

    def before_step(self):
        if self._restore is None:
            return
        # The loader iterator draws its base seed from torch's RNG when it is created (lazily, at
        # the first step of a run): create it before setting the states, as it was in the run
        # that wrote them.
        trainer = getattr(self.trainer, "_trainer", self.trainer)
        if getattr(trainer, "_data_loader_iter_obj", 0) is None:
            trainer._data_loader_iter  # noqa: B018  (the property creates the iterator)
        set_rng_state(self._restore)
        self._restore = None

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self.period == 0 or it >= self.trainer.max_iter - 1:
            self.capture()

    def capture(self) -> None:
        """Gather every process's RNG states after the current step (a collective: all processes
        call it at the same iteration) for the checkpoint written after it."""
        it = self.trainer.iter
        if self._snapshot_iter == it:
            return
        mine = rng_state()
        self._snapshot = comm.all_gather(mine) if comm.get_world_size() > 1 else [mine]
        self._snapshot_iter = it
        self._restore = mine


class PreemptionHook(HookBase):
    """SIGTERM / SIGUSR1 -> checkpoint ``model_<iteration>.pth`` after the current step, exit 75.

    The signal handlers only set a flag (:mod:`iaunet.engine.stopping`). After each step every
    process contributes its flag to an all-gather, so that all of them stop after the same step
    even when only some received the signal; rank 0 then writes the checkpoint (atomically, with
    :class:`ExactResume`'s state), all wait for it, and each raises
    ``TrainingStopped(EXIT_PREEMPTED)``. A signal during an evaluation is acted on after the next
    step; a signal at the last step lets the run finish normally; a signal before the first step
    (``train_net.py`` installs the handlers before its setup) stops at once, without a checkpoint:
    the one the run started from is its state.
    """

    def __init__(self, checkpointer, exact_resume: Optional[ExactResume] = None):
        self.checkpointer = checkpointer
        self.exact_resume = exact_resume
        self._installed = False

    def before_train(self):
        self._installed = install_signal_handlers()
        signum = self._agreed_signal()
        if signum is not None:  # during setup: the last checkpoint is the current state
            reason = (
                f"{signal_name(signum)} before the first step: stopped at iteration "
                f"{self.trainer.start_iter}; exit status {EXIT_PREEMPTED}, continue with --resume"
            )
            logger.warning(reason)
            raise TrainingStopped(EXIT_PREEMPTED, reason, all_workers=True)
        logger.info(
            "SIGTERM/SIGUSR1 stop training with a checkpoint of the current iteration "
            f"(exit status {EXIT_PREEMPTED}; continue with --resume)"
        )

    def after_train(self):
        if self._installed:
            uninstall_signal_handlers()
            self._installed = False

    def _agreed_signal(self) -> Optional[int]:
        mine = received_signal()
        if comm.get_world_size() == 1:
            return mine
        return next((s for s in comm.all_gather(mine) if s is not None), None)

    def after_step(self):
        signum = self._agreed_signal()
        if signum is None:
            return
        it = self.trainer.iter
        if it >= self.trainer.max_iter - 1:
            logger.warning(f"{signal_name(signum)} at the last iteration: finishing the run")
            return
        if self.exact_resume is not None:
            self.exact_resume.capture()
        name = f"model_{it:07d}"
        if comm.is_main_process():
            self.checkpointer.save(name, iteration=it)
        comm.synchronize()
        reason = (
            f"{signal_name(signum)}: stopped after iteration {it} with checkpoint "
            f"{self.checkpointer.save_dir}/{name}.pth; exit status {EXIT_PREEMPTED}, continue with "
            "--resume"
        )
        logger.warning(reason)
        raise TrainingStopped(EXIT_PREEMPTED, reason, all_workers=True)
