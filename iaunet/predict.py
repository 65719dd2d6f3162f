"""Predict instance masks on microscopy files: ``python -m iaunet.predict`` / ``iaunet-predict``.

    iaunet-predict --weights model_final.pth --input images/ "more/*.tif" --output out/
        [--config-file CFG] [--save labels,overlay,rois,masks,csv,coco] [--score-threshold 0.5]
        [--scale S | --diameter PX] [--tile 512] [--tile-overlap 64] [--device cuda]
        [--opts KEY VALUE ...]
    iaunet-predict --backend onnxruntime --model model.onnx --input images/ --output out/ [...]
    iaunet-predict --weights W --input slide.ome.zarr big.tif --output out/
        --dask [SCHEDULER_ADDRESS | local:N] [--block 2048] [--channel C] [--z Z] [--t T]

With ``--dask``, each image is predicted block by block on a Dask cluster and written as
``<stem>.ome.zarr`` (image + NGFF labels), ``<stem>_objects.csv`` and ``<stem>_blocks/`` (the
manifest that makes a rerun of the same command resume, and every object's whole mask):
:mod:`iaunet.bigimage.big_image`, docs/predict.md "Whole slides".

Per image (``--save``, default all): ``<stem>_labels.tif`` (flattened instance ids),
``<stem>_overlay.png``, ``<stem>_rois.zip`` (ImageJ/Fiji ROI set), ``<stem>_masks.tif``
(overlap-preserving label pages) and ``<stem>_objects.csv`` (per-object measurements); per run
``objects.csv``, ``predictions.json`` (COCO results) and ``images.json``. Instance id k is the same
in every file. The flags: :mod:`iaunet.predict_args`; the writers: :mod:`iaunet.outputs`.

Exit status: 0 all images done, 1 some files failed (named in the log and the summary), 2 bad
command line, 74 an output could not be written because of the storage (disk full, read-only file
system, no permission): the run stops at that file with one line naming it. An output that only its
own file cannot have (a name too long) fails that image only.
"""

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .bigimage.big_image import predict_big
from .checkpoint import CheckpointError
from .config import ConfigError, one_line
from .data.image_io import read_image
from .data.lazy_image import is_zarr, open_plane, open_stack
from .inference import IAUNetPredictor
from .inference.predictor import PredictorSpec
from .outputs.coco import category_ids
from .outputs.writer import PredictionWriter, image_prediction, parse_save
from .predict_args import UsageError, build_parser, expand_inputs, flag_opts, output_stems
from .predict_stack import check_link_flags, predict_stack
from .utils.atomic import EXIT_WRITE_ERROR, describe_write_error, is_storage_error

logger = logging.getLogger("iaunet.predict")


