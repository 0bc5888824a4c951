"""The compiled train step: one compilation per input shape, donated state, frozen backbone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gattanet_jax as gj
from train import steps
from train.train import attention_loss_fn


def test_attention_step_compiles_once_donates_state_and_leaves_the_backbone_alone():
    backbone = gj.ToyCNN(3, features=(2, 3, 2), hidden=4)
    bv = jax.jit(backbone.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    sites = gj.resolve_sites(backbone, bv, (8, 8, 3), gj.TOY_SITES)
    attention = gj.AttentionSystem(sites, d=3, alpha_init=0.1)
    params = gj.init_attention(attention, jax.random.key(1))["params"]
    tx = optax.adam(1e-3)
    step = jax.jit(
        functools.partial(
            steps.train_step,
            attention_loss_fn(backbone, attention, 1e-5),
            tx,
            True,
            4,
            jax.random.key(2),
        ),
        donate_argnums=(0,),
    )
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), np.uint8))
    labels = jnp.arange(16, dtype=jnp.int32) % 3
    perm = jnp.arange(16)
    backbone_before = jax.tree.map(np.asarray, bv)
    state = steps.init_state(params, tx)
    for i in range(4):
        old = state
        state, metrics = step(state, bv, images, labels, perm, jnp.int32(i))
        assert bool(metrics["finite"])
        assert all(x.is_deleted() for x in jax.tree.leaves(old["params"]))  # donated
    assert step._cache_size() == 1  # one compilation for four calls with the same shapes
    assert int(state["step"]) == 4
    for a, b in zip(jax.tree.leaves(bv), jax.tree.leaves(backbone_before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
