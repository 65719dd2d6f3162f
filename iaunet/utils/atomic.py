"""The one atomic file writer: checkpoints, ``last_checkpoint``, dataset caches and every prediction
output.

A file is written to a temporary file in the same folder, flushed and fsynced, then renamed over the
target (``os.replace`` is atomic on POSIX), and the folder is fsynced so that the rename survives a
power loss. At any moment the target holds either its old content or the complete new one. When the
write fails (full disk, read-only file system, no permission) the temporary file is removed and the
error names the target; after a SIGKILL it stays as ``.<name>.tmp-<pid>`` (see ``TMP_MARK``).
"""

import contextlib
import os
from typing import IO, Any, Callable, Union

TMP_MARK = ".tmp-"


def atomic_write(path: str, content: Union[bytes, str, Callable[[IO[bytes]], Any]]) -> None:
    """Create or replace ``path`` with ``content``: bytes, text (UTF-8), or a function ``write(f)``
    that
    writes to a binary file object. Raises ``OSError`` naming ``path`` when it cannot be written."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and path not in str(e):
            raise type(e)(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened/fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
