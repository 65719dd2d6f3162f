"""Block-wise prediction of one large image on Dask (``iaunet-predict --dask``), resumable.

The image plane (:class:`~iaunet.data.lazy_image.ImagePlane`, read region by region) is cut into
blocks (:mod:`.blocks`). Each block is two Dask tasks: *detect* runs the model on the block's tiles
(the predictor is built once per worker process and kept; tiles go through the model
``TEST.TILE_BATCH`` at a time) and saves the detections; *write* stitches the detections of the
block and its neighbours, writes the block's chunks of the OME-Zarr image and labels
(:mod:`iaunet.bigimage.ome_zarr`) and saves the objects it owns (the sparse per-instance store).
Results travel through files in ``<output>/<stem>_blocks/``, so the workers need the output folder
(a shared file system on a cluster), and the scheduler only moves file names.

``<stem>_blocks/manifest.json`` (written atomically after every finished task) records the run's
settings and the finished blocks: the same command, restarted after a kill, submits only what is
not finished. A worker that dies is replaced by Dask and its tasks run again elsewhere.
"""

import csv
import io
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.image_io import intensity_range
from ..data.lazy_image import ImagePlane, subsample_step
from ..inference.predictor import PredictorSpec
from ..outputs.table import AMODAL_COLUMNS
from ..utils.atomic import atomic_write
from .blocks import (
    Block,
    TileGrid,
    block_grid,
    context_tiles,
    id_dtype,
    load_detections,
    object_rows,
    owned_tiles,
    pack_crops,
    paint_labels,
    read_npz,
    read_window,
    save_detections,
    stitch_block,
    unpack_crops,
    write_npz,
)
from .ome_zarr import create_ome_zarr, write_block

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# The intensity range (percentiles) of a large image is taken on at most this many pixels, read
# with a stride; an image up to this size is read whole for it, as in-process prediction does.
RANGE_PIXELS = 4096 * 4096
TABLE_FIELDS = (
    "id",
    "class",
    "score",
    "area",
    "centroid_x",
    "centroid_y",
    "bbox_x",
    "bbox_y",
    "bbox_width",
    "bbox_height",
    "block",
)


_PREDICTORS: Dict[PredictorSpec, object] = {}
# Workers that are threads of one process (LocalCluster(processes=False)) share one predictor;
# building two at once in threads trips CPython 3.11's parser (torch / detectron2 parse sources).
_BUILD_LOCK = threading.Lock()


def worker_predictor(spec: PredictorSpec):
    """The predictor of ``spec``, built on first use in this process and kept."""
    with _BUILD_LOCK:
        return _PREDICTORS[spec] if spec in _PREDICTORS else _build(spec)


def _build(spec: PredictorSpec):
    import torch

    try:
        from distributed import get_worker

        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except ValueError:  # not in a Dask worker
        pass
    _PREDICTORS[spec] = spec.build()
    return _PREDICTORS[spec]


@dataclass(frozen=True)
class BlockJob:
    """Everything a block task needs, small enough to send with every task."""

    plane: ImagePlane
    spec: PredictorSpec
    folder: str  # <output>/<stem>_blocks
    zarr_path: str
    size: Tuple[int, int]
    block: int
    halo: int
    tile: int
    overlap: int
    value_range: Optional[Tuple[float, float]]
    per_tile: int
    label_dtype: str
    amodal: bool = False  # whole outlines next to the visible parts (MODEL.IAUNET.AMODAL)
    score_threshold: float = 0.0  # the lowest score of an output object (output_threshold)
    class_names: Tuple[str, ...] = ()  # the model's thing_classes, for the table

    def grid(self) -> List[Block]:
        return block_grid(*self.size, self.block)

    def tiles(self) -> TileGrid:
        return TileGrid(*self.size, self.tile, self.overlap)

    def detections_file(self, block: Block) -> str:
        return os.path.join(self.folder, f"detections_{block.name}.npz")

    def objects_file(self, block: Block) -> str:
        return os.path.join(self.folder, f"objects_{block.name}.npz")


def detect_block(job: BlockJob, index: int) -> str:
    """Run the model on the tiles block ``index`` owns; save their detections; return the file."""
    block = job.grid()[index]
    tiles = owned_tiles(block, job.tiles())
    dets = []
    if tiles:
        predictor = worker_predictor(job.spec)
        y0, x0, y1, x1 = read_window(tiles)
        region = job.plane[y0:y1, x0:x1]
        dets = predictor.detect_tiles(region, tiles, job.value_range, job.size, origin=(y0, x0))
        if any(d.index >= job.per_tile for d in dets):
            raise RuntimeError(f"a tile gave more than {job.per_tile} detections")
    path = job.detections_file(block)
    save_detections(path, dets)
    return path


