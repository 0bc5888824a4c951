"""Faults a researcher meets, each with the one line they see and a check that nothing was lost.

Cases tested elsewhere: unknown config field (test_train), unknown site and bad lesion strings in
the API (test_gattanet), missing dataset, corrupt / grayscale / wrongly sized images and archive
entries escaping the target (test_data), a checkpoint of another model (test_train), kill -9
at any moment and during a checkpoint write (test_crash), an absurd learning rate (test_train).
"""

import errno
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from gattanet_jax import agreement
from tests.test_train import assert_trees_equal, tiny_config
from train import checkpoints, run, steps, tasks, train
from train.errors import UserError


def snapshot(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("backbone")
    train.train_and_evaluate(tiny_config(epochs=1), str(workdir))
    return workdir


def attention_config(backbone_dir, epochs=1):
    config = tiny_config("attention", epochs=epochs)
    config.backbone_checkpoint = str(backbone_dir)
    return config


def test_cli_value_of_the_wrong_type_is_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.main",
            "--config=configs/toy_cifar10.py",
            f"--workdir={tmp_path / 'wd'}",
            "--config.attention.d=sixteen",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: flag --config.attention.d=sixteen: invalid literal for int() with base 10: "
        "'sixteen'"
    )
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("attention.d", "16", r"config.attention.d must be a positive integer, got '16'"),
        ("attention.d", 0, r"config.attention.d must be a positive integer, got 0"),
        ("attention.d", -4, r"config.attention.d must be a positive integer, got -4"),
        ("attention.dropout_rate", 1.0, r"attention.dropout_rate must be in \[0.0, 1.0\)"),
        ("attention_training.learning_rate", 0.0, r"learning_rate must be in \(0.0, inf\]"),
        ("attention_training.augment", "yes", r"augment must be True or False, got 'yes'"),
        ("model.dtype", "float16", r"model.dtype must be one of \('float32', 'bfloat16'\)"),
        ("on_nonfinite", "ignore", r"on_nonfinite must be one of \('stop', 'skip'\)"),
        ("attention.q_avg_source", "mean", r"q_avg_source must be one of \('own', 'learned'"),
    ],
)
def test_bad_config_values_are_named_before_anything_runs(tmp_path, field, value, match):
    # As a user's own config file would write it (overrides of a built config are type-checked
    # by ml_collections itself).
    tree = tiny_config("attention").to_dict()
    section, _, name = field.rpartition(".")
    (tree[section] if section else tree)[name] = value
    config = ml_collections.ConfigDict(tree)
    with pytest.raises(UserError, match=match):
        train.train_and_evaluate(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_unknown_site_lists_the_available_ones_before_data_or_weights_are_read(tmp_path):
    config = tiny_config("attention")
    config.model.sites = ("conv1", "conv4")
    config.dataset.name = "no_such_dataset"  # never reached
    with pytest.raises(
        UserError,
        match=r"config.model.sites: unknown attention site 'conv4'. Did you mean 'conv3' or .*"
        r"Available sites .*: conv1, Dropout_0, conv2, Dropout_1, conv3, Dropout_2, dense1",
    ):
        train.train_and_evaluate(config, str(tmp_path))


def test_label_out_of_range(tmp_path):
    config = tiny_config()
    config.dataset.num_classes = 5  # the embedded data has 10 classes
    with pytest.raises(UserError, match=r"label \d of example \d+ is outside \[0, 5\)"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_workdir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("precious")
    with pytest.raises(UserError, match=r"workdir .*a_file/run is not writable: Not a directory"):
        train.train_and_evaluate(tiny_config(), str(blocker / "run"))
    assert blocker.read_text() == "precious"


def test_disk_full_during_a_checkpoint_keeps_the_last_complete_one(tmp_path, monkeypatch):
    original = ocp.StandardCheckpointHandler.async_save
    periodic = []

    async def failing(self, directory, *args, **kwargs):
        if directory.parent.parent.name == "checkpoints":
            periodic.append(directory)
            if len(periodic) == 2:
                (directory / "partial").write_bytes(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)
    with pytest.raises(
        UserError,
        match=r"could not write checkpoint 2 to .*checkpoints: No space left on device; the last "
        r"complete checkpoint is .*checkpoints/1; free space and rerun",
    ):
        train.train_and_evaluate(tiny_config(epochs=3), str(tmp_path))
    kept = snapshot(tmp_path / "checkpoints" / "1")
    monkeypatch.undo()
    state, results = train.train_and_evaluate(tiny_config(epochs=3), str(tmp_path))
    assert kept == snapshot(tmp_path / "checkpoints" / "1")  # untouched by the rerun
    straight_state, straight = train.train_and_evaluate(
        tiny_config(epochs=3), str(tmp_path / "straight")
    )
    assert_trees_equal(state["state"], straight_state["state"])
    assert results["test_accuracy"] == straight["test_accuracy"]
    assert results["steps"] == straight["steps"]


def test_pretrained_weights_with_missing_and_extra_names(backbone_dir, tmp_path):
    best = checkpoints.manager(backbone_dir / "best", keep=1, create=False)
    variables = best.restore(best.latest_step())["variables"]
    params = dict(variables["params"])
    params["conv3"] = {"kernel": params["conv3"]["kernel"]}  # its bias is missing
    params["extra"] = {"kernel": np.zeros((3, 3), np.float32)}
    checkpoints.save(
        checkpoints.manager(tmp_path / "edited" / "best", keep=1),
        1,
        {"variables": {"params": params}},
    )
    before = snapshot(tmp_path / "edited")
    with pytest.raises(
        UserError,
        match=r"does not fit this config: missing variables/params/conv3/bias \(8,\); "
        r"unexpected variables/params/extra/kernel \(3, 3\)",
    ):
        train.train_and_evaluate(attention_config(tmp_path / "edited"), str(tmp_path / "wd"))
    assert snapshot(tmp_path / "edited") == before


@pytest.mark.parametrize("change", ["nan", "int"])
def test_a_backbone_checkpoint_with_non_finite_values_or_other_dtypes_is_refused(
    backbone_dir, tmp_path, change
):
    best = checkpoints.manager(backbone_dir / "best", keep=1, create=False)
    variables = best.restore(best.latest_step())["variables"]
    params = {k: dict(v) for k, v in variables["params"].items()}
    kernel = np.asarray(params["conv3"]["kernel"])
    if change == "nan":
        params["conv3"]["kernel"] = np.where(np.arange(kernel.size).reshape(kernel.shape) < 3,
                                             np.nan, kernel).astype(np.float32)  # fmt: skip
        expected = (
            r"holds non-finite values \(NaN or infinity\) in 1 arrays: params/conv3/kernel \(3 of"
        )
    else:
        params["conv3"]["kernel"] = kernel.astype(np.int32)
        expected = (
            r"does not fit this config: variables/params/conv3/kernel: checkpoint int32, model"
        )
    edited = tmp_path / "edited" / "best"
    checkpoints.save(checkpoints.manager(edited, keep=1), 1, {"variables": {"params": params}})
    with pytest.raises(UserError, match=expected):
        train.train_and_evaluate(attention_config(tmp_path / "edited"), str(tmp_path / "wd"))


def test_same_config_and_seed_give_identical_runs(backbone_dir, tmp_path):
    runs = [
        train.train_and_evaluate(attention_config(backbone_dir), str(tmp_path / name))
        for name in ("a", "b")
    ]
    (state_a, results_a), (state_b, results_b) = runs
    assert_trees_equal(state_a["state"], state_b["state"])
    for key in results_a:
        if key not in ("wall_time_s", "processes"):
            assert results_a[key] == results_b[key], key


def test_guard_alpha_zero_is_the_backbone(backbone_dir, tmp_path, monkeypatch):
    original = agreement.modulation
    monkeypatch.setattr(
        agreement, "modulation", lambda gatta, alpha, kind: original(gatta, alpha, kind) + 0.01
    )
    with pytest.raises(UserError, match=r"guard failed: with every alpha = 0 .* differ by up to"):
        train.train_and_evaluate(attention_config(backbone_dir), str(tmp_path))
    assert (
        not list((tmp_path / "checkpoints").iterdir()) and not (tmp_path / "config.json").exists()
    )


def test_guard_backbone_checkpoint_changed_during_attention_training(backbone_dir, tmp_path):
    import shutil

    copy = tmp_path / "backbone"
    shutil.copytree(backbone_dir, copy)
    original = run.evaluate
    calls = []

    def evaluate_and_tamper(*args, **kwargs):
        if not calls:
            victim = max((copy / "best").rglob("*"), key=lambda p: p.stat().st_size)
            victim.write_bytes(victim.read_bytes()[::-1])
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "evaluate", evaluate_and_tamper)
        with pytest.raises(UserError, match=r"guard failed: the backbone checkpoint .* changed"):
            train.train_and_evaluate(attention_config(copy), str(tmp_path / "wd"))
    assert (tmp_path / "wd" / "checkpoints" / "1").is_dir()  # the attention state is kept


def test_backbone_variables_bit_identical_after_attention_training(backbone_dir, tmp_path):
    before = snapshot(backbone_dir)
    _, results = train.train_and_evaluate(attention_config(backbone_dir), str(tmp_path))
    assert snapshot(backbone_dir) == before
    digest = checkpoints.digest(*checkpoints.find_model_checkpoint(str(backbone_dir)))
    assert results["backbone_checkpoint_sha256"] == digest


def nan_when_label_is_3(params, extra, frozen, x, y, rng):
    logits = jnp.mean(x, axis=(1, 2)) @ params["w"]
    loss = jnp.mean(steps.cross_entropy(logits, y))
    return jnp.where(y[0] == 3, jnp.nan, loss), (logits, extra)


def test_skip_mode_drops_exactly_the_non_finite_updates():
    tx = optax.adam(1e-2)
    params = {"w": jnp.ones((3, 10), jnp.float32)}
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (8, 4, 4, 3)), jnp.uint8)
    labels = jnp.asarray([1, 3, 5, 3, 2, 0, 3, 1], jnp.int32)
    perm = jnp.arange(8)
    key = jax.random.key(0)
    skip = jax.jit(
        lambda s, i: steps.train_step(
            nan_when_label_is_3,
            tx,
            False,
            1,
            key,
            s,
            {},
            images,
            labels,
            perm,
            i,
            skip_nonfinite=True,
        )
    )
    stop = jax.jit(
        lambda s, i: steps.train_step(
            nan_when_label_is_3, tx, False, 1, key, s, {}, images, labels, perm, i
        )
    )
    state = steps.init_state(params, tx)
    for i in range(8):
        before = state
        state, metrics = skip(before, jnp.int32(i))
        assert int(state["step"]) == i + 1
        if int(labels[i]) == 3:
            assert not bool(metrics["finite"]) and float(metrics["loss"]) == 0.0
            assert_trees_equal(state["params"], before["params"])
            assert_trees_equal(state["opt_state"], before["opt_state"])
        else:
            expected, _ = stop(before, jnp.int32(i))
            assert_trees_equal(state["params"], expected["params"])
    assert int(state["skipped"]) == 3


