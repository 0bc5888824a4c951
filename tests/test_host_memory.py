"""Importing gattanet_jax keeps freed host memory for reuse: a program whose 38 MB result is
allocated on every call page-faults it again each time without the setting, and not with it."""

import json
import os
import subprocess
import sys

import pytest

from gattanet_jax import host_memory

# A fresh process (the setting acts only before NumPy and JAX start threads): minor page faults
# in a median call of a compiled program returning 38 MB (9,200 pages of 4 KiB).
_PROBE = """
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
print(json.dumps({"applied": host_memory.keep_freed_host_memory(), "faults": faults}))
"""


def _probe(setting: str) -> dict:
    env = {**os.environ, "GATTANET_KEEP_HOST_MEMORY": setting, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's allocator only")
def test_freed_buffers_are_reused_without_page_faults():
    on, off = _probe("1"), _probe("0")
    assert on["applied"] and not off["applied"]
    assert off["faults"] > 5000, off  # the result's pages, faulted again on every call
    assert on["faults"] < 500, on
