"""Reading microscopy images (PNG/JPEG/TIFF; 8/16-bit, float; gray/RGB/RGBA) into the model's 0..255
range."""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

TIFF_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp") + TIFF_EXTENSIONS
INTENSITY_NORMS = ("percentile", "dtype")


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file."""


def read_tiff(path: str) -> Tuple[np.ndarray, str]:
    """(array, axes) of a TIFF's first series (tifffile). LZW/deflate TIFFs that tifffile cannot
    decode without the optional ``imagecodecs`` package (OpenCV and many microscopes write LZW) are
    read page by page by OpenCV instead (axes "QYX", or "QYXS" for colour)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return np.asarray(series.asarray()), series.axes
    except ValueError as e:
        if "imagecodecs" not in str(e):
            raise
        ok, pages = cv2.imreadmulti(path, flags=cv2.IMREAD_UNCHANGED)
        if not ok or not pages:
            raise
        pages = [cv2.cvtColor(p, cv2.COLOR_BGR2RGB) if p.ndim == 3 else p for p in pages]
        return np.stack(pages), "QYXS" if pages[0].ndim == 3 else "QYX"


def named_axes(axes: str) -> str:
    """tifffile's axes with its unnamed stack axes (Q, I) as Z (lower case kept): an unknown
    leading axis is a stack of planes (except where :func:`stack_axis` reads it as colour or as
    a model's channels)."""
    return "".join(("z" if a.islower() else "Z") if a in "qiQI" else a for a in axes)


def stack_axis(path: str, selection: Dict[str, Optional[int]]) -> Optional[Tuple[str, int]]:
    """(axis, planes) of the z or t axis of a TIFF that ``selection`` (``{"channel"|"z"|"t":
    index or None}``) leaves open with more than one plane, or None (a 2-D image, another format,
    or every such axis chosen). Both open is an error naming the flags. tifffile's unnamed stack
    axes (q, i) are z, except a leading one of 3 or 4 in a (3|4, H, W) file: colour channels, as
    :func:`read_image` reads them."""
    if not path.lower().endswith(TIFF_EXTENSIONS) or not os.path.isfile(path):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            raw, shape = tif.series[0].axes.lower(), tuple(tif.series[0].shape)
    except Exception as e:
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if raw in ("qyx", "iyx") and (shape[0] in (3, 4) or selection.get("channels")):
        return None  # colour, or the channels of a model of INPUT.CHANNELS
    axes = named_axes(raw)
    found = {a: n for a, n in zip(axes, shape) if a in "zt" and n > 1 and selection.get(a) is None}
    if len(found) > 1:
        raise ImageReadError(
            f"{path}: both z ({found['z']}) and t ({found['t']}) have several planes; choose a "
            "time point with --t (a z-stack) or a plane with --z (a time-lapse)"
        )
    return next(iter(found.items()), None)


def tiff_channel_names(tif, count: int) -> Optional[List[str]]:
    """The names of the ``count`` channels of an open ``tifffile.TiffFile``: OME-XML ``Channel
    Name`` of the first image, or ImageJ slice labels (channel first in ImageJ's page order); None
    where the file names none."""
    names: List[str] = []
    if tif.is_ome and tif.ome_metadata:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            return None
        image = next((e for e in root.iter() if e.tag.endswith("}Image")), None)
        if image is not None:
            names = [e.get("Name", "") for e in image.iter() if e.tag.endswith("}Channel")]
    elif tif.is_imagej:
        labels = (tif.imagej_metadata or {}).get("Labels") or []
        names = [str(v) for v in labels[:count]] if len(labels) >= count else []
    return names[:count] if len(names) >= count and any(names[:count]) else None


