"""Block-wise prediction of images too large for one process: block geometry, the tiles of a block,
and the stitching of instances across block borders.

The image keeps the tile grid of in-process tiled prediction (:func:`~.tiling.tile_windows` over
the whole image). Blocks are a square grid of ``block`` px over it:

1. **Detection.** A block runs the model on the tiles it *owns*: those whose top-left pixel lies in
   its core (``Block.core``, the block's square). Every tile belongs to exactly one block, so the
   model sees the tiles of the in-process path, once each, whatever the block size.
2. **Stitching.** A block gathers the detections of every tile that intersects its core widened by
   the ``halo`` (its own tiles and its neighbours') and applies the tile stitching rule
   (:func:`~.tiling.stitch_detections`: the most confident whole view of each object) to them. With
   a halo larger than the objects, every view of an object that touches the core is there, so the
   block decides about it as the whole image would.
3. **Ownership.** Of the stitched objects, a block paints those that touch its core into its part of
   the label image (never beyond its core: blocks write disjoint, chunk-aligned regions) and lists
   the objects whose box centre lies in its core: every object is listed by exactly one block.

An object's id is fixed by its detection: ``tile * per_tile + index + 1`` (the tile's number in the
image's grid, the detection's position among its tile's), so neighbouring blocks that stitch the
same object give it the same id without talking to each other. Ids are unique, not consecutive.
"""

import io
import threading
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from ..inference.tiling import Detection, rank_key, stitch_detections, tile_starts
from ..outputs.table import amodal_rows, class_name
from ..utils.atomic import atomic_write

Window = Tuple[int, int, int, int]  # y0, x0, y1, x1
Tile = Tuple[int, Window]  # (index in the image's tile grid, window)


@dataclass(frozen=True)
class Block:
    """Block ``index`` of the grid, at (``row``, ``col``); ``core`` = its (y0, x0, y1, x1)."""

    index: int
    row: int
    col: int
    core: Window

    @property
    def name(self) -> str:
        return f"{self.row:04d}_{self.col:04d}"


