"""The one atomic file writer: checkpoints, ``last_checkpoint``, dataset caches and every prediction
output.

A file is written to a temporary file in the same folder, flushed and fsynced, then renamed over the
target (``os.replace`` is atomic on POSIX), and the folder is fsynced so that the rename survives a
power loss. At any moment the target holds either its old content or the complete new one. When the
write fails (full disk, read-only file system, no permission) the temporary file is removed and the
error names the target; after a SIGKILL it stays as ``.<name>.tmp-<pid>`` (see ``TMP_MARK``).

:func:`is_storage_error` tells a failed write that every later write to the same place will meet
too (full disk, read-only file system, folder without write permission: stop the run) from one
that concerns one file only (a name too long, a folder in the way: skip the file). Commands stop
on the former with one line and :data:`EXIT_WRITE_ERROR`.
"""

import contextlib
import errno
import os
from typing import IO, Any, Callable, Union

TMP_MARK = ".tmp-"

# sysexits.h EX_IOERR ("an error occurred while doing I/O on some file"): the exit status of
# train_net.py and iaunet-predict when an output cannot be written because of the storage.
EXIT_WRITE_ERROR = 74

# errno of a failed write that concerns the storage, not the file: full disk or quota, read-only
# file system, no permission to create files in the folder (atomic_write creates a temporary file
# there, so a read-only target file itself is no error), I/O error, folder gone or stale (NFS).
STORAGE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.ESTALE,
    }
)


def is_storage_error(e: BaseException) -> bool:
    """True for an ``OSError`` that every later write to the same folder will meet too
    (:data:`STORAGE_ERRNOS`); False for a per-file error (``ENAMETOOLONG``, ``EISDIR``, ``EFBIG``,
    ``EINVAL``: a name the file system rejects, ...) and for any other exception."""
    return isinstance(e, OSError) and e.errno in STORAGE_ERRNOS


def describe_write_error(e: OSError) -> str:
    """One line naming the cause with its errno name, e.g. ``cannot write out/a.tif: No space left
    on device (ENOSPC)``; the path when the error carries one (``atomic_write``'s do)."""
    code = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    msg = e.strerror if e.strerror else str(e)
    if e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return f"{msg} ({code})" if code and code not in msg else msg


def _os_error_in_chain(e: BaseException):
    """``e`` if it is an ``OSError``, else the ``OSError`` it was raised while handling, if any:
    torch.save reports a full disk as ``RuntimeError: ... unexpected pos`` raised while closing
    its zip writer, with the ``OSError: [Errno 28]`` of the failed write as its context."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def atomic_write(path: str, content: Union[bytes, str, Callable[[IO[bytes]], Any]]) -> None:
    """Create or replace ``path`` with ``content``: bytes, text (UTF-8), or a function ``write(f)``
    that writes to a binary file object. Raises ``OSError`` (same errno, message ``cannot write
    <path>: <cause>``) when it cannot be written; the target is then unchanged and no temporary
    file is left."""
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
        cause = _os_error_in_chain(e) if isinstance(e, Exception) else None  # not Ctrl-C, exit
        if cause is None or (cause is e and path in str(e)):
            raise
        if path in str(cause):
            raise type(cause)(*cause.args) from e
        if cause.errno is None:
            raise OSError(f"cannot write {path}: {cause}") from e
        raise type(cause)(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from e
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened/fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
