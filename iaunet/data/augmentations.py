"""Training augmentations for a handful of images (beyond the thesis's flips and scale jitter).

A few annotated images show one microscope, one stain, one exposure: the network learns their
intensities and orientations as if they were the object. These make every crop look like another
acquisition of the same objects -- the augmentations Cellpose and StarDist train with:

* :class:`RandomIntensity` (``INPUT.INTENSITY_AUG``): contrast, brightness and gamma, Gaussian
  blur and noise, applied to the image only (masks unchanged);
* :class:`RandomRotation` (``INPUT.ROTATE``): a free rotation by any angle, image bilinear and masks
  nearest, the uncovered corners filled with the pad value (as crop padding) and empty in the
  masks.
"""

from typing import Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T


class RandomIntensity(T.Augmentation):
    """With probability ``prob``: ``255 (c (x / 255 - m) + m + b)^gamma``-like jitter of a float
    image on the 0..255 scale, then Gaussian blur (half the time) and additive Gaussian noise.

    Args:
        prob: probability of changing a sample at all.
        contrast: range of the contrast factor c (around the image mean m).
        brightness: range of the shift b, in units of the 0..255 range.
        gamma: range of log(gamma); gamma is applied to the image rescaled to its own 0..1 range.
        blur: range of the blur sigma (px), drawn for half of the changed samples.
        noise: range of the noise sigma, in units of 0..255.
    """

    def __init__(
        self,
        prob: float = 0.8,
        contrast: Tuple[float, float] = (0.6, 1.4),
        brightness: Tuple[float, float] = (-0.1, 0.1),
        gamma: Tuple[float, float] = (-0.4, 0.4),
        blur: Tuple[float, float] = (0.3, 1.2),
        noise: Tuple[float, float] = (0.0, 8.0),
    ):
        super().__init__()
        if not 0 <= prob <= 1:
            raise ValueError(f"INPUT.INTENSITY_AUG must be a probability in [0, 1], got {prob}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        if np.random.rand() >= self.prob:
            return T.NoOpTransform()
        u = np.random.uniform
        c, b, g = u(*self.contrast), 255 * u(*self.brightness), float(np.exp(u(*self.gamma)))
        sigma = u(*self.blur) if np.random.rand() < 0.5 else 0.0
        noise, seed = u(*self.noise), int(np.random.randint(2**31))

        def apply(img: np.ndarray) -> np.ndarray:
            x = img.astype(np.float32)
            lo, hi = float(x.min()), float(x.max())
            if hi > lo:  # gamma on the image's own range, which it keeps
                x = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** g
            x = c * (x - x.mean()) + x.mean() + b
            if sigma > 0:
                x = cv2.GaussianBlur(x, (0, 0), sigma)
            if noise > 0:
                x = x + np.random.default_rng(seed).normal(0, noise, x.shape).astype(np.float32)
            return np.clip(x, 0, 255).astype(np.float32)

        return T.ColorTransform(apply)


class _PaddedRotation(T.RotationTransform):
    """detectron2's rotation (no expansion) with the image's uncovered corners set to ``pad``."""

    def __init__(self, h: int, w: int, angle: float, pad: float):
        super().__init__(h, w, angle, expand=False)
        self.pad = pad

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        if len(img) == 0 or self.angle % 360 == 0:
            return img
        interp = interp if interp is not None else self.interp
        return cv2.warpAffine(
            img,
            self.rm_image,
            (self.bound_w, self.bound_h),
            flags=interp,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(self.pad,) * 4,
        )

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(
            segmentation,
            self.rm_image,
            (self.bound_w, self.bound_h),
            flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )


class RandomRotation(T.Augmentation):
    """With probability ``prob``, rotate by an angle drawn uniformly from [0, 360) degrees about
    the image centre (size kept), the uncovered corners filled with ``pad``."""

    def __init__(self, prob: float, pad: float = 0.0):
        super().__init__()
        if not 0 <= prob <= 1:
            raise ValueError(f"INPUT.ROTATE must be a probability in [0, 1], got {prob}")
        self.prob, self.pad = prob, pad

    def get_transform(self, image: np.ndarray) -> T.Transform:
        if np.random.rand() >= self.prob:
            return T.NoOpTransform()
        h, w = image.shape[:2]
        return _PaddedRotation(h, w, float(np.random.uniform(0, 360)), self.pad)
