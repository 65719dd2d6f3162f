"""Crash-safe checkpoints: a checkpoint file is never half-written, ``last_checkpoint`` always names
a complete file, and a file that is not a checkpoint fails with an error naming it.

detectron2 (fvcore) writes ``model_XXXXXXX.pth`` in place and then ``last_checkpoint``: a job killed
during the write (preemption, OOM killer, Ctrl-C) leaves a truncated file that ``--resume`` then
fails to load. Here both go through :func:`iaunet.utils.atomic.atomic_write`; the temporary file of
a save killed by SIGKILL stays as ``.<name>.tmp-<pid>``, which ``resume_or_load`` reports.

``resume_or_load`` falls back to the newest checkpoint that loads when the one named in
``last_checkpoint`` is missing, truncated or corrupt (torch's zip records carry CRC-32s, which
torch itself does not check: :func:`zip_crc_error` does), and stops with a
:class:`CheckpointError` listing every file and its fault when none loads.

State-dict keys renamed since the first release are mapped when a checkpoint is loaded
(``LEGACY_KEY_RENAMES``), so that older checkpoints keep loading.
"""

import contextlib
import glob
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils.atomic import TMP_MARK, atomic_write
from .utils.safe_load import UnsafeFileError, load_weights_file

logger = logging.getLogger(__name__)

# (pattern, replacement) of state-dict keys renamed in version 0.2 (thesis names, shared/style):
# the light mask head is its own module, the U-Net stages name their conv (G_x) and SE.
LEGACY_KEY_RENAMES = (
    (r"^pixel_decoder\.lateral\.", "pixel_decoder.mask_head.lateral."),
    (r"^pixel_decoder\.output\.", "pixel_decoder.mask_head.output."),
    (r"^pixel_decoder\.stages\.(\d+)\.0\.", r"pixel_decoder.stages.\1.conv."),
    (r"^pixel_decoder\.stages\.(\d+)\.1\.", r"pixel_decoder.stages.\1.se."),
)


def rename_legacy_keys(state_dict: Dict[str, Any]) -> int:
    """Rename keys of older IAUNet checkpoints in place (``LEGACY_KEY_RENAMES``); returns how
    many."""
    renamed = 0
    for key in list(state_dict):
        new = key
        for pattern, repl in LEGACY_KEY_RENAMES:
            new = re.sub(pattern, repl, new)
        if new != key and new not in state_dict:
            state_dict[new] = state_dict.pop(key)
            renamed += 1
    return renamed


# --- Another number of queries (MODEL.IAUNET.NUM_QUERIES) --------------------------------------
# The only tensors whose shape depends on N are the query decoder's two (N, D) tables, the
# learnable query features and their positional embeddings (thesis §3.5); every other weight is
# shared by all queries. A model with N_new queries therefore starts from a checkpoint with N_old
# queries by taking the first min(N_old, N_new) rows of both tables; with N_new < N_old the last
# rows are dropped. With N_new > N_old the extra rows either keep the model's fresh initialisation
# (new_rows "fresh") or start as copies of the trained rows, cycled, with a little noise ("copy",
# MODEL.IAUNET.TRAIN.NEW_QUERIES): a random query has never been matched to anything and takes most
# of a short fine-tuning on a few images to find objects, while a copy starts where a trained query
# already finds them; the noise and Hungarian matching pull the copies apart. Queries are
# interchangeable under Hungarian matching, so any subset of trained queries is a valid model; the
# first rows are the deterministic choice. AtomicCheckpointer applies this to every load, so
# MODEL.WEIGHTS at training time and IAUNetPredictor both accept such checkpoints (with a warning
# naming the keys).

QUERY_KEYS = ("query_decoder.queries.weight", "query_decoder.query_pos.weight")
NEW_ROWS = ("fresh", "copy")
COPY_NOISE = 0.02  # std of the noise added to copied rows, relative to the rows' std


