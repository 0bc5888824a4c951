"""GALA, SE and GSA against their formulas and direct loops over positions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gattanet_jax import count_params
from gattanet_jax.systems import GALA, GSA, GSAConv, ResidualGSA, SqueezeExcitation, gsa


def numpy_tree(tree):
    return jax.tree.map(np.asarray, tree)


def randomize(variables, seed=1, fan_in=False):
    """Random values everywhere (a and m too), so no term vanishes at its init; BatchNorm's
    running variances positive. ``variables`` may be shapes only (``jax.eval_shape``).
    ``fan_in``: kernels scaled by 1/sqrt(fan-in), activations kept in range through a deep net."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        value = rng.normal(0, 0.5, x.shape)
        if path[-1].key == "var":
            value = np.abs(value) + 0.1
        elif fan_in and path[-1].key == "kernel":
            value = value * 2 / np.sqrt(np.prod(x.shape[:-1]))
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, variables)


def relu(t):
    return np.maximum(t, 0)


def sigmoid(t):
    return 1 / (1 + np.exp(-t))


def gala_numpy(p, x, squash="tanh", gate="direct"):
    """GALA written out from its formula (float64): global path W2 relu(W1 GAP(X)), local
    one-channel map conv1x1(relu(conv1x1(X))), s = squash(a (s_g + s_l) + m s_g s_l); the
    paper's Y = s X, or Y = (1 + gamma s) X for the residual gate."""
    x = np.asarray(x, np.float64)
    g, l1, l2 = p["global"], p["local1"], p["local2"]
    s_g = relu(x.mean(axis=(1, 2)) @ g["fc1"]["kernel"] + g["fc1"]["bias"])
    s_g = (s_g @ g["fc2"]["kernel"] + g["fc2"]["bias"])[:, None, None, :]  # (B, 1, 1, C)
    s_l = relu(x @ l1["kernel"] + l1["bias"]) @ l2["kernel"] + l2["bias"]  # (B, H, W, 1)
    z = p["a"] * (s_g + s_l) + p["m"] * (s_g * s_l)
    s = np.tanh(z) if squash == "tanh" else sigmoid(z)
    return s * x if gate == "direct" else (1 + p["gamma"] * s) * x


@pytest.mark.parametrize("squash", ["tanh", "sigmoid"])
def test_gala_matches_the_formula_by_hand(squash):
    x = np.random.default_rng(10).normal(size=(2, 5, 6, 8)).astype(np.float32)
    module = GALA(reduction=4, squash=squash)
    v = randomize(module.init(jax.random.key(0), x))
    expected = gala_numpy(numpy_tree(v["params"]), x, squash)
    np.testing.assert_allclose(module.apply(v, x), expected, rtol=1e-5, atol=1e-6)
    # parameters: two dense layers (8 -> 2 -> 8), two 1x1 convs (8 -> 2 -> 1), a and m
    n = sum(t.size for t in jax.tree.leaves(v))
    assert n == (8 * 2 + 2) + (2 * 8 + 8) + (8 * 2 + 2) + (2 * 1 + 1) + 8 + 8


