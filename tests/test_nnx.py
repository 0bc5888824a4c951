"""NNX backbones through the site seam: the same sites, logits, internals and gradients as the
Linen toy CNN with the same weights; NNX site names, globs and errors; the user's model never
touched; a model written the way NNX model collections write theirs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gattanet_jax as gj
from gattanet_jax import addon
from gattanet_jax.backbones import toy_nnx
from gattanet_jax.backbones.nnx_weights import load_linen_variables
from gattanet_jax.systems import GALA

SHAPE = (16, 16, 3)
KW = dict(features=(4, 8, 8), hidden=16)


@pytest.fixture(scope="module")
def pair():
    """The Linen toy CNN and its NNX twin with the same weights: (linen, variables, graphdef,
    state, model, images)."""
    linen = gj.ToyCNN(10, **KW)
    x = np.random.default_rng(0).uniform(size=(3, *SHAPE)).astype(np.float32)
    variables = linen.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a + 0.05 * np.sign(a + 1e-3), variables)  # biases too
    model = toy_nnx.ToyCNN(10, image_size=SHAPE[0], rngs=nnx.Rngs(0), **KW)
    load_linen_variables(model, variables)
    graphdef, state = nnx.split(model)
    return linen, variables, graphdef, state, model, x


def _numpy(tree):
    """A copy of every array (random keys as their data)."""

    def one(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        return np.array(a)

    return jax.tree.map(one, tree)


def _close(a, b, tol=1e-6):
    for p, q in zip(jax.tree.leaves(_numpy(a)), jax.tree.leaves(_numpy(b)), strict=True):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=tol, atol=tol)


def test_nnx_twin_gives_the_linen_logits_internals_and_attention_gradients(pair):
    lesion = "c.cd."  # with a lesion: the seam's factors and records both checked
    linen, variables, graphdef, state, _, x = pair
    assert gj.available_sites(graphdef, state, SHAPE) == gj.available_sites(linen, variables, SHAPE)
    sites = gj.resolve_sites(graphdef, state, SHAPE, gj.TOY_SITES)
    assert sites == gj.resolve_sites(linen, variables, SHAPE, gj.TOY_SITES)
    attention = gj.AttentionSystem(sites, d=8)
    av = jax.tree.map(lambda a: a + 0.2, gj.init_attention(attention, jax.random.key(1)))
    _close(gj.backbone_logits(graphdef, state, x), gj.backbone_logits(linen, variables, x))

    def run(backbone, bv, av):
        return gj.two_pass(backbone, attention, av, bv, x, lesion=lesion, return_internals=True)

    ours = jax.jit(lambda av, s: run(graphdef, s, av))(av, state)
    theirs = run(linen, variables, av)
    _close(ours.logits, theirs.logits)
    _close(ours.attention, theirs.attention)

    def loss(backbone, bv, av):
        return jnp.sum(run(backbone, bv, av).logits ** 2)

    _close(
        jax.grad(lambda av: loss(graphdef, state, av))(av),
        jax.grad(lambda av: loss(linen, variables, av))(av),
        1e-5,
    )


def test_vmap_over_attention_systems_on_the_nnx_twin_equals_a_loop(pair):
    """jax.vmap over stacked attention variables (a sweep's members) through the NNX seam."""
    _, _, graphdef, state, _, x = pair
    sites = gj.resolve_sites(graphdef, state, SHAPE, gj.TOY_SITES)
    attention = gj.AttentionSystem(sites, d=4)
    members = [
        jax.tree.map(
            lambda a, i=i: a + 0.1 * (i + 1), gj.init_attention(attention, jax.random.key(i))
        )
        for i in range(3)
    ]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)

    def logits(av):
        return gj.two_pass(graphdef, attention, av, state, x, lesion="cc.dd").logits

    together = jax.jit(jax.vmap(logits))(stacked)
    for i, av in enumerate(members):
        _close(together[i], logits(av))
    assert not np.allclose(together[0], together[1])


def test_an_add_on_on_the_nnx_twin_equals_the_linen_one(pair):
    linen, variables, graphdef, state, _, x = pair
    sites = gj.resolve_sites(graphdef, state, SHAPE, ("conv*",))
    addons = addon.addon_modules(sites, lambda s, name: GALA(reduction=2, name=name))
    av = jax.tree.map(lambda a: a + 0.1, addon.init_addons(addons, jax.random.key(2)))
    ours = jax.jit(lambda av, s: addon.forward(graphdef, addons, av, s, x))(av, state)
    _close(ours, addon.forward(linen, addons, av, variables, x))


