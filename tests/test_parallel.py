"""Data parallel training (config.parallel='jit' and 'pmap') over the 8 forced host devices."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_train import tiny_config
from train import train
from train.errors import UserError


def parallel_config(mode, stage="backbone"):
    config = tiny_config(stage, epochs=1)
    config.parallel = mode
    config.eval_batch_size = 48
    config.dataset.max_train_examples = 3 * 32 * 10 // 9 + 1  # 3 steps of 32 after validation
    return config


def run_both(tmp_path, stage, mode, **overrides):
    runs = []
    for m in ("none", mode):
        config = parallel_config(m, stage)
        config.update(overrides)
        runs += train.train_and_evaluate(config, str(tmp_path / f"{stage}_{m}"))
    return runs


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parallel") / "backbone"
    train.train_and_evaluate(parallel_config("none"), str(path))
    return path


@pytest.mark.parametrize("mode", ["jit", "pmap"])
@pytest.mark.parametrize("stage", ["backbone", "attention"])
def test_data_parallel_equals_one_device(tmp_path, stage, mode, backbone_dir):
    assert jax.local_device_count() == 8
    overrides = {"backbone_checkpoint": str(backbone_dir)}
    if stage == "attention":
        # augmentation on too: each device must draw its slice of the global batch's transforms
        overrides["attention_training"] = {"augment": True}
    elif mode == "pmap":
        # the backbone's own dropout is drawn per device under pmap (see train/parallel.py)
        overrides["model"] = {"dropout_rate": 0.0}
    one_state, one, all_state, par = run_both(tmp_path, stage, mode, **overrides)
    assert one["steps"] == par["steps"] == 3
    for a, b in zip(
        jax.tree.leaves(one_state["state"]["params"]),
        jax.tree.leaves(all_state["state"]["params"]),
        strict=True,
    ):
        assert b.sharding.device_set == set(jax.local_devices())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert par["test_accuracy"] == one["test_accuracy"]
    assert abs(par["test_loss"] - one["test_loss"]) <= 1e-5 * abs(one["test_loss"])


@pytest.mark.parametrize("field", ["backbone_training.batch_size", "eval_batch_size"])
def test_batch_size_that_does_not_divide_by_the_devices(tmp_path, field):
    config = parallel_config("jit")
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = 30
    with pytest.raises(
        UserError,
        match=rf"config.{field} = 30 does not divide by the 8 devices of config.parallel='jit'; "
        "use a multiple of 8",
    ):
        train.train_and_evaluate(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_unknown_parallel_mode(tmp_path):
    config = parallel_config("pmapp")
    with pytest.raises(
        UserError, match=r"config.parallel must be one of \('none', 'jit', 'pmap'\)"
    ):
        train.train_and_evaluate(config, str(tmp_path))


def test_pmap_key_query_batch_norm_statistics_are_the_global_batch_s(tmp_path, backbone_dir):
    # (under 'jit' the step is one global computation: the batch statistics are global anyway)
    variant = {"batch_norm_kq": True, "layer_norm_gatta": True}
    one_state, one, all_state, par = run_both(
        tmp_path, "attention", "pmap", backbone_checkpoint=str(backbone_dir), attention=variant
    )
    one_vars, all_vars = one_state["state"]["extra"], all_state["state"]["extra"]
    assert jax.tree.structure(one_vars) == jax.tree.structure(all_vars)
    for a, b in zip(jax.tree.leaves(one_vars), jax.tree.leaves(all_vars), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert float(np.max(np.abs(np.asarray(one_vars["batch_stats"]["conv1"]["K_mean"])))) > 0
    assert par["test_accuracy"] == one["test_accuracy"]


# Steps with a gradient all-reduce, dispatched one after another without reading a result back
# (as the loop does between log steps): 30 in flight were enough to abort the process before.
_IN_FLIGHT = """
import sys
import jax, jax.numpy as jnp
from train import parallel
place = parallel.Placement(parallel.Mesh(jax.devices(), (parallel.AXIS,)), sys.argv[1])

def step(w, x, shard=0, num_shards=1, axis_name=None, batch_sharding=None):
    x = parallel.constrain(x, batch_sharding)
    if axis_name:
        x = x.reshape(num_shards, -1, *x.shape[1:])[shard]
    g = jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w)))(w)
    if axis_name:
        g = jax.lax.pmean(g, axis_name)
    return w - 0.1 * g, jnp.mean(x)

step_fn = place.compile(step, donate_state=True)
w, x = place.replicate(jnp.ones((16, 16))), place.replicate(jnp.ones((128, 32, 32, 16)))
total = 0.0
for _ in range(64):
    w, m = step_fn(w, x)
    total = total + m
print(float(total))
"""


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_many_steps_in_flight_on_eight_cpu_devices(mode):
    run = subprocess.run(
        [sys.executable, "-c", _IN_FLIGHT, mode],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) == 64.0
