"""Large images read lazily, one region at a time: OME-Zarr (NGFF), BigTIFF / OME-TIFF (tiled,
striped or pyramidal, through tifffile's zarr store), and every file :func:`read_image` reads (those
are small: read whole).

:func:`open_plane` selects one 2-D plane (``channel``, ``z``, ``t`` where the image has those axes)
and, in a pyramid, the level nearest the model's scale, and returns an :class:`ImagePlane`: shape,
dtype and numpy regions ``plane[y0:y1, x0:x1]`` as :func:`read_image` would give them ((h, w) or
(h, w, 3|4) for RGB(A) samples). It pickles as a description (path and selection), so that a Dask
worker opens the file itself.
"""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .image_io import (
    IMAGE_EXTENSIONS,
    TIFF_EXTENSIONS,
    ImageReadError,
    named_axes,
    read_image,
    read_tiff,
    resolve_channels,
    stack_axis,
    tiff_channel_names,
    unnamed_channel_axis,
)

ZARR_EXTENSIONS = (".zarr",)
# Axes that select a plane; y, x stay; s (tifffile) / rgb samples stay as colour channels.
PLANE_AXES = {"c": "channel", "z": "z", "t": "t"}


def is_zarr(path: str) -> bool:
    """An OME-Zarr image: a ``*.zarr`` folder (or any folder with NGFF ``multiscales``)."""
    path = path.rstrip("/")
    return os.path.isdir(path) and (
        path.lower().endswith(ZARR_EXTENSIONS) or bool(_zarr_multiscales(path, quiet=True))
    )


def _zarr_attrs(path: str) -> dict:
    """The NGFF attributes of an OME-Zarr image (0.4 ``.zattrs`` or 0.5 ``zarr.json``)."""
    for name in ("zarr.json", ".zattrs"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f) as fh:
                attrs = json.load(fh)
            attrs = attrs.get("attributes", attrs) if name == "zarr.json" else attrs
            attrs = attrs.get("ome", attrs)  # NGFF 0.5 keeps its metadata under "ome"
            if attrs.get("multiscales"):
                return attrs
    return {}


def _zarr_multiscales(path: str, quiet: bool = False) -> Optional[dict]:
    attrs = _zarr_attrs(path)
    if attrs:
        return attrs["multiscales"][0]
    if quiet:
        return None
    raise ImageReadError(f"{path}: not an OME-Zarr image (no NGFF 'multiscales' metadata)")


