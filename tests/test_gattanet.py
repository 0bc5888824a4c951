"""The two-pass forward, the interceptor, the attention tree and their composition with JAX."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import gattanet_jax as gj
from gattanet_jax.backbones import toy_nnx
from gattanet_jax.nnx_backbone import NNXBackbone
from tests import reference as ref


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def make(
    num_classes=10,
    d=16,
    features=(32, 64, 128),
    hidden=256,
    size=32,
    seed=0,
    alpha=0.3,
    dtype=jnp.float32,
    api="linen",
):
    """A toy backbone with non-zero biases and an attention system whose alphas alternate in
    sign across sites (magnitudes around ``alpha``), with random biases. ``api='nnx'``: the
    backbone is the NNX twin with the same variables (reached through the NNX side of the
    site seam)."""
    backbone = gj.ToyCNN(num_classes, features=features, hidden=hidden, dtype=dtype)
    x = jnp.zeros((1, size, size, 3))
    bv = jax.jit(backbone.init)(jax.random.key(seed), x)
    if api == "nnx":
        backbone = NNXBackbone(
            lambda rngs: toy_nnx.ToyCNN(
                num_classes, features, hidden, dtype=dtype, image_size=size, rngs=rngs
            )
        )
    rng = np.random.default_rng(seed + 3)  # the backbone's zero-initialised biases too
    bv = jax.tree_util.tree_map_with_path(
        lambda p, a: (
            jnp.asarray(np.asarray(a) + 0.05 * rng.normal(size=a.shape).astype(a.dtype))
            if p[-1].key == "bias"
            else a
        ),
        bv,
    )
    sites = gj.resolve_sites(backbone, bv, (size, size, 3), gj.TOY_SITES)
    attention = gj.AttentionSystem(sites, d=d, alpha_init=alpha)
    av = perturb(gj.init_attention(attention, jax.random.key(seed + 1)), seed + 2)
    signs = {gj.attention.param_name(s.name): (-1) ** i for i, s in enumerate(sites)}
    params = {k: {**v, "alpha": signs[k] * v["alpha"]} for k, v in av["params"].items()}
    return backbone, bv, attention, {**av, "params": params}


def perturb(tree, seed):
    """Random offsets on every leaf, so that nothing hides behind zeros or equal values (added in
    NumPy: eager JAX would compile one small program per leaf shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a) + 0.1 * rng.normal(size=a.shape).astype(a.dtype)), tree
    )


def jitted(backbone, attention, **static):
    """two_pass compiled with its modules and static options bound (eager dispatch is slow)."""
    return jax.jit(functools.partial(gj.two_pass, backbone, attention, **static))


def to_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def images(batch, size=32, seed=3):
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3))


@pytest.mark.reference
@pytest.mark.parametrize(("batch", "d", "api"), [(2, 16, "linen"), (3, 5, "linen"), (3, 5, "nnx")])
def test_two_pass_matches_numpy_step_by_step(batch, d, api):
    backbone, bv, attention, av = make(d=d, api=api)
    x = images(batch)
    out = jitted(backbone, attention, return_internals=True)(av, bv, x)
    sites = [(s.name, s.kind) for s in attention.sites]
    att_np = {k.replace(".", "/"): v for k, v in to_numpy(av["params"]).items()}
    logits, q_avg, gatta = ref.gattanet_toy(to_numpy(bv["params"]), att_np, np.asarray(x), sites)
    assert rel_err(out.logits, logits) < 1e-5
    assert rel_err(out.attention.q_avg, q_avg) < 1e-5
    for name, _ in sites:
        assert rel_err(out.attention.gatta[name], gatta[name]) < 1e-5
    # And the modulation really changed something.
    assert rel_err(jax.jit(gj.backbone_logits, static_argnums=0)(backbone, bv, x), logits) > 1e-3


def test_inference_without_internals_takes_the_shortcut_and_agrees():
    backbone, bv, attention, av = make(d=7)
    x = images(3)
    full = jitted(backbone, attention, return_internals=True)(av, bv, x)
    fast = jitted(backbone, attention)(av, bv, x)
    assert rel_err(fast.logits, full.logits) < 1e-5
    assert fast.attention is None and set(full.attention.keys) == set(gj.TOY_SITES)


