#!/usr/bin/env python
"""The picture of docs/amodal.md: one scene of ``synthetic_occluded_val`` as image, visible parts,
whole outlines and hidden parts (the whole outlines minus the visible parts).

    python tools/plot_occluded_scene.py --output docs/images/amodal_scene.png [--index 22]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from detectron2.structures import polygons_to_bitmask  # noqa: E402

from iaunet.data.datasets.synthetic import OCCLUDED_SPLITS, render_occluded_scene  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--index", type=int, default=22, help="scene of synthetic_occluded_val")
    args = parser.parse_args(argv)
    seed = OCCLUDED_SPLITS["synthetic_occluded_val"][0] * 1_000_003 + args.index
    image, polygons, visible = render_occluded_scene(seed)
    h, w = image.shape
    whole = [polygons_to_bitmask([p.ravel()], h, w) for p in polygons]
    rng = np.random.default_rng(0)
    colours = rng.uniform(0.3, 1.0, (len(whole), 3))

    def paint(masks):
        out = np.zeros((h, w, 3))
        for m, c in zip(masks, colours):
            out[m] = c
        return out

    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("image")
    axes[1].imshow(paint(visible))
    axes[1].set_title("visible parts (segmentation)")
    axes[2].imshow(image, cmap="gray")
    for p, c in zip(polygons, colours):  # whole outlines overlap: drawn as outlines
        axes[2].plot(*np.vstack([p, p[:1]]).T, color=c, lw=1.5)
    axes[2].set_title("whole cells (amodal_segmentation)")
    axes[3].imshow(paint([m & ~v for m, v in zip(whole, visible)]))
    axes[3].set_title("hidden parts (whole - visible)")
    for ax in axes:
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
