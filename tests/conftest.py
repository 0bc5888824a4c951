"""Test setup: 8 forced host devices for the multi-device tests, and cheaper compilation.

Tests compile many small programs and run each briefly (compilation is about two thirds of the
suite's CPU time), so LLVM skips its expensive passes, XLA's CPU backend emits fusions with its
elemental emitters instead of the MLIR fusion emitters (each program compiles in about 0.6 of the
time and runs no slower at these sizes), each program is emitted in one piece rather than split
for parallel code generation (the workers keep both cores busy already; about 6 % less CPU for
the same compilations), and every compiled program, however small, goes to a
persistent cache made fresh for each session: many tests (and the training subprocesses, which
inherit the environment) compile the same steps again. (--xla_backend_optimization_level=0
would halve the compile time again, but miscompiles: non-finite losses and float64 gradients
turn into NaN with jaxlib 0.10.2: not used.) Benchmarks and training keep XLA's defaults.
A flag or option the installed version does not know is not set (the probe below; jaxlib 0.12
has no switch for the fusion emitters).

Random bits come from the non-partitionable threefry: with jaxlib 0.10.2 on CPU the partitionable
one (JAX's default) takes several times longer to compile (about 1.9 s against 0.3 s for one
(3, 3, 4, 4) normal draw here), and the suite compiles hundreds of steps with dropout or
augmentation in them. Both are the same distribution and neither depends on how arrays are
sharded; only the bits differ, and no test compares with bits from outside the suite.
"""

import json
import os
import shutil
import tempfile

import pytest

from train import versions

# What the suite asks of JAX, set only where the installed version knows it (train/versions.py):
# the process that starts pytest probes once; its workers and subprocesses inherit the result.
XLA_FLAGS = [
    "--xla_force_host_platform_device_count=8",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",  # jaxlib before 0.12 (the fusion emitters' switch)
    "--xla_cpu_parallel_codegen_split_count=1",
]
OPTIONS = {  # jax.config option: its environment variable's value
    "jax_persistent_cache_min_compile_time_secs": "0",
    "jax_threefry_partitionable": "0",
}
if "GATTANET_TEST_SETTINGS" not in os.environ:
    _found = versions.probe(XLA_FLAGS if "XLA_FLAGS" not in os.environ else [], list(OPTIONS))
    if "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = " ".join(_found.flags)
    for _name in _found.options:
        os.environ.setdefault(_name.upper(), OPTIONS[_name])
    os.environ["GATTANET_TEST_SETTINGS"] = json.dumps(
        {"xla_flags": _found.flags, "refused": _found.refused, "options": _found.options}
    )
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The session's cache: made by the process that starts pytest (its workers and subprocesses
# inherit the variable) and removed by it at the end.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="gattanet-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE


@pytest.fixture(autouse=True)
def _reference_precision(request):
    """Tests marked ``reference`` (float64 references) run at the project's default precision
    policy (train/precision.py), so that they hold on a GPU or TPU as on a CPU:
    ``JAX_PLATFORMS= python -m pytest -m reference -n 0`` runs them on whatever device JAX has."""
    if request.node.get_closest_marker("reference") is None:
        yield
        return
    from train import precision

    with precision.scope_for("float32", precision.DEFAULT):
        yield


# The modules that take longest (seconds of work each, measured with --durations=0 on a 2-core
# machine), dispatched first: the workers take whole modules (--dist loadscope) in collection
# order, so a long module collected last would run alone at the end while the other worker idles.
LONGEST_FIRST = (
    "test_crash.py",
    "test_suite.py",
    "test_gattanet.py",
    "test_seeds.py",
    "test_analyze.py",
    "test_parallel.py",
    "test_systems.py",
    "test_sweep.py",
    "test_protocol.py",
    "test_bfloat16.py",
    "test_workdir_trust.py",
    "test_errors.py",
    "test_faults.py",
    "test_nnx.py",
    "test_reliability.py",
)


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a module
