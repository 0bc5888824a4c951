"""Shared by the benchmarks (no flags here: each benchmark module defines its own)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import gattanet_jax as gj


def build(batch: int, dtype: str, d: int):
    backbone = gj.ToyCNN(10, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    x = jnp.zeros((1, 32, 32, 3))
    backbone_vars = jax.jit(backbone.init)(jax.random.key(0), x)
    sites = gj.resolve_sites(backbone, backbone_vars, (32, 32, 3), gj.TOY_SITES)
    attention = gj.AttentionSystem(sites, d=d, alpha_init=0.01)
    attention_vars = gj.init_attention(attention, jax.random.key(1))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)
    return backbone, backbone_vars, attention, attention_vars, images, labels


def median_seconds(fn, *args, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn(*args)`` with the result waited for; ``fn`` returns new args
    for the next call when it is a step (state threading), else its outputs are dropped."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))