def resolve_channels(
    path: str, wanted: Sequence, count: int, names: Optional[Sequence[str]]
) -> Tuple[int, ...]:
    """The indices of ``wanted`` (``INPUT.CHANNELS``: indices, or channel names as the file's
    metadata gives them) among the file's ``count`` channels; an error naming the file, the
    channel and what the file has."""
    found = []
    have = f"{count} channel(s)" + (f": {', '.join(map(repr, names))}" if names else "")
    for w in wanted:
        if isinstance(w, (int, np.integer)) or (isinstance(w, str) and w.isdigit()):
            if not 0 <= int(w) < count:
                raise ImageReadError(f"{path}: has {have}; INPUT.CHANNELS asks for channel {w}")
            found.append(int(w))
            continue
        if not names:
            raise ImageReadError(
                f"{path}: INPUT.CHANNELS names channel {w!r}, but the file names no channels "
                f"(OME or ImageJ metadata; it has {have}): give the channels as indices"
            )
        exact = [k for k, n in enumerate(names) if n == w]
        loose = [k for k, n in enumerate(names) if n.lower() == str(w).lower()]
        match = exact or loose
        if len(match) != 1:
            raise ImageReadError(
                f"{path}: has {have}; INPUT.CHANNELS channel {w!r} is "
                + ("not one of them" if not match else "ambiguous")
            )
        found.append(match[0])
    return tuple(found)


MAX_UNNAMED_CHANNELS = 16  # (H, W, C) without metadata: C at most this (else a z-stack)


def unnamed_channel_axis(axes: str, shape: Sequence[int]) -> Optional[int]:
    """The channel axis of a 3-D TIFF without metadata (tifffile's ``QYX``): 2 for (H, W, C) when
    the last axis is the shorter end and at most ``MAX_UNNAMED_CHANNELS`` long, else 0 (C, H, W);
    None for any other file."""
    if axes.upper() not in ("QYX", "IYX") or len(shape) != 3:
        return None
    return 2 if shape[2] < shape[0] and shape[2] <= MAX_UNNAMED_CHANNELS else 0


def image_size(path: str) -> Tuple[int, int]:
    """(H, W) of an image file, whatever its channels or planes: the y and x axes of a TIFF's
    first series (an (H, W, C) TIFF without metadata by its short last axis) or of an OME-Zarr
    image's full resolution, else as :func:`read_image` reads it."""
    if os.path.isdir(path):
        from .lazy_image import zarr_size

        return zarr_size(path)
    if path.lower().endswith(TIFF_EXTENSIONS) and os.path.isfile(path):
        try:  # read whole: a corrupt file is named here, not in training
            array, axes = read_tiff(path)
        except Exception as e:
            raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        shape = array.shape
        if unnamed_channel_axis(axes, shape) == 2:
            return shape[0], shape[1]
        if "Y" in axes and "X" in axes:
            return shape[axes.index("Y")], shape[axes.index("X")]
    return read_image(path).shape[:2]


def read_image(
    path: str, plane: Optional[Tuple[str, int]] = None, channels: Sequence = ()
) -> np.ndarray:
    """Read an image file as stored: (H, W) or (H, W, C), dtype unchanged, channels in RGB(A) order.

    TIFF goes through tifffile; other formats through OpenCV. A 3-D stack is rejected unless
    ``plane`` (axis "z" or "t", index; :func:`stack_axis`) picks one of its planes (the error says
    to pick a plane or project it). A stack is a TIFF whose metadata (ImageJ/OME) has a Z
    or T axis longer than 1, or a 3-D array whose first and last axes are both not 1, 3 or 4 long
    (e.g. (5, H, W)); a (3|4, H, W) TIFF without such metadata is read as channel-first RGB(A).
    ``channels`` (a model's ``INPUT.CHANNELS``): those channels, (H, W, C), as
    :func:`iaunet.data.lazy_image.open_plane` reads them (by index or metadata name).
    """
    if channels or os.path.isdir(path):  # the channels of a model; an OME-Zarr image
        from .lazy_image import open_plane

        where = {plane[0]: int(plane[1])} if plane else {}
        return open_plane(path, **where, channels=channels).read()
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ImageReadError(f"image file is empty (0 bytes): {path}")
    if plane is not None and not path.lower().endswith(TIFF_EXTENSIONS):
        raise ImageReadError(f"{path}: {plane[0]} plane {plane[1]} asked of a file that is no TIFF")
    try:
        if path.lower().endswith(TIFF_EXTENSIONS):
            img, axes = read_tiff(path)
            if plane is not None:
                k = named_axes(axes).find(plane[0].upper())
                if k < 0 or not 0 <= plane[1] < img.shape[k]:
                    raise ImageReadError(
                        f"{path}: no {plane[0]} plane {plane[1]} ({axes} {img.shape})"
                    )
                img, axes = np.take(img, plane[1], axis=k), axes[:k] + axes[k + 1 :]
            stacked = [f"{a}={n}" for a, n in zip(axes, img.shape) if a in "ZT" and n > 1]
            if stacked:
                raise ImageReadError(
                    f"{path}: shape {img.shape} (axes {axes}, {', '.join(stacked)}) is a 3-D "
                    "stack; IAUNet takes "
                    "2-D images (save one plane or a max-projection)"
                )
        else:
            img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            if img is not None and img.ndim == 3:
                img = cv2.cvtColor(
                    img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB
                )
    except ImageReadError:
        raise
    except Exception as e:  # corrupt/truncated files raise many different exception types
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if img is None or img.size == 0:
        raise ImageReadError(f"cannot read image {path}: not an image or unsupported/corrupt file")
    img = np.squeeze(img) if img.ndim > 3 or (img.ndim == 3 and img.shape[0] == 1) else img
    if img.ndim == 3 and img.shape[2] not in (1, 3, 4) and img.shape[0] in (1, 3, 4):
        img = np.moveaxis(img, 0, -1)  # channel-first TIFF
    if img.ndim == 3 and img.shape[2] not in (1, 3, 4):
        raise ImageReadError(
            f"{path}: shape {img.shape} looks like a 3-D stack or a multi-channel image; "
            "IAUNet takes 2-D images (save one plane or a max-projection) or the channels "
            "INPUT.CHANNELS selects"
        )
    if img.ndim not in (2, 3):
        raise ImageReadError(f"{path}: unsupported image shape {img.shape}")
    return img


