"""Shared by the benchmarks (no flags here: each benchmark module defines its own)."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import gattanet_jax as gj
from gattanet_jax.backbones import resnet


def build(batch: int, dtype: str, d: int, backbone_name: str = "toy", image_size: int = 0, **arch):
    """A backbone with random weights, its attention system, and a batch of uint8 images.

    'toy' (10 classes, 32 px by default) or 'resnet18' / 'resnet50' (1000 classes, 224 px by
    default, the paper's ResNet attention variant with BatchNorm and LayerNorm); ``arch``
    overrides ResNet fields (``stage_sizes``, ``width``: a small network of the same kind)."""
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    if backbone_name == "toy":
        backbone, sites, classes, size = gj.ToyCNN(10, dtype=compute), gj.TOY_SITES, 10, 32
        variant = {}
    else:
        backbone = resnet.ARCHITECTURES[backbone_name](num_classes=1000, dtype=compute, **arch)
        sites, classes, size = resnet.RESNET_SITES, 1000, 224
        variant = {"batch_norm_kq": True, "layer_norm_gatta": True}
    size = image_size or size
    x = jnp.zeros((1, size, size, 3))
    backbone_vars = jax.jit(backbone.init)(jax.random.key(0), x)
    sites = gj.resolve_sites(backbone, backbone_vars, (size, size, 3), sites)
    attention = gj.AttentionSystem(sites, d=d, alpha_init=0.01, **variant)
    attention_vars = gj.init_attention(attention, jax.random.key(1))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, classes, (batch,)), jnp.int32)
    return backbone, backbone_vars, attention, attention_vars, images, labels


def aot(jitted, *args) -> tuple:
    """Compiles ``jitted`` for ``args`` once, ahead of time: (the executable, which serves both the
    timing and the cost analysis, and its stats: compile_s, XLA's FLOPs and temporary bytes)."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    return compiled, {
        "compile_s": seconds,
        "flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)) if mem else None,
    }


def report(results: dict, as_json: bool) -> None:
    """Prints a benchmark's results: one JSON object, or one 'key value' line per entry."""
    if as_json:
        print(json.dumps(results, indent=1))
        return
    for k, v in results.items():
        print(f"{k:40s} {v}")


def median_seconds(fn, *args, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn(*args)`` with the result waited for; ``fn`` returns new args
    for the next call when it is a step (state threading), else its outputs are dropped. NaN
    for no repeats."""
    if not repeats:
        return float("nan")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))
