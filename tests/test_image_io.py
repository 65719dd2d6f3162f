"""Bad and unusual image files through read_image / to_model_range (and IAUNetDatasetMapper, which
reads them): each is read correctly or rejected with an ImageReadError naming the file. The cases
are rows of docs/robustness.md."""

import cv2
import numpy as np
import pytest
import tifffile
import torch
from conftest import _record, _square

from iaunet.data import ImageReadError, read_image, to_model_range

pytestmark = pytest.mark.usefixtures("one_thread")


def _truncated(src_writer, ext):
    def write(path):
        full = path.with_name("full" + ext)
        src_writer(full)
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return write


def _png(arr):
    return lambda path: cv2.imwrite(str(path), arr)


def _tif(arr, **kwargs):
    return lambda path: tifffile.imwrite(path, arr, **kwargs)


_NOISE8 = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
_NAN = np.ones((16, 16), np.float32)
_NAN[3, 3] = np.nan
_INF = np.ones((16, 16), np.float32)
_INF[3, 3] = np.inf

BAD_IMAGES = [
    ("zero_bytes.png", lambda p: p.write_bytes(b""), r"empty \(0 bytes\): .*zero_bytes\.png"),
    ("truncated.png", _truncated(_png(_NOISE8), ".png"), r"truncated\.png"),
    ("truncated.tif", _truncated(_tif(_NOISE8.astype(np.uint16) * 200), ".tif"), r"truncated\.tif"),
    ("text.png", lambda p: p.write_text("not an image\n" * 20), r"text\.png: not an image"),
    ("text.tif", lambda p: p.write_text("not an image\n" * 20), r"text\.tif.*not a TIFF"),
    (
        "zstack.tif",
        _tif(np.zeros((5, 16, 16), np.uint16)),
        r"zstack\.tif.*3-D stack.*max-projection",
    ),
    (
        "zstack_imagej.tif",
        _tif(np.zeros((3, 16, 16), np.float32), imagej=True, metadata={"axes": "ZYX"}),
        r"zstack_imagej\.tif.*Z=3.*3-D stack.*max-projection",
    ),
    ("nan.tif", _tif(_NAN), r"nan\.tif: contains NaN or infinite"),
    ("inf.tif", _tif(_INF), r"inf\.tif: contains NaN or infinite"),
]


@pytest.mark.parametrize("name,write,message", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_image_file_is_rejected_naming_it(tmp_path, mappers, name, write, message):
    path = tmp_path / name
    write(path)
    for mapper in mappers:
        with pytest.raises(ImageReadError, match=message):
            mapper(_record(path, 16, 16))


def test_rgba_alpha_is_dropped(tmp_path, mappers):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7  # BGRA on disk: blue 200, alpha 7
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    out = mappers[1](_record(tmp_path / "rgba.png", 16, 16))
    assert out["image"].shape == (3, 64, 64)
    assert out["image"][2].max() == 200 and out["image"][:2].max() == 0  # RGB order, alpha gone


def test_intensity_edge_cases_give_valid_images(tmp_path, mappers):
    tifffile.imwrite(tmp_path / "zeros16.tif", np.zeros((16, 16), np.uint16))
    tifffile.imwrite(tmp_path / "const16.tif", np.full((16, 16), 1234, np.uint16))
    tifffile.imwrite(
        tmp_path / "float.tif", np.linspace(-3, 7, 256, dtype=np.float32).reshape(16, 16)
    )
    for name in ("zeros16.tif", "const16.tif", "float.tif"):
        for rule in ("percentile", "dtype"):
            x = to_model_range(read_image(str(tmp_path / name)), rule, name=name)
            assert (
                x.shape == (16, 16, 3) and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 255
            )
    assert (
        to_model_range(np.zeros((16, 16), np.uint16)).max() == 0
    )  # flat image: no division by zero
    out = mappers[0](_record(tmp_path / "zeros16.tif", 16, 16, [_square(2, 2, 8)]))
    assert torch.isfinite(out["image"]).all()


def test_normalize_8bit_makes_8_and_16_bit_copies_alike():
    """INPUT.NORMALIZE_8BIT: an image stored in 8 bits and its 16-bit copy reach the model alike."""
    rng = np.random.default_rng(0)
    img8 = rng.integers(20, 120, (32, 32), dtype=np.uint8)
    img16 = img8.astype(np.uint16) * 200 + 1000
    a = to_model_range(img8, "percentile", (0.5, 99.5), normalize_uint8=True)
    b = to_model_range(img16, "percentile", (0.5, 99.5))
    assert np.allclose(a, b, atol=1e-3) and a.max() == 255 and a.min() == 0
    assert np.array_equal(to_model_range(img8)[..., 0], img8)  # default: 8-bit kept as is


@pytest.mark.parametrize(
    "dtype, shape, normalize_uint8",
    [
        (np.uint16, (300, 170), False),
        (np.uint8, (300, 170, 3), False),
        (np.uint8, (300, 170), True),
        (np.float32, (130, 90), False),
    ],
)
def test_uint8_rendering_in_row_blocks_equals_the_whole_image(dtype, shape, normalize_uint8):
    """The overlay's 8-bit image, made 64 rows at a time with the whole image's range, is the
    rounded model input of the whole image (blocks do not get their own percentiles)."""
    from iaunet.data.image_io import to_model_range, to_uint8_rgb

    rng = np.random.default_rng(0)
    img = (rng.random(shape) * (255 if dtype == np.uint8 else 4000)).astype(dtype)
    img[:64] //= 4  # a darker top block: its own percentiles would differ
    whole = to_model_range(img, normalize_uint8=normalize_uint8).round().astype(np.uint8)
    assert np.array_equal(to_uint8_rgb(img, normalize_uint8=normalize_uint8, rows=64), whole)
