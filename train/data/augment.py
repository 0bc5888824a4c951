"""Keras-style augmentation on the device, inside the compiled step.

The paper's recipe (Keras ImageDataGenerator): rotation up to 20 degrees, width and height shifts
up to 20 %, horizontal flips; bilinear resampling with the 'nearest' fill mode (edge pixels
repeat). One random affine map per image, applied by gathering the four neighbours of every
output pixel's source position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def affine_params(rng, batch, max_rotation_deg=20.0, max_shift=0.2, flip=True):
    """Per image: rotation angle (radians), shift (fraction of size, y and x), flip sign."""
    k_rot, k_shift, k_flip = jax.random.split(rng, 3)
    theta = jnp.deg2rad(
        jax.random.uniform(k_rot, (batch,), minval=-1.0, maxval=1.0) * max_rotation_deg
    )
    shift = jax.random.uniform(k_shift, (batch, 2), minval=-max_shift, maxval=max_shift)
    sign = (
        jnp.where(jax.random.bernoulli(k_flip, 0.5, (batch,)), -1.0, 1.0)
        if flip
        else (jnp.ones((batch,)))
    )
    return theta, shift, sign


def warp(images: jax.Array, theta, shift, sign) -> jax.Array:
    """Resamples float images (B, H, W, C): output pixel p takes input at R(theta)(p - c) * flip
    + c - shift * size, bilinearly, with coordinates clamped to the image ('nearest' fill)."""
    b, h, w, c = images.shape
    ys, xs = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    y0, x0 = ys - cy, (xs - cx)
    cos, sin = jnp.cos(theta)[:, None, None], jnp.sin(theta)[:, None, None]
    x0 = x0[None] * sign[:, None, None]
    src_y = cos * y0[None] - sin * x0 + cy - shift[:, 0, None, None] * h
    src_x = sin * y0[None] + cos * x0 + cx - shift[:, 1, None, None] * w
    src_y = jnp.clip(src_y, 0.0, h - 1.0)
    src_x = jnp.clip(src_x, 0.0, w - 1.0)
    fy, fx = jnp.floor(src_y), jnp.floor(src_x)
    wy, wx = (src_y - fy)[..., None], (src_x - fx)[..., None]
    iy0, ix0 = fy.astype(jnp.int32), fx.astype(jnp.int32)
    iy1, ix1 = jnp.minimum(iy0 + 1, h - 1), jnp.minimum(ix0 + 1, w - 1)
    flat = images.reshape(b, h * w, c)

    def gather(iy, ix):
        idx = (iy * w + ix).reshape(b, h * w, 1)
        return jnp.take_along_axis(flat, idx, axis=1).reshape(b, h, w, c)

    top = gather(iy0, ix0) * (1 - wx) + gather(iy0, ix1) * wx
    bottom = gather(iy1, ix0) * (1 - wx) + gather(iy1, ix1) * wx
    return top * (1 - wy) + bottom * wy


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1], the backbones' input range."""
    return images.astype(jnp.float32) / 255.0


def augment(rng, images: jax.Array, total: int | None = None, offset=0) -> jax.Array:
    """uint8 (B, H, W, C) -> augmented float32 in [0, 1].

    A data-parallel shard holding images [offset, offset + B) of a global batch of ``total``
    draws the global batch's transforms and applies its own, as the unsharded step would."""
    b = images.shape[0]
    params = affine_params(rng, total or b)
    if total:
        params = [jax.lax.dynamic_slice_in_dim(p, offset, b) for p in params]
    return warp(to_float(images), *params)
