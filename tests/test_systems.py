"""GALA, SE and GSA against their formulas and direct loops over positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gattanet_jax.systems import GALA, GSA, SqueezeExcitation, gsa

RNG = np.random.default_rng(0)


def numpy_tree(tree):
    return jax.tree.map(np.asarray, tree)


def randomize(variables, seed=1):
    """Random values everywhere (a and m too), so no term vanishes at its init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32), variables)


@pytest.mark.parametrize("squash", ["tanh", "sigmoid"])
def test_gala_matches_the_formula_by_hand(squash):
    x = RNG.normal(size=(2, 5, 6, 8)).astype(np.float32)
    module = GALA(reduction=4, squash=squash)
    v = randomize(module.init(jax.random.key(0), x))
    p = numpy_tree(v["params"])
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    gap = x.mean(axis=(1, 2))
    s_g = relu(gap @ p["global"]["fc1"]["kernel"] + p["global"]["fc1"]["bias"])
    s_g = s_g @ p["global"]["fc2"]["kernel"] + p["global"]["fc2"]["bias"]  # (B, C)
    h = relu(x @ p["local1"]["kernel"][0, 0] + p["local1"]["bias"])
    s_l = h @ p["local2"]["kernel"][0, 0] + p["local2"]["bias"]  # (B, H, W, 1)
    s_g = s_g[:, None, None, :]
    z = p["a"] * (s_g + s_l) + p["m"] * (s_g * s_l)
    s = np.tanh(z) if squash == "tanh" else 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(module.apply(v, x), s * x, rtol=1e-5, atol=1e-6)
    # parameters: two dense layers (8 -> 2 -> 8), two 1x1 convs (8 -> 2 -> 1), a and m
    n = sum(t.size for t in jax.tree.leaves(v))
    assert n == (8 * 2 + 2) + (2 * 8 + 8) + (8 * 2 + 2) + (2 * 1 + 1) + 8 + 8