def test_se_is_gala_without_the_local_path():
    x = np.random.default_rng(11).normal(size=(2, 4, 4, 8)).astype(np.float32)
    se = SqueezeExcitation(reduction=4)
    v = randomize(se.init(jax.random.key(0), x))
    p = numpy_tree(v["params"])["global"]
    z = relu(x.mean(axis=(1, 2)) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    z = z @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(se.apply(v, x), x * sigmoid(z)[:, None, None], rtol=1e-5, atol=1e-6)
    gala = GALA(reduction=4, squash="sigmoid", use_local=False)
    gv = gala.init(jax.random.key(0), x)
    gv = {"params": {"global": v["params"]["global"], "a": jnp.ones(8), "m": gv["params"]["m"]}}
    np.testing.assert_allclose(gala.apply(gv, x), se.apply(v, x), rtol=1e-6, atol=1e-7)


# GSA, from the GSA paper's equations (Appendix B), in float64 loops over pixels. Relative
# embedding tables hold offset o in row L - 1 + o, o = -(L-1) .. L-1.


def content_loop(q, k, v):
    """F_c(p) = sum_n (q(p) . softmax_n(k)(n)) v(n): keys normalised over the positions n,
    channel by channel; queries not normalised."""
    b, hh, ww, heads, dk = k.shape
    out = np.zeros((*q.shape[:4], v.shape[-1]))
    for bi, h in np.ndindex(b, heads):
        keys = np.asarray(k[bi, :, :, h], np.float64).reshape(hh * ww, dk)
        keys = np.exp(keys - keys.max(axis=0))
        keys = keys / keys.sum(axis=0)  # each key channel sums to 1 over the positions
        vals = np.asarray(v[bi, :, :, h], np.float64).reshape(hh * ww, -1)
        for y, x, n in np.ndindex(hh, ww, hh * ww):  # every position reaches every query
            out[bi, y, x, h] += (q[bi, y, x, h] @ keys[n]) * vals[n]
    return out


def positional_loop(q, v, r_col, r_row, normalize=lambda f: f):
    """F_col(y, x) = sum_y' (q(y, x) . r_col[y' - y]) v(y', x); then ``normalize`` (the
    BatchNorm); F_pos(y, x) = sum_x' (q(y, x) . r_row[x' - x]) F_col(y, x'). No softmax."""
    b, hh, ww, heads, _ = q.shape
    f_col = np.zeros(v.shape)
    for bi, y, x, h, y2 in np.ndindex(b, hh, ww, heads, hh):
        f_col[bi, y, x, h] += (q[bi, y, x, h] @ r_col[(y2 - y) + hh - 1]) * v[bi, y2, x, h]
    f_col = normalize(f_col)
    out = np.zeros(v.shape)
    for bi, y, x, h, x2 in np.ndindex(b, hh, ww, heads, ww):
        out[bi, y, x, h] += (q[bi, y, x, h] @ r_row[(x2 - x) + ww - 1]) * f_col[bi, y, x2, h]
    return out


def test_content_attention_against_a_loop_over_positions():
    rng = np.random.default_rng(12)
    b, hh, ww, heads, dk, dv = 2, 3, 4, 2, 3, 5
    q = rng.normal(size=(b, hh, ww, heads, dk)).astype(np.float32)
    k = rng.normal(size=(b, hh, ww, heads, dk)).astype(np.float32)
    v = rng.normal(size=(b, hh, ww, heads, dv)).astype(np.float32)
    np.testing.assert_allclose(
        gsa.content_attention(q, k, v), content_loop(q, k, v), rtol=1e-5, atol=1e-5
    )


def test_positional_attention_against_a_loop_with_explicit_offsets():
    rng = np.random.default_rng(13)
    b, hh, ww, heads, dk, dv = 2, 4, 3, 2, 3, 4
    q = rng.normal(size=(b, hh, ww, heads, dk)).astype(np.float32)
    v = rng.normal(size=(b, hh, ww, heads, dv)).astype(np.float32)
    r_col = rng.normal(size=(2 * hh - 1, dk)).astype(np.float32)  # offsets -(H-1) .. H-1
    r_row = rng.normal(size=(2 * ww - 1, dk)).astype(np.float32)
    ours = np.asarray(gsa.positional_attention(q, v, r_col, r_row))
    np.testing.assert_allclose(ours, positional_loop(q, v, r_col, r_row), rtol=1e-5, atol=1e-4)
    # linear in v (no softmax anywhere in the positional branch)
    np.testing.assert_allclose(
        gsa.positional_attention(q, 3 * v, r_col, r_row), 3 * ours, rtol=1e-5, atol=1e-4
    )
    # the extreme offsets -(L-1) and L-1 are used: changing either changes the output
    for row in (0, 2 * hh - 2):
        bumped = r_col.copy()
        bumped[row] += 1.0
        assert not np.allclose(gsa.positional_attention(q, v, bumped, r_row), ours)
    with pytest.raises(ValueError, match="need 7 relative embeddings"):
        gsa.positional_attention(q, v, r_col[:-1], r_row)


@pytest.mark.reference
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_gsa_module_is_the_papers_equations(train):
    """The whole module against the loops: 1x1 projections, content + positional branches,
    the BatchNorm between the column and row steps (batch statistics in training, running
    averages otherwise), and the running averages' update."""
    b, hh, ww, heads, dk, features = 2, 5, 6, 4, 8, 16
    x = np.random.default_rng(14).normal(size=(b, hh, ww, 12)).astype(np.float32)
    module = GSA(features=features, heads=heads, key_features=dk)
    v = randomize(module.init(jax.random.key(0), x), seed=4)
    p, stats = numpy_tree(v["params"]), numpy_tree(v["batch_stats"])["col_norm"]
    assert p["qkv"]["kernel"].shape == (12, dk + dk + features)
    assert p["rel_col"].shape == (2 * hh - 1, dk // heads)
    assert p["rel_row"].shape == (2 * ww - 1, dk // heads)
    proj = np.asarray(x, np.float64) @ p["qkv"]["kernel"]
    split = lambda t: t.reshape(b, hh, ww, heads, -1)  # noqa: E731
    q, k, val = split(proj[..., :dk]), split(proj[..., dk : 2 * dk]), split(proj[..., 2 * dk :])
    per_head = lambda t: t.reshape(heads, features // heads)  # noqa: E731
    scale, offset = per_head(p["col_norm"]["scale"]), per_head(p["col_norm"]["bias"])
    seen = {}

    def batch_norm(f):  # each of the d_out channels (head, channel) on its own
        if train:
            mean, var = f.mean(axis=(0, 1, 2)), f.var(axis=(0, 1, 2))
            seen["mean"], seen["var"] = mean, var
        else:
            mean, var = per_head(stats["mean"]), per_head(stats["var"])
        return (f - mean) / np.sqrt(var + 1e-5) * scale + offset

    expected = content_loop(q, k, val) + positional_loop(
        q, val, p["rel_col"], p["rel_row"], batch_norm
    )
    if train:
        out, updates = module.apply(v, x, True, mutable=["batch_stats"])
        new = numpy_tree(updates["batch_stats"]["col_norm"])
        for name in ("mean", "var"):
            np.testing.assert_allclose(
                new[name], 0.9 * stats[name] + 0.1 * seen[name].reshape(-1), rtol=1e-4
            )
    else:
        out = module.apply(v, x)
    assert out.shape == (b, hh, ww, features)
    np.testing.assert_allclose(out, expected.reshape(out.shape), rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="heads"):
        GSA(features=10, heads=4).init(jax.random.key(0), x)


@pytest.mark.reference
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_gala_add_on_on_the_toy_cnn_equals_the_reference_forward_with_gala_by_hand(api):
    import gattanet_jax as gj
    from gattanet_jax import addon
    from gattanet_jax.backbones import toy_nnx
    from gattanet_jax.nnx_backbone import NNXBackbone
    from tests import reference as ref

    backbone = gj.ToyCNN(10, features=(4, 8, 8), hidden=16)
    bv = backbone.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    if api == "nnx":  # the NNX twin, with the same variables
        backbone = NNXBackbone(
            lambda rngs: toy_nnx.ToyCNN(10, (4, 8, 8), 16, image_size=16, rngs=rngs)
        )
    sites = gj.resolve_sites(backbone, bv, (16, 16, 3), ("conv1", "conv2", "conv3"))
    addons = addon.addon_modules(sites, lambda s, name: GALA(reduction=2, name=name))
    av = randomize(addon.init_addons(addons, jax.random.key(1)))
    x = np.random.default_rng(15).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    ours = jax.jit(lambda av, x: addon.forward(backbone, addons, av, bv, x))(av, x)
    p = numpy_tree(av["params"])

    def gala_by_hand(name, a):  # GALA's formula, in NumPy
        return gala_numpy(p[name], a) if name in ("conv1", "conv2", "conv3") else a

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


@pytest.mark.parametrize("kind", ["gala", "gsa_conv"])
def test_from_scratch_protocol_trains_backbone_and_modules_together(kind, tmp_path):
    """GALA in the toy CNN, and the GSA toy CNN (its convolutions replaced by GSA modules)."""
    from tests.test_train import tiny_config
    from train import train

    config = tiny_config("addon", epochs=1)
    config.addon.kind = kind
    config.addon.from_scratch = True
    state, results = train.train_and_evaluate(config, str(tmp_path))
    assert sorted(state["params"]) == ["addon", "backbone"]
    assert results["frozen_params"] == 0
    assert results["trainable_params"] == count_params(state["params"])
    convs = {"conv1", "conv2", "conv3"} & set(state["params"]["backbone"])
    assert convs == (set() if kind == "gsa_conv" else {"conv1", "conv2", "conv3"})


@pytest.mark.parametrize(
    "make",
    [
        lambda: GALA(reduction=4, gate="residual"),
        lambda: SqueezeExcitation(reduction=4, gate="residual"),
        lambda: ResidualGSA(features=8, heads=2, reduction=2),
    ],
    ids=["gala", "se", "gsa"],
)
def test_residual_add_ons_are_the_identity_until_trained(make):
    x = np.random.default_rng(16).normal(size=(2, 5, 6, 8)).astype(np.float32)
    module = make()
    v = module.init(jax.random.key(0), x)
    np.testing.assert_array_equal(module.apply(v, x), x)
    # trained (random) parameters: no longer the identity
    assert not np.allclose(module.apply(randomize(v), x), x)


def test_gala_residual_gate_is_one_plus_gamma_times_the_papers_gate():
    x = np.random.default_rng(17).normal(size=(2, 5, 6, 8)).astype(np.float32)
    residual = GALA(reduction=4, gate="residual")
    v = randomize(residual.init(jax.random.key(0), x))
    p = numpy_tree(v["params"])
    np.testing.assert_allclose(
        residual.apply(v, x), x + p["gamma"] * gala_numpy(p, x), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        residual.apply(v, x), gala_numpy(p, x, gate="residual"), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="gate"):
        GALA(gate="sideways").init(jax.random.key(0), x)


def test_gsa_conv_downsamples_by_average_pooling_and_applies_its_activation():
    x = np.random.default_rng(18).normal(size=(2, 8, 8, 6)).astype(np.float32)
    module = GSAConv(features=8, heads=2, stride=2, activation="relu")
    v = randomize(module.init(jax.random.key(0), x), seed=5)
    out = module.apply(v, x)
    assert out.shape == (2, 4, 4, 8)
    inner = {"params": v["params"]["gsa"], "batch_stats": v["batch_stats"]["gsa"]}
    full = np.asarray(GSA(8, 2).apply(inner, x))
    pooled = full.reshape(2, 4, 2, 4, 2, 8).mean(axis=(2, 4))
    np.testing.assert_allclose(out, np.maximum(pooled, 0), rtol=1e-5, atol=1e-5)


def tiny_resnet(block):
    from gattanet_jax.backbones import resnet

    net = resnet.ResNet(stage_sizes=(2, 1, 1, 1), block=block, num_classes=5, width=4)
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return net, randomize(shapes, seed=3)  # random BatchNorm statistics, scales and offsets too


def test_site_patterns_expand_to_module_paths_in_call_order():
    import gattanet_jax as gj

    net, v = tiny_resnet("basic")
    sites = gj.resolve_sites(net, v, (32, 32, 3), ("layer*/*/bn2",))
    assert [s.name for s in sites] == [
        "layer1/0/bn2",
        "layer1/1/bn2",
        "layer2/0/bn2",
        "layer3/0/bn2",
        "layer4/0/bn2",
    ]
    assert sites[2].shape == (4, 4, 8) and sites[2].input_shape == (4, 4, 8)
    with pytest.raises(ValueError, match="matches no module"):
        gj.resolve_sites(net, v, (32, 32, 3), ("layer*/*/bn9",))


class _Zero(nn.Module):
    @nn.compact
    def __call__(self, y):
        return jnp.zeros_like(y)


def test_resnet_add_on_sits_before_the_residual_addition():
    """A module that zeroes its input, at each layer1 block's last BatchNorm: each block then
    returns relu(0 + identity) = its (non-negative) input, so layer1 is the identity. After the
    addition it would give zeros; before the BatchNorm, BN(0) = its offset."""
    import gattanet_jax as gj
    from gattanet_jax import addon
    from gattanet_jax import sites as sites_lib

    net, v = tiny_resnet("basic")
    sites = gj.resolve_sites(net, v, (32, 32, 3), ("layer1/*/bn2",))
    addons = addon.addon_modules(sites, lambda s, name: _Zero(name=name))
    x = np.random.default_rng(19).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    with_zero = sites_lib.record(lambda: addon.forward(net, addons, {}, v, x), ["stem", "layer1"])[
        1
    ]
    stem = with_zero["stem"]
    pooled = nn.max_pool(stem, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_allclose(with_zero["layer1"], pooled, rtol=1e-6)
    plain = sites_lib.record(lambda: net.apply(v, x), ["layer1"])[1]["layer1"]
    assert not np.allclose(plain, pooled)


def test_replaced_sites_get_the_input_and_the_replaced_module_never_runs():
    """Bottleneck 3x3 convolutions (strided ones too) replaced by a copy of themselves: same
    logits, with the originals' parameters removed from the backbone's tree."""
    import gattanet_jax as gj
    from gattanet_jax import addon
    from gattanet_jax.backbones import resnet

    net, v = tiny_resnet("bottleneck")
    sites = gj.resolve_sites(net, v, (32, 32, 3), ("layer*/*/conv2",))
    assert [s.input_shape for s in sites][2] == (8, 8, 8) and sites[2].shape == (4, 4, 8)

    def make(site, name):
        stride = site.input_shape[0] // site.shape[0]
        return resnet._conv(site.channels, 3, stride, jnp.float32, name)

    addons = addon.addon_modules(sites, make, replace=True)
    copies = {
        "params": {
            gj.attention.param_name(s.name): _at(v["params"], s.name.split("/")) for s in sites
        }
    }
    kept = addon.drop_replaced(v["params"], addons)
    assert "conv2" not in kept["layer2"]["0"] and "conv1" in kept["layer2"]["0"]
    assert "conv2" in v["params"]["layer2"]["0"]  # the caller's tree is left alone
    x = np.random.default_rng(20).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    ours = addon.forward(net, addons, copies, {**v, "params": kept}, x)
    np.testing.assert_allclose(ours, net.apply(v, x), rtol=1e-5, atol=1e-5)


def _at(tree, path):
    for p in path:
        tree = tree[p]
    return tree


@pytest.mark.parametrize(
    "kind, sites", [("gala", "layer*/*/bn3"), ("gsa_conv", "layer*/*/conv2")], ids=["gala", "gsa"]
)
def test_from_scratch_resnet_add_on_trains_its_batch_norm_statistics(kind, sites):
    """Protocol (b) on a ResNet: GALA-ResNet and GSA-ResNet (Bottleneck 3x3 convs replaced)."""
    from configs import resnet50_imagenet
    from train import addon_tasks, models, steps

    config = resnet50_imagenet.get_config("tiny")
    config.stage = "addon"
    config.addon.kind, config.addon.sites, config.addon.heads = kind, (sites,), 2
    config.addon.from_scratch = True
    backbone = models.build_backbone(config)
    task = addon_tasks.addon_task(config, backbone, jax.random.key(0))
    # GSA modules have statistics of their own (the BatchNorm between column and row steps)
    stateful = ["addon_state", "batch_stats"] if kind == "gsa_conv" else ["batch_stats"]
    assert sorted(task.extra) == stateful and sorted(task.params) == ["addon", "backbone"]
    if kind == "gsa_conv":
        assert "conv2" not in task.params["backbone"]["layer1"]["0"]
    x = np.random.default_rng(21).uniform(size=(4, 64, 64, 3)).astype(np.float32)
    y = np.arange(4) % 10

    def loss(p):
        return task.loss_fn(p, task.extra, {}, x, y, steps.loss_rngs(jax.random.key(1), 4))

    (value, (logits, new_extra)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        task.params
    )
    assert logits.shape == (4, 1000) and np.isfinite(value)
    before, after = task.extra["batch_stats"]["stem"], new_extra["batch_stats"]["stem"]
    assert not np.allclose(before["bn1"]["mean"], after["bn1"]["mean"])
    assert sorted(new_extra) == stateful
    if kind == "gsa_conv":
        before = task.extra["addon_state"]["batch_stats"]["layer1.0.conv2"]["gsa"]["col_norm"]
        after = new_extra["addon_state"]["batch_stats"]["layer1.0.conv2"]["gsa"]["col_norm"]
        assert not np.allclose(before["var"], after["var"])
    # (with the residual gate at gamma = 0, only gamma gets a gradient at first)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["addon"])) > 0