def transfer_query_rows(
    model: torch.nn.Module, state_dict: Dict[str, Any], new_rows: str = "fresh"
) -> List[str]:
    """Resize the query tables of checkpoint ``state_dict`` (in place) to ``model``'s number of
    queries, extra rows ``new_rows`` ("fresh" | "copy", see above); returns the keys
    changed. Tables of another width D are left alone (the checkpointer then reports the shape
    mismatch as usual)."""
    if new_rows not in NEW_ROWS:
        raise ValueError(
            f"MODEL.IAUNET.TRAIN.NEW_QUERIES must be one of {NEW_ROWS}, got {new_rows!r}"
        )
    own = model.state_dict()
    gen = torch.Generator().manual_seed(0)  # the same copies on every worker and every run
    changed, sizes = [], None
    for key in list(state_dict):
        name = key[len("module.") :] if key.startswith("module.") else key
        if name not in QUERY_KEYS or name not in own:
            continue
        old, new = torch.as_tensor(state_dict[key]), own[name]
        if old.shape == new.shape or old.dim() != 2 or old.shape[1] != new.shape[1]:
            continue
        n = min(old.shape[0], new.shape[0])
        merged = new.detach().clone()
        merged[:n] = old[:n].to(merged.dtype)
        if new_rows == "copy" and new.shape[0] > n:
            copies = old[torch.arange(n, new.shape[0]) % n].float()
            noise = torch.randn(copies.shape, generator=gen) * COPY_NOISE * old.float().std()
            merged[n:] = (copies + noise).to(merged.dtype)
        state_dict[key] = merged
        changed.append(name)
        sizes = (old.shape[0], new.shape[0])
    if changed:
        n_old, n_new = sizes
        grown = (
            "start as copies of the trained rows"
            if new_rows == "copy"
            else "keep their fresh initialisation"
        )
        what = (
            f"rows {n_old}..{n_new - 1} {grown}"
            if n_new > n_old
            else f"rows {n_new}..{n_old - 1} are dropped"
        )
        logger.warning(
            f"The checkpoint has {n_old} queries, the model {n_new} (MODEL.IAUNET.NUM_QUERIES): "
            f"copied the first {min(n_old, n_new)} rows of {', '.join(changed)}; {what}"
        )
    return changed


# --- Another number of input channels (INPUT.CHANNELS) -----------------------------------------
# A model of C channels fine-tunes from one trained on gray (replicated to 3) or RGB images: every
# weight but the convolutions that read the image (the backbone's stem; the mask head's detail
# stage at MASK_STRIDE 2) is shared. Their (O, 3, k, k) kernels become (O, C, k, k) by spreading
# the sum over the old input channels evenly over the new ones: an image whose C channels all equal
# the gray one gives the same response, and training tells the channels apart from there.


def spread_input_channels(model: torch.nn.Module, state_dict: Dict[str, Any]) -> List[str]:
    """Resize (in place) the image-reading kernels of checkpoint ``state_dict`` to ``model``'s
    number of input channels (``len(MODEL.PIXEL_MEAN)``); returns the keys changed (logged)."""
    mean = getattr(model, "pixel_mean", None)
    if mean is None:
        return []
    channels, own, changed = int(mean.numel()), model.state_dict(), []
    for key in list(state_dict):
        name = key[len("module.") :] if key.startswith("module.") else key
        old = state_dict[key]
        if name not in own or not isinstance(old, torch.Tensor) or old.dim() != 4:
            continue
        new = own[name]
        same_rest = old.shape[0] == new.shape[0] and old.shape[2:] == new.shape[2:]
        reads_image = old.shape[1] in (1, 3) and new.shape[1] == channels != old.shape[1]
        if not (same_rest and reads_image):
            continue
        total = old.float().sum(dim=1, keepdim=True)
        state_dict[key] = (total / channels).repeat(1, channels, 1, 1).to(old.dtype)
        changed.append(f"{name} ({old.shape[1]} -> {channels})")
    if changed:
        logger.warning(
            f"The model reads {channels} image channel(s) (INPUT.CHANNELS), the checkpoint "
            f"another number: spread the input kernels of {', '.join(changed)} evenly over the "
            "model's channels"
        )
    return changed


def checkpoint_queries(checkpoint: Optional[Mapping]) -> Optional[int]:
    """The number of queries of an IAUNet checkpoint dict (None: no checkpoint or no query
    table)."""
    model = checkpoint.get("model", {}) if checkpoint else {}
    for key in (QUERY_KEYS[0], "module." + QUERY_KEYS[0]):
        if key in model and len(model[key].shape) == 2:
            return int(model[key].shape[0])
    return None


class CheckpointError(RuntimeError):
    """A file that cannot be loaded as a checkpoint; the message names it."""


# The checkpoints a training run writes (PeriodicCheckpointer's and PreemptionHook's
# model_<iteration>.pth, model_final.pth): the candidates of a resume.
CHECKPOINT_PATTERN = "model_*.pth"