def test_se_is_gala_without_the_local_path():
    x = RNG.normal(size=(2, 4, 4, 8)).astype(np.float32)
    se = SqueezeExcitation(reduction=4)
    v = randomize(se.init(jax.random.key(0), x))
    p = numpy_tree(v["params"])["global"]
    z = np.maximum(x.mean(axis=(1, 2)) @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    z = z @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(
        se.apply(v, x), x / (1 + np.exp(-z))[:, None, None], rtol=1e-5, atol=1e-6
    )
    gala = GALA(reduction=4, squash="sigmoid", use_local=False)
    gv = gala.init(jax.random.key(0), x)
    gv = {"params": {"global": v["params"]["global"], "a": jnp.ones(8), "m": gv["params"]["m"]}}
    np.testing.assert_allclose(gala.apply(gv, x), se.apply(v, x), rtol=1e-6, atol=1e-7)


def softmax(t, axis):
    e = np.exp(t - t.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_content_attention_against_a_loop_over_positions():
    b, hh, ww, heads, dk, dv = 2, 3, 4, 2, 3, 5
    q = RNG.normal(size=(b, hh, ww, heads, dk)).astype(np.float32)
    k = RNG.normal(size=(b, hh, ww, heads, dk)).astype(np.float32)
    v = RNG.normal(size=(b, hh, ww, heads, dv)).astype(np.float32)
    out = np.zeros((b, hh, ww, heads, dv), np.float32)
    for bi in range(b):
        for h in range(heads):
            keys = k[bi, :, :, h].reshape(hh * ww, dk)
            keys = softmax(keys, axis=0)  # each key channel normalised over the positions
            vals = v[bi, :, :, h].reshape(hh * ww, dv)
            for y in range(hh):
                for x in range(ww):
                    for n in range(hh * ww):  # every position contributes to every query
                        out[bi, y, x, h] += (q[bi, y, x, h] @ keys[n]) * vals[n]
    np.testing.assert_allclose(gsa.content_attention(q, k, v), out, rtol=1e-5, atol=1e-5)


def positional_loop(q, v, r_col, r_row):
    b, hh, ww, heads, _ = q.shape
    f_col = np.zeros(v.shape, np.float32)
    for bi, y, x, h in np.ndindex(b, hh, ww, heads):
        logits = np.array([q[bi, y, x, h] @ r_col[(y2 - y) + hh - 1] for y2 in range(hh)])
        w = softmax(logits, 0)
        f_col[bi, y, x, h] = sum(w[y2] * v[bi, y2, x, h] for y2 in range(hh))
    out = np.zeros(v.shape, np.float32)
    for bi, y, x, h in np.ndindex(b, hh, ww, heads):
        logits = np.array([q[bi, y, x, h] @ r_row[(x2 - x) + ww - 1] for x2 in range(ww)])
        w = softmax(logits, 0)
        out[bi, y, x, h] = sum(w[x2] * f_col[bi, y, x2, h] for x2 in range(ww))
    return out


def test_positional_attention_against_a_loop_with_explicit_offsets():
    b, hh, ww, heads, dk, dv = 2, 4, 3, 2, 3, 4
    q = RNG.normal(size=(b, hh, ww, heads, dk)).astype(np.float32)
    v = RNG.normal(size=(b, hh, ww, heads, dv)).astype(np.float32)
    r_col = RNG.normal(size=(2 * hh - 1, dk)).astype(np.float32)  # offsets -(H-1) .. H-1
    r_row = RNG.normal(size=(2 * ww - 1, dk)).astype(np.float32)
    ours = np.asarray(gsa.positional_attention(q, v, r_col, r_row))
    np.testing.assert_allclose(ours, positional_loop(q, v, r_col, r_row), rtol=1e-5, atol=1e-5)
    # the extreme offsets -(L-1) and L-1 are used: changing either changes the output
    for row in (0, 2 * hh - 2):
        bumped = r_col.copy()
        bumped[row] += 1.0
        assert not np.allclose(gsa.positional_attention(q, v, bumped, r_row), ours)
    with pytest.raises(ValueError, match="need 7 relative embeddings"):
        gsa.positional_attention(q, v, r_col[:-1], r_row)


def test_gsa_module_shapes_parameters_and_sum_of_the_two_layers():
    x = RNG.normal(size=(2, 5, 6, 12)).astype(np.float32)
    module = GSA(features=16, heads=4, key_features=8)
    v = module.init(jax.random.key(0), x)
    p = v["params"]
    assert p["qkv"]["kernel"].shape == (1, 1, 12, 8 + 8 + 16)
    assert p["rel_col"].shape == (2 * 5 - 1, 2) and p["rel_row"].shape == (2 * 6 - 1, 2)
    out = module.apply(v, x)
    assert out.shape == (2, 5, 6, 16)
    proj = np.asarray(x @ np.asarray(p["qkv"]["kernel"][0, 0]))
    q, k, val = (proj[..., :8], proj[..., 8:16], proj[..., 16:])
    heads = lambda t: t.reshape(2, 5, 6, 4, -1)  # noqa: E731
    q, k, val = heads(q), heads(k), heads(val)
    expected = np.asarray(gsa.content_attention(q, k, val)) + positional_loop(
        q, val, np.asarray(p["rel_col"]), np.asarray(p["rel_row"])
    )
    np.testing.assert_allclose(out, expected.reshape(2, 5, 6, 16), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        GSA(features=10, heads=4).init(jax.random.key(0), x)


def test_gala_add_on_on_the_toy_cnn_equals_the_reference_forward_with_gala_by_hand():
    import gattanet_jax as gj
    from gattanet_jax import addon
    from tests import reference as ref

    backbone = gj.ToyCNN(10, features=(4, 8, 8), hidden=16)
    bv = backbone.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    sites = gj.resolve_sites(backbone, bv, (16, 16, 3), ("conv1", "conv2", "conv3"))
    addons = addon.addon_modules(sites, lambda s, name: GALA(reduction=2, name=name))
    av = randomize(addon.init_addons(addons, jax.random.key(1)))
    x = RNG.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    ours = jax.jit(lambda av, x: addon.forward(backbone, addons, av, bv, x))(av, x)

    def gala_by_hand(name, a):  # the module's own formula, checked above
        if name not in ("conv1", "conv2", "conv3"):
            return a
        v = {"params": av["params"][name]}
        return np.asarray(GALA(reduction=2).apply(v, a.astype(np.float32)), np.float64)

    expected = ref.toy_forward(numpy_tree(bv["params"]), x, gala_by_hand)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    # only the add-on's parameters are in its tree; the backbone's stay its own
    assert sorted(av["params"]) == ["conv1", "conv2", "conv3"]


@pytest.fixture(scope="module")
def toy_backbone(tmp_path_factory):
    from tests.test_train import tiny_config
    from train import train

    path = tmp_path_factory.mktemp("systems") / "backbone"
    train.train_and_evaluate(tiny_config(epochs=1), str(path))
    return path


@pytest.mark.parametrize("kind", ["gala", "se", "gsa"])
def test_add_on_protocol_trains_only_the_module_on_the_frozen_backbone(
    kind, toy_backbone, tmp_path
):
    from tests.test_train import assert_trees_equal, tiny_config
    from train import checkpoints, train

    config = tiny_config("addon", epochs=1)
    config.addon.kind = kind
    config.backbone_checkpoint = str(toy_backbone)
    before = checkpoints.digest(toy_backbone / "best", 1)
    state, results = train.train_and_evaluate(config, str(tmp_path / kind))
    assert sorted(state["params"]) == ["conv1", "conv2", "conv3"]  # the modules only
    assert results["trainable_params"] > 0 and "backbone_test_accuracy" in results
    assert checkpoints.digest(toy_backbone / "best", 1) == before
    # rerun: resumes the finished run, same results
    again_state, again = train.train_and_evaluate(config, str(tmp_path / kind))
    assert again["test_accuracy"] == results["test_accuracy"]
    assert_trees_equal(again_state["params"], state["params"])


def test_from_scratch_protocol_trains_backbone_and_modules_together(tmp_path):
    from tests.test_train import tiny_config
    from train import train

    config = tiny_config("addon", epochs=1)
    config.addon.from_scratch = True
    state, results = train.train_and_evaluate(config, str(tmp_path))
    assert sorted(state["params"]) == ["addon", "backbone"]
    assert results["frozen_params"] == 0
    assert results["trainable_params"] == train.count_params(state["params"])
