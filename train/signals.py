"""SIGTERM and Ctrl-C at any moment of a command, and the phases a run passes through.

The command-line tools call ``install()`` first, before anything slow is imported. From then on a
signal never raises into the code it interrupts (no traceback, whatever it hits):

- While a training step has run since the last full checkpoint (``unsaved(True)``), the first
  SIGTERM or SIGINT is kept for the training loop, which saves the run at its next step
  boundary (or at the end of the epoch it is evaluating) and exits with 128 + the signal.
- Anywhere else (start-up, compilation, a run whose progress is all saved, writing results,
  the switch between stages, an analysis), and for a second signal anywhere, the process stops
  at once: one line, then ``os._exit(128 + signal)``, as if killed. Every file the project
  writes is complete or absent at any instant (checkpoints are renamed into place, then get
  their digest, and only then is an older one pruned; records are written to a temporary name
  and renamed), so an instant stop loses nothing that a rerun of the same command does not
  redo.

``phase(name)`` names the moment a run has reached (start-up, compilation, each checkpoint
save, ...): the one-line message says it, and the fault sweep (``python -m tests.fault_sweep``)
uses it to interrupt a run at every phase of its life. With ``GATTANET_PHASE_LOG=<file>`` each
phase is appended to that file as it starts; ``GATTANET_FAULT=<phase>:<n>:<fault>`` delivers a
fault (``TERM``, ``KILL``, or ``INT2``: two SIGINTs 0.3 s apart) to the process itself when it
enters that phase for the n-th time. Standard library only: importable before JAX.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import ClassVar

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _State:
    installed = False  # by install(): handlers for the whole process
    tool = "train"
    phase = "start-up"
    label = ""  # the stage's tag for messages, e.g. '[backbone] '
    unsaved = False  # a training step has run since the last full checkpoint
    pending: int | None = None  # a signal kept for the training loop
    cleanups: ClassVar[list] = []  # called before an instant stop (e.g. the lock's holder record)
    counts: ClassVar[dict] = {}  # phase -> times entered
    fault: tuple[str, int, str] | None = None
    phase_log: str | None = None


S = _State


def _read_environment() -> None:
    S.phase_log = os.environ.get("GATTANET_PHASE_LOG") or None
    spec = os.environ.get("GATTANET_FAULT")
    S.fault = None
    if spec:
        name, n, fault = spec.rsplit(":", 2)
        S.fault = (name, int(n), fault)


def install(tool: str = "train") -> None:
    """Handlers for SIGTERM and SIGINT for the whole process (a command's first call), and the
    process's allocator setting (``train.process``)."""
    from train import process

    process.keep_freed_host_memory()
    _read_environment()
    S.tool = tool
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handle)
        S.installed = True


def _handle(signum, frame):
    del frame
    if S.pending is None and S.unsaved:
        S.pending = signum  # the training loop saves at its next step boundary and exits
        return
    stop_now(signum)


PHASES = {  # phase -> the words of the one-line message
    "imports": "start-up (imports)",
    "config": "start-up (reading the config)",
    "restore": "start-up (restoring the workdir)",
    "data": "start-up (reading the data)",
    "compile": "compilation",
    "first_step": "the first training step",
    "step": "training",
    "eval": "evaluation",
    "save_best": "the best checkpoint's save",
    "save_periodic": "a checkpoint's save",
    "save_mid": "a within-epoch checkpoint's save",
    "results": "the final evaluation",
    "switch": "the switch between the stages",
    "end": "the end of the run",
}


def describe(name: str) -> str:
    """A phase in words ('save_best:written' -> "the best checkpoint's save")."""
    return PHASES.get(name.split(":")[0], name)


def stop_now(signum: int) -> None:
    """One line naming the signal and the phase, then the process ends (128 + the signal)."""
    name = signal.Signals(signum).name
    if S.tool == "train":
        advice = "the workdir keeps its last complete checkpoint: rerun the same command to resume"
    else:
        advice = "rerun the same command"
    line = f"{S.label}{name} during {describe(S.phase)}: stopped at once; {advice}\n"
    for cleanup in list(S.cleanups):
        with contextlib.suppress(Exception):
            cleanup()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # (a write it interrupted may hold the buffer)
            stream.flush()
    with contextlib.suppress(OSError):
        os.write(2, line.encode())
    os._exit(128 + signum)


def pending() -> int | None:
    """The signal kept for the training loop, if any."""
    return S.pending


def unsaved(flag: bool) -> None:
    """Whether the run has progress that is not in a full checkpoint yet (a signal then waits
    for the loop to save it)."""
    S.unsaved = flag


def label(tag: str) -> None:
    """The tag of the messages from now on (the stage: '[backbone] ')."""
    S.label = tag


@contextlib.contextmanager
def cleanup(fn):
    """``fn`` runs before an instant stop while the block runs."""
    S.cleanups.append(fn)
    try:
        yield
    finally:
        S.cleanups.remove(fn)


def phase(name: str) -> None:
    """The run has reached ``name``: recorded for the messages (and the fault sweep)."""
    S.phase = name
    S.counts[name] = n = S.counts.get(name, 0) + 1
    if S.phase_log:
        with open(S.phase_log, "a") as f:
            f.write(f"{time.time():.4f} {name} {n}\n")
    if S.fault and S.fault[:2] == (name, n):
        _deliver(S.fault[2])


def _deliver(fault: str) -> None:
    pid = os.getpid()
    if fault == "KILL":
        os.kill(pid, signal.SIGKILL)
    elif fault == "TERM":
        os.kill(pid, signal.SIGTERM)
    elif fault == "INT2":
        os.kill(pid, signal.SIGINT)
        threading.Timer(0.3, os.kill, (pid, signal.SIGINT)).start()
    else:
        raise ValueError(f"GATTANET_FAULT: unknown fault {fault!r} (TERM, KILL or INT2)")


@contextlib.contextmanager
def handled():
    """Handlers for the block where no command installed them (a library user's own script
    calling ``train_and_evaluate`` in its main thread); put back afterwards."""
    if S.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    _read_environment()
    S.installed = True
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        S.installed = False
        S.pending, S.unsaved = None, False
