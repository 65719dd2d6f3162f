"""Self-check of an installation: ``iaunet-check`` / ``python -m iaunet.check``.

Prints the versions (Python, torch, detectron2, timm, CUDA, cuDNN and the other dependencies),
whether detectron2's compiled ops are there (IAUNet does not need them), the thread settings, the
devices, the time of a tiny forward pass on the CPU (and on CUDA when present), the datasets root
and which registered datasets are on disk. Exit status 1, with the fix on the line of each problem,
when something needed is missing or the forward pass fails; 0 otherwise.

It imports detectron2 only inside the checks, so that a missing detectron2 is reported like any
other problem (``iaunet/__init__.py`` lets this command through).
"""

import argparse
import importlib
import os
import platform
import sys
import time
import warnings
from importlib import metadata
from typing import Callable, List, Optional, Sequence, Tuple

from . import DETECTRON2_IMPORT_ERROR, JIT_SCRIPT_WARNING, __version__

REINSTALL = "python -m pip install -e .  (in the IAUNet checkout)"
DETECTRON2_FIX = (
    "python -m pip install 'git+https://github.com/facebookresearch/detectron2.git' (detectron2 "
    "is not on PyPI; README.md, Install), then " + REINSTALL
)
# (module, distribution, why IAUNet needs it)
DEPENDENCIES = (
    ("timm", "timm", "Swin backbone"),
    ("fvcore", "fvcore", "detectron2 layers, FLOP counts"),
    ("pycocotools", "pycocotools", "COCO datasets and evaluation"),
    ("cv2", "opencv-python-headless", "image resizing, overlays"),
    ("tifffile", "tifffile", "TIFF images and label outputs"),
    ("skimage", "scikit-image", "per-object tables"),
    ("roifile", "roifile", "ImageJ ROI sets"),
    ("scipy", "scipy", "Hungarian matching"),
)
TINY_MODEL = [  # a small IAUNet (ResNet-18, D=32, 8 queries) that builds and runs in a second
    "MODEL.META_ARCHITECTURE", "IAUNet",
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.IAUNET.NORM", "BN",
    "MODEL.IAUNET.HIDDEN_DIM", 32,
    "MODEL.IAUNET.MASK_DIM", 32,
    "MODEL.IAUNET.DIM_FEEDFORWARD", 64,
    "MODEL.IAUNET.NHEADS", 4,
    "MODEL.IAUNET.NUM_QUERIES", 8,
    "INPUT.IMAGE_SIZE", 64,
    "DATASETS.TEST", (),
]  # fmt: skip


class Report:
    """Collects ``name: value`` lines and problems (each with its fix)."""

    def __init__(self):
        self.problems: List[str] = []

    def line(self, name: str, value: str) -> None:
        print(f"  {name:<22} {value}")

    def problem(self, name: str, what: str, fix: str) -> None:
        self.line(name, f"PROBLEM: {what}")
        print(f"  {'':<22} fix: {fix}")
        self.problems.append(f"{name}: {what} -- fix: {fix}")

    def section(self, title: str) -> None:
        print(f"{title}")


