"""Fast dropout masks for the key and query maps.

GAttANet drops keys and queries per element (rate 0.25 in the paper): millions of mask bits per
step at the toy model's conv sites. On CPU, threefry costs tens of nanoseconds per element and
would dominate the step. The mask here comes from a counter-based hash (two rounds of the
MurmurHash3 32-bit finaliser over the element index, seeded from the JAX key): deterministic for a
given key, independent across elements for all practical purposes, and cheap because it is plain
fused integer arithmetic. Keep probabilities are exact multiples of 2**-24.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 pseudo-random bits of ``shape``, a pure function of the key and the element index.

    ``key``: one key for the whole array, or one key per example (shape (B,) = ``shape[0]``):
    each example's bits are then a function of its own key alone, so a slice of the batch with
    its slice of the keys gets exactly that slice of the bits (data-parallel shards)."""
    if jnp.ndim(key) == 0:
        seeds = jax.random.bits(key, (2,), jnp.uint32)
        index = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)
        return _fmix32(_fmix32(index * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1])
    if key.shape != shape[:1]:
        raise ValueError(f"per-example keys {key.shape} do not match the batch of {shape}")
    seeds = jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(key)
    seeds = seeds.reshape(shape[0], *(1,) * (len(shape) - 1), 2)
    index = jax.lax.iota(jnp.uint32, int(np.prod(shape[1:]))).reshape(1, *shape[1:])
    return _fmix32(_fmix32(index * jnp.uint32(0x9E3779B9) + seeds[..., 0]) ^ seeds[..., 1])


def fold_in(key: jax.Array, data: int) -> jax.Array:
    """``jax.random.fold_in`` for one key or for one key per example."""
    if jnp.ndim(key) == 0:
        return jax.random.fold_in(key, data)
    return jax.vmap(jax.random.fold_in, (0, None))(key, data)


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask, True with probability 1 - rate (``key``: as ``uniform_bits``)."""
    threshold = jnp.uint32(round(rate * 2**24))
    return (uniform_bits(key, shape) >> 8) >= threshold


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest.
    ``key``: one key, or one key per example of x (see ``uniform_bits``)."""
    if rate <= 0.0:
        return x
    keep = keep_mask(key, x.shape, rate)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)
