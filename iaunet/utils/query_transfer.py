"""Loading a checkpoint trained with another number of queries (``MODEL.IAUNET.NUM_QUERIES``).

The only tensors whose shape depends on N are the query decoder's two (N, D) tables, the learnable
query features and their positional embeddings (thesis §3.5); every other weight is shared by all
queries. A model with N_new queries therefore starts from a checkpoint with N_old queries by taking
the first min(N_old, N_new) rows of both tables; with N_new < N_old the last rows are dropped. With
N_new > N_old the extra rows either keep the model's fresh initialisation (``new_rows="fresh"``) or
start as copies of the trained rows, cycled, with a little noise (``"copy"``,
``MODEL.IAUNET.TRAIN.NEW_QUERIES``): a random query has never been matched to anything and takes
most of a short fine-tuning on a few images to find objects, while a copy starts where a trained
query already finds them; the noise and Hungarian matching pull the copies apart. Queries are
interchangeable under Hungarian matching, so any subset of trained queries is a valid model; the
first rows are the deterministic choice.

Used by :class:`iaunet.checkpoint.AtomicCheckpointer` for every load, so ``MODEL.WEIGHTS`` at
training time and ``IAUNetPredictor`` both accept such checkpoints (with a warning naming the keys).
"""

import logging
from typing import Any, Dict, List

import torch

logger = logging.getLogger(__name__)

QUERY_KEYS = ("query_decoder.queries.weight", "query_decoder.query_pos.weight")
NEW_ROWS = ("fresh", "copy")
COPY_NOISE = 0.02  # std of the noise added to copied rows, relative to the rows' std


def transfer_query_rows(
    model: torch.nn.Module, state_dict: Dict[str, Any], new_rows: str = "fresh"
) -> List[str]:
    """Resize the query tables of checkpoint ``state_dict`` (in place) to ``model``'s number of
    queries, extra rows ``new_rows`` ("fresh" | "copy", module docstring); returns the keys
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
            else ("keep their fresh initialisation")
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
