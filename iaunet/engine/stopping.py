"""How a training run stops on purpose: preemption signals, write errors, exit statuses.

Exit statuses of ``train_net.py`` (besides 0, 1 for an error with a traceback, and 2 for a bad
command line):

* ``EXIT_PREEMPTED`` (75, sysexits.h ``EX_TEMPFAIL``: "temporary failure, retry later"): SIGTERM or
  SIGUSR1 stopped training after a checkpoint of the current iteration; run the same command with
  ``--resume`` (a requeued job) to continue exactly there. See docs/distributed.md (SLURM,
  Kubernetes).
* ``EXIT_WRITE_ERROR`` (74, ``EX_IOERR``, :mod:`iaunet.utils.atomic`): a checkpoint or another
  output could not be written (disk full, read-only file system, no permission); one line names the
  file and the cause, the previous checkpoint and ``last_checkpoint`` are unchanged.
* ``EXIT_NO_CHECKPOINT`` (66, ``EX_NOINPUT``): ``--resume`` found checkpoints in ``OUTPUT_DIR`` but
  none of them loads (or ``--eval-only``'s ``MODEL.WEIGHTS`` is not a checkpoint); one line names
  each file and why.

Signals: the worker processes record SIGTERM / SIGUSR1 in a flag (:func:`install_signal_handlers`,
main thread) that :class:`iaunet.engine.hooks.PreemptionHook` reads after each step. With several
processes on a machine, the launching process forwards the signals to its workers
(:func:`launcher`), so that signalling only it (Kubernetes signals PID 1) is enough.
"""

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable, Dict, Iterator, Optional

from ..checkpoint import CheckpointError
from ..utils.atomic import EXIT_WRITE_ERROR, describe_write_error, is_storage_error

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
EXIT_NO_CHECKPOINT = 66
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: Optional[int] = None  # the first preemption signal this process received
_previous: Optional[Dict[int, object]] = None  # handlers replaced by install_signal_handlers


class TrainingStopped(SystemExit):
    """Training stopped on purpose, with ``code`` as the exit status. A ``SystemExit``, so that
    detectron2's training loop runs the hooks' ``after_train`` (metrics, logs) without logging a
    traceback, and a process that does not catch it exits with ``code``. ``all_workers``: every
    process stops at this point (preemption), so they can meet in a barrier before exiting."""

    def __init__(self, code: int, reason: str, all_workers: bool = False):
        super().__init__(code)
        self.reason = reason
        self.all_workers = all_workers


def _record(signum, frame) -> None:
    # Only set a flag: a handler may run in the middle of anything (a log call, a save).
    global _received
    if _received is None:
        _received = signum


def install_signal_handlers() -> bool:
    """Record SIGTERM / SIGUSR1 instead of dying; True when installed by this call (False: already
    installed, or not in the main thread, where Python cannot install handlers). Data-loader
    workers forked later inherit the handlers, so that a signal sent to the whole process group
    (SLURM) does not kill them under the training loop."""
    global _previous
    if _previous is not None:
        return False
    if threading.current_thread() is not threading.main_thread():
        logger.warning(
            "Training runs outside the main thread: SIGTERM/SIGUSR1 will not save a checkpoint"
        )
        return False
    _previous = {s: signal.signal(s, _record) for s in PREEMPTION_SIGNALS}
    return True


def uninstall_signal_handlers() -> None:
    """Put back the handlers that :func:`install_signal_handlers` replaced; forget a signal."""
    global _previous, _received
    if _previous is not None and threading.current_thread() is threading.main_thread():
        for s, handler in _previous.items():
            signal.signal(s, handler)
        _previous = None
    _received = None


def received_signal() -> Optional[int]:
    """The preemption signal this process received since the handlers were installed, if any
    (:data:`STOP_REQUESTED` for :func:`request_stop`)."""
    return _received


STOP_REQUESTED = 0  # not a signal: a caller asked the run to stop (iaunet.train's ``stop``)


def request_stop() -> None:
    """Stop the running training as a preemption signal does: a checkpoint of the current
    iteration, then ``TrainingStopped(EXIT_PREEMPTED)`` (``PreemptionHook``). Safe from any
    thread."""
    _record(STOP_REQUESTED, None)


def clear_stop() -> None:
    """Forget a stop request or signal (a finished run in a process that trains again)."""
    global _received
    _received = None


def signal_name(signum: int) -> str:
    return "stop requested" if signum == STOP_REQUESTED else signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_write_error(describe_state: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Turn a storage error (:func:`iaunet.utils.atomic.is_storage_error`: disk full, read-only,
    no permission) raised inside into one logged line and ``TrainingStopped(EXIT_WRITE_ERROR)``.
    ``describe_state()`` adds what is left (e.g. the last complete checkpoint)."""
    try:
        yield
    except OSError as e:
        if not is_storage_error(e):
            raise
        state = describe_state()
        reason = f"{describe_write_error(e)}; training stopped{'. ' + state if state else ''}"
        logger.error(reason)
        raise TrainingStopped(EXIT_WRITE_ERROR, reason) from None


@contextlib.contextmanager
def exit_on_run_error(prog: str) -> Iterator[None]:
    """For a command's worker: a checkpoint that cannot be loaded, or an output that cannot be
    written, ends the process with one line (``<prog>: error: ...``) and its exit status."""
    try:
        yield
    except CheckpointError as e:
        logger.error(f"{prog}: error: {e}")
        raise SystemExit(EXIT_NO_CHECKPOINT) from None
    except OSError as e:
        if not is_storage_error(e):
            raise
        logger.error(f"{prog}: error: {describe_write_error(e)}")
        raise SystemExit(EXIT_WRITE_ERROR) from None


def _forward(signum, frame) -> None:
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError):
            os.kill(child.pid, signum)


@contextlib.contextmanager
def launcher(world_size: int, prog: str = "train_net.py") -> Iterator[None]:
    """Around detectron2's ``launch`` in the launching process. With several processes (it spawns
    the workers and waits): forward SIGTERM / SIGUSR1 to them, and leave with the exit status of
    the worker that stopped first (e.g. 75 after a preemption) instead of a traceback. With one
    process the launcher is the worker and this does nothing."""
    if world_size <= 1:
        yield
        return
    from torch.multiprocessing import ProcessExitedException

    previous = {s: signal.signal(s, _forward) for s in PREEMPTION_SIGNALS}
    try:
        yield
    except ProcessExitedException as e:
        if e.exit_code is None or e.exit_code <= 0:
            raise
        meaning = {EXIT_PREEMPTED: "preempted, resume with --resume"}.get(e.exit_code, "see log")
        print(
            f"{prog}: worker {e.error_index} exited with status {e.exit_code} ({meaning})",
            file=sys.stderr,
        )
        raise SystemExit(e.exit_code) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
