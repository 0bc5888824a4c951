"""The compiled train step: one compilation per input shape, donated state, frozen backbone,
the loss it minimises (cross-entropy plus L2 on exactly the leaves the paper names)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gattanet_jax as gj
from tests import reference as ref
from train import steps
from train.tasks import attention_loss_fn, backbone_loss_fn


def tiny_attention(dropout_rate=0.25):
    backbone = gj.ToyCNN(3, features=(2, 3, 2), hidden=4)
    bv = jax.jit(backbone.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    rng = np.random.default_rng(7)  # non-zero backbone biases
    bv = jax.tree_util.tree_map_with_path(
        lambda p, a: (
            a + 0.1 * rng.normal(size=a.shape).astype(a.dtype) if p[-1].key == "bias" else a
        ),
        bv,
    )
    sites = gj.resolve_sites(backbone, bv, (8, 8, 3), gj.TOY_SITES)
    attention = gj.AttentionSystem(sites, d=3, alpha_init=0.1, dropout_rate=dropout_rate)
    params = gj.init_attention(attention, jax.random.key(1))["params"]
    return backbone, bv, attention, params


@pytest.mark.reference
def test_attention_step_compiles_once_donates_state_and_leaves_the_backbone_alone():
    """No dropout and no augmentation, so the first step's loss can be checked against the
    NumPy reference: cross-entropy of the two-pass logits plus 1e-5 x sum of K^2 and Q^2."""
    backbone, bv, attention, params = tiny_attention(dropout_rate=0.0)
    tx = optax.adam(1e-2)
    step = jax.jit(
        functools.partial(
            steps.train_step,
            attention_loss_fn(backbone, attention, 1e-5),
            tx,
            False,
            4,
            jax.random.key(2),
        ),
        donate_argnums=(0,),
    )
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), np.uint8))
    labels = jnp.arange(16, dtype=jnp.int32) % 3
    perm = jnp.asarray(np.random.default_rng(1).permutation(16))
    backbone_before = jax.tree.map(np.copy, jax.tree.map(np.asarray, bv))
    params_before = jax.tree.map(np.copy, jax.tree.map(np.asarray, params))
    state = steps.init_state(params, tx)
    losses = []
    for i in range(4):
        old = state
        state, metrics = step(state, {"backbone": bv}, images, labels, perm, jnp.int32(i))
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
        assert all(x.is_deleted() for x in jax.tree.leaves(old["params"]))  # donated
    assert step._cache_size() == 1  # one compilation for four calls with the same shapes
    assert int(state["step"]) == 4
    # the first step's loss, from the NumPy reference on batch 0 of the permutation
    idx = np.asarray(perm[:4])
    att_np = {k: jax.tree.map(np.float64, v) for k, v in params_before.items()}
    sites = [(s.name, s.kind) for s in attention.sites]
    bparams = jax.tree.map(np.float64, backbone_before["params"])
    logits, _, _ = ref.gattanet_toy(bparams, att_np, np.asarray(images)[idx] / 255.0, sites)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.mean(logp[np.arange(4), np.asarray(labels)[idx]])
    l2 = sum(np.sum(p["K"] ** 2) + np.sum(p["Q"] ** 2) for p in att_np.values())
    np.testing.assert_allclose(losses[0], ce + 1e-5 * l2, rtol=1e-5)
    # every attention parameter moved; the backbone's did not
    for path, new in jax.tree_util.tree_leaves_with_path(state["params"]):
        old = functools.reduce(lambda t, k: t[k.key], path, params_before)
        assert np.all(np.isfinite(new)) and not np.allclose(new, old), path
    for a, b in zip(jax.tree.leaves(bv), jax.tree.leaves(backbone_before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def l2_part(loss_fn, params, extra, frozen, coefficient):
    """(loss with L2 - loss without, its gradient) at the same data and dropout draws."""
    x = jax.random.uniform(jax.random.key(3), (4, 8, 8, 3))
    y = jnp.array([0, 1, 2, 0])

    def loss(p, fn):
        return fn(p, extra, frozen, x, y, steps.loss_rngs(jax.random.key(4), 4))[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # one compile each
    (with_l2, g_with), (without, g_without) = (
        value_and_grad(params, loss_fn(c)) for c in (coefficient, 0.0)
    )
    g_diff = jax.tree.map(
        lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), g_with, g_without
    )
    return float(with_l2) - float(without), g_diff


def test_l2_coefficient_covers_exactly_the_key_and_query_matrices():
    backbone, bv, attention, params = tiny_attention()
    params = jax.tree.map(lambda a: a + 0.5, params)  # biases and alphas non-zero too
    diff, g_diff = l2_part(
        lambda c: attention_loss_fn(backbone, attention, c), params, {}, {"backbone": bv}, 0.1
    )
    squares = sum(float(jnp.sum(p[w] ** 2)) for p in params.values() for w in ("K", "Q"))
    np.testing.assert_allclose(diff, 0.1 * squares, rtol=1e-4)
    for path, g in jax.tree_util.tree_leaves_with_path(g_diff):
        w = np.asarray(functools.reduce(lambda t, k: t[k.key], path, params))
        expected = 0.2 * w if path[-1].key in ("K", "Q") else np.zeros_like(w)
        np.testing.assert_allclose(g, expected, rtol=1e-3, atol=1e-4, err_msg=str(path))


def test_backbone_l2_covers_kernels_not_biases():
    backbone = gj.ToyCNN(3, features=(2, 3, 2), hidden=4)
    variables = jax.jit(backbone.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    params = jax.tree.map(lambda a: a + 0.5, variables["params"])
    diff, g_diff = l2_part(lambda c: backbone_loss_fn(backbone, c), params, {}, {}, 0.1)
    squares = sum(float(jnp.sum(p["kernel"] ** 2)) for p in params.values())
    np.testing.assert_allclose(diff, 0.1 * squares, rtol=1e-4)
    for path, g in jax.tree_util.tree_leaves_with_path(g_diff):
        w = np.asarray(functools.reduce(lambda t, k: t[k.key], path, params))
        expected = 0.2 * w if path[-1].key == "kernel" else np.zeros_like(w)
        np.testing.assert_allclose(g, expected, rtol=1e-3, atol=1e-4, err_msg=str(path))
