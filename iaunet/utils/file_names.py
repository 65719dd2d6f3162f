"""File names made from free text (dataset names such as ``folder:/abs/path#val``)."""

import re

MAX_LENGTH = 80  # characters kept (the end of the name: the most specific part of a path)


def safe_file_name(name: str) -> str:
    """``name`` usable as one file-name component (output folders, pictures, cache files):
    characters other than letters, digits, ``_ . -`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-MAX_LENGTH:] or "dataset"