def test_skip_mode_end_to_end_counts_the_skips(tmp_path, monkeypatch):
    original = tasks.backbone_loss_fn

    def sometimes_nan(backbone, weight_decay):
        loss_fn = original(backbone, weight_decay)

        def wrapped(params, extra, frozen, x, y, rngs):
            loss, aux = loss_fn(params, extra, frozen, x, y, rngs)
            return jnp.where(y[0] == 3, jnp.nan, loss), aux

        return wrapped

    monkeypatch.setattr(tasks, "backbone_loss_fn", sometimes_nan)
    config = tiny_config(epochs=2)
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step \d+ \(epoch 1\)"):
        train.train_and_evaluate(config, str(tmp_path / "stop"))
    config.on_nonfinite = "skip"
    _, results = train.train_and_evaluate(config, str(tmp_path / "skip"))
    assert 0 < results["skipped_updates"] < results["steps"]
    saved = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert saved["skipped_updates"] == results["skipped_updates"]
    assert np.isfinite(saved["test_loss"])


def test_skip_mode_stops_when_a_whole_epoch_is_skipped(tmp_path):
    config = tiny_config(epochs=3)
    config.on_nonfinite = "skip"
    config.backbone_training.learning_rate = 1e30
    with pytest.raises(UserError, match=r"every update of epoch \d was non-finite and skipped"):
        train.train_and_evaluate(config, str(tmp_path))


