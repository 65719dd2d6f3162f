import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Qt without a window system (napari plugin tests); napari's OpenGL canvas still needs a display,
# which pytest-xvfb provides (a virtual X server, started for the session).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _datasets_root(tmp_path_factory):
    """Synthetic datasets are generated once per test session into a temporary root."""
    if "IAUNET_TEST_DATASETS" in os.environ:
        root = os.environ["IAUNET_TEST_DATASETS"]
    else:
        root = str(tmp_path_factory.mktemp("datasets"))
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = root
    yield root
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = old


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_cfg(**overrides):
    """A small IAUNet config (ResNet-18, D=32, 8 queries) for fast CPU tests."""
    from detectron2.config import get_cfg

    from iaunet import add_iaunet_config

    cfg = get_cfg()
    add_iaunet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-IAUNet.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.RESNETS.DEPTH",
            18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            64,
            "MODEL.RESNETS.NORM",
            "SyncBN",
            "MODEL.IAUNET.HIDDEN_DIM",
            32,
            "MODEL.IAUNET.MASK_DIM",
            32,
            "MODEL.IAUNET.DIM_FEEDFORWARD",
            64,
            "MODEL.IAUNET.NHEADS",
            4,
            "MODEL.IAUNET.NUM_QUERIES",
            8,
            "MODEL.IAUNET.TRAIN_NUM_POINTS",
            256,
            "INPUT.IMAGE_SIZE",
            64,
            "SOLVER.AMP.ENABLED",
            False,
        ]
    )
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


@pytest.fixture(autouse=True)
def _loggers_propagate():
    """detectron2's setup_logger (run by in-process trainers) stops propagation; caplog needs it."""
    import logging

    for name in ("iaunet", "detectron2", "d2", "fvcore"):
        logging.getLogger(name).propagate = True
    yield


def scene_masks(seed: int = 3):
    """A synthetic scene with overlapping cells: (H, W) uint16 image, (N, H, W) bool masks."""
    import cv2
    import numpy as np

    from iaunet.data.datasets.synthetic import render_scene

    image, polygons = render_scene(seed, (96, 128))
    masks = []
    for poly in polygons:
        m = np.zeros(image.shape, np.uint8)
        cv2.fillPoly(m, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        masks.append(m.astype(bool))
    return np.round(500 + image * 30000).astype(np.uint16), np.stack(masks)
