"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

A write that fails (a missing or read-only folder, a full disk, a place like ``/proc``) is one
``VlcapError`` line naming the file, and leaves no temporary file behind. New files get the
permissions the umask allows, like any file a program creates (``mkstemp`` alone gives 0600); a
replaced file keeps its own.
"""
import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from vlcap.core.errors import VlcapError


@contextlib.contextmanager
def atomic_write(path, mode="wb", newline=None):
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.
    Text modes write UTF-8 whatever the locale (``newline`` as for ``open``)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, file_mode(path))
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": newline}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        sync_directory(path.parent)
    except OSError as exc:
        raise VlcapError(f"{path}: cannot write ({exc.strerror or exc}){advice(exc.errno)}") from None
    except RuntimeError as exc:
        # torch.save reports a failed write (a full disk) as a RuntimeError ("unexpected pos").
        if "unexpected pos" not in str(exc) and "PytorchStreamWriter" not in str(exc):
            raise
        raise VlcapError(f"{path}: cannot write (the writer stopped part-way: {free_space(path.parent)} free "
                         "on that disk); free some space or write elsewhere") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def file_mode(path):
    """The permissions of the file ``path`` will be: its own if it exists, else 0666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def advice(code):
    return {errno.ENOSPC: "; the disk is full: free some space or write elsewhere",
            errno.EDQUOT: "; over the disk quota: free some space or write elsewhere",
            errno.EROFS: "; the file system is read-only: write elsewhere",
            errno.EACCES: "; no permission: write elsewhere",
            errno.EPERM: "; not permitted: write elsewhere",
            errno.ENOENT: "; the folder cannot be created there: write elsewhere"}.get(code, "")


def free_space(folder):
    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 20:,.0f} MiB"
    except OSError:
        return "unknown"


def sync_directory(folder):
    """The rename itself is only durable once the directory entry is on disk."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