def test_a_stage_that_ends_in_an_error_closes_its_event_file(tmp_path, monkeypatch):
    """Closed on the way out, not by tensorboardX's exit hook: that hook starts a thread at
    interpreter shutdown, which Python 3.12 refuses with a traceback after the error's line."""
    from train import progress

    closed = []
    real_close = progress.Writer.close
    monkeypatch.setattr(progress.Writer, "close", lambda self: closed.append(real_close(self)))

    def fail(self, stop):
        raise UserError("no space left on the device")

    monkeypatch.setattr(run.Run, "train_epoch", fail)
    with pytest.raises(UserError, match="no space left"):
        train.train_and_evaluate(tiny_config(epochs=1), str(tmp_path / "w"))
    assert closed


_WRITER = """
import importlib.util, sys
from pathlib import Path
from train import progress
writer = progress.Writer(Path(sys.argv[1]))
writer.scalars(1, {"loss": 0.5})
writer.close()
assert "torch" not in sys.modules, "the event writer imported torch"
if importlib.util.find_spec("torch"):
    import torch  # still importable afterwards
    assert torch.zeros(1).shape == (1,)
print("ok")
"""


def test_the_event_writer_does_not_import_torch_and_leaves_it_importable(tmp_path):
    """tensorboardX imports torch where it is installed (a second and a few hundred MB per
    training process) unless kept from it; torch stays importable for whoever needs it."""
    r = subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path)], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    (event,) = (tmp_path / "tensorboard").iterdir()
    assert b"loss" in event.read_bytes()


def test_after_a_failed_read_orbax_futures_never_retrieved_are_not_logged():
    """A damaged checkpoint's other arrays fail in orbax's gathering futures, which asyncio
    logs when they are collected: after the one-line error, those logs are dropped; others
    still reach the terminal."""
    import logging

    def raised(filename):
        try:
            exec(compile("raise ValueError('OUT_OF_RANGE: Error reading')", filename, "exec"))
        except ValueError as e:
            return (ValueError, e, e.__traceback__)

    def logged(exc_info):
        record = logging.LogRecord(
            "asyncio", logging.ERROR, "base_events.py", 1, "%s exception was never retrieved",
            ("_GatheringFuture",), exc_info,
        )  # fmt: skip
        return logging.getLogger("asyncio").filter(record)

    checkpoints._drop_abandoned_reads()
    assert not logged(raised("/site-packages/orbax/checkpoint/serialization.py"))
    assert logged(raised("/work/project/code.py"))
