import contextlib
import importlib.util
import itertools
import json
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_CONFIG = os.path.join(ROOT, "configs", "synthetic", "iaunet_quick.yaml")
# The model of tiny_cfg() as train_net.py options: ResNet-18, D = 32, 8 queries.
TINY_MODEL_OPTS = [
    *("MODEL.RESNETS.DEPTH", "18", "MODEL.IAUNET.HIDDEN_DIM", "32"),
    *("MODEL.IAUNET.MASK_DIM", "32", "MODEL.IAUNET.DIM_FEEDFORWARD", "64"),
    *("MODEL.IAUNET.NHEADS", "4", "MODEL.IAUNET.NUM_QUERIES", "8"),
    *("MODEL.IAUNET.TRAIN_NUM_POINTS", "256"),
]
# ... and a seconds-long train_net.py run of the quick config with it (64-px crops, batch 2).
TINY_RUN_OPTS = TINY_MODEL_OPTS + [
    *("INPUT.IMAGE_SIZE", "64", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"),
]
# Qt without a window system (napari plugin tests); napari's OpenGL canvas still needs a display,
# which pytest-xvfb provides (a virtual X server, started for the session).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def train_net_command(*args, python_args=()):
    """``python [python_args] train_net.py --config-file <quick config> *args``."""
    train_net = os.path.join(ROOT, "train_net.py")
    return [sys.executable, *python_args, train_net, "--config-file", QUICK_CONFIG, *args]


def run_train_net(datasets_root, *args, python_args=(), timeout=600):
    """:func:`train_net_command` run in the repository root -> (exit status, stdout + stderr)."""
    proc = subprocess.run(
        train_net_command(*args, python_args=python_args),
        cwd=ROOT,
        env=train_net_env(datasets_root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def train_net_env(datasets_root):
    """The environment of a train_net.py subprocess: datasets root, one thread, unbuffered."""
    return dict(
        os.environ, DETECTRON2_DATASETS=datasets_root, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"
    )


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


@pytest.fixture(scope="session")
def synthetic_ready(_datasets_root):
    """The datasets root, with the quick config's training sets generated: once, before tests start
    ``train_net.py`` subprocesses (in parallel, each would generate them)."""
    from detectron2.data import DatasetCatalog

    from iaunet.config import load_config

    for name in load_config(QUICK_CONFIG).DATASETS.TRAIN:
        DatasetCatalog.get(name)
    return _datasets_root


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
            *TINY_MODEL_OPTS,
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            64,
            "MODEL.RESNETS.NORM",
            "SyncBN",
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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than two, and much faster on shared, busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


@pytest.fixture(scope="module")
def mappers(cfg):
    """The training and the test IAUNetDatasetMapper of ``tiny_cfg()``."""
    from iaunet.data import IAUNetDatasetMapper

    return IAUNetDatasetMapper(cfg, is_train=True), IAUNetDatasetMapper(cfg, is_train=False)


@pytest.fixture(scope="module")
def model(cfg):
    """The model of ``tiny_cfg()``, seeded (a module may override it with its own ``model``)."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(cfg)


@contextlib.contextmanager
def captured_logs(name: str):
    """Records of logger ``name`` (detectron2's setup_logger turns propagation off, so caplog can
    miss them)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _messages(records) -> str:
    return "\n".join(r.getMessage() for r in records)


def _square(x0: float, y0: float, size: float) -> list:
    return [x0, y0, x0 + size, y0, x0 + size, y0 + size, x0, y0 + size]


def _record(path, h: int, w: int, polygons=()) -> dict:
    """A dataset dict (as IAUNetDatasetMapper takes it) with one category-0 instance per polygon."""
    anns = [
        {"category_id": 0, "segmentation": [p], "iscrowd": 0, "id": i + 1}
        for i, p in enumerate(polygons)
    ]
    return {"file_name": str(path), "height": h, "width": w, "annotations": anns}


_DATASET_IDS = itertools.count()


def _coco_tree(tmp_path, images=None, annotations=None):
    """Two 32x32 images on disk and a COCO json (1-based category 'cell'); returns the registered
    name."""
    from iaunet.data.datasets.common import register_coco_dataset

    (tmp_path / "images").mkdir(exist_ok=True)
    for i in (1, 2):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), np.zeros((32, 32), np.uint8))
    if images is None:
        images = [{"id": i, "file_name": f"{i}.png", "height": 32, "width": 32} for i in (1, 2)]
    if annotations is None:
        annotations = [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [_square(2, 2, 8)],
                "iscrowd": 0,
            }
        ]
    json_file = tmp_path / "annotations.json"
    json_file.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "cell"}],
            }
        )
    )
    name = f"robustness_{next(_DATASET_IDS)}"
    register_coco_dataset(
        name, str(json_file), str(tmp_path / "images"), {"thing_classes": ["cell"]}
    )
    return name, str(json_file)


def _ann(ann_id, image_id=1, category_id=1, polygon=None):
    """A COCO annotation for ``_coco_tree`` (default: an 8x8 square)."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": 0,
        "segmentation": [polygon or _square(2, 2, 8)],
    }


def scene_masks(seed: int = 3):
    """A synthetic scene with overlapping cells: (H, W) uint16 image, (N, H, W) bool masks."""
    import numpy as np
    from detectron2.structures import polygons_to_bitmask

    from iaunet.data.datasets.synthetic import render_scene

    image, polygons = render_scene(seed, (96, 128))
    masks = [polygons_to_bitmask([poly.ravel()], *image.shape) for poly in polygons]
    return np.round(500 + image * 30000).astype(np.uint16), np.stack(masks)
