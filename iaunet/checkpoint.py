"""Crash-safe checkpoints: a checkpoint file is never half-written, ``last_checkpoint`` always names a
complete file, and a file that is not a checkpoint fails with an error naming it.

detectron2 (fvcore) writes ``model_XXXXXXX.pth`` in place and then ``last_checkpoint``: a job killed
during the write (preemption, OOM killer, Ctrl-C) leaves a truncated file that ``--resume`` then fails
to load. Here both are written to a temporary file in the same folder, flushed and fsynced, then
renamed over the target (``os.replace`` is atomic on POSIX), and the folder is fsynced so that the
rename survives a power loss. The temporary file of an interrupted save is removed when the save fails
with an exception; after a SIGKILL it stays as ``.<name>.tmp-<pid>``, which ``resume_or_load`` reports.
"""

import contextlib
import glob
import logging
import os
from collections.abc import Mapping
from typing import IO, Any, Callable, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A file that cannot be loaded as a checkpoint; the message names it."""


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Create or replace ``path`` with what ``write(f)`` writes to a binary file object ``f``:
    either the old content or the complete new one is there at any moment, never a partial file."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}{_TMP_SUFFIX}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened/fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic ``save`` / ``tag_last_checkpoint`` and clear load errors.

    Same constructor and file format as ``DetectionCheckpointer``: a drop-in replacement, e.g.
    ``AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(trainer))``.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` (model, checkpointables, ``kwargs``) atomically, then tag it."""
        if not self.save_dir or not self.save_to_disk:
            return
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(
            self.save_dir, exist_ok=True
        )  # e.g. OUTPUT_DIR deleted during training: save anyway
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``<save_dir>/last_checkpoint`` at a file that is already complete (atomically)."""
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.save_dir:
            stale = sorted(glob.glob(os.path.join(self.save_dir, f".*{_TMP_SUFFIX}[0-9]*")))
            if stale:
                logger.warning(
                    f"Partial files of interrupted checkpoint saves in {self.save_dir} (never loaded; safe to "
                    f"delete once no job writes there): {[os.path.basename(p) for p in stale]}"
                )
        return super().resume_or_load(path, resume=resume)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            loaded = super()._load_file(filename)
        except (
            Exception
        ) as e:  # torch.load / pickle raise many types (UnpicklingError, KeyError, EOFError, ...)
            raise CheckpointError(
                f"cannot load checkpoint {filename}: {type(e).__name__}: {e}. Expected a .pth file saved by "
                "detectron2/torch.save or a detectron2 model-zoo .pkl (MODEL.WEIGHTS, or the file named in "
                "last_checkpoint when resuming)"
            ) from e
        model = loaded.get("model") if isinstance(loaded, Mapping) else loaded
        if not isinstance(model, Mapping):
            raise CheckpointError(
                f"cannot load checkpoint {filename}: it holds a {type(model).__name__}, not a state dict "
                "(a mapping of parameter names to tensors)"
            )
        return loaded
