"""Freed host memory kept for reuse: XLA's large CPU buffers without a page fault per step.

On CPU, XLA's runtime allocates the temporary buffer of a compiled program (for the toy CNN's
training step at batch 128: 104 MB) on every call, with ``posix_memalign`` from a thread of its
pool. glibc serves a block that large from a fresh ``mmap`` and gives it back with ``munmap``
when it is freed, so every call page-faults its whole temporary buffer again: 25,300 faults per
toy training step, about 20 ms of a 135 ms step on the 2-core development CPU
(``benchmarks/RESULTS.md``). PyTorch's smaller per-layer blocks stay under glibc's mmap
threshold and are reused.

``keep_freed_host_memory()`` sets glibc's allocator (``mallopt``) to one arena, no ``mmap`` and
no trimming: a freed buffer stays in the process's heap and the next call reuses it, with no page
fault. The cost: the process keeps the largest heap it has used (its resident memory does not
shrink). It acts only with glibc on Linux, and only for threads that have not allocated yet, so
it must run before NumPy or JAX start threads. Importing ``gattanet_jax`` does not call it
(a library changes nothing in the process that imports it): the project's commands
(``train.main`` and the other tools, the benchmarks) call it first, through ``train.process``,
which loads this module without the package. In a script of your own, call
``train.process.keep_freed_host_memory()`` before importing NumPy or JAX, or
``gattanet_jax.keep_freed_host_memory()`` after (part of the gain: 9,800 faults per step).
``GATTANET_KEEP_HOST_MEMORY=0`` in the environment turns it off. This module imports nothing
but the standard library.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1

_applied: bool | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only; musl has a no-op mallopt)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_host_memory() -> bool:
    """Sets glibc's allocator to keep and reuse freed memory; True if it did (see the module
    docstring). Calling it again does nothing more."""
    global _applied
    if _applied is not None:
        return _applied
    libc = None if os.environ.get("GATTANET_KEEP_HOST_MEMORY", "1") == "0" else _glibc()
    _applied = bool(
        libc is not None
        and libc.mallopt(_M_ARENA_MAX, 1)
        and libc.mallopt(_M_MMAP_MAX, 0)
        and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    )
    return _applied