def write_block_task(job: BlockJob, index: int, *detections: str) -> int:
    """Stitch block ``index`` from its context's ``detections`` files, write its chunks of the
    OME-Zarr image and labels and its objects; returns the number of objects it owns."""
    block = job.grid()[index]
    dets = [d for path in detections for d in load_detections(path)]
    context = context_tiles(block, job.tiles(), job.halo)
    kept, touching, owned = stitch_block(block, dets, context, job.score_threshold)
    labels = paint_labels(block.core, touching, job.per_tile, np.dtype(job.label_dtype))
    y0, x0, y1, x1 = block.core
    write_block(job.zarr_path, block.core, job.plane[y0:y1, x0:x1], labels)
    rows = object_rows(owned, job.per_tile, block, around=kept, class_names=job.class_names)
    arrays = {
        "rows": np.array(json.dumps(rows)),
        **pack_crops("", [(d.y0, d.x0, d.crop) for d in owned]),
    }
    if job.amodal:
        arrays.update(pack_crops("whole_", [d.whole for d in owned]))
    write_npz(job.objects_file(block), arrays)
    return len(owned)


def context_blocks(job: BlockJob, block: Block) -> List[int]:
    """The blocks owning the tiles of ``block``'s context (itself and its neighbours)."""
    cols = job.grid()[-1].col + 1
    owners = {
        int(w[0] // job.block) * cols + int(w[1] // job.block)
        for _, w in context_tiles(block, job.tiles(), job.halo)
    }
    return sorted(owners)


class Manifest:
    """``manifest.json``: the run's settings and finished blocks, rewritten atomically."""

    def __init__(self, path: str, settings: Dict):
        self.path = path
        self.settings = settings
        self.detected: set = set()
        self.written: set = set()
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("settings") != settings:
                changed = sorted(
                    k for k in settings if saved.get("settings", {}).get(k) != settings[k]
                )
                raise ValueError(
                    f"{path}: the output was started with other settings ({', '.join(changed)}); "
                    "rerun the same command, or use another --output"
                )
            self.detected = set(saved["detected"])
            self.written = set(saved["written"])

    def save(self) -> None:
        content = {
            "version": MANIFEST_VERSION,
            "settings": self.settings,
            "detected": sorted(self.detected),
            "written": sorted(self.written),
        }
        atomic_write(self.path, json.dumps(content, indent=1))


def plane_intensity_range(plane: ImagePlane, predictor) -> Optional[Tuple[float, float]]:
    """The image's intensity range (``INPUT.INTENSITY_NORM``) from at most ``RANGE_PIXELS``
    pixels, read with a stride (the whole plane when it is no larger)."""
    step = subsample_step(plane.shape, RANGE_PIXELS)
    sample = plane[0 : plane.shape[0] : step, 0 : plane.shape[1] : step]
    return intensity_range(
        sample,
        predictor.intensity_norm,
        predictor.percentiles,
        name=plane.path,
        normalize_uint8=predictor.normalize_uint8,
        channels=len(predictor.channels),
    )


def chunk_size(block: int) -> int:
    """The zarr chunk side: the block, or 1024 when that divides a larger block."""
    return 1024 if block > 1024 and block % 1024 == 0 else block


def predict_big(
    plane: ImagePlane,
    predictor,
    spec: PredictorSpec,
    output: str,
    stem: str,
    client,
    block: int = 2048,
    halo: Optional[int] = None,
) -> Dict:
    """Predict ``plane`` block by block on the Dask ``client``; write ``<output>/<stem>.ome.zarr``,
    ``<output>/<stem>_objects.csv`` and ``<output>/<stem>_blocks/``. ``predictor`` (the client's
    own) gives the geometry; the workers build theirs from ``spec``. ``halo``: image px around a
    block whose tiles its stitching sees (default: a tile). Returns a summary."""
    from distributed import as_completed
    from tqdm import tqdm

    size = tuple(int(n) for n in plane.shape[:2])
    _, tile, overlap = predictor.tile_geometry()
    halo = tile if halo is None else halo
    if block < tile:
        raise ValueError(f"--block {block} is smaller than a tile ({tile} image px)")
    per_tile = int(predictor.cfg.TEST.DETECTIONS_PER_IMAGE)
    num_tiles = len(TileGrid(*size, tile, overlap))
    folder = os.path.join(output, f"{stem}_blocks")
    os.makedirs(folder, exist_ok=True)
    value_range = plane_intensity_range(plane, predictor)
    job = BlockJob(
        plane=plane,
        spec=spec,
        folder=folder,
        zarr_path=os.path.join(output, f"{stem}.ome.zarr"),
        size=size,
        block=block,
        halo=halo,
        tile=tile,
        overlap=overlap,
        value_range=value_range,
        per_tile=per_tile,
        label_dtype=id_dtype(num_tiles, per_tile).name,
        amodal=predictor.amodal,
        # as in-process: objects stitched from every detection, then the outputs' threshold
        score_threshold=predictor.output_threshold,
        class_names=tuple(getattr(predictor.metadata, "thing_classes", None) or ()),
    )
    settings = {
        "image": os.path.abspath(plane.path),
        "plane": {"axes": plane.axes, "index": plane.index, "level": plane.level},
        "size": list(size),
        **{k: getattr(job, k) for k in ("block", "halo", "tile", "overlap", "per_tile")},
        "value_range": list(value_range) if value_range else None,
        "predictor": {
            k: v if not isinstance(v, tuple) else list(v) for k, v in asdict(spec).items()
        },
    }
    manifest = Manifest(os.path.join(folder, "manifest.json"), settings)
    create_ome_zarr(
        job.zarr_path,
        plane.shape,
        plane.dtype,
        np.dtype(job.label_dtype),
        chunk_size(block),
        plane.pixel_size,
        plane.unit,
    )
    grid = job.grid()
    resumed = len(manifest.written), len(manifest.detected)
    if any(resumed):
        logger.info(
            f"{plane.path}: resuming, {resumed[0]} of {len(grid)} blocks written and "
            f"{resumed[1]} detected before; only the others are computed"
        )
    manifest.save()
    detect = {}
    for b in grid:
        if b.index in manifest.detected and os.path.isfile(job.detections_file(b)):
            detect[b.index] = job.detections_file(b)
        else:
            manifest.detected.discard(b.index)
            detect[b.index] = client.submit(
                detect_block, job, b.index, key=f"detect-{stem}-{b.name}", pure=False
            )
    kinds = {f.key: ("detected", i) for i, f in detect.items() if not isinstance(f, str)}
    futures = [f for f in detect.values() if not isinstance(f, str)]
    writes = []
    for b in grid:
        if b.index in manifest.written:
            continue
        deps = [detect[i] for i in context_blocks(job, b)]
        f = client.submit(write_block_task, job, b.index, *deps, key=f"write-{stem}-{b.name}")
        writes.append(f)
        kinds[f.key] = ("written", b.index)
    start = time.time()
    total = len(futures) + len(writes)
    with tqdm(total=total, desc=f"blocks of {stem}", unit="task", file=sys.stderr) as bar:
        for f in as_completed(futures + writes):
            f.result()  # a task that failed after Dask's retries stops the run here
            kind, index = kinds[f.key]
            getattr(manifest, kind).add(index)
            manifest.save()
            bar.update()
    objects = write_table(job, grid, os.path.join(output, f"{stem}_objects.csv"))
    seconds = time.time() - start
    logger.info(
        f"{plane.path}: {len(grid)} blocks ({total} tasks this run), {objects} objects, "
        f"{seconds:.0f} s, {size[0] * size[1] / 1e6 / max(seconds, 1e-9):.3g} megapixels/s"
    )
    return {"blocks": len(grid), "tasks": total, "objects": objects, "seconds": seconds}


def write_table(job: BlockJob, grid: Sequence[Block], path: str) -> int:
    """The per-object table of the image, block by block from the blocks' object files, written
    atomically; returns its number of rows."""
    count = 0

    def write(f):
        nonlocal count
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        fields = TABLE_FIELDS + (tuple(AMODAL_COLUMNS) if job.amodal else ())
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        for b in grid:
            rows = json.loads(str(read_npz(job.objects_file(b))["rows"]))
            writer.writerows(rows)
            count += len(rows)
        text.flush()
        text.detach()

    atomic_write(path, write)
    return count


def read_objects(output: str, stem: str, whole: bool = False):
    """Yields (row, (y0, x0), crop) of every object of a finished run: the sparse per-instance
    store, each object's mask even where others overlap it (the label image keeps only the higher
    score's pixels). ``whole``: the whole outlines of a ``MODEL.IAUNET.AMODAL`` model's objects
    instead of their visible parts."""
    folder = os.path.join(output, f"{stem}_blocks")
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("objects_") and name.endswith(".npz")):
            continue
        z = read_npz(os.path.join(folder, name))
        rows = json.loads(str(z["rows"]))
        if whole and rows and "whole_bits" not in z:
            raise ValueError(f"{output}: {stem} was predicted without whole outlines")
        for row, (y0, x0, crop) in zip(rows, unpack_crops(z, "whole_" if whole else "")):
            yield row, (y0, x0), crop