@pytest.mark.reference
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_lesions_match_numpy(api):
    backbone, bv, attention, av = make(api=api)
    x = images(2)
    sites = [(s.name, s.kind) for s in attention.sites]
    att_np = {k: v for k, v in to_numpy(av["params"]).items()}
    for lesion in ("c.cdd", "cccd.", "...d."):
        out = jitted(backbone, attention, lesion=lesion)(av, bv, x)
        logits, _, _ = ref.gattanet_toy(
            to_numpy(bv["params"]), att_np, np.asarray(x), sites, lesion
        )
        assert rel_err(out.logits, logits) < 1e-5, lesion
        mask = jnp.asarray([c != "." for c in lesion], jnp.float32)
        traced = jax.jit(lambda m: gj.two_pass(backbone, attention, av, bv, x, lesion=m).logits)
        assert rel_err(traced(mask), logits) < 1e-5, lesion


def test_alpha_zero_and_full_lesion_equal_the_backbone_exactly():
    backbone, bv, attention, av = make()
    x = images(4)
    base = jax.jit(gj.backbone_logits, static_argnums=0)(backbone, bv, x)
    assert np.all(np.isfinite(base))  # (NaN would compare equal below)
    zero = jax.tree.map(lambda a: jnp.zeros_like(a) if a.ndim == 0 else a, av)
    np.testing.assert_array_equal(jitted(backbone, attention)(zero, bv, x).logits, base)
    np.testing.assert_array_equal(
        jitted(backbone, attention, lesion=".....")(av, bv, x).logits, base
    )
    # Eagerly too.
    np.testing.assert_array_equal(
        gj.two_pass(backbone, attention, zero, bv, x).logits, gj.backbone_logits(backbone, bv, x)
    )


@pytest.mark.parametrize(
    ("num_classes", "d", "expected"),
    [(10, 16, 15_845), (100, 16, 18_725), (100, 32, 37_445), (100, 64, 74_885)],
)
def test_attention_parameter_counts_match_table_1(num_classes, d, expected):
    _, bv, _, av = make(num_classes=num_classes, d=d)
    assert gj.count_params(av) == expected
    assert set(av) == {"params"}
    assert gj.count_params(bv) == {10: 620_362, 100: 643_492}[num_classes]


def test_attention_tree_is_separate_and_named_by_site():
    _, bv, _, av = make()
    assert sorted(av["params"]) == sorted(gj.TOY_SITES)
    assert sorted(av["params"]["conv2"]) == ["K", "K_bias", "Q", "Q_bias", "alpha"]
    assert av["params"]["conv2"]["K"].shape == (64, 16)
    assert av["params"]["logits"]["Q"].shape == (10, 16)
    backbone_leaves = {id(x) for x in jax.tree_util.tree_leaves(bv)}
    assert not backbone_leaves & {id(x) for x in jax.tree_util.tree_leaves(av)}


def tiny(seed=0, d=3, dtype=jnp.float32):
    return make(d=d, features=(2, 3, 2), hidden=4, num_classes=3, size=8, seed=seed, dtype=dtype)


@pytest.mark.reference
def test_gradients_reach_every_attention_parameter_and_match_finite_differences():
    with jax.enable_x64(True):
        backbone, bv, attention, av = tiny(dtype=jnp.float64)
        bv = jax.tree.map(lambda a: a.astype(jnp.float64), bv)
        av = jax.tree.map(lambda a: a.astype(jnp.float64), av)
        x = images(2, size=8).astype(jnp.float64)
        labels = jnp.array([0, 2])

        def loss(av):
            logits = gj.two_pass(backbone, attention, av, bv, x).logits
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

        loss = jax.jit(loss)
        check_grads(loss, (av,), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)
        grads = jax.grad(loss)(av)
        for site in gj.TOY_SITES:
            for name in ("K", "Q", "K_bias", "Q_bias", "alpha"):
                assert np.any(np.asarray(grads["params"][site][name]) != 0), (site, name)


def test_backbone_gets_no_gradient():
    backbone, bv, attention, av = tiny()
    x = images(2, size=8)

    def loss(bv, av):
        return jnp.sum(gj.two_pass(backbone, attention, av, bv, x).logits ** 2)

    g_backbone = jax.jit(jax.grad(loss))(bv, av)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(g_backbone))


