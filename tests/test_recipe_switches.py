"""The recipe switches that separate this project's toy baseline from a Keras script's: the
kernel initialiser, the input scale, where dropout sits, what validation is, what early stopping
watches and which weights are kept; and the data's JPEG compression, as a probe."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gattanet_jax import ToyCNN
from gattanet_jax.backbones.toy import HashDropout
from train import defaults, history, selection, train, validate
from train.data import input_pipeline, sources
from train.errors import UserError
from train.tools.analyses import selection as selection_analysis

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


@pytest.mark.parametrize(
    "place, dropped",
    [
        ("pooling", {"Dropout_0": 32, "Dropout_1": 64, "Dropout_2": 128}),
        ("flatten", {"Dropout_flatten": 2048}),
        ("dense1", {"Dropout_dense1": 256}),
        (
            "pooling_and_dense1",
            {"Dropout_0": 32, "Dropout_1": 64, "Dropout_2": 128, "Dropout_dense1": 256},
        ),
    ],
)
def test_dropout_sits_where_dropout_after_says_and_adds_no_parameters(place, dropped):
    model = ToyCNN(dropout_after=place)
    x = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    assert sum(p.size for p in jax.tree.leaves(variables)) == 620_362
    seen = {}  # each dropout layer's input and output

    def record(call, args, kwargs, context):
        out = call(*args, **kwargs)
        if isinstance(context.module, HashDropout):
            seen[context.module.name] = (np.asarray(args[0]), np.asarray(out))
        return out

    with nn.intercept_methods(record):
        model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert {name: x_in.shape[-1] for name, (x_in, _) in seen.items()} == dropped
    for x_in, out in seen.values():
        active = x_in != 0
        zeroed = out[active] == 0
        assert 0.15 < zeroed.mean() < 0.25  # the rate, 0.2, of what reached the layer
        np.testing.assert_allclose(out[active][~zeroed], x_in[active][~zeroed] / 0.8, rtol=1e-6)


def test_validation_on_the_test_split_trains_on_the_whole_train_split():
    config = tiny_config(max_train_examples=400, max_test_examples=100)
    held_out = input_pipeline.load(config, (32, 32, 3))
    assert (len(held_out.train), len(held_out.validation), len(held_out.test)) == (360, 40, 100)
    config.dataset.validation = "test"
    on_test = input_pipeline.load(config, (32, 32, 3))
    assert (len(on_test.train), len(on_test.validation), len(on_test.test)) == (400, 100, 100)
    np.testing.assert_array_equal(on_test.validation.labels, on_test.test.labels)


def test_jpeg_quality_reencodes_every_image_once_and_more_loss_is_further():
    config = tiny_config(max_train_examples=200, max_test_examples=50)
    plain = input_pipeline.load(config, (32, 32, 3))
    config.dataset.jpeg_quality = 50
    coarse = input_pipeline.load(config, (32, 32, 3))
    for split in ("train", "validation", "test"):
        before, after = getattr(plain, split), getattr(coarse, split)
        np.testing.assert_array_equal(after.labels, before.labels)
        np.testing.assert_array_equal(after.images, sources.jpeg_roundtrip(before.images, 50))
        assert after.images.dtype == np.uint8 and np.any(after.images != before.images)
    x = plain.test.images

    def distance(quality):
        return np.abs(sources.jpeg_roundtrip(x, quality).astype(float) - x).mean()

    assert distance(25) > distance(50) > distance(90) > 0


def _replay(accuracies, losses, monitor, restore, patience):
    """(the epoch early stopping ends the run at, the epoch whose weights are kept)."""
    records = [
        {"epoch": e, "val_accuracy": a, "val_loss": v}
        for e, (a, v) in enumerate(zip(accuracies, losses, strict=True), 1)
    ]
    kept = selection.replay(records, monitor, restore, patience, num_epochs=len(records))
    return kept["stop_epoch"], kept["epoch"]


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
        ("model.dropout_after", "conv"),
        ("model.pixel_scale", 0.0),
        ("model.pixel_scale", float("nan")),
        ("backbone_training.monitor", "val_acc"),
        ("backbone_training.restore", "first"),
        ("dataset.jpeg_quality", 96),
        ("dataset.jpeg_quality", -1),
        ("dataset.jpeg_quality", True),
    ],
)
def test_bad_switch_values_are_refused(field, value):
    config = tiny_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match=rf"config\.{field} must be"):
        validate.check_config(config)


def test_jpeg_quality_is_an_integer_and_refused_for_the_streamed_imagenet_pipeline():
    config = tiny_config()
    config.dataset.pipeline, config.dataset.jpeg_quality = "imagenet", 50
    with pytest.raises(UserError, match=r"config\.dataset\.jpeg_quality must be 0 for the"):
        validate.check_config(config)
    tree = tiny_config().to_dict()  # a config file's value that is not an integer
    tree["dataset"]["jpeg_quality"] = 50.5
    with pytest.raises(UserError, match=r"config\.dataset\.jpeg_quality must be a positive"):
        validate.check_config(defaults.complete(tree))


def test_a_config_file_with_a_non_boolean_test_each_epoch_is_refused():
    tree = tiny_config().to_dict()  # as a config.json or a user's file could hold it
    tree["backbone_training"]["test_each_epoch"] = "yes"
    with pytest.raises(UserError, match=r"config\.backbone_training\.test_each_epoch must be"):
        validate.check_config(defaults.complete(tree))


def test_keras_recipe_run_records_its_selection_and_refuses_another_scale_or_dropout(tmp_path):
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
    # fine-tuned, the backbone trains with its dropout: it must sit where it sat in training
    second.model.pixel_scale = 255.0
    second.model.dropout_after = "dense1"
    second.attention_training.finetune_backbone = True
    with pytest.raises(UserError, match=r"model\.dropout_after='pooling'; set --config"):
        train.train_and_evaluate(second, str(tmp_path / "a"))


def _learning(**changes):
    """A tiny run that learns within 5 epochs (its rules keep different epochs)."""
    config = tiny_config(epochs=5, max_train_examples=800, max_test_examples=200)
    t = config.backbone_training
    t.learning_rate, t.augment, t.patience = 1e-2, False, 2
    t.update(changes)
    return config


def test_a_rule_replayed_on_a_recorded_run_is_the_run_with_that_rule(tmp_path):
    """One run with the test split recorded each epoch gives every stopping rule's figure: a run
    trained with another rule stops, keeps and tests exactly as its replay says."""
    recorded = _learning(test_each_epoch=True, monitor="val_loss")
    _, own = train.train_and_evaluate(recorded, str(tmp_path / "recorded"))
    records = history.read(tmp_path / "recorded")
    assert [r["epoch"] for r in records] == list(range(1, own["epochs"] + 1))
    assert records[own["best_epoch"] - 1]["test_accuracy"] == own["test_accuracy"]
    replayed = selection_analysis.replay(tmp_path / "out", [str(tmp_path / "recorded")])
    rules = replayed["runs"][0]["rules"]
    assert (tmp_path / "out" / "selection.png").is_file()
    assert len({rule["epoch"] for rule in rules.values()}) > 1  # the rules disagree
    _, other = train.train_and_evaluate(_learning(), str(tmp_path / "accuracy"))
    kept = rules["val_accuracy, best"]
    assert (kept["stop_epoch"], kept["epoch"]) == (other["epochs"], other["best_epoch"])
    assert kept["test_accuracy"] == pytest.approx(other["test_accuracy"], abs=1e-9)
    assert kept["epoch"] != rules["val_loss, best"]["epoch"]
    # a history that is not the run's is refused in one line
    results = json.loads((tmp_path / "recorded" / "results.json").read_text())
    results["best_epoch"] = results["best_epoch"] % results["epochs"] + 1  # another epoch
    (tmp_path / "recorded" / "results.json").write_text(json.dumps(results))
    with pytest.raises(UserError, match="its history is not the run's"):
        selection_analysis.replay(tmp_path / "out", [str(tmp_path / "recorded")])


def test_history_drops_the_epochs_a_resumed_run_left_and_a_cut_last_line(tmp_path):
    for epoch in range(1, 6):
        history.append(tmp_path, {"epoch": epoch, "val_accuracy": epoch / 10})
    history.keep_until(tmp_path, 3)  # resumed from epoch 3's checkpoint
    history.append(tmp_path, {"epoch": 4, "val_accuracy": 0.9})
    with open(tmp_path / history.NAME, "a") as f:
        f.write('{"epoch": 5, "val_acc')  # a crash mid-line
    assert [(r["epoch"], r["val_accuracy"]) for r in history.read(tmp_path)] == [
        (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.9)
    ]  # fmt: skip
    (tmp_path / history.NAME).write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(UserError, match="line 2 is not an epoch record"):
        history.read(tmp_path)


def test_a_run_without_validation_data_says_it_selected_on_the_training_data(tmp_path, capsys):
    """validation_fraction=0 holds nothing out: early stopping and the best epoch follow the
    training accuracy, and the record, the sweep's and the final line say so."""
    config = tiny_config(epochs=2)
    config.dataset.validation_fraction = 0.0
    _, results = train.train_and_evaluate(config, str(tmp_path / "b"))
    assert results["selected_on"] == selection.TRAINING == "training data"
    out = capsys.readouterr().out
    assert "(no validation split: epochs are selected on the training data)" in out
    assert "(selected on the training data: there is no validation split)" in out
    config.sweep.seeds = (0, 1)
    _, swept = train.train_and_evaluate(config, str(tmp_path / "s"))
    assert swept["selected_on"] == "training data"
    assert all(np.isfinite(r["best_validation_accuracy"]) for r in swept["members"])
    member = json.loads((tmp_path / "s" / "members" / "1" / "results.json").read_text())
    assert member["selected_on"] == "training data"
    assert "best epochs selected on: training data" in (tmp_path / "s" / "sweep.md").read_text()
    held_out = tiny_config(epochs=1)
    assert train.train_and_evaluate(held_out, str(tmp_path / "h"))[1]["selected_on"] == (
        "held-out validation"
    )
