"""Backbone layers: the CPU-fast convolution equals nn.Conv (values and gradients), and the toy
CNN's hash dropout keeps 1 - p of its inputs, scaled by 1 / (1 - p)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gattanet_jax as gj
from gattanet_jax.backbones import conv
from gattanet_jax.backbones.toy import HashDropout


@pytest.mark.parametrize(
    ("channels", "kernel", "strides", "padding", "patches"),
    [
        (3, (3, 3), 1, "SAME", True),  # the toy CNN's first layer
        (2, (5, 5), 1, "SAME", True),
        (3, (5, 5), 1, "SAME", False),  # 75 patch columns: more than the patch path takes
        (2, (3, 3), 1, ((1, 1), (1, 1)), True),
        (3, (3, 3), 2, "SAME", False),  # strided: XLA's convolution
        (32, (3, 3), 1, "SAME", False),  # wide input: XLA's convolution
        (3, (3, 3), 1, "VALID", False),  # output smaller than the input
    ],
)
def test_fast_conv_equals_flax_conv_in_values_and_gradients(
    channels, kernel, strides, padding, patches
):
    rng = np.random.default_rng(40)
    x = jnp.asarray(rng.normal(size=(4, 9, 10, channels)).astype(np.float32))
    plain = nn.Conv(8, kernel, strides, padding=padding)
    fast = nn.Conv(8, kernel, strides, padding=padding, conv_general_dilated=conv.fast_conv)
    v = plain.init(jax.random.key(0), x)
    v = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), v)
    assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, v)
    seen = []
    real = conv.im2col_conv

    def spy(*args, **kw):
        seen.append(True)
        return real(*args, **kw)

    conv.im2col_conv = spy
    try:
        out = fast.apply(v, x)
    finally:
        conv.im2col_conv = real
    assert bool(seen) == patches  # the path taken
    expected = plain.apply(v, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rng.normal(size=expected.shape).astype(np.float32))

    def grads(module):
        return jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) * cot), argnums=(0, 1)))(
            v, x
        )

    for a, b in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(plain)), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_toy_cnn_with_and_without_the_fast_convolution_agree():
    x = jnp.asarray(np.random.default_rng(41).uniform(size=(3, 32, 32, 3)).astype(np.float32))
    fast, plain = gj.ToyCNN(10), gj.ToyCNN(10, fast_conv=False)
    v = plain.init(jax.random.key(0), x)
    np.testing.assert_allclose(fast.apply(v, x), plain.apply(v, x), rtol=1e-5, atol=1e-5)


def test_hash_dropout_keeps_one_minus_p_scaled_and_is_the_identity_in_inference():
    x = jnp.ones((64, 16, 16, 8))
    layer = HashDropout(0.2)
    out = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.8)}
    assert abs((out != 0).mean() - 0.8) < 0.01
    again = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.array_equal(out, again)
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
