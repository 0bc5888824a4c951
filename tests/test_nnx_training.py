"""Training with an NNX backbone (``model.api='nnx'``): from the same weights and data, the
training library's compiled steps follow the same trajectory as with the Linen backbone, for
the backbone stage, the attention stage and joint fine-tuning with updated batch statistics;
the commands run on it end to end (``tests/test_nnx_commands.py``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import toy_cifar10
from gattanet_jax.nnx_backbone import NNXBackbone
from train import defaults, models, steps, tasks

BATCH, STEPS = 8, 3


def _config(backbone: str, api: str):
    if backbone == "toy":
        config = toy_cifar10.get_config("smoke")
        config.model.features = (4, 8, 8)
        config.model.hidden = 16
        config.model.dropout_rate = 0.0  # the two APIs draw dropout bits differently
        config.dataset.image_shape = (16, 16, 3)
    else:  # two stages of one block: BatchNorm everywhere, little to compile
        config = defaults.complete({"model": {"backbone": backbone}})
        config.model.width = 4
        config.model.stage_sizes = (1, 1)
        config.model.sites = ("stem", "layer1", "layer2", "fc")
        config.dataset.num_classes = 10
        config.dataset.image_shape = (16, 16, 3)
        config.attention.d = 4
    config.model.api = api
    config.attention_training.backbone_batch_stats = "update"
    return config


def _run(task_or_parts, frozen, data, tx=None):
    """STEPS compiled training steps from the task's initial state: (losses, final state)."""
    loss_fn, params, extra = task_or_parts
    tx = tx or optax.adam(1e-2)
    images, labels = data
    step = jax.jit(functools.partial(steps.train_step, loss_fn, tx, True, BATCH, jax.random.key(3)))
    state = steps.init_state(params, tx, extra)
    perm = jnp.arange(len(labels))
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, frozen, images, labels, perm, jnp.int32(i))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def _close(a, b, tol=1e-5):
    for (path, p), q in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(p), np.asarray(q), rtol=tol, atol=tol, err_msg=str(path)
        )


@pytest.fixture(scope="module", params=["toy", "resnet18"])
def both(request):
    """(config per API, backbone per API, the same backbone variables, data)."""
    configs = {api: _config(request.param, api) for api in ("linen", "nnx")}
    backbones = {api: models.build_backbone(c) for api, c in configs.items()}
    assert isinstance(backbones["nnx"], NNXBackbone)
    shape = models.image_shape(configs["linen"])
    variables = backbones["linen"].init(jax.random.key(0), jnp.zeros((1, *shape)))
    rng = np.random.default_rng(1)  # non-zero biases, running averages away from 0 and 1
    variables = jax.tree.map(
        lambda a: a + 0.1 * rng.uniform(size=a.shape).astype(a.dtype), variables
    )
    images = rng.integers(0, 256, size=(2 * BATCH, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(2 * BATCH,)).astype(np.int32)
    return configs, backbones, dict(variables), (images, labels)


def test_the_nnx_backbone_has_the_linen_variables_and_sites(both):
    configs, backbones, variables, _ = both
    shapes = {api: models.backbone_shapes(b, configs[api]) for api, b in backbones.items()}
    assert jax.tree.map(jnp.shape, shapes["nnx"]) == jax.tree.map(jnp.shape, shapes["linen"])
    sites = {
        api: models.build_attention(configs[api], b, variables).sites
        for api, b in backbones.items()
    }
    assert sites["nnx"] == sites["linen"]


def test_the_backbone_stage_follows_the_linen_trajectory(both):
    configs, backbones, variables, data = both
    out = {}
    for api, backbone in backbones.items():
        task = tasks.backbone_task(configs[api], backbone, jax.random.key(0))
        extra = {k: v for k, v in variables.items() if k != "params"}
        out[api] = _run((task.loss_fn, variables["params"], extra), {}, data)
    np.testing.assert_allclose(out["nnx"][0], out["linen"][0], rtol=1e-5)
    assert len(set(out["linen"][0])) == STEPS  # it trains
    _close(out["nnx"][1], out["linen"][1])  # parameters, optimizer state, statistics


def test_the_attention_stage_and_joint_fine_tuning_follow_the_linen_trajectory(both):
    """The attention stage on the toy CNN; joint fine-tuning with updated batch statistics on
    both (the ResNet's BatchNorm statistics train)."""
    configs, backbones, variables, data = both
    toy = configs["linen"].model.backbone == "toy"
    for finetune in (False, True) if toy else (True,):
        out = {}
        for api, backbone in backbones.items():
            config = configs[api]
            attention = models.build_attention(config, backbone, variables)
            att = dict(tasks.init_attention(attention, jax.random.key(1)))
            params = att.pop("params")
            if finetune:
                task = tasks.finetune_task(
                    config, backbone, attention, params, att, variables, None
                )
                parts = (task.loss_fn, task.params, task.extra)
                out[api] = _run(parts, {"backbone": variables}, data, task.tx)
            else:
                loss_fn = tasks.attention_loss_fn(backbone, attention, 1e-4)
                out[api] = _run((loss_fn, params, att), {"backbone": variables}, data)
        np.testing.assert_allclose(out["nnx"][0], out["linen"][0], rtol=1e-5)
        _close(out["nnx"][1], out["linen"][1])
        if finetune and "batch_stats" in variables:  # the statistics were trained
            before = jax.tree.leaves(variables["batch_stats"])
            after = jax.tree.leaves(out["nnx"][1]["extra"]["backbone_state"])
            assert any(not np.allclose(a, b) for a, b in zip(after, before, strict=True))