def _truncated_zip(path: str) -> bool:
    """A file that starts as a zip archive (torch's format) but is not a complete one."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)
    return False


def zip_crc_error(path: str) -> Optional[str]:
    """The first record of the zip checkpoint ``path`` whose CRC-32 does not match (a bit flip
    anywhere in the file), or None (all match, or not a zip file: legacy torch format or a
    truncated file, which ``torch.load`` rejects by itself). Reads the whole file (~1 GB/s)."""
    with contextlib.suppress(zipfile.BadZipFile, OSError, EOFError, ValueError):
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    return None


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic ``save`` / ``tag_last_checkpoint``, clear load errors,
    legacy-key mapping, and the training config saved in every checkpoint.

    Same constructor and file format as ``DetectionCheckpointer`` (a drop-in replacement), plus
    ``config``: a CfgNode whose YAML dump is stored under ``"config"``, so that a checkpoint carries
    the architecture and the data-dependent keys (``INPUT.PIXEL_SCALE``, ...) that inference needs.
    """

    def __init__(self, model, save_dir: str = "", *, config=None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.config = config

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` (model, checkpointables, config, ``kwargs``) atomically,
        then tag it as the last checkpoint."""
        if not self.save_dir or not self.save_to_disk:
            return
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if self.config is not None:
            data["config"] = self.config.dump()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)  # e.g. OUTPUT_DIR deleted during training
        atomic_write(save_file, lambda f: torch.save(data, f))
        try:
            self.tag_last_checkpoint(basename)
        except BaseException:
            # A checkpoint that last_checkpoint does not name is removed, so that a failed save
            # (disk full) leaves the folder as it was and frees the space it took.
            with contextlib.suppress(OSError):
                os.remove(save_file)
            raise

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``<save_dir>/last_checkpoint`` at a file that is already complete (atomically)."""
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def has_checkpoint(self) -> bool:
        """``last_checkpoint`` exists, or (when it was lost) a ``model_*.pth`` does."""
        return super().has_checkpoint() or bool(self.checkpoint_files())

    def checkpoint_files(self) -> List[str]:
        """The ``model_*.pth`` files of ``save_dir``, newest (modification time) first."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        files = [f for f in glob.glob(os.path.join(self.save_dir, CHECKPOINT_PATTERN))]
        return sorted(
            (f for f in files if os.path.isfile(f)),
            key=lambda f: (os.path.getmtime(f), f),
            reverse=True,
        )

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """With ``resume`` and a checkpoint in ``save_dir``: load the one ``last_checkpoint``
        names, or, when it is missing or does not load (truncated, corrupt), the newest
        ``model_*.pth`` that does, with a warning naming each bad file; a CheckpointError listing
        them when none loads (never a silent restart from iteration 0). Else load ``path``'s
        model weights only, as detectron2 does."""
        if resume and self.save_dir:
            stale = sorted(glob.glob(os.path.join(self.save_dir, f".*{TMP_MARK}[0-9]*")))
            if stale:
                logger.warning(
                    f"Partial files of interrupted checkpoint saves in {self.save_dir} (never "
                    "loaded; safe to "
                    f"delete once no job writes there): {[os.path.basename(p) for p in stale]}"
                )
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        named, problems = self._named_checkpoint()
        candidates = ([named] if named else []) + [f for f in self.checkpoint_files() if f != named]
        for candidate in candidates:
            try:
                checkpoint = self._read_local(candidate)
            except CheckpointError as e:
                problems.append(str(e))
                logger.warning(f"Cannot resume from {candidate}: {e}")
                continue
            if problems:
                logger.warning(
                    f"Resuming from {candidate}, the newest checkpoint that loads: "
                    + "; ".join(problems)
                )
            self._preloaded = (candidate, checkpoint)
            try:
                return self.load(candidate)
            finally:
                self._preloaded = None
        raise CheckpointError(
            f"cannot resume from {self.save_dir}: no checkpoint there loads ({'; '.join(problems)})"
            ". Restore a good copy, or remove the bad files and last_checkpoint to start over"
        )

    def _named_checkpoint(self) -> Tuple[str, List[str]]:
        """The file ``last_checkpoint`` names ("" if none) and the problems found on the way."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if not os.path.exists(tag):
            return "", [f"{tag} is missing"]
        named = self.get_checkpoint_file()
        if named.rstrip("/") == self.save_dir.rstrip("/"):  # empty last_checkpoint
            return "", [f"{tag} is empty"]
        if not os.path.isfile(named):
            return "", [f"{tag} names {named}, which does not exist"]
        return named, []

    def _read_local(self, filename: str) -> Dict[str, Any]:
        """Read (not load into the model) a local checkpoint file, as ``load`` reads it."""
        self._parsed_url_during_load = urlparse(filename)
        try:
            return self._load_file(filename)
        finally:
            self._parsed_url_during_load = None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        preloaded = getattr(self, "_preloaded", None)
        if preloaded is not None and preloaded[0] == filename:
            self._preloaded = None
            return preloaded[1]
        bad_record = zip_crc_error(filename) if os.path.isfile(filename) else None
        if bad_record is not None:
            raise CheckpointError(
                f"cannot load checkpoint {filename}: its record {bad_record} fails the CRC-32 "
                "check: the file is corrupt (bit flip, incomplete copy, storage fault)"
            )
        try:
            loaded = self._read_data(filename)
        except UnsafeFileError as e:  # asks to run code: nothing of it ran
            raise CheckpointError(str(e)) from None
        except Exception as e:  # torch.load / pickle raise many types (UnpicklingError, ...)
            if _truncated_zip(filename):
                raise CheckpointError(
                    f"cannot load checkpoint {filename}: the file is truncated (a zip archive "
                    f"without its end, {os.path.getsize(filename)} bytes): an interrupted write "
                    "or copy"
                ) from e
            raise CheckpointError(
                f"cannot load checkpoint {filename}: {type(e).__name__}: {e}. Expected a .pth file "
                "saved by detectron2/torch.save or a detectron2 model-zoo .pkl (MODEL.WEIGHTS, or "
                "the file named in last_checkpoint when resuming)"
            ) from e
        model = loaded.get("model") if isinstance(loaded, Mapping) else loaded
        if not isinstance(model, Mapping):
            raise CheckpointError(
                f"cannot load checkpoint {filename}: it holds a {type(model).__name__}, not a "
                "state "
                "dict (a mapping of parameter names to tensors)"
            )
        return loaded

    def _read_data(self, filename: str) -> Dict[str, Any]:
        """``DetectionCheckpointer._load_file`` with every file read as data
        (:func:`iaunet.utils.safe_load.load_weights_file`): detectron2 reads ``.pkl`` with
        ``pickle.load``, which runs whatever code the file names. The model-zoo / Caffe2 layouts of
        a ``.pkl`` are told apart as detectron2 does (``detection_checkpoint.py``)."""
        if not filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)  # torch files: _torch_load below
        data = load_weights_file(filename)
        if not isinstance(data, dict):
            raise CheckpointError(
                f"cannot load checkpoint {filename}: it holds a {type(data).__name__}, not a dict"
            )
        if filename.endswith(".pyth"):  # pycls (a torch file)
            if "model_state" not in data:
                raise CheckpointError(
                    f"cannot load {filename}: no 'model_state' (not a pycls file)"
                )
            state = data["model_state"]
            state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if "model" in data and "__author__" in data:  # detectron2 model-zoo format
            logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        data = data.get("blobs", data)  # Caffe2 / Detectron1: detection models keep "blobs"
        weights = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, f: str) -> Dict[str, Any]:
        return load_weights_file(f)  # torch.load(weights_only=True), whatever torch's default

    def load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Load an already read checkpoint dict (:func:`read_checkpoint`) into the model."""
        incompatible = self._load_model(checkpoint)
        if incompatible is not None:
            self._log_incompatible_keys(incompatible)

    def _load_model(self, checkpoint: Dict[str, Any]):
        if isinstance(checkpoint.get("model"), dict) and not checkpoint.get("matching_heuristics"):
            renamed = rename_legacy_keys(checkpoint["model"])
            if renamed:
                logger.info(f"Renamed {renamed} state-dict keys of an older IAUNet checkpoint")
            new_rows = (
                self.config.MODEL.IAUNET.TRAIN.NEW_QUERIES if self.config is not None else "fresh"
            )  # another NUM_QUERIES: fine-tuning
            transfer_query_rows(self.model, checkpoint["model"], new_rows)
            spread_input_channels(self.model, checkpoint["model"])
        return super()._load_model(checkpoint)


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint dict in ``path`` (a CheckpointError naming the file when it is not one), read
    as ``DetectionCheckpointer.load`` reads it (URLs, ``?matching_heuristics=True``, .pkl files)."""
    checkpointer = AtomicCheckpointer(torch.nn.Module())
    parsed = urlparse(path)
    local = checkpointer.path_manager.get_local_path(parsed._replace(query="").geturl())
    if not os.path.isfile(local):
        raise CheckpointError(f"checkpoint {path} not found")
    checkpointer._parsed_url_during_load = parsed  # what DetectionCheckpointer.load sets
    try:
        return checkpointer._load_file(local)
    finally:
        checkpointer._parsed_url_during_load = None