def build_predictor(args: argparse.Namespace) -> IAUNetPredictor:
    """The predictor of the command line, built as the napari widget builds it
    (:meth:`IAUNetPredictor.from_checkpoint` / :meth:`~IAUNetPredictor.from_exported`): the saved
    config (or ``--config-file``), ``--opts``, then the flags. A bad command line, config or
    checkpoint is a UsageError naming it."""
    exported = args.backend != "pytorch"
    if exported and not args.model:
        raise UsageError(f"--backend {args.backend} needs --model (an exported model file)")
    if not exported and not args.weights:
        raise UsageError("--weights is required (or --backend onnxruntime --model FILE.onnx)")
    if exported and not os.path.isfile(args.model):
        raise UsageError(f"model file not found: {args.model}")
    if args.weights and "://" not in args.weights and not os.path.isfile(args.weights):
        raise UsageError(f"weights file not found: {args.weights}")
    if args.tile < 0 or (args.tile_overlap is not None and args.tile_overlap < 0):
        raise UsageError("--tile and --tile-overlap must be >= 0")
    source = args.model if exported else args.weights
    try:
        # min_score: the model's own threshold must not hide instances the user asked for
        predictor = predictor_spec(args, absolute=False).build(threads=None)
    except (ConfigError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    except Exception as e:  # a file or config value the model/predictor rejects
        raise UsageError(f"cannot set up the predictor ({source}): {one_line(e)}") from None
    if args.score_threshold is None:  # the model's own (tuned after training, or 0.5)
        args.score_threshold = predictor.output_threshold
    overlap = predictor.cfg.TEST.TILE_OVERLAP
    if args.tile and overlap >= args.tile:
        raise UsageError(f"the tile overlap ({overlap}) must be smaller than --tile ({args.tile})")
    return predictor


def predict_file(
    predictor: IAUNetPredictor,
    writer: PredictionWriter,
    path: str,
    image_id: int,
    stem: str,
    args: argparse.Namespace,
) -> Dict:
    """Predict one file (every plane of a z-stack or time-lapse: :mod:`iaunet.predict_stack`) and
    write its outputs; returns its ``images.json`` entry."""
    selection = file_selection(args, predictor)
    stack = None if is_zarr(path) else open_stack(path, selection)
    if stack is not None:
        return predict_stack(predictor, writer, stack, args, selection, image_id, stem)
    raw = read_input(path, selection)
    instances = predictor.predict(raw, tiled=True if args.tile else None, full_masks=False)
    prediction = image_prediction(
        instances, raw, args.score_threshold, image_id=image_id, path=path, stem=stem
    )
    return writer.write_image(prediction)


def file_selection(args: argparse.Namespace, predictor: IAUNetPredictor) -> Dict:
    """What to read of each file: ``--channel`` / ``--z`` / ``--t`` and the channels the model
    takes (``INPUT.CHANNELS``, saved with it: no flag)."""
    return {"channel": args.channel, "z": args.z, "t": args.t, "channels": predictor.channels}


def read_input(path: str, selection: Optional[Dict] = None):
    """The image of ``path`` as read today (:func:`read_image`), or its selected plane (level 0)
    for an OME-Zarr image, when ``--channel`` / ``--z`` / ``--t`` is given or the model takes
    channels (:func:`file_selection`)."""
    selection = selection or {}
    chosen = [v for k, v in selection.items() if k != "channels" and v is not None]
    if is_zarr(path) or chosen or selection.get("channels"):
        return open_plane(path, **selection).read()
    return read_image(path)


def dask_client(address: str):
    """A Dask client: ``local`` / ``local:N`` starts N local worker processes of one thread each
    (one per CPU core by default); anything else is a scheduler's address."""
    from distributed import Client, LocalCluster

    if address == "local" or address.startswith("local:"):
        n = address.partition(":")[2]
        if n and not (n.isdigit() and int(n) > 0):
            raise UsageError(f"--dask local:N needs a number of workers N >= 1, got {address}")
        cluster = LocalCluster(
            n_workers=int(n) if n else (os.cpu_count() or 1),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",  # scheduler and workers listen on this machine only
            dashboard_address=None,
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        )
        return Client(cluster)
    try:
        return Client(address, timeout="30s")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot reach the Dask scheduler {address}: {one_line(e)}") from None


def predictor_spec(args: argparse.Namespace, absolute: bool = True) -> PredictorSpec:
    """The predictor of the command line (``absolute``: its files as absolute paths, for Dask
    workers; else as given, as messages name them)."""
    opts = flag_opts(args)
    path = os.path.abspath if absolute else str
    return PredictorSpec(
        weights=path(args.weights) if args.weights else "",
        model=path(args.model) if args.model else "",
        backend=args.backend,
        config_file=path(args.config_file) if args.config_file else "",
        opts=tuple(opts),
        scale=args.scale,
        diameter=args.diameter,
        min_score=args.score_threshold,
    )


def run_dask(args: argparse.Namespace, files: List[str], predictor: IAUNetPredictor) -> int:
    """``--dask``: every file block by block (:func:`predict_big`); exit status as :func:`run`."""
    if args.block < 1 or (args.block > 1024 and args.block % 1024):
        raise UsageError(
            f"--block must be >= 1 and a multiple of 1024 above 1024, got {args.block}"
        )
    spec = predictor_spec(args)
    selection = file_selection(args, predictor)
    failed = []
    with dask_client(args.dask) as client:
        logger.info(f"Dask: {client.scheduler_info()['address']}, {len(client.nthreads())} workers")
        for path, stem in zip(files, output_stems(files)):
            try:
                plane = open_plane(path, **selection, model_scale=predictor.scale)
                file_spec, file_predictor = spec, predictor
                if plane.downsample[0] != 1.0:  # a pyramid level: its pixels are larger
                    scale = predictor.scale * plane.downsample[0]
                    logger.info(f"{path}: pyramid level {plane.level}, resize factor {scale:.3g}")
                    file_spec = dataclasses.replace(spec, scale=scale, diameter=None)
                    file_predictor = file_spec.build()
                predict_big(plane, file_predictor, file_spec, args.output, stem, client, args.block)
            except Exception as e:  # one bad file must not stop the others
                if is_storage_error(e):
                    raise
                msg = one_line(e)
                logger.error(f"failed: {msg if path in msg else f'{path}: {msg}'}")
                failed.append(path)
    summary = f"{len(files) - len(failed)} images processed, {len(failed)} failed"
    if failed:
        logger.error(f"{summary}: {', '.join(failed)}")
        return 1
    logger.info(f"{summary}; outputs in {args.output}")
    return 0


@contextlib.contextmanager
def _log_to_stderr(level: int = logging.INFO):
    """Send the iaunet / detectron2 / fvcore logs to the current stderr for the duration of a CLI
    run."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[%(asctime)s %(name)s] %(levelname)s: %(message)s", "%H:%M:%S")
    )
    # fvcore repeats detectron2's checkpoint messages at INFO; its warnings (mismatched weights)
    # matter.
    levels = {"iaunet": level, "detectron2": level, "fvcore": max(level, logging.WARNING)}
    loggers = [logging.getLogger(name) for name in levels]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(levels[lg.name])
        lg.propagate = False
    try:
        yield loggers
    finally:
        for lg, (lvl, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(lvl)
            lg.propagate = propagate


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with _log_to_stderr() as loggers:
        try:
            return run(args, loggers)
        except UsageError as e:
            logger.error(str(e))
            return 2
        except OSError as e:  # the storage refuses outputs: every later file would fail too
            if not is_storage_error(e):
                raise
            logger.error(f"stopped: {describe_write_error(e)}")
            return EXIT_WRITE_ERROR


def run(args: argparse.Namespace, loggers: List[logging.Logger]) -> int:
    try:
        save = parse_save(args.save)
    except ValueError as e:
        raise UsageError(str(e)) from None
    files = expand_inputs(args.input)
    check_link_flags(args)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} exists and is not a folder")
    predictor = build_predictor(args)
    os.makedirs(args.output, exist_ok=True)
    if args.dask:
        return run_dask(args, files, predictor)
    writer = PredictionWriter(
        args.output,
        save,
        cat_ids=category_ids(predictor.metadata, predictor.cfg.MODEL.IAUNET.NUM_CLASSES),
        class_names=getattr(predictor.metadata, "thing_classes", None),
        intensity_norm=predictor.intensity_norm,
        percentiles=predictor.percentiles,
        normalize_uint8=predictor.normalize_uint8,
    )

    done, failed = 0, []
    with logging_redirect_tqdm(loggers=loggers):
        for image_id, (path, stem) in enumerate(
            tqdm(
                list(zip(files, output_stems(files))),
                desc="iaunet-predict",
                unit="img",
                file=sys.stderr,
            ),
            start=1,
        ):
            try:
                predict_file(predictor, writer, path, image_id, stem, args)
            except Exception as e:  # one bad file must not stop the batch; the log names it
                if is_storage_error(e):  # disk full, read-only, no permission: stop (main)
                    raise
                msg = one_line(e)
                logger.error(f"failed: {msg if path in msg else f'{path}: {msg}'}")
                failed.append(path)
                continue
            done += 1

    writer.finish()
    summary = f"{done} images processed, {len(failed)} failed"
    if failed:
        logger.error(f"{summary}: {', '.join(failed)}")
        return 1
    logger.info(f"{summary}; outputs in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
