r"""Steady-state training throughput on real CIFAR-10 against synthetic data of the same shape.

  python -m benchmarks.pipeline --data_dir data/tfds [--stage attention] [--steps 60] [--json]

Both runs use the training loop's own step (batch picked by index from the device-resident
dataset, augmented on the device): per step the host sends one scalar. If the input pipeline
costs nothing, the two throughputs are equal.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from benchmarks.common import build
from configs import toy_cifar10
from train import cli, steps
from train.data import input_pipeline
from train.tasks import attention_loss_fn, backbone_loss_fn

_DATA_DIR = flags.DEFINE_string("data_dir", "data/tfds", "tfds data dir with local_cifar10.")
_STAGE = flags.DEFINE_enum("stage", "attention", ["attention", "backbone"], "Step to run.")
_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per run.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def steps_per_second(step_fn, state, frozen, images, labels, n_steps: int, batch: int) -> float:
    n = labels.shape[0]
    perm = jax.jit(steps.epoch_permutation, static_argnums=2)(jax.random.key(0), 0, n)
    per_epoch = n // batch
    for i in range(3):  # warm-up (compilation)
        state, m = step_fn(state, frozen, images, labels, perm, jnp.int32(i))
    jax.block_until_ready(m)
    t = time.perf_counter()
    for i in range(n_steps):
        state, m = step_fn(state, frozen, images, labels, perm, jnp.int32(i % per_epoch))
    jax.block_until_ready(m)
    return n_steps / (time.perf_counter() - t)


def main(argv):
    del argv
    config = toy_cifar10.get_config()
    config.dataset.data_dir = _DATA_DIR.value
    real = input_pipeline.read_tfds("local_cifar10", _DATA_DIR.value)[0]["train"]
    rng = np.random.default_rng(0)
    synthetic = input_pipeline.Split(
        rng.integers(0, 256, real.images.shape, dtype=np.uint8),
        rng.integers(0, 10, real.labels.shape).astype(np.int32),
    )
    backbone, bv, attention, av, _, _ = build(_BATCH.value, "float32", 16)
    if _STAGE.value == "attention":
        loss_fn, params, frozen = (
            attention_loss_fn(backbone, attention, 1e-5),
            av["params"],
            {"backbone": bv},
        )
    else:
        loss_fn, frozen = backbone_loss_fn(backbone, 0.0), {}
        params = jax.tree.map(jnp.copy, bv["params"])
    tx = optax.adam(1e-3)
    step_fn = jax.jit(
        functools.partial(steps.train_step, loss_fn, tx, True, _BATCH.value, jax.random.key(0)),
        donate_argnums=(0,),
    )
    out = {}
    for name, split in (
        ("synthetic", synthetic),
        ("cifar10", real),
        ("synthetic_again", synthetic),
    ):
        fresh = jax.tree.map(jnp.copy, params)  # each run donates its own copy
        state = steps.init_state(fresh, tx)
        images, labels = jax.device_put(split.images), jax.device_put(split.labels)
        out[f"{name}_steps_per_s"] = steps_per_second(
            step_fn, state, frozen, images, labels, _STEPS.value, _BATCH.value
        )
    synthetic_mean = (out["synthetic_steps_per_s"] + out["synthetic_again_steps_per_s"]) / 2
    out["cifar10_over_synthetic"] = out["cifar10_steps_per_s"] / synthetic_mean
    out["stage"], out["batch"], out["device"] = _STAGE.value, _BATCH.value, str(jax.devices()[0])
    print(json.dumps(out, indent=1) if _JSON.value else out)


if __name__ == "__main__":
    cli.run(main, tool="tool")