def _rgb_channels(img: np.ndarray, name: str) -> np.ndarray:
    """(H, W) or (H, W, 3), a view: a single channel squeezed, alpha dropped; else an error."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ImageReadError(
            f"{name}: expected a (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape "
            f"{img.shape}"
        )
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ImageReadError(f"{name}: empty image of shape {img.shape}")
    return img


def _model_channels(img: np.ndarray, name: str, channels: int) -> np.ndarray:
    """(H, W, ``channels``): the channels ``INPUT.CHANNELS`` selected, as :class:`ImagePlane`
    reads them; anything else is an error naming the count."""
    img = img[:, :, None] if img.ndim == 2 else img
    if img.ndim != 3 or img.shape[2] != channels:
        raise ImageReadError(
            f"{name}: the model takes {channels} channel(s) (INPUT.CHANNELS), got an image of "
            f"shape {img.shape}; read it with the model's channels (iaunet-predict does)"
        )
    return img


def intensity_range(
    img: np.ndarray,
    rule: str = "percentile",
    percentiles: Sequence[float] = (0.5, 99.5),
    name: str = "image",
    normalize_uint8: bool = False,
    channels: int = 0,
):
    """The input values (lo, hi) that :func:`to_model_range` maps to 0 and 255, or None for uint8
    (unless ``normalize_uint8``: ``INPUT.NORMALIZE_8BIT``) and bool images (kept as they are).
    Computed on the image as stored (gray is not replicated), so that a large image's range costs
    one copy of it; pass it to ``to_model_range(crop, value_range=...)`` to normalize the crops of a
    large image as the whole (tiled prediction). Non-finite values are an error. ``channels`` > 0
    (a model of ``INPUT.CHANNELS``): one (lo, hi) per channel of an (H, W, channels) image, each
    channel normalized on its own (a dim nuclei channel next to a bright cytoplasm one)."""
    if rule not in INTENSITY_NORMS:
        raise ValueError(f"INPUT.INTENSITY_NORM must be one of {INTENSITY_NORMS}, got {rule!r}")
    img = _model_channels(img, name, channels) if channels else _rgb_channels(img, name)
    if img.dtype == np.bool_ or (img.dtype == np.uint8 and not normalize_uint8):
        return None
    if not np.issubdtype(img.dtype, np.number):
        raise ImageReadError(f"{name}: unsupported dtype {img.dtype}")
    _check_finite(img, name)
    if channels:
        return tuple(
            intensity_range(img[:, :, c], rule, percentiles, name, True) for c in range(channels)
        )
    if rule == "percentile":
        lo, hi = np.percentile(img, percentiles)
        return float(lo), float(hi)
    scale = float(np.iinfo(img.dtype).max) if np.issubdtype(img.dtype, np.integer) else 1.0
    return 0.0, scale


def to_model_range(
    img: np.ndarray,
    rule: str = "percentile",
    percentiles: Sequence[float] = (0.5, 99.5),
    name: str = "image",
    image_format: str = "RGB",
    value_range=None,
    normalize_uint8: bool = False,
    channels: int = 0,
) -> np.ndarray:
    """Any (H, W) / (H, W, 1|3|4) RGB(A) array -> float32 (H, W, 3) on the 0..255 scale, in
    ``image_format`` channel order ("RGB", or "BGR": detectron2's ``INPUT.FORMAT``). ``channels``
    > 0 (a model of ``INPUT.CHANNELS``): an (H, W, channels) array -> float32 (H, W, channels),
    each channel with its own range (:func:`intensity_range`), in the order selected.

    uint8 is kept as is (unless ``normalize_uint8``: ``INPUT.NORMALIZE_8BIT``). Other dtypes are
    rescaled (:func:`intensity_range`, or ``value_range`` when given, e.g. the whole image's for a
    crop of it): "percentile" maps the per-image low/high percentiles to 0/255 (clipped), "dtype"
    divides by the integer dtype's maximum (floats are assumed to be in [0, 1]). Gray is replicated
    to 3 channels; alpha is dropped. Non-finite values are an error. Peak memory: the output and one
    float32 copy of the input's channels.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {image_format!r}")
    if value_range is None:
        value_range = intensity_range(img, rule, percentiles, name, normalize_uint8, channels)
    else:
        _check_finite(img, name)
    if channels:
        img = _model_channels(img, name, channels)
        if value_range is None:
            return _scaled(img, None)
        out = np.empty(img.shape, np.float32)
        for c, rng in enumerate(value_range):
            out[:, :, c] = _scaled(img[:, :, c], rng)
        return out
    x = _scaled(_rgb_channels(img, name), value_range)
    if x.ndim == 2:
        return np.repeat(x[:, :, None], 3, axis=2)
    return np.ascontiguousarray(x[:, :, ::-1]) if image_format == "BGR" else x


def _scaled(img: np.ndarray, value_range: Optional[Tuple[float, float]]) -> np.ndarray:
    """float32 copy of ``img``: ``value_range`` (lo, hi) -> 0..255, clipped; None: as it is (bool:
    0 / 255)."""
    x = img.astype(np.float32)
    if value_range is None:
        return x * np.float32(255.0) if img.dtype == np.bool_ else x
    lo, hi = value_range
    x -= np.float32(lo)
    x *= np.float32(255.0 / max(hi - lo, 1e-6))
    return np.clip(x, 0, 255, out=x)


def _check_finite(img: np.ndarray, name: str) -> None:
    if np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
        raise ImageReadError(f"{name}: contains NaN or infinite values")


def to_uint8_rgb(
    img: np.ndarray,
    rule: str = "percentile",
    percentiles: Sequence[float] = (0.5, 99.5),
    normalize_uint8: bool = False,
    rows: int = 512,
) -> np.ndarray:
    """The (H, W, 3) uint8 RGB rendering of ``img`` as the model sees it (:func:`to_model_range`
    with the whole image's intensity range, rounded), made ``rows`` rows at a time: the float32
    (H, W, 3) copy that one call would make is 3.2 GB for an 8192² image."""
    # the INPUT.CHANNELS of a model: a composite, each channel normalized on its own
    c = img.shape[2] if img.ndim == 3 and img.shape[2] not in (1, 3, 4) else 0
    value_range = intensity_range(
        img, rule, percentiles, normalize_uint8=normalize_uint8, channels=c
    )
    out = np.empty((*img.shape[:2], 3), np.uint8)
    for y in range(0, img.shape[0], rows):
        part = to_model_range(
            img[y : y + rows], rule, percentiles, value_range=value_range, channels=c
        )
        if c:
            part = np.clip(part @ composite_colours(c), 0, 255)
        np.rint(part, out=part)
        out[y : y + rows] = part
    return out


# colours of the channels of a composite, as in Fiji's "Composite" view: green, magenta, ...
COMPOSITE_COLOURS = ((0, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0), (0, 0, 1))


def composite_colours(c: int) -> np.ndarray:
    """(C, 3): channel k in ``COMPOSITE_COLOURS[k]`` (cycled); added and clipped to one RGB."""
    return np.array([COMPOSITE_COLOURS[k % len(COMPOSITE_COLOURS)] for k in range(c)], np.float32)
