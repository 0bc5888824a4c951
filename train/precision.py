"""The precision policy: what float32 means for every dot and convolution a run compiles.

On a CPU, float32 dots and convolutions are float32 whatever XLA is told. On recent NVIDIA GPUs
(A100, H100, H200) and TPUs, XLA's default precision for float32 inputs is lower: TF32-class
products on GPUs (10 bits of mantissa), bfloat16 passes on TPUs. ``config.model.precision``:

  'float32'        every float32 dot and convolution at ``Precision.HIGHEST``: float32 as on a
                   CPU (the default; the reference tests hold on any device).
  'tensorfloat32'  ``Precision.HIGH``: TF32 products on GPUs (faster, about 1e-3 relative error
                   in the toy model's logits on an H200), 3 bfloat16 passes on TPUs.

bfloat16 runs (``model.dtype='bfloat16'``) keep XLA's default for every dot and convolution,
as their low precision is chosen already.

The policy is a ``jax.default_matmul_precision`` scope around everything a run, an analysis or
a benchmark traces, lowers and calls, so it reaches the backbones, the attention system and the
add-ons alike (none of them passes a ``precision`` of its own).
"""

from __future__ import annotations

import contextlib

import jax

PRECISIONS = ("float32", "tensorfloat32")
DEFAULT = "float32"
HLO_NAMES = {"float32": "HIGHEST", "tensorfloat32": "HIGH", None: "DEFAULT"}


def policy(dtype: str, precision: str) -> str | None:
    """The ``jax.default_matmul_precision`` value of a run: None keeps XLA's default."""
    return None if dtype == "bfloat16" else precision


def scope(config) -> contextlib.AbstractContextManager:
    """The run's precision policy as a context: enter it around tracing, lowering and calls."""
    return scope_for(config.model.dtype, config.model.precision)


def scope_for(dtype: str, precision: str = DEFAULT) -> contextlib.AbstractContextManager:
    name = policy(dtype, precision)
    return contextlib.nullcontext() if name is None else jax.default_matmul_precision(name)
