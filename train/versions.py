"""Settings that only some JAX versions know, set only where the running version knows them.

XLA aborts the whole process at its first computation when ``XLA_FLAGS`` holds a flag its
jaxlib does not define (``Unknown flag in XLA_FLAGS: ...``), and JAX ignores a ``JAX_*``
environment variable or refuses a ``jax.config.update`` of an option it does not define. Flags
come and go between jaxlib releases (``--xla_cpu_use_fusion_emitters`` is gone from 0.12), so
code that wants one asks first:

- ``known_xla_flags(flags)`` starts one short process with the flags and keeps those its XLA
  accepts (one more process per flag it refuses): the probe, in the tests' setup;
- ``known_options(names)`` says which ``jax.config`` options the installed JAX defines;
- ``update(name, value)`` sets an option where it is defined and says whether it did.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import NamedTuple

_UNKNOWN_FLAG = re.compile(r"Unknown flags? in XLA_FLAGS: *(\S+)")
_PROBE = (
    "import json, sys, jax\n"
    "known = [n for n in json.loads(sys.argv[1]) if n in jax.config.values]\n"
    "print(json.dumps(known), flush=True)\n"
    "jax.devices('cpu')\n"  # where XLA reads XLA_FLAGS, and aborts on one it does not know
)


class Probe(NamedTuple):
    """What one probe found: the flags XLA accepted and refused, the options JAX defines."""

    flags: list[str]
    refused: list[str]
    options: list[str]


def probe(flags: list[str], options: list[str] = ()) -> Probe:
    """Starts a process with ``XLA_FLAGS`` = ``flags`` until XLA accepts them all, dropping each
    flag it refuses by name; returns what it accepted and which of ``options`` JAX defines."""
    flags, refused = list(flags), []
    while True:
        env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
        env.pop("JAX_ENABLE_X64", None)
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, json.dumps(list(options))],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        known = json.loads(done.stdout.splitlines()[0]) if done.stdout.strip() else []
        if done.returncode == 0:
            return Probe(flags, refused, known)
        found = _UNKNOWN_FLAG.search(done.stderr)
        name = found and found.group(1).split("=")[0]
        matching = [f for f in flags if f.split("=")[0] == name]
        if not matching:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"JAX does not start with XLA_FLAGS={' '.join(flags)!r}: {last}")
        flags = [f for f in flags if f not in matching]
        refused += matching


def known_xla_flags(flags: list[str]) -> list[str]:
    """The subset of ``flags`` (``--name=value`` each) that the installed jaxlib accepts."""
    return probe(flags).flags


def known_options(names) -> list[str]:
    """Which of the ``jax.config`` option ``names`` the installed JAX defines (in this
    process: it imports jax)."""
    import jax

    return [n for n in names if n in jax.config.values]


def update(name: str, value) -> bool:
    """``jax.config.update(name, value)`` where the installed JAX defines ``name``; False
    (and nothing set) where it does not."""
    if not known_options([name]):
        return False
    import jax

    jax.config.update(name, value)
    return True
