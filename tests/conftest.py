"""Test setup: 8 forced host devices for the multi-device tests, and fast compilation.

LLVM's optimisation level only changes how fast the compiled CPU code runs, not what it computes
(the HLO graph and its fusions are the same); tests compile many small programs and run each
briefly, so they compile with less effort. Benchmarks and training keep XLA's defaults.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
