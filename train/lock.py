"""One writer per workdir: ``<workdir>/.lock``, held while a process trains there.

An flock, so the system drops it when its holder ends, even by ``kill -9``; the file names the
holder (pid, host, start time) for the one-line refusal a second process gets, and is emptied
on a clean release, so that a new holder finding a name in it knows its predecessor died while
holding it (and says so). On several hosts only process 0 takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from train import progress, signals
from train.errors import UserError

LOCK = ".lock"


@contextlib.contextmanager
def hold(workdir: str | os.PathLike):
    """Holds the workdir's lock for the block; a UserError naming the holder if another process
    holds it."""
    if not progress.is_main():
        yield
        return
    path = Path(workdir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        f = open(path / LOCK, "a+b", buffering=0)  # noqa: SIM115  (held for the whole block)
    except OSError as e:
        raise UserError(f"workdir {path} is not writable: {e.strerror or e}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"workdir {path} is in use by {_holder(f)}: one process trains a workdir at a "
                "time (wait for it to end, or stop it)"
            ) from None
        before = _read(f)
        if before:
            progress.log(
                f"note: took over the lock of {path} from pid {before.get('pid')} on "
                f"{before.get('host')}, which ended without releasing it"
            )
        _write(f, {"pid": os.getpid(), "host": socket.gethostname(),
                   "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})  # fmt: skip
        try:
            with signals.cleanup(lambda: _write(f, None)):  # an instant stop releases it too
                yield
        finally:
            _write(f, None)
            fcntl.flock(f, fcntl.LOCK_UN)


def _read(f) -> dict:
    f.seek(0)
    try:
        record = json.loads(f.read() or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _write(f, record: dict | None) -> None:
    """The holder's name in the file (unbuffered); on a full disk the lock holds without it."""
    try:
        f.seek(0)
        f.truncate()
        if record:
            f.write(json.dumps(record).encode())
    except OSError:
        pass


def _holder(f) -> str:
    r = _read(f)
    if not r:
        return "another process"
    return f"pid {r.get('pid')} on host {r.get('host')} (since {r.get('since')})"
