"""The recipe switches that separate this project's toy baseline from a Keras script's: the
kernel initialiser, the input scale, what validation is, what early stopping watches and which
weights are kept."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gattanet_jax import ToyCNN
from train import selection, train, validate
from train.data import input_pipeline
from train.errors import UserError

from .test_train import tiny_config


def _kernel(init: str, layer: str) -> np.ndarray:
    variables = ToyCNN(kernel_init=init).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return np.asarray(variables["params"][layer]["kernel"]), variables["params"]


@pytest.mark.parametrize("layer", ["conv2", "conv3", "dense1"])
def test_keras_kernels_are_glorot_uniform_and_flax_kernels_lecun_normal(layer):
    keras, params = _kernel("keras", layer)
    flax_default, _ = _kernel("flax", layer)
    fan_in, fan_out = np.prod(keras.shape[:-1]), np.prod(keras.shape[:-2]) * keras.shape[-1]
    glorot = 2.0 / (fan_in + fan_out)
    np.testing.assert_allclose(keras.var(), glorot, rtol=0.05)
    assert np.abs(keras).max() <= np.sqrt(3 * glorot)  # uniform on [-limit, limit]
    np.testing.assert_allclose(flax_default.var(), 1.0 / fan_in, rtol=0.05)
    for name in ("conv1", "conv2", "conv3", "dense1", "logits"):
        assert not np.any(np.asarray(params[name]["bias"]))  # zero biases in both libraries


def test_pixel_scale_feeds_raw_pixel_values():
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    variables = ToyCNN().init(jax.random.key(0), x)
    raw = ToyCNN(pixel_scale=255.0).apply(variables, x)
    np.testing.assert_allclose(raw, ToyCNN().apply(variables, 255.0 * x), rtol=1e-5, atol=1e-5)


def test_validation_on_the_test_split_trains_on_the_whole_train_split():
    config = tiny_config(max_train_examples=400, max_test_examples=100)
    held_out = input_pipeline.load(config, (32, 32, 3))
    assert (len(held_out.train), len(held_out.validation), len(held_out.test)) == (360, 40, 100)
    config.dataset.validation = "test"
    on_test = input_pipeline.load(config, (32, 32, 3))
    assert (len(on_test.train), len(on_test.validation), len(on_test.test)) == (400, 100, 100)
    np.testing.assert_array_equal(on_test.validation.labels, on_test.test.labels)


def _replay(accuracies, losses, monitor, restore, patience):
    """(the epoch early stopping ends the run at, the epoch whose weights are kept)."""
    meta = {"epoch": 0, "best_val": -1.0, "bad_epochs": 0, "done": False}
    kept = None
    for acc, loss in zip(accuracies, losses, strict=True):
        meta["epoch"] += 1
        improved = selection.update(meta, {"accuracy": acc, "loss": loss}, monitor, patience)
        kept = meta["epoch"] if selection.keeps(restore, improved) else kept
        if meta["done"]:
            break
    return meta["epoch"], kept


def test_stopping_rule_on_a_synthetic_history():
    # Accuracy keeps rising while the loss turns up after epoch 2 (overconfident errors).
    acc = [0.50, 0.60, 0.62, 0.64, 0.63, 0.61, 0.60]
    loss = [1.50, 1.20, 1.25, 1.30, 1.40, 1.50, 1.60]
    assert _replay(acc, loss, "val_accuracy", "best", 2) == (6, 4)
    assert _replay(acc, loss, "val_loss", "best", 2) == (4, 2)
    assert _replay(acc, loss, "val_loss", "last", 2) == (4, 4)
    assert _replay(acc, loss, "val_accuracy", "last", 3) == (7, 7)
    # A loss above 1 on the first epoch still counts as the first best.
    assert _replay([0.1, 0.2], [2.5, 2.4], "val_loss", "best", 5) == (2, 2)


@pytest.mark.parametrize(
    "field, value",
    [
        ("dataset.validation", "train"),
        ("model.kernel_init", "glorot"),
        ("model.pixel_scale", 0.0),
        ("model.pixel_scale", float("nan")),
        ("backbone_training.monitor", "val_acc"),
        ("backbone_training.restore", "first"),
    ],
)
def test_bad_switch_values_are_refused(field, value):
    config = tiny_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match=rf"config\.{field} must be"):
        validate.check_config(config)


def test_keras_recipe_run_records_its_selection_and_refuses_another_scale(tmp_path):
    config = tiny_config(epochs=3)
    config.dataset.validation = "test"
    config.model.kernel_init = "keras"
    config.model.pixel_scale = 255.0
    config.backbone_training.monitor = "val_loss"
    config.backbone_training.restore = "last"
    _, results = train.train_and_evaluate(config, str(tmp_path / "b"))
    assert results["selected_on"] == "test"
    assert (results["monitor"], results["restore"]) == ("val_loss", "last")
    assert results["best_epoch"] == results["epochs"] == 3  # the last weights are kept
    assert results["best_validation_loss"] > 0 and "best_validation_accuracy" not in results
    assert json.loads((tmp_path / "b" / "results.json").read_text())["selected_on"] == "test"
    second = tiny_config(stage="attention")
    second.backbone_checkpoint = str(tmp_path / "b")
    with pytest.raises(UserError, match=r"model\.pixel_scale=255"):
        train.train_and_evaluate(second, str(tmp_path / "a"))