@dataclass
class ImagePlane:
    """One 2-D plane of an image file, read region by region.

    ``axes``: the file's axis names (lower case; ``s`` = RGB samples); ``index``: the fixed index of
    every axis but y, x, s; ``level``: the pyramid level read; ``downsample``: its (y, x) pixel
    size over level 0's; ``pixel_size``: (y, x) physical size of a pixel of this level and its
    ``unit``, when the file declares one. ``channels``: the channels of ``channel_axis`` a model of
    ``INPUT.CHANNELS`` takes, in its order (regions are then (h, w, len(channels))).
    """

    path: str
    kind: str  # "zarr", "tiff" or "memory"
    axes: str
    index: Dict[str, int]
    level: int = 0
    level_path: str = ""
    downsample: Tuple[float, float] = (1.0, 1.0)
    pixel_size: Optional[Tuple[float, float]] = None
    unit: str = ""
    shape: Tuple[int, ...] = ()
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.uint8))
    channels: Tuple[int, ...] = ()
    channel_axis: str = ""

    def __post_init__(self):
        self._array = None
        self._tiff = None

    def __getstate__(self):
        return {**self.__dict__, "_tiff": None, "_array": None}  # a worker opens the file itself

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _open(self):
        if self._array is None:
            import zarr

            if self.kind == "memory":
                self._array = _read_whole(self.path, bool(self.channels))
            elif self.kind == "zarr":
                self._array = zarr.open_array(os.path.join(self.path, self.level_path), mode="r")
            else:
                import tifffile

                self._tiff = tifffile.TiffFile(self.path)
                store = self._tiff.series[0].aszarr(level=self.level)
                self._array = zarr.open_array(store, mode="r")
        return self._array

    def __getitem__(self, item) -> np.ndarray:
        """``plane[ys, xs]`` (slices) -> numpy (h, w) or (h, w, S)."""
        ys, xs = item
        array = self._open()
        if self.kind == "memory":
            return array[ys, xs][:, :, list(self.channels)] if self.channels else array[ys, xs]
        kept = "yxs" + self.channel_axis
        sel = tuple(
            ys if a == "y" else xs if a == "x" else slice(None) if a in kept else self.index[a]
            for a in self.axes
        )
        try:
            region = np.asarray(array[sel])
        except Exception as e:  # corrupt / missing chunks: name the file
            raise ImageReadError(f"cannot read {self.path} {sel}: {type(e).__name__}: {e}") from e
        kept = [a for a in self.axes if a in kept]
        order = "yxs" + self.channel_axis.replace("s", "")
        region = region.transpose([kept.index(a) for a in order if a in kept])
        if not self.channels:
            return region
        return region[:, :, list(self.channels)] if self.channel_axis else region[:, :, None]

    def read(self) -> np.ndarray:
        """The whole plane (small images; the in-process path)."""
        return self[0 : self.shape[0], 0 : self.shape[1]]

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
        self._tiff = None
        self._array = None


def _select(
    path: str, axes: str, shape, selection: Dict[str, Optional[int]], keep: str = ""
) -> Dict[str, int]:
    """The index of every plane axis but ``keep`` (the model's channel axis): the one asked for, 0
    when it has length 1; an axis longer than 1 without a choice, a choice without its axis or out
    of range is an error naming both."""
    index = {}
    for a, n in zip(axes, shape):
        if a in "yxs" + keep:
            continue
        flag = PLANE_AXES.get(a)
        chosen = selection.get(flag) if flag else None
        if chosen is None:
            if n > 1:
                name = f"--{flag}" if flag else f"axis {a}"
                raise ImageReadError(
                    f"{path}: axis {a} has {n} planes (axes {axes}, shape {tuple(shape)}); choose "
                    f"one with {name} (IAUNet takes a 2-D plane)"
                )
            chosen = 0
        if not 0 <= chosen < n:
            raise ImageReadError(
                f"{path}: --{flag} {chosen} is out of range: axis {a} has {n} planes (0..{n - 1})"
            )
        index[a] = int(chosen)
    for flag, value in selection.items():
        if flag == "channels":
            continue
        a = {v: k for k, v in PLANE_AXES.items()}[flag]
        if value is not None and a not in axes:
            raise ImageReadError(f"{path}: --{flag} given, but the image has no {a} axis ({axes})")
    return index


def _zarr_axes(multiscales: dict) -> str:
    """The axis names of NGFF ``multiscales`` metadata, lower case (0.3's default "tczyx")."""
    axes = multiscales.get("axes", "tczyx")
    return "".join((a["name"] if isinstance(a, dict) else a).lower() for a in axes)


def zarr_size(path: str) -> Tuple[int, int]:
    """(H, W) of an OME-Zarr image at full resolution (its metadata and level 0's header)."""
    import zarr

    ms = _zarr_multiscales(path)
    axes = _zarr_axes(ms)
    try:
        shape = zarr.open_array(os.path.join(path, ms["datasets"][0]["path"]), mode="r").shape
    except Exception as e:
        raise ImageReadError(f"{path}: cannot open level 0: {e}") from None
    return shape[axes.index("y")], shape[axes.index("x")]


