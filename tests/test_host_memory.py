"""Freed host memory kept for reuse: set first by the project's commands, never by importing the
library. A program whose 38 MB result is allocated on every call page-faults it again each time
without the setting, and not with it."""

import json
import os
import subprocess
import sys

import pytest

from gattanet_jax import host_memory

# A fresh process (the setting acts only before NumPy and JAX start threads): minor page faults
# in a median call of a compiled program returning 38 MB (9,200 pages of 4 KiB). FIRST is what
# the process does before anything else.
_PROBE = """
{first}
import json, resource, sys
import gattanet_jax
import jax, jax.numpy as jnp
from gattanet_jax import host_memory
f = jax.jit(lambda x: jnp.tile(x, (1, 9)))
x = jnp.ones((32768, 32), jnp.float32)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(faults[2:])[len(faults[2:]) // 2]  # median call after two warm-up calls
print(json.dumps({{"applied": host_memory._applied, "faults": faults}}))
"""
COMMAND = "from train import signals; signals.install()"  # what every command does first


def _probe(first: str, setting: str = "1") -> dict:
    env = {**os.environ, "GATTANET_KEEP_HOST_MEMORY": setting, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(first=first)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's allocator only")
def test_commands_keep_freed_buffers_and_importing_the_library_changes_nothing():
    command, imported, off = _probe(COMMAND), _probe(""), _probe(COMMAND, setting="0")
    assert command["applied"] is True and command["faults"] < 500, command
    assert imported["applied"] is None, imported  # the import never called it
    assert imported["faults"] > 5000, imported  # the result's pages, faulted again on every call
    assert off["applied"] is False and off["faults"] > 5000, off
