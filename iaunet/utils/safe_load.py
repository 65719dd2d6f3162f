"""Weights files are data: the one reader of every weights file this project opens.

A ``.pkl`` file (detectron2's model-zoo format, and what ``tools/convert_pretrained.py`` writes) is
a Python pickle, and a pickle can name any importable function to call while it is read
(``os.system``, ``subprocess.Popen``, ...). Files that labs exchange by e-mail, Zenodo or forums
must never run code when opened, so :func:`load_weights_file` reads

- ``.pkl`` with :class:`DataUnpickler`, which admits only what model-zoo and converted files hold:
  dicts, lists, tuples, sets, strings, bytes, numbers, booleans, ``None`` (pickle opcodes, no
  globals), ``collections.OrderedDict`` and numpy arrays, scalars and dtypes (the few numpy
  functions that rebuild them);
- every other file (``.pth`` zip archives and torch's legacy non-zip format alike) with
  ``torch.load(weights_only=True)``: tensors, containers and primitive types only.

Anything else stops the read with an :class:`UnsafeFileError` naming the file and the refused
global, before the global is imported or called. docs/security.md lists what is trusted and why.
"""

import _compat_pickle
import pickle
import re
from typing import Any, FrozenSet, Tuple

import torch

# (module, name) of the globals a model-zoo / converted .pkl may name. numpy's pickles of arrays
# call _reconstruct (protocol <= 4) or _frombuffer (protocol 5) with ndarray and a dtype; scalars go
# through scalar(); Python 2 pickles of bytes through _codecs.encode. Pickle's own opcodes build
# dicts, lists, tuples, strings and numbers without any global; sets/frozensets need them at
# protocol 2. Each admitted global is a constructor of plain data: none reads or writes files or
# runs a command.
_NUMPY = ("numpy.core", "numpy._core")  # numpy 1.x / 2.x module names
ALLOWED_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(
    [(m + ".multiarray", "_reconstruct") for m in _NUMPY]
    + [(m + ".multiarray", "scalar") for m in _NUMPY]
    + [(m + ".numeric", "_frombuffer") for m in _NUMPY]
    + [
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("builtins", "bytearray"),
    ]
)
# numpy 2 pickles name numpy.dtypes.Float32DType etc. for dtypes
_NUMPY_DTYPE_CLASS = re.compile(r"^[A-Za-z0-9]+DType$")


class UnsafeFileError(ValueError):
    """A weights file that asks to run code (or is not a weights file); the message is one line
    naming the file and the refused global."""


class DataUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only :data:`ALLOWED_GLOBALS` (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (__builtin__.set, copy_reg...) as pickle itself maps them
        py3 = _compat_pickle.NAME_MAPPING.get((module, name))
        checked = py3 or (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        if checked in ALLOWED_GLOBALS or (
            checked[0] == "numpy.dtypes" and _NUMPY_DTYPE_CLASS.match(name)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {checked[0]}.{checked[1]} is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _refused_global(e: BaseException) -> str:
    """The ``module.name`` an unpickler refused, from its message ('' if it names none)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return found.group(1) if found else ""


def load_weights_file(path: str) -> Any:
    """The contents of weights file ``path`` read as data (module docstring); UnsafeFileError
    naming the file and the refused global when it asks for anything else. Errors of the file
    itself (missing, truncated, not a pickle) pass through as they are."""
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                # latin1: Python 2 pickles of numpy arrays (detectron2's model zoo reads them so)
                return DataUnpickler(f, encoding="latin1").load()
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(e)
        if not refused and "weights only" not in str(e).lower() and "not allowed" not in str(e):
            raise
        what = f"it asks to run {refused}" if refused else "it holds more than data"
        raise UnsafeFileError(
            f"refused to load {path}: {what}, which a weights file does not need (weights are "
            "read as data only: tensors, arrays, numbers, strings and containers; "
            "docs/security.md)"
        ) from None
