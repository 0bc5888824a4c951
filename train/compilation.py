"""Compilation: a persistent cache of compiled programs, and what each compilation cost.

The cache is on by default for ``train.main``, ``train.compare``, the analyses and the
benchmarks: compiled programs (and, on GPUs, XLA's autotuning results) are kept in
``$XDG_CACHE_HOME/gattanet-jax/xla`` (``~/.cache/gattanet-jax/xla``), so a rerun, a resumed run
or the next seed of the same model does not compile again. JAX's own settings override it:
``JAX_COMPILATION_CACHE_DIR=DIR`` puts it elsewhere, ``JAX_ENABLE_COMPILATION_CACHE=false``
turns it off, ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` sets which programs are worth
keeping (here 0.1 s and up unless set).

``CompileLog`` collects, from JAX's monitoring events, every compilation while it is active:
the function, its tracing, lowering and XLA seconds, and whether the cache served it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import ClassVar

from jax import monitoring

from train import progress, versions

TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
XLA = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"
MIN_COMPILE_S = 0.1  # programs that take less to compile are not worth a cache entry


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gattanet-jax" / "xla"


def enable_cache() -> str | None:
    """Turns the persistent compilation cache on (before anything compiles); returns its
    directory, or None where it is off (by JAX_ENABLE_COMPILATION_CACHE=false, or a directory
    that cannot be made: said in one line)."""
    if os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "").lower() in ("0", "false", "no", "off"):
        return None
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(default_dir())
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        progress.log(f"note: no compilation cache: cannot create {directory} ({e.strerror or e})")
        return None
    if not versions.update("jax_compilation_cache_dir", directory):
        return None  # a JAX without the persistent cache
    _note_damaged_entries(directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        versions.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return directory


DAMAGED_ENTRY = "Error reading persistent compilation cache entry"


def _note_damaged_entries(directory: str) -> None:
    """JAX skips a cache entry it cannot read (cut short by a crash, damaged) and compiles the
    program again, warning with two lines per entry: one note per process says so instead."""
    previous = warnings.showwarning
    if getattr(previous, "_notes_damaged_entries", False):
        return
    seen = []

    def show(message, category, filename, lineno, file=None, line=None):
        if DAMAGED_ENTRY not in str(message):
            return previous(message, category, filename, lineno, file, line)
        if not seen:
            progress.log(
                f"note: a damaged entry of the compilation cache ({directory}) was skipped: its "
                "program is compiled again"
            )
        seen.append(str(message))
        return None

    show._notes_damaged_entries = True
    warnings.showwarning = show


@contextlib.contextmanager
def cache():
    """``enable_cache()`` as a context, for entry points written as ``with`` blocks."""
    enable_cache()
    yield


class CompileLog:
    """The compilations JAX reports while the log is active (``start`` ... ``stop``), in order:
    each a dict of name, trace_s, lower_s, xla_s (XLA's compile, or the cache read) and
    cache_hit. Tracing and lowering count towards the next compilation reported."""

    _active: ClassVar[list[CompileLog]] = []
    _registered: ClassVar[bool] = False

    def __init__(self):
        self.records: list[dict] = []
        self._pending = {"trace_s": 0.0, "lower_s": 0.0, "cache_hit": False}
        self._reported = 0

    def start(self) -> CompileLog:
        if not CompileLog._registered:
            monitoring.register_event_duration_secs_listener(CompileLog._on_duration)
            monitoring.register_event_listener(CompileLog._on_event)
            CompileLog._registered = True
        CompileLog._active.append(self)
        return self

    def stop(self) -> None:
        if self in CompileLog._active:
            CompileLog._active.remove(self)

    @staticmethod
    def _on_duration(event: str, duration: float, **kwargs) -> None:
        for log in CompileLog._active:
            log._duration(event, duration, kwargs.get("fun_name", "?"))

    @staticmethod
    def _on_event(event: str, **kwargs) -> None:
        if event == CACHE_HIT:
            for log in CompileLog._active:
                log._pending["cache_hit"] = True

    def _duration(self, event: str, duration: float, name: str) -> None:
        if event == TRACE:
            self._pending["trace_s"] += duration
        elif event == LOWER:
            self._pending["lower_s"] += duration
        elif event == XLA:
            self.records.append({"name": name, **self._pending, "xla_s": duration})
            self._pending = {"trace_s": 0.0, "lower_s": 0.0, "cache_hit": False}

    def summary(self) -> dict:
        """Totals: seconds (trace + lower + XLA), xla_s, programs, cache_hits."""
        recs = self.records
        return {
            "seconds": round(sum(r["trace_s"] + r["lower_s"] + r["xla_s"] for r in recs), 3),
            "xla_s": round(sum(r["xla_s"] for r in recs), 3),
            "programs": len(recs),
            "cache_hits": sum(r["cache_hit"] for r in recs),
        }

    def new_lines(self, min_s: float = 0.2) -> list[str]:
        """One line for each compilation since the last call that took ``min_s`` or more, and
        one for the rest together."""
        new, self._reported = self.records[self._reported :], len(self.records)
        lines, small = [], []
        for r in new:
            total = r["trace_s"] + r["lower_s"] + r["xla_s"]
            if total < min_s:
                small.append(total)
                continue
            how = "from the cache" if r["cache_hit"] else "XLA"
            lines.append(
                f"compiled {r['name']} in {total:.1f} s (trace {r['trace_s']:.1f} s, lowering "
                f"{r['lower_s']:.1f} s, {how} {r['xla_s']:.1f} s)"
            )
        if small:
            lines.append(
                f"compiled {len(small)} small program{'s' * (len(small) > 1)} in {sum(small):.1f} s"
            )
        return lines


@contextlib.contextmanager
def timed() -> CompileLog:
    """A CompileLog active within the block."""
    log = CompileLog().start()
    try:
        yield log
    finally:
        log.stop()