def _nearest_level(downsamples: List[float], model_scale: Optional[float]) -> int:
    """The coarsest level not coarser than the model needs: the model resizes a full-resolution
    image by ``model_scale`` (image px -> model px), so level k, ``downsamples[k]`` times coarser,
    needs ``model_scale * downsamples[k]``; a factor above 1 would upsample data a finer level
    holds (small tolerance for rounded pyramid sizes)."""
    if not model_scale or len(downsamples) < 2:
        return 0
    fine_enough = [k for k, d in enumerate(downsamples) if model_scale * d <= 1.0 + 1e-3]
    return max(fine_enough, key=lambda k: downsamples[k]) if fine_enough else 0


def _open_zarr(path: str, selection, model_scale) -> ImagePlane:
    import zarr

    ms = _zarr_multiscales(path)
    axes = _zarr_axes(ms)
    if "y" not in axes or "x" not in axes:
        raise ImageReadError(f"{path}: the OME-Zarr image has no y and x axes ({axes})")
    yx = axes.index("y"), axes.index("x")
    scales = []
    for d in ms["datasets"]:
        scale = [t["scale"] for t in d.get("coordinateTransformations", []) if t["type"] == "scale"]
        scales.append([float(scale[0][i]) for i in yx] if scale else None)
    shapes = []
    for d in ms["datasets"]:
        try:
            shapes.append(zarr.open_array(os.path.join(path, d["path"]), mode="r").shape)
        except Exception as e:
            raise ImageReadError(f"{path}: cannot open level {d['path']}: {e}") from None
    if all(s is not None for s in scales):  # declared pixel sizes
        downs = [s[0] / scales[0][0] for s in scales]
    else:  # the sizes of the levels
        downs = [shapes[0][yx[0]] / s[yx[0]] for s in shapes]
    level = _nearest_level(downs, model_scale)
    units = [a.get("unit", "") for a in ms.get("axes", []) if isinstance(a, dict)]
    shape = shapes[level]
    omero = _zarr_attrs(path).get("omero") or {}
    names = [str(c.get("label", "")) for c in omero.get("channels", [])]
    axis, channels = _channel_choice(path, axes, shape, selection, names)
    return ImagePlane(
        path=path,
        kind="zarr",
        axes=axes,
        index=_select(path, axes, shape, selection, axis),
        level=level,
        level_path=ms["datasets"][level]["path"],
        downsample=(downs[level], shapes[0][yx[1]] / shape[yx[1]]),
        pixel_size=tuple(scales[level]) if scales[level] is not None else None,
        unit=units[yx[0]] if units else "",
        shape=(shape[yx[0]], shape[yx[1]]) + ((len(channels),) if channels else ()),
        dtype=np.dtype(zarr.open_array(os.path.join(path, ms["datasets"][level]["path"])).dtype),
        channels=channels,
        channel_axis=axis,
    )


def _channel_choice(path: str, axes: str, shape, selection, names) -> Tuple[str, Tuple[int, ...]]:
    """(the channel axis, the indices of the channels ``selection["channels"]``, a model's
    ``INPUT.CHANNELS``, asks for); ("", ()) when it asks for none. An image without a channel axis
    has one channel."""
    wanted = selection.get("channels") or ()
    if not wanted:
        return "", ()
    if selection.get("channel") is not None:
        raise ImageReadError(
            f"{path}: --channel picks one plane, but the model takes the channels "
            f"{tuple(wanted)} (INPUT.CHANNELS, saved with it): leave --channel out"
        )
    axis = "c" if "c" in axes else "s" if "s" in axes else ""
    count = shape[axes.index(axis)] if axis else 1
    return axis, resolve_channels(path, wanted, count, names)


