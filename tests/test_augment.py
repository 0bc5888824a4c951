"""The on-device augmentation: exact on hand-computable transforms."""

import jax
import jax.numpy as jnp
import numpy as np

from train.data import augment


def batch(n=3, size=8, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3))


def test_identity_flip_and_integer_shift_are_exact():
    x = batch()
    zeros, ones = jnp.zeros(3), jnp.ones(3)
    np.testing.assert_array_equal(augment.warp(x, zeros, jnp.zeros((3, 2)), ones), x)
    np.testing.assert_allclose(
        augment.warp(x, zeros, jnp.zeros((3, 2)), -ones), x[:, :, ::-1], atol=1e-6
    )
    # A shift of +2 pixels in x moves content right; the left edge repeats ('nearest' fill).
    shifted = augment.warp(x, zeros, jnp.tile(jnp.array([[0.0, 2 / 8]]), (3, 1)), ones)
    np.testing.assert_allclose(shifted[:, :, 2:], x[:, :, :-2], atol=1e-6)
    np.testing.assert_allclose(shifted[:, :, 0], x[:, :, 0], atol=1e-6)


def test_rotation_by_90_degrees_turns_the_image():
    x = batch(n=1)
    rotated = augment.warp(x, jnp.array([np.pi / 2]), jnp.zeros((1, 2)), jnp.ones(1))
    np.testing.assert_allclose(rotated[0], np.rot90(np.asarray(x[0]), k=-1), atol=1e-5)


def test_augment_stays_in_range_and_depends_on_the_key():
    x = (batch(n=4) * 255).astype(jnp.uint8)
    a = augment.augment(jax.random.key(0), x)
    b = augment.augment(jax.random.key(1), x)
    assert a.dtype == jnp.float32 and float(a.min()) >= 0 and float(a.max()) <= 1
    assert not np.allclose(a, b)
