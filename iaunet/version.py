"""The package version (one place: the package face, the bioimage.io packages and iaunet-check read
it here; setup.py carries the same number)."""

__version__ = "0.2.0"