def _open_tiff(path: str, selection, model_scale) -> ImagePlane:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes.lower()
            levels = [lv.shape for lv in series.levels]
            dtype = series.dtype
            voxel = _tiff_sizes(tif)[0]  # OME-XML or ImageJ pixel sizes
            ps = voxel[1:] if voxel else None
            count = levels[0][axes.index("c")] if "c" in axes else 1
            names = tiff_channel_names(tif, count) if "c" in axes else None
    except Exception as e:
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if "y" not in axes or "x" not in axes:
        raise ImageReadError(f"{path}: the TIFF has no y and x axes ({axes})")
    if selection.get("channels") and axes in ("qyx", "iyx"):
        return _in_memory(path, selection)  # no metadata: the short axis is the channels
    # tifffile names an unknown leading axis q / i: treat it as a stack to choose from
    axes = named_axes(axes)
    yx = axes.index("y"), axes.index("x")
    downs = [levels[0][yx[0]] / s[yx[0]] for s in levels]
    level = _nearest_level(downs, model_scale)
    shape = levels[level]
    d = (downs[level], levels[0][yx[1]] / shape[yx[1]])
    axis, channels = _channel_choice(path, axes, shape, selection, names)
    return ImagePlane(
        path=path,
        kind="tiff",
        axes=axes,
        index=_select(path, axes, shape, selection, axis),
        level=level,
        downsample=d,
        pixel_size=(ps[0] * d[0], ps[1] * d[1]) if ps else None,
        shape=(shape[yx[0]], shape[yx[1]])
        + ((len(channels),) if channels else (shape[axes.index("s")],) if "s" in axes else ()),
        dtype=np.dtype(dtype),
        channels=channels,
        channel_axis=axis,
    )


def open_plane(
    path: str,
    channel: Optional[int] = None,
    z: Optional[int] = None,
    t: Optional[int] = None,
    model_scale: Optional[float] = None,
    channels: Sequence = (),
) -> ImagePlane:
    """The 2-D plane of ``path`` to predict: OME-Zarr and TIFF lazily (the pyramid level nearest
    ``model_scale`` when they have several), other formats read whole; with ``channels`` (a
    model's ``INPUT.CHANNELS``: indices or the names of OME/ImageJ/OME-Zarr metadata) those
    channels, in that order, as the last axis. Errors are one line naming the file
    (:class:`ImageReadError`)."""
    selection = {"channel": channel, "z": z, "t": t, "channels": tuple(channels)}
    if os.path.isdir(path):
        return _open_zarr(path.rstrip("/"), selection, model_scale)
    if path.lower().endswith(TIFF_EXTENSIONS):
        plane = _open_tiff(path, selection, model_scale)
        if plane.ndim == 3 and plane.shape[2] not in (1, 3, 4) and not plane.channels:
            raise ImageReadError(f"{path}: unsupported samples per pixel {plane.shape}")
        try:
            plane[0:1, 0:1]
        except ImageReadError as e:  # compression tifffile cannot decode here: whole file
            if "imagecodecs" not in str(e):
                raise
            return _in_memory(path, selection)
        return plane
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        raise ImageReadError(f"{path}: not an image file ({', '.join(IMAGE_EXTENSIONS)}, .zarr)")
    return _in_memory(path, selection)


@dataclass(frozen=True)
class Stack:
    """The planes of a z-stack or time-lapse that a selection leaves open: ``axis`` "z" or "t",
    ``length`` planes; ``voxel_size`` (z, y, x) in ``unit`` and ``interval`` (T) where the file
    declares them (ImageJ hyperstack or OME metadata)."""

    path: str
    axis: str
    length: int
    voxel_size: Optional[Tuple[float, float, float]] = None
    unit: str = ""
    interval: Optional[float] = None

    def plane(self, k: int, selection: Dict[str, Optional[int]]) -> ImagePlane:
        return open_plane(self.path, **{**selection, self.axis: k})


def _micron(unit: str) -> str:
    """The spellings of micrometres in ImageJ / OME metadata as "µm"; other units unchanged."""
    return "µm" if unit.lower() in ("micron", "microns", "um", "µm", "\\u00b5m") else unit