def _version(module: str, dist: str = "") -> Optional[str]:
    """The installed version of ``dist`` when ``module`` imports, else None."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    try:
        return metadata.version(dist or module)
    except metadata.PackageNotFoundError:
        return str(getattr(mod, "__version__", "installed"))


def check_versions(report: Report) -> bool:
    """Versions; returns whether torch and detectron2 are usable."""
    report.section("Versions")
    report.line("iaunet", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})")
    report.line("python", f"{platform.python_version()} ({sys.executable})")
    try:
        import torch
    except ImportError as e:
        report.problem(
            "torch", f"not importable ({e})", "python -m pip install torch torchvision (README)"
        )
        return False
    report.line("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    report.line("cuDNN", str(cudnn) if cudnn else "not available")
    report.line("torchvision", _version("torchvision") or "not installed")
    ok = True
    if DETECTRON2_IMPORT_ERROR is not None:
        report.problem(
            "detectron2",
            f"not importable ({DETECTRON2_IMPORT_ERROR})",
            DETECTRON2_FIX,
        )
        ok = False
    else:
        import detectron2

        report.line(
            "detectron2", f"{detectron2.__version__} ({os.path.dirname(detectron2.__file__)})"
        )
        try:
            importlib.import_module("detectron2._C")
            built = "built"
        except ImportError:
            built = "not built"
        report.line(
            "detectron2 C++ ops",
            f"{built}; not needed: IAUNet uses none of detectron2's compiled ops (no ROIAlign, NMS "
            "or deformable convolution), so a pure-Python detectron2 install is enough",
        )
    for module, dist, why in DEPENDENCIES:
        version = _version(module, dist)
        if version is None:
            report.problem(dist, f"not installed ({why})", REINSTALL)
        else:
            report.line(dist, version)
    return ok


def check_threads_and_devices(report: Report) -> List[str]:
    """Threads and devices; returns the devices to run the forward pass on."""
    import torch

    report.section("Threads and devices")
    report.line(
        "CPU threads",
        f"torch {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op, "
        f"{os.cpu_count()} logical CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}",
    )
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            report.line(
                f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}"
            )
        devices.append("cuda")
    else:
        report.line("CUDA", "not available (CPU only)")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        report.line("MPS", "available (IAUNet runs on cpu or cuda)")
    return devices


def tiny_forward(device: str, size: int = 64, repeats: int = 3) -> Tuple[float, int]:
    """Build the tiny IAUNet and time its forward pass on one (3, size, size) image; returns (best
    seconds, number of instances)."""
    import torch
    from detectron2.modeling import build_model

    from .config import load_config

    cfg = load_config(opts=TINY_MODEL + ["MODEL.DEVICE", device])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.rand(3, size, size) * 255
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        with torch.inference_mode():
            out = model([{"image": image, "height": size, "width": size}])
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, len(out[0]["instances"])


def check_forward(report: Report, devices: Sequence[str], run: Callable = tiny_forward) -> None:
    report.section("Forward pass (tiny IAUNet, ResNet-18, one 64x64 image)")
    for device in devices:
        try:
            seconds, n = run(device)
        except Exception as e:  # any failure here is the thing to report
            msg = " ".join(str(e).split())[:300]
            report.problem(
                f"forward on {device}",
                f"{type(e).__name__}: {msg}",
                "reinstall torch/detectron2 for this machine (README, Install)",
            )
            continue
        report.line(f"forward on {device}", f"ok, {seconds * 1000:.1f} ms, {n} instances")


def check_datasets(report: Report) -> None:
    from .data.datasets.common import DATASET_FILES, ENV_ROOT, datasets_root

    root = datasets_root()
    report.section("Datasets")
    where = os.environ.get(ENV_ROOT)
    report.line(
        "root",
        f"{os.path.abspath(root)} ({ENV_ROOT}={where})"
        if where
        else f"{os.path.abspath(root)} ({ENV_ROOT} unset: ./datasets)",
    )
    if not os.path.isdir(root):
        report.line("", f"does not exist yet; set {ENV_ROOT} or see datasets/README.md")
    present, absent = [], []
    for name, paths in sorted(DATASET_FILES.items()):
        missing = [p for p in paths if not os.path.exists(os.path.join(root, p))]
        (absent if missing else present).append(name)
    report.line("present", ", ".join(present) or "none")
    report.line(
        "not on disk",
        (", ".join(absent) or "none")
        + " (synthetic_* are generated on first use; others: datasets/README.md)",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argparse.ArgumentParser(
        prog="iaunet-check",
        description="Check this IAUNet installation: versions, devices, a tiny forward pass, "
        "datasets. Exit status 1 when something needed is missing.",
    ).parse_args(argv)
    report = Report()
    print(f"IAUNet self-check ({platform.platform()})")
    usable = check_versions(report)
    if usable:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=JIT_SCRIPT_WARNING, category=FutureWarning)
            devices = check_threads_and_devices(report)
            check_forward(report, devices)
            check_datasets(report)
    if report.problems:
        print(f"\n{len(report.problems)} problem(s):", file=sys.stderr)
        for p in report.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("\nAll checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
