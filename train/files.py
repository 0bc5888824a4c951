"""Files a command writes and reads, and what goes wrong with them, in a few words.

``write_atomic`` writes to a temporary name beside the file and renames it into place: at any
instant (a kill, a full disk) the file is its old complete version or its new one. ``reason``
tells the causes of a failed read or write apart in a few words ('not found', 'permission
denied', 'no space left on the device', ...) for the one-line errors of every command. Standard
library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

REASONS = {
    errno.ENOENT: "not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
    errno.EIO: "input/output error (a failing disk or a lost mount)",
}


def reason(e: BaseException) -> str:
    """A failed read or write in a few words."""
    if isinstance(e, OSError) and e.errno in REASONS:
        return REASONS[e.errno]
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "No space left" in text or "ENOSPC" in text:
        return REASONS[errno.ENOSPC]
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
