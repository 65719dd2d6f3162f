"""``<stem>_overlay.png`` of ``iaunet-predict``: outlines and ids on the 8-bit rendering."""

import colorsys

import cv2
import numpy as np

from ..structures import MaskCrops


def render_overlay(image8: np.ndarray, masks: MaskCrops) -> np.ndarray:
    """Outlines and ids (1..N) of ``masks`` drawn on an (H, W, 3) uint8 RGB image."""
    canvas = np.ascontiguousarray(image8.copy())
    h, w = canvas.shape[:2]
    thickness = max(1, round(min(h, w) / 600))
    font_scale = max(0.3, min(h, w) / 1500)
    for i, (y0, x0, crop) in enumerate(masks):
        if crop.size == 0:
            continue
        # Golden-ratio hues: neighbouring ids get clearly different, saturated colours.
        color = [round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.9, 1.0)]
        contours, _ = cv2.findContours(
            crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(x0, y0)
        )
        cv2.drawContours(canvas, contours, -1, color, thickness)
        ys, xs = np.nonzero(crop)
        text = str(i + 1)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        org = (int(xs.mean()) + x0 - tw // 2, int(ys.mean()) + y0 + th // 2)
        for c, extra in (((0, 0, 0), 2), ((255, 255, 255), 0)):  # dark halo keeps ids legible
            cv2.putText(
                canvas,
                text,
                org,
                cv2.FONT_HERSHEY_SIMPLEX,
                font_scale,
                c,
                thickness + extra,
                cv2.LINE_AA,
            )
    return canvas


def png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG file content."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