def _tiff_sizes(tif) -> Tuple[Optional[Tuple[float, float, float]], str, Optional[float]]:
    """((z, y, x) voxel size, unit, frame interval) from OME-XML or ImageJ metadata; None where
    the file declares none (a plane without a z size gets z = 1 in the unit of y and x)."""
    import re

    if tif.is_ome:
        meta = tif.ome_metadata or ""

        def number(key):
            m = re.search(rf'{key}="([0-9.eE+-]+)"', meta)
            return float(m.group(1)) if m else None

        x, y, z = number("PhysicalSizeX"), number("PhysicalSizeY"), number("PhysicalSizeZ")
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', meta)
        sizes = (z or 1.0, y, x) if x and y else None
        return (
            sizes,
            _micron(unit.group(1) if unit else "µm") if sizes else "",
            number("TimeIncrement"),
        )
    ij = tif.imagej_metadata or {}
    tags = tif.pages[0].tags
    calibrated = str(ij.get("unit", "")).lower() not in ("", "pixel", "pixels")
    if "XResolution" in tags and "YResolution" in tags and calibrated:
        (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
        if xn and yn:  # pixels per unit
            size = (float(ij.get("spacing", 1.0)), yd / yn, xd / xn)
            return size, _micron(str(ij["unit"])), ij.get("finterval")
    return None, "", ij.get("finterval")


def open_stack(path: str, selection: Dict[str, Optional[int]]) -> Optional[Stack]:
    """The z or t axis of a TIFF that ``selection`` (``--channel``/``--z``/``--t``) leaves open
    with more than one plane (:func:`iaunet.data.image_io.stack_axis`), with the voxel size and
    frame interval its metadata declares; None for a 2-D image."""
    found = stack_axis(path, selection)
    if found is None:
        return None
    import tifffile

    with tifffile.TiffFile(path) as tif:
        size, unit, interval = _tiff_sizes(tif)
    return Stack(path, *found, size, unit, interval)


_WHOLE: Dict[Tuple[str, bool], np.ndarray] = {}


def _read_whole(path: str, channels_last: bool = False) -> np.ndarray:
    """A file read whole, kept for the next call (the blocks of one image in one worker);
    ``channels_last``: as (H, W, C), a TIFF without metadata (C, H, W) or (H, W, C) by its short
    axis."""
    if (path, channels_last) not in _WHOLE:
        _WHOLE.clear()
        if channels_last and path.lower().endswith(TIFF_EXTENSIONS):
            image, axes = read_tiff(path)
            if unnamed_channel_axis(axes, image.shape) == 0:
                image = np.moveaxis(image, 0, -1)  # (C, H, W)
            if image.ndim > 3 or min(image.shape) < 1:
                raise ImageReadError(f"{path}: shape {image.shape} ({axes}) is no (C, H, W) image")
        else:
            image = read_image(path)
        _WHOLE[(path, channels_last)] = (
            image[:, :, None] if channels_last and image.ndim == 2 else image
        )
    return _WHOLE[(path, channels_last)]


def _in_memory(path: str, selection) -> ImagePlane:
    given = [f"--{k}" for k, v in selection.items() if v is not None and k != "channels"]
    if given:
        raise ImageReadError(f"{path}: {', '.join(given)} need a TIFF or OME-Zarr image")
    wanted = selection.get("channels") or ()
    image = _read_whole(path, bool(wanted))
    channels = resolve_channels(path, wanted, image.shape[2], None) if wanted else ()
    shape = (*image.shape[:2], len(channels)) if channels else image.shape
    plane = ImagePlane(path, "memory", "yx", {}, shape=shape, dtype=image.dtype, channels=channels)
    plane._array = image
    return plane


def subsample_step(shape: Tuple[int, ...], max_pixels: int) -> int:
    """The stride that reads at most ``max_pixels`` of a plane (1: all of it)."""
    return max(1, math.ceil(math.sqrt(shape[0] * shape[1] / max_pixels)))
