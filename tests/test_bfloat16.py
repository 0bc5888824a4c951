"""bfloat16 end to end: backbone and attention compute in bfloat16, parameters, optimizer state
and loss stay float32, training stays finite and lands near float32's accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import tiny_config
from train import tasks, train


def config_for(dtype, stage="backbone"):
    config = tiny_config(stage, epochs=6, max_train_examples=3072, max_test_examples=256)
    config.model.dtype = dtype
    config.model.features, config.model.hidden = (16, 32, 32), 64
    config.backbone_training.batch_size = 64
    config.backbone_training.learning_rate = 3e-3
    config.backbone_training.augment = False
    config.attention_training.num_epochs = 1
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = train.train_and_evaluate(config_for(dtype), str(root / dtype))
    return root, out


def test_bfloat16_backbone_training_is_finite_and_near_float32(runs):
    _, out = runs
    (_, r32), (state16, r16) = out["float32"], out["bfloat16"]
    assert r32["test_accuracy"] > 0.4  # well above chance (0.1) on the embedded data
    assert abs(r16["test_accuracy"] - r32["test_accuracy"]) < 0.1, (r16, r32)
    assert np.isfinite(r16["test_loss"]) and r16["skipped_updates"] == 0
    for leaf in jax.tree.leaves(state16["state"]["params"]):
        assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
    for leaf in jax.tree.leaves(state16["state"]["opt_state"]):
        assert leaf.dtype in (jnp.float32, jnp.int32)


def test_bfloat16_attention_computes_in_bfloat16_with_float32_parameters(runs):
    import gattanet_jax as gj
    from train import models

    root, _ = runs
    config = config_for("bfloat16", "attention")
    config.backbone_checkpoint = str(root / "bfloat16")
    state, results = train.train_and_evaluate(config, str(root / "attention16"))
    assert np.isfinite(results["test_loss"]) and results["skipped_updates"] == 0
    assert results["test_accuracy"] >= results["backbone_test_accuracy"] - 0.05
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))
    # the computation itself: bfloat16 activations, keys and agreement; float32 logits only
    # where the loss casts them
    backbone = models.build_backbone(config)
    bvars, _ = tasks.load_backbone(config, backbone)
    attention = models.build_attention(config, backbone, bvars)
    x = jnp.zeros((2, 32, 32, 3), jnp.float32)
    forward = jax.jit(
        lambda v, b, x: gj.two_pass(backbone, attention, v, b, x, return_internals=True)
    )
    out = forward(state["variables"], bvars, x)
    assert out.logits.dtype == jnp.bfloat16
    assert out.attention.keys["conv1"].dtype == jnp.bfloat16
    assert out.attention.gatta["conv1"].dtype == jnp.bfloat16
