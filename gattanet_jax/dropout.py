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


def uniform_bits(key: jax.Array, shape: tuple[int, ...], offset=0) -> jax.Array:
    """uint32 pseudo-random bits of ``shape``, a pure function of ``key`` and the element index.

    ``offset`` shifts the element index: a slice of a larger array starting at flat element
    ``offset`` gets exactly the bits of that slice of the larger array (data-parallel shards
    draw the masks of their part of the global batch)."""
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    n = int(np.prod(shape))
    index = (jax.lax.iota(jnp.uint32, n) + jnp.asarray(offset).astype(jnp.uint32)).reshape(shape)
    return _fmix32(_fmix32(index * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1])


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float, offset=0) -> jax.Array:
    """Boolean mask, True with probability 1 - rate."""
    threshold = jnp.uint32(round(rate * 2**24))
    return (uniform_bits(key, shape, offset) >> 8) >= threshold


def dropout(key: jax.Array, x: jax.Array, rate: float, offset=0) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest.
    ``offset``: the flat index of x's first element in the array it is a slice of."""
    if rate <= 0.0:
        return x
    keep = keep_mask(key, x.shape, rate, offset)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)