def test_jit_grad_vmap_compose_over_a_stack_of_attention_trees():
    backbone, bv, attention, _ = tiny()
    x = images(3, size=8)
    stack = [tiny(seed=s)[3] for s in range(4)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *stack)

    def loss(av):
        return jnp.mean(gj.two_pass(backbone, attention, av, bv, x).logits ** 2)

    values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(stacked)
    single = jax.jit(jax.value_and_grad(loss))
    for i, av in enumerate(stack):
        v, g = single(av)
        assert rel_err(values[i], v) < 1e-5
        member = jax.tree.map(lambda a, i=i: a[i], grads)
        assert rel_err(flat(member), flat(g)) < 1e-5


def flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


def test_vmap_over_lesion_masks():
    backbone, bv, attention, av = tiny()
    x = images(3, size=8)
    lesions = ("cccdd", ".ccdd", "cccd.")
    masks = jnp.array([[c != "." for c in s] for s in lesions], jnp.float32)
    per_lesion = jax.jit(
        jax.vmap(lambda m: gj.two_pass(backbone, attention, av, bv, x, lesion=m).logits)
    )(masks)
    for i, s in enumerate(lesions):
        expected = jitted(backbone, attention, lesion=s)(av, bv, x).logits
        assert rel_err(per_lesion[i], expected) < 1e-5


def test_training_mode_applies_key_query_dropout():
    """Each key and query element is kept with probability 1 - p = 0.75 and scaled by
    1 / (1 - p); nothing else differs from inference (no backbone dropout, no other noise)."""
    backbone, bv, attention, av = tiny()
    x = images(16, size=8)
    with pytest.raises(ValueError, match="needs an rng"):
        gj.two_pass(backbone, attention, av, bv, x, train=True)
    internals = jitted(backbone, attention, return_internals=True)
    train = jitted(backbone, attention, train=True, return_internals=True)
    plain = internals(av, bv, x).attention
    dropped = train(av, bv, x, rng=jax.random.key(1)).attention
    kept = total = 0
    for which in ("keys", "queries"):
        for name in plain.keys:
            full = np.asarray(getattr(plain, which)[name])
            got = np.asarray(getattr(dropped, which)[name])
            assert np.all(np.isfinite(got)) and np.all(full != 0)
            mask = got != 0
            np.testing.assert_allclose(got[mask], full[mask] / 0.75, rtol=1e-6)
            kept, total = kept + mask.sum(), total + mask.size
    assert total > 4000 and abs(kept / total - 0.75) < 0.03, kept / total
    # the global query is the mean of the dropped queries; different rngs, different masks
    q = [np.asarray(dropped.queries[s.name]) for s in attention.sites]
    q_avg = np.mean([v.reshape(16, -1, v.shape[-1]).mean(1) for v in q], axis=0)
    np.testing.assert_allclose(dropped.q_avg, q_avg, rtol=1e-5, atol=1e-6)
    other = train(av, bv, x, rng=jax.random.key(2)).attention
    assert not np.array_equal(other.keys["conv1"] != 0, dropped.keys["conv1"] != 0)
    # with the rate at 0, training mode is inference mode exactly: only keys and queries drop
    no_drop = attention.clone(dropout_rate=0.0)
    a = jitted(backbone, no_drop, train=True)(av, bv, x, rng=jax.random.key(1)).logits
    np.testing.assert_array_equal(a, jitted(backbone, no_drop)(av, bv, x).logits)
    assert np.all(np.isfinite(a))