def block_grid(height: int, width: int, block: int) -> List[Block]:
    """The blocks of ``block`` px covering an image, row by row (the last ones cut to it)."""
    if block < 1:
        raise ValueError(f"the block size must be >= 1 px, got {block}")
    rows, cols = -(-height // block), -(-width // block)
    return [
        Block(
            r * cols + c,
            r,
            c,
            (r * block, c * block, min((r + 1) * block, height), min((c + 1) * block, width)),
        )
        for r in range(rows)
        for c in range(cols)
    ]


def _inside(y: float, x: float, rect: Window) -> bool:
    return rect[0] <= y < rect[2] and rect[1] <= x < rect[3]


def _intersects(a: Window, b: Window) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def widen(rect: Window, halo: int) -> Window:
    return rect[0] - halo, rect[1] - halo, rect[2] + halo, rect[3] + halo


class TileGrid:
    """The tiles of :func:`~.tiling.tile_windows` (same windows, same row-major numbers), found by
    region from the two axes' start lists: memory and time follow the region, not the image."""

    def __init__(self, height: int, width: int, tile: int, overlap: int):
        self.size = (height, width)
        self.tile = tile
        self.ys = np.array(tile_starts(height, tile, overlap))
        self.xs = np.array(tile_starts(width, tile, overlap))

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def _tiles(self, iy: np.ndarray, ix: np.ndarray) -> List[Tile]:
        h, w = self.size
        return [
            (
                int(y * len(self.xs) + x),
                (
                    int(self.ys[y]),
                    int(self.xs[x]),
                    int(min(self.ys[y] + self.tile, h)),
                    int(min(self.xs[x] + self.tile, w)),
                ),
            )
            for y in iy
            for x in ix
        ]

    def starting_in(self, rect: Window) -> List[Tile]:
        """The tiles whose top-left pixel lies in ``rect``."""
        iy = np.flatnonzero((self.ys >= rect[0]) & (self.ys < rect[2]))
        ix = np.flatnonzero((self.xs >= rect[1]) & (self.xs < rect[3]))
        return self._tiles(iy, ix)

    def meeting(self, rect: Window) -> List[Tile]:
        """The tiles that intersect ``rect``."""
        h, w = self.size
        ye, xe = np.minimum(self.ys + self.tile, h), np.minimum(self.xs + self.tile, w)
        iy = np.flatnonzero((self.ys < rect[2]) & (ye > rect[0]))
        ix = np.flatnonzero((self.xs < rect[3]) & (xe > rect[1]))
        return self._tiles(iy, ix)


def owned_tiles(block: Block, tiles: TileGrid) -> List[Tile]:
    """The tiles whose top-left pixel lies in the block's core."""
    return tiles.starting_in(block.core)


def context_tiles(block: Block, tiles: TileGrid, halo: int) -> List[Tile]:
    """The tiles that intersect the block's core widened by ``halo`` px."""
    return tiles.meeting(widen(block.core, halo))


def read_window(tiles: Sequence[Tile]) -> Window:
    """The smallest window holding ``tiles`` (what a block reads of the image)."""
    w = np.array([t[1] for t in tiles])
    return int(w[:, 0].min()), int(w[:, 1].min()), int(w[:, 2].max()), int(w[:, 3].max())


def object_id(d: Detection, per_tile: int) -> int:
    return d.tile * per_tile + d.index + 1


def id_dtype(num_tiles: int, per_tile: int) -> np.dtype:
    """uint32 while every possible id fits, else uint64."""
    return np.dtype(np.uint32 if num_tiles * per_tile < 2**32 else np.uint64)


def stitch_block(
    block: Block, dets: Sequence[Detection], context: Sequence[Tile], min_score: float = 0.0
) -> Tuple[List[Detection], List[Detection], List[Detection]]:
    """(objects of the context, those touching the core, those owned: box centre in the core),
    each by decreasing score, from the detections of the block's ``context`` tiles (module
    docstring); objects scoring below ``min_score`` are dropped after stitching, as the in-process
    outputs drop them."""
    allowed = {t[0] for t in context}
    kept = stitch_detections([d for d in dets if d.tile in allowed])
    kept = [d for d in kept if d.score >= min_score]
    touching = [d for d in kept if _intersects(d.box, block.core)]
    owned = [d for d in touching if _inside(*_centre(d), block.core)]
    return kept, touching, owned


def _centre(d: Detection) -> Tuple[float, float]:
    y0, x0, y1, x1 = d.box
    return (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2


def paint_labels(
    core: Window, dets: Sequence[Detection], per_tile: int, dtype: np.dtype
) -> np.ndarray:
    """The label image of ``core``: object ids, 0 = background; where objects overlap the higher
    score wins (as in ``_labels.tif``)."""
    y0, x0, y1, x1 = core
    labels = np.zeros((y1 - y0, x1 - x0), dtype)
    # lowest first, higher scores overwrite: the reverse of the stitched order (ties included)
    for d in sorted(dets, key=rank_key, reverse=True):
        by0, bx0, by1, bx1 = d.box
        cy0, cx0, cy1, cx1 = max(by0, y0), max(bx0, x0), min(by1, y1), min(bx1, x1)
        if cy1 <= cy0 or cx1 <= cx0:
            continue
        crop = d.crop[cy0 - by0 : cy1 - by0, cx0 - bx0 : cx1 - bx0]
        labels[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0][crop] = object_id(d, per_tile)
    return labels


FIELDS = ("tile", "index", "y0", "x0", "h", "w", "label", "partial")


def pack_crops(prefix: str, parts: Sequence[Tuple[int, int, np.ndarray]]) -> Dict[str, np.ndarray]:
    """(y0, x0, crop) masks as ``<prefix>offsets`` (M, 2), ``<prefix>shapes`` (M, 2) and
    ``<prefix>bits`` (the crops bit-packed, one after the other)."""
    return {
        f"{prefix}offsets": np.array([p[:2] for p in parts], np.int64).reshape(-1, 2),
        f"{prefix}shapes": np.array([p[2].shape for p in parts], np.int64).reshape(-1, 2),
        f"{prefix}bits": np.packbits(
            np.concatenate([p[2].ravel() for p in parts] or [np.zeros(0, bool)])
        ),
    }


def unpack_crops(z: Dict[str, np.ndarray], prefix: str) -> List[Tuple[int, int, np.ndarray]]:
    """The (y0, x0, crop) masks :func:`pack_crops` stored."""
    offsets, shapes = z[f"{prefix}offsets"].tolist(), z[f"{prefix}shapes"].tolist()
    sizes = [h * w for h, w in shapes]
    flat = np.unpackbits(z[f"{prefix}bits"], count=int(sum(sizes))).astype(bool)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return [
        (y0, x0, flat[starts[i] : starts[i + 1]].reshape(h, w))
        for i, ((y0, x0), (h, w)) in enumerate(zip(offsets, shapes))
    ]


def write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """``arrays`` to a compressed ``.npz``, written atomically."""

    def write(f):
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        f.write(buf.getvalue())

    atomic_write(path, write)


def save_detections(path: str, dets: Iterable[Detection]) -> None:
    """Detections (in image coordinates) to an ``.npz`` written atomically: per detection its tile
    (number, window), position, box, score, class, whether cut, and its crop (bit-packed); the
    whole outlines (``whole_*``) when the detections carry them (``MODEL.IAUNET.AMODAL``)."""
    dets = list(dets)
    ints = np.array(
        [[d.tile, d.index, d.y0, d.x0, *d.crop.shape, d.label, d.partial] for d in dets], np.int64
    ).reshape(-1, len(FIELDS))
    arrays = {
        "ints": ints,
        "windows": np.array([d.window for d in dets], np.int64).reshape(-1, 4),
        "scores": np.array([d.score for d in dets], np.float64),
        "bits": pack_crops("", [(d.y0, d.x0, d.crop) for d in dets])["bits"],  # shapes: ints
    }
    if dets and dets[0].whole is not None:
        arrays.update(pack_crops("whole_", [d.whole for d in dets]))
    write_npz(path, arrays)


# np.load parses .npy headers with ast.literal_eval, which CPython 3.11 (before 3.11.8) can fail
# with "AST constructor recursion depth mismatch" when threads call it at once (Dask workers that
# are threads of one process).
_LOAD_LOCK = threading.Lock()


def read_npz(path: str) -> Dict[str, np.ndarray]:
    """Every array of an ``.npz`` file."""
    with _LOAD_LOCK, np.load(path) as z:
        return {k: z[k] for k in z.files}


def load_detections(path: str) -> List[Detection]:
    z = read_npz(path)
    crops = unpack_crops({**z, "offsets": z["ints"][:, 2:4], "shapes": z["ints"][:, 4:6]}, "")
    wholes = unpack_crops(z, "whole_") if "whole_bits" in z else [None] * len(crops)
    dets = []
    for i, (tile, index, y0, x0, _, _, label, partial) in enumerate(z["ints"].tolist()):
        window = tuple(z["windows"][i].tolist())
        score = float(z["scores"][i])
        dets.append(
            Detection(
                tile, window, y0, x0, crops[i][2], score, label, bool(partial), index, wholes[i]
            )
        )
    return dets


def object_rows(
    dets: Sequence[Detection],
    per_tile: int,
    block: Block,
    around: Sequence[Detection] = (),
    class_names: Sequence[str] = (),
) -> List[Dict]:
    """The per-object table rows of a block's owned objects ``dets`` (classes named as in-process
    tables name them, from ``class_names``). Detections with whole
    outlines (``MODEL.IAUNET.AMODAL``) are measured on them, as in-process tables are, and get
    the :data:`~iaunet.outputs.table.AMODAL_COLUMNS`; the instances on top are looked for among
    ``dets`` and ``around`` (the block's stitched context)."""
    amodal = bool(dets) and dets[0].whole is not None
    rows = []
    for d in dets:
        y0, x0, crop = d.whole if amodal else (d.y0, d.x0, d.crop)
        ys, xs = np.nonzero(crop)
        rows.append(
            {
                "id": object_id(d, per_tile),
                "class": class_name(d.label, class_names),
                "score": round(d.score, 6),
                "area": int(crop.sum()),
                "centroid_x": round(float(xs.mean()) + x0, 3),
                "centroid_y": round(float(ys.mean()) + y0, 3),
                "bbox_x": x0,
                "bbox_y": y0,
                "bbox_width": crop.shape[1],
                "bbox_height": crop.shape[0],
                "block": block.name,
            }
        )
    if amodal:
        owned = {id(d) for d in dets}
        both = list(dets) + [d for d in around if id(d) not in owned]
        measures = amodal_rows(
            [(d.y0, d.x0, d.crop) for d in both],
            [d.whole for d in both],
            [object_id(d, per_tile) for d in both],
            count=len(dets),
        )
        for row, extra in zip(rows, measures):
            row.update(extra)
    return rows
