"""What a command of this project sets for its whole process, first (``signals.install`` calls
it): glibc's allocator keeps freed host memory for reuse (``gattanet_jax.host_memory``).

The setting acts only for threads that have not allocated yet, so it must come before NumPy or
JAX is imported; importing ``gattanet_jax`` imports both. So the library's module is loaded
here on its own, from its file, and registered under its name: ``import gattanet_jax`` later
finds it (and that it was applied) instead of loading it again. Standard library only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "gattanet_jax.host_memory"


def keep_freed_host_memory() -> bool:
    """``gattanet_jax.host_memory.keep_freed_host_memory()`` without importing the library
    (nor NumPy or JAX); True if the setting was applied."""
    module = sys.modules.get(_NAME)
    if module is None:
        package = importlib.util.find_spec("gattanet_jax")  # finds it; imports nothing
        if package is None or not package.submodule_search_locations:
            return False
        path = Path(next(iter(package.submodule_search_locations))) / "host_memory.py"
        spec = importlib.util.spec_from_file_location(_NAME, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return module.keep_freed_host_memory()