def test_the_users_model_is_never_touched(pair):
    _, _, graphdef, state, model, x = pair
    before = _numpy(nnx.state(model))
    modules = {p: id(m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    sites = gj.resolve_sites(graphdef, state, SHAPE, gj.TOY_SITES)
    attention = gj.AttentionSystem(sites, d=8)
    av = gj.init_attention(attention, jax.random.key(1))
    gj.two_pass(graphdef, attention, av, state, x, train=True, rng=jax.random.key(3))
    assert {p: id(m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)} == modules
    _close(nnx.state(model), before, 0)
    assert type(model.conv1) is toy_nnx.ConvReLU


class Block(nnx.Module):
    """As NNX model collections write a block: BatchNorm with running averages, activation as a
    plain function, keyword arguments in ``__call__``."""

    def __init__(self, c, *, rngs):
        self.conv = nnx.Conv(c, c, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(c, rngs=rngs)
        self.act = nnx.relu

    def __call__(self, x, *, scale=1.0):
        return self.act(self.bn(self.conv(x))) * scale + x


class Foreign(nnx.Module):
    def __init__(self, *, rngs, twice=False):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.blocks = nnx.List([Block(8, rngs=rngs) for _ in range(3)])
        self.head = nnx.Linear(8, 5, rngs=rngs)
        self.twice = twice

    def __call__(self, x, *, train=False):
        x = nnx.relu(self.stem(x))
        for block in self.blocks:
            x = block(x, scale=0.5)
            if self.twice:
                x = self.blocks[0](x)
        return self.head(x.mean(axis=(1, 2)))


def test_nnx_sites_are_graph_paths_with_globs_and_one_line_errors():
    graphdef, state = nnx.split(Foreign(rngs=nnx.Rngs(0)))
    sites = gj.resolve_sites(graphdef, state, SHAPE, ("stem", "blocks/*/conv", "head"))
    assert [s.name for s in sites] == [
        "stem", "blocks/0/conv", "blocks/1/conv", "blocks/2/conv", "head",
    ]  # fmt: skip
    assert [s.kind for s in sites] == ["conv"] * 4 + ["dense"]
    with pytest.raises(ValueError, match=r"unknown attention site 'blocks/0/cnv'.*'blocks/0/conv'"):
        gj.resolve_sites(graphdef, state, SHAPE, ("blocks/0/cnv",))
    with pytest.raises(ValueError, match=r"'blocks/1/act' is a plain function \(relu\), not a mod"):
        gj.resolve_sites(graphdef, state, SHAPE, ("blocks/1/act",))
    twice_def, twice_state = nnx.split(Foreign(rngs=nnx.Rngs(0), twice=True))
    attention = gj.AttentionSystem(sites, d=4)
    av = gj.init_attention(attention, jax.random.key(0))
    x = jnp.ones((2, *SHAPE))
    with pytest.raises(ValueError, match=r"'blocks/0/conv' ran more than once"):
        gj.two_pass(twice_def, attention, av, twice_state, x)


def test_gattanet_trains_on_a_foreign_nnx_model_and_its_state_stays_as_it_was():
    graphdef, state = nnx.split(Foreign(rngs=nnx.Rngs(0)))
    sites = gj.resolve_sites(graphdef, state, SHAPE, ("blocks/*/bn", "head"))
    attention = gj.AttentionSystem(sites, d=4)
    av = gj.init_attention(attention, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (4, *SHAPE))
    labels = jnp.arange(4) % 5
    before = _numpy(state)

    @jax.jit
    def step(av, state):
        def loss(av):
            logits = gj.two_pass(graphdef, attention, av, state, x, lesion="c.cd").logits
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

        value, grads = jax.value_and_grad(loss)(av)
        return jax.tree.map(lambda p, g: p - 0.5 * g, av, grads), value

    losses = []
    for _ in range(4):
        av, value = step(av, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    _close(state, before, 0)
    internals = gj.two_pass(graphdef, attention, av, state, x, return_internals=True).attention
    assert internals.gatta["blocks/1/bn"].shape == (4, 16, 16)


def test_gsa_in_place_of_a_foreign_models_convolutions_trains_and_leaves_its_state():
    """The add-on that replaces modules (GSA in place of each block's convolution, its own
    BatchNorm statistics updated in training mode) trained a few steps on the foreign model."""
    from gattanet_jax.systems import GSAConv

    graphdef, state = nnx.split(Foreign(rngs=nnx.Rngs(0)))
    sites = gj.resolve_sites(graphdef, state, SHAPE, ("blocks/*/conv",))
    addons = addon.addon_modules(
        sites, lambda s, name: GSAConv(s.channels, 2, 1, name=name), replace=True
    )
    av = addon.init_addons(addons, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (4, *SHAPE))
    labels = jnp.arange(4) % 5
    before = _numpy(state)

    @jax.jit
    def step(av, state):
        def loss(params):
            logits, updates = addon.forward(
                graphdef, addons, {**av, "params": params}, state, x, train_addons=True
            )
            ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
            return ce, updates["addon"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(av["params"])
        params = jax.tree.map(lambda p, g: p - 0.2 * g, av["params"], grads)
        return {**av, **stats, "params": params}, value

    losses, first = [], av
    for _ in range(4):
        av, value = step(av, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    stats = [jax.tree.leaves({k: v for k, v in t.items() if k != "params"}) for t in (av, first)]
    assert stats[0] and any(  # the modules' running averages moved
        not np.allclose(a, b) for a, b in zip(*stats, strict=True)
    )
    _close(state, before, 0)
    # the replaced convolutions are not run: their kernels change nothing
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, a: a * 0 if "conv" in jax.tree_util.keystr(p) else a, state
    )
    _close(
        addon.forward(graphdef, addons, av, zeroed, x),
        addon.forward(graphdef, addons, av, state, x),
        0,
    )


def test_the_nnx_module_trains_its_attention_alone_with_nnx_optimizer():
    backbone = Foreign(rngs=nnx.Rngs(0))
    model = gj.GAttANet(backbone, ["blocks/*/bn", "head"], SHAPE, d=4, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=gj.AttentionParam)
    x = jax.random.uniform(jax.random.key(1), (4, *SHAPE))
    labels = jnp.arange(4) % 5
    frozen = _numpy(nnx.state(model.backbone))
    start = _numpy(model.variables())
    graphdef, state = nnx.split(backbone)  # the functional call gives the module's numbers
    _close(model(x), gj.two_pass(graphdef, model.attention, model.variables(), state, x).logits, 0)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            logits = model(x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, gj.AttentionParam))(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    _close(nnx.state(model.backbone), frozen, 0)  # bit-identical
    trained = jax.tree.leaves(_numpy(model.variables()))
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(start), trained, strict=True))


@pytest.mark.parametrize("variant", ["basic", "bottleneck"])
def test_nnx_resnets_load_torchvision_weights_and_give_the_linen_numbers(variant):
    from gattanet_jax.backbones import resnet, resnet_nnx
    from gattanet_jax.backbones.nnx_weights import linen_variables
    from tests.test_resnet import VARIANTS, random_state_dict

    kw = VARIANTS[variant]
    linen = resnet.ResNet(**kw)
    sd = random_state_dict(linen, (32, 32, 3))
    abstract = jax.eval_shape(lambda: linen.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    variables = gj.weights.from_torchvision(sd, abstract, resnet.torch_name)
    model = resnet_nnx.ResNet(**kw, rngs=nnx.Rngs(0))
    resnet_nnx.load_torchvision(model, sd, image_size=32)
    _close(linen_variables(model), variables, 0)  # the same names, the same values
    graphdef, state = nnx.split(model)
    x = np.random.default_rng(4).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    _close(gj.backbone_logits(graphdef, state, x), linen.apply(variables, x), 1e-5)
    sites = gj.resolve_sites(graphdef, state, (32, 32, 3), resnet.RESNET_SITES)
    assert sites == gj.resolve_sites(linen, variables, (32, 32, 3), resnet.RESNET_SITES)
    attention = gj.AttentionSystem(sites, d=4)
    av = jax.tree.map(lambda a: a + 0.1, gj.init_attention(attention, jax.random.key(1)))
    ours = gj.two_pass(graphdef, attention, av, state, x, return_internals=True)
    theirs = gj.two_pass(linen, attention, av, variables, x, return_internals=True)
    _close(ours.logits, theirs.logits, 1e-5)
    _close(ours.attention, theirs.attention, 1e-5)
    del sd["fc.bias"]
    sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"][:1]
    with pytest.raises(gj.weights.WeightsError, match=r"fc\.bias.*layer1\.0\.conv1\.weight"):
        resnet_nnx.load_torchvision(model, sd, image_size=32)
