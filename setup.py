#!/usr/bin/env python
"""IAUNet for detectron2. detectron2 itself is a prerequisite (not on PyPI): see README.md."""

from setuptools import find_packages, setup

EXTRAS = {
    "isbi": ["h5py"],  # MATLAB v7.3 files in datasets/prepare_isbi2014.py
    # napari plugin (iaunet/napari_plugin): dock widget and reader
    "napari": ["napari>=0.5", "npe2>=0.7", "magicgui>=0.8", "qtpy", "pyqt5"],
    # tools/export_model.py --format onnx and the onnxruntime backend of iaunet-predict
    "export": ["onnx>=1.14", "onnxruntime>=1.16"],
    # tools/export_model.py --format bioimageio: bioimage.io model packages (the spec's
    # description, ONNX weights) and bioimage.io's own test and prediction (bioimageio.core)
    "bioimageio": [
        "bioimageio.core>=0.11",
        "bioimageio.spec>=0.5.12",
        "pydantic>=2",
        "onnx>=1.14",
        "onnxruntime>=1.16",
    ],
    # tools/benchmark_few_shot.py: the peers trained from scratch, Cellpose 3 (not Cellpose 4,
    # whose 300M-parameter model is impractical on a CPU) and StarDist 2D (TensorFlow on the CPU;
    # csbdeep normalizes its inputs)
    "fewshot": ["cellpose==3.1.*", "stardist==0.9.2", "csbdeep>=0.8", "tensorflow-cpu>=2.15"],
    # iaunet-predict --dask: block-wise prediction of large images on Dask, OME-Zarr / TIFF read
    # lazily (zarr), OME-Zarr labels written and validated (ome-zarr-py, ome-zarr-models), opened
    # in napari (napari-ome-zarr)
    "bigimage": [
        "dask>=2024.1",
        "distributed>=2024.1",
        "zarr>=3",
        "ome-zarr>=0.10",
        "ome-zarr-models>=1.0",
        "napari-ome-zarr>=0.6",
    ],
}
# Everything the test suite needs: pytest, the linter, and every optional feature's dependencies.
# pytest-qt drives the napari widget; pytest-xvfb gives napari's OpenGL canvas a virtual X display
# (the Xvfb program: `apt-get install xvfb` on Debian/Ubuntu; .ci/run installs it).
EXTRAS["test"] = ["pytest>=7", "ruff>=0.5", "pytest-qt", "pytest-xvfb"] + sorted(
    {d for deps in EXTRAS.values() for d in deps}
)

setup(
    name="iaunet",
    version="0.2.0",
    description="IAUNet (Instance-Aware U-Net): query-based instance segmentation for microscopy, "
    "on detectron2",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["iaunet", "iaunet.*"]),
    python_requires=">=3.8",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "pycocotools>=2.0.2",
        "scipy>=1.7",
        "numpy",
        "opencv-python-headless>=4.5",
        "tifffile>=2021.1",
        "scikit-image>=0.19",  # per-object tables (regionprops)
        "roifile>=2023.5",  # ImageJ/Fiji ROI sets (outputs, and annotations of folder: datasets)
        "timm>=1.0.8",  # Swin with always_partition / strict_img_size
        "safetensors",  # timm checkpoints in tools/convert_pretrained.py
        "matplotlib",
        "tensorboard",
        "tqdm",
    ],
    extras_require=EXTRAS,
    package_data={"iaunet.napari_plugin": ["napari.yaml"]},
    entry_points={
        "console_scripts": ["iaunet-predict=iaunet.predict:main", "iaunet-check=iaunet.check:main"],
        "napari.manifest": ["iaunet = iaunet.napari_plugin:napari.yaml"],
    },
)