class ChainedSite(nn.Dense):
    """A site whose __call__ chains to its parent's, and which is called inside a parent."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        x = ChainedSite(5, name="chained")(x)
        return Inner(name="block")(x)


class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(x))


def test_chained_call_is_modulated_once_and_nested_paths_work():
    backbone = Nested()
    bv = backbone.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
    sites = gj.resolve_sites(backbone, bv, (2, 2, 1), ["chained", "block/out"])
    assert [s.kind for s in sites] == ["dense", "dense"]
    attention = gj.AttentionSystem(sites, d=2, alpha_init=0.5)
    av = gj.init_attention(attention, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (3, 2, 2, 1))
    out = jitted(backbone, attention, return_internals=True)(av, bv, x)
    # By hand: the chained site's final output (after x2) is modulated once.
    p = bv["params"]
    h = 2.0 * (x.reshape(3, -1) @ p["chained"]["kernel"] + p["chained"]["bias"])
    assert np.allclose(
        out.attention.keys["chained"][..., 0] - av["params"]["chained"]["K_bias"][0],
        h * av["params"]["chained"]["K"][:, 0],
        atol=1e-5,
    )
    h = h * (1 + 0.5 * out.attention.gatta["chained"])
    y = nn.relu(h) @ p["block"]["out"]["kernel"] + p["block"]["out"]["bias"]
    y = y * (1 + 0.5 * out.attention.gatta["block/out"])
    np.testing.assert_allclose(out.logits, y, rtol=1e-5)


def test_interceptor_inside_jit_takes_effect():
    backbone, bv, attention, av = tiny()
    x = images(2, size=8)
    f = jax.jit(lambda av: gj.two_pass(backbone, attention, av, bv, x).logits)
    assert rel_err(f(av), gj.two_pass(backbone, attention, av, bv, x).logits) < 1e-5
    assert not np.allclose(f(av), gj.backbone_logits(backbone, bv, x))


def test_unknown_site_lists_the_available_ones():
    backbone = gj.ToyCNN(10)
    bv = backbone.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(
        ValueError, match=r"unknown attention site 'conv4'.*conv1, .*dense1, logits"
    ):
        gj.resolve_sites(backbone, bv, (32, 32, 3), ["conv1", "conv4"])
    with pytest.raises(ValueError, match="Did you mean 'dense1'"):
        gj.resolve_sites(backbone, bv, (32, 32, 3), ["dens1"])


@pytest.mark.parametrize(
    ("lesion", "match"),
    [
        ("cccd", "one character per site"),
        ("cccdx", "'x' at site 'logits'"),
        ("dcccd", "'d' at site 'conv1'"),
    ],
)
def test_bad_lesion_strings(lesion, match):
    backbone, bv, attention, av = tiny()
    with pytest.raises(ValueError, match=match):
        gj.two_pass(backbone, attention, av, bv, images(1, size=8), lesion=lesion)


@pytest.mark.reference
@pytest.mark.parametrize(
    ("iterations", "bounded", "api"), [(2, False, "linen"), (3, True, "linen"), (3, True, "nnx")]
)
def test_several_iterations_match_numpy(iterations, bounded, api):
    backbone, bv, attention, av = make(d=5, features=(4, 8, 8), hidden=16, size=16, api=api)
    attention = attention.clone(bounded=bounded)
    x = images(2, size=16)
    run = jitted(backbone, attention, return_internals=True, iterations=iterations)
    out = run(av, bv, x)
    sites = [(s.name, s.kind) for s in attention.sites]
    att_np = {k.replace(".", "/"): v for k, v in to_numpy(av["params"]).items()}
    logits, q_avg, _ = ref.gattanet_toy(
        to_numpy(bv["params"]), att_np, np.asarray(x), sites, None, iterations, bounded=bounded
    )
    assert rel_err(out.logits, logits) < 1e-5
    assert rel_err(out.attention.q_avg, q_avg) < 1e-5
    one = jitted(backbone, attention)(av, bv, x).logits
    assert rel_err(one, logits) > 1e-4  # a second iteration changes the prediction


def test_one_iteration_and_no_cue_are_the_papers_model_exactly():
    backbone, bv, attention, av = make(d=5, features=(4, 8, 8), hidden=16, size=16)
    x = images(3, size=16)
    paper = jitted(backbone, attention)(av, bv, x).logits
    assert np.all(np.isfinite(paper))  # (NaN would compare equal below)
    np.testing.assert_array_equal(
        jitted(backbone, attention, iterations=1)(av, bv, x).logits, paper
    )
    cue = jax.random.normal(jax.random.key(9), (3, 5))
    cued = jax.jit(
        lambda av, bv, x, c, w: gj.two_pass(backbone, attention, av, bv, x, cue=c, cue_weight=w)
    )
    np.testing.assert_array_equal(cued(av, bv, x, cue, 0.0).logits, paper)
    np.testing.assert_array_equal(cued(av, bv, x, cue, jnp.zeros(3)).logits, paper)


@pytest.mark.reference
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_cue_mixes_into_the_global_query_as_numpy_does(api):
    backbone, bv, attention, av = make(d=5, features=(4, 8, 8), hidden=16, size=16, api=api)
    x = images(3, size=16)
    cue = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    weight = np.array([0.0, 0.5, 1.0], np.float32)  # one weight per example
    out = jitted(backbone, attention, return_internals=True)(av, bv, x, cue=cue, cue_weight=weight)
    sites = [(s.name, s.kind) for s in attention.sites]
    att_np = {k.replace(".", "/"): v for k, v in to_numpy(av["params"]).items()}
    logits, q_avg, _ = ref.gattanet_toy(
        to_numpy(bv["params"]), att_np, np.asarray(x), sites, cue=cue, cue_weight=weight
    )
    assert rel_err(out.logits, logits) < 1e-5 and rel_err(out.attention.q_avg, q_avg) < 1e-5
    np.testing.assert_allclose(out.attention.q_avg[2], cue[2], rtol=1e-6)  # weight 1: the cue


def test_class_cues_use_a_learned_embedding_that_trains():
    backbone, bv, attention, av = make(d=5, features=(4, 8, 8), hidden=16, size=16)
    attention = attention.clone(cue_classes=10)
    av = gj.init_attention(attention, jax.random.key(1))
    assert av["params"]["cue_embedding"].shape == (10, 5)
    x = images(2, size=16)
    labels = jnp.array([3, 7])

    def loss(av):
        out = gj.two_pass(backbone, attention, av, bv, x, cue=labels, cue_weight=0.5)
        return jnp.sum(out.logits[jnp.arange(2), labels])

    grads = jax.jit(jax.grad(loss))(av)["params"]["cue_embedding"]
    used = np.abs(np.asarray(grads)).sum(axis=1) > 0
    assert used.tolist() == [i in (3, 7) for i in range(10)]  # only the cued classes' rows
    with pytest.raises(ValueError, match="cue_classes"):
        gj.two_pass(backbone, attention.clone(cue_classes=0), av, bv, x, cue=labels, cue_weight=1.0)
    with pytest.raises(ValueError, match="iterations"):
        gj.two_pass(backbone, attention, av, bv, x, iterations=0)


def multi_head_numpy(bparams, att, x, sites, heads, d):
    """Multi-head GAttANet on the toy model, head by head, from the one-head NumPy functions."""
    acts = {}

    def keep(name, a):
        acts[name] = a
        return a

    ref.toy_forward(bparams, x, keep)
    keys, q_sites = {}, {}
    for name, kind in sites:
        p, c = att[name], acts[name].shape[-1]
        for j in range(heads):
            cols = slice(j * d, (j + 1) * d)
            if kind == "conv":
                k = ref.conv_keys(acts[name], p["K"][:, cols], p["K_bias"][cols])
                q = ref.conv_keys(acts[name], p["Q"][:, cols], p["Q_bias"][cols])
            else:
                units = slice(j * c // heads, (j + 1) * c // heads)
                k = ref.dense_keys(acts[name][:, units], p["K"][units], p["K_bias"][cols])
                q = ref.dense_keys(acts[name][:, units], p["Q"][units], p["Q_bias"][cols])
            keys[name, j], q_sites[name, j] = k, q
    q_avg = [ref.global_query([q_sites[n, j] for n, _ in sites]) for j in range(heads)]

    def mod(name, a):
        if name not in att:
            return a
        out = a.copy()
        c = a.shape[-1]
        for j in range(heads):
            g = ref.agreement(keys[name, j], q_avg[j])
            group = slice(j * c // heads, (j + 1) * c // heads)
            out[..., group] = ref.modulate(a[..., group], g, att[name]["alpha"][j])
        return out

    return ref.toy_forward(bparams, x, mod), np.stack(q_avg, axis=1)


@pytest.mark.reference
def test_multi_head_agreement_matches_a_loop_over_heads():
    backbone, bv, attention, _ = make(d=3, features=(4, 8, 8), hidden=16, size=16)
    attention = attention.clone(heads=2)
    av = perturb(gj.init_attention(attention, jax.random.key(1)), 5)
    p = av["params"]
    assert p["conv1"]["K"].shape == (4, 6) and p["dense1"]["K"].shape == (16, 3)
    assert p["conv1"]["alpha"].shape == (2,) and p["dense1"]["K_bias"].shape == (6,)
    x = images(2, size=16)
    out = jitted(backbone, attention, return_internals=True)(av, bv, x)
    sites = [(s.name, s.kind) for s in attention.sites]
    att_np = {k.replace(".", "/"): v for k, v in to_numpy(p).items()}
    logits, q_avg = multi_head_numpy(to_numpy(bv["params"]), att_np, np.asarray(x), sites, 2, 3)
    assert rel_err(out.logits, logits) < 1e-5
    assert rel_err(out.attention.q_avg, q_avg) < 1e-5
    # trainable: every head's parameters get a gradient
    grads = jax.jit(
        jax.grad(lambda av: jnp.sum(gj.two_pass(backbone, attention, av, bv, x).logits ** 2))
    )(av)
    assert np.all(np.abs(np.asarray(grads["params"]["conv2"]["alpha"])) > 0)
    with pytest.raises(ValueError, match="must divide"):
        gj.init_attention(attention.clone(heads=3), jax.random.key(0))


def test_one_head_is_the_papers_model_exactly():
    backbone, bv, attention, av = make(d=5, features=(4, 8, 8), hidden=16, size=16)
    one = attention.clone(heads=1)
    fresh = gj.init_attention(one, jax.random.key(7))
    paper = gj.init_attention(attention, jax.random.key(7))
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, paper)
    x = images(2, size=16)
    logits = jitted(backbone, attention)(av, bv, x).logits
    assert np.all(np.isfinite(logits))  # (NaN would compare equal below)
    np.testing.assert_array_equal(jitted(backbone, one)(av, bv, x).logits, logits)


def test_q_avg_controls_remove_the_images_own_agreement():
    """'shifted': each image is modulated with the previous image's global query; 'learned':
    one trained vector for every image, which gets the gradient the queries no longer do."""
    backbone, bv, attention, av = make(d=4, features=(4, 8, 8), hidden=16, size=16)
    x = images(3, size=16)
    own = jitted(backbone, attention, return_internals=True)(av, bv, x)
    shifted = attention.clone(q_avg_source="shifted")
    out = jitted(backbone, shifted, return_internals=True)(av, bv, x)
    np.testing.assert_array_equal(out.attention.q_avg, jnp.roll(own.attention.q_avg, 1, axis=0))
    # image i, modulated with image i-1's query, gives what the own model gives image i when
    # its query is given as a full-weight cue
    cued = jitted(backbone, attention)(av, bv, x, cue=out.attention.q_avg, cue_weight=1.0)
    assert rel_err(out.logits, cued.logits) < 1e-6
    assert rel_err(out.logits, own.logits) > 1e-3

    learned = attention.clone(q_avg_source="learned")
    lv = gj.init_attention(learned, jax.random.key(1))
    vector = lv["params"]["q_avg_learned"]
    assert vector.shape == (4,) and np.all(np.asarray(vector) != 0)
    lv = {"params": {**av["params"], "q_avg_learned": vector}}
    out = jitted(backbone, learned, return_internals=True)(lv, bv, x)
    np.testing.assert_array_equal(out.attention.q_avg, jnp.broadcast_to(vector, (3, 4)))
    grads = jax.jit(
        jax.grad(lambda v: jnp.sum(gj.two_pass(backbone, learned, v, bv, x).logits ** 2))
    )(lv)
    assert np.all(np.asarray(grads["params"]["conv1"]["Q"]) == 0)
    assert np.all(np.abs(np.asarray(grads["params"]["q_avg_learned"])) > 0)
    assert np.any(np.asarray(grads["params"]["conv1"]["K"]) != 0)
    with pytest.raises(ValueError, match="q_avg_source"):
        gj.init_attention(attention.clone(q_avg_source="mean"), jax.random.key(0))


def test_per_image_keys_make_a_slice_of_the_batch_drop_what_the_whole_batch_does():
    """two_pass(rng=one key per image): a data-parallel shard given its images and their keys
    computes exactly its rows of the whole batch's training forward, with no offset."""
    backbone, bv, attention, av = make(d=4, features=(4, 8, 8), hidden=16, size=16)
    x = images(6, size=16)
    keys = jax.random.split(jax.random.key(5), 6)
    fwd = jitted(backbone, attention, train=True, return_internals=True)
    whole = fwd(av, bv, x, rng=keys)
    part = fwd(av, bv, x[2:5], rng=keys[2:5])
    np.testing.assert_allclose(part.logits, whole.logits[2:5], rtol=1e-5, atol=1e-6)
    for name in ("conv1", "conv3", "dense1"):
        kept = np.asarray(whole.attention.queries[name]) != 0
        assert 0.6 < kept.mean() < 0.9  # dropout is on
        np.testing.assert_array_equal(np.asarray(part.attention.queries[name]) != 0, kept[2:5])
    # one key for the whole batch: the masks of a slice are not the slice of the masks
    one = fwd(av, bv, x, rng=jax.random.key(5)).logits
    sliced = fwd(av, bv, x[2:5], rng=jax.random.key(5)).logits
    assert np.max(np.abs(np.asarray(sliced) - np.asarray(one[2:5]))) > 1e-3
