r"""Times one training epoch on CIFAR-10 as the training loop runs it.

  python -m benchmarks.epoch --stage backbone|attention --data_dir data/tfds [--json]

The toy CIFAR-10 recipe (configs/toy_cifar10.py): 45,000 training images, batch 128, the
device-resident dataset augmented inside the compiled step, then the validation split evaluated
(5,000 images), with the training loop's own compiled step, batches and evaluation. A
warm-up of ``--warmup_steps`` steps and one validation pass (compilation) comes first; the timed
epoch is the next full epoch of steps plus its validation. The attention stage runs on a frozen
backbone with random weights (timing does not depend on them).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from absl import flags

from benchmarks.common import report
from configs import toy_cifar10
from train import checkpoints, cli, compilation, models, parallel, precision, steps, tasks
from train.data import input_pipeline

_STAGE = flags.DEFINE_enum("stage", "backbone", ["backbone", "attention"], "Stage to time.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data/tfds", "Prepared tfds data (local_cifar10).")
_DATASET = flags.DEFINE_string("dataset", "local_cifar10", "Dataset name.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 20, "Untimed steps before the timed epoch.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def random_backbone_workdir(config, root: str) -> str:
    """A workdir holding a randomly initialised backbone as its best checkpoint."""
    backbone = models.build_backbone(config)
    x = jnp.zeros((1, *models.image_shape(config)), jnp.float32)
    variables = jax.jit(backbone.init)(jax.random.key(0), x)
    best = checkpoints.manager(os.path.join(root, "best"), keep=1)
    checkpoints.save(best, 1, {"variables": variables})
    best.wait_until_finished()
    return root


def time_epoch(stage: str, data_dir: str, dataset: str, warmup_steps: int) -> dict:
    config = toy_cifar10.get_config()
    config.stage = stage
    config.dataset.name = dataset
    config.dataset.data_dir = data_dir
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "attention":
            config.backbone_checkpoint = random_backbone_workdir(config, tmp)
        place = parallel.placement(config)
        backbone = models.build_backbone(config)
        make_task = {"backbone": tasks.backbone_task, "attention": tasks.attention_task}[stage]
        task = make_task(config, backbone, jax.random.key(0))
    data = input_pipeline.load(config, models.image_shape(config))
    recipe = task.recipe
    batch = recipe.batch_size
    task = dataclasses.replace(task, frozen=place.replicate(task.frozen), place=place)
    validation = input_pipeline.on_device(data.validation, config.eval_batch_size, place.replicate)
    tx = task.tx or optax.adam(recipe.learning_rate, eps=1e-7)
    state = place.replicate(steps.init_state(task.params, tx, task.extra))
    seed_key = jax.random.key(config.seed)
    step_fn = place.compile(
        functools.partial(steps.train_step, task.loss_fn, tx, recipe.augment, batch, seed_key),
        donate_state=True,
    )
    batches = steps.Batches(data.train, place, seed_key, config.seed, batch, recipe.augment)

    def run(epoch, n_steps):
        nonlocal state
        for _, args in zip(range(n_steps), batches.epoch(epoch), strict=False):
            state, metrics = step_fn(state, task.frozen, *args)
        jax.block_until_ready(metrics["loss"])
        return tasks.evaluate(task, steps.variables(state), validation, config.eval_batch_size)

    t = time.perf_counter()
    with compilation.timed() as compiles:
        run(0, warmup_steps)
    warmup_s = time.perf_counter() - t
    steps_per_epoch = len(data.train) // batch
    t = time.perf_counter()
    val = run(1, steps_per_epoch)
    epoch_s = time.perf_counter() - t
    return {
        "stage": stage,
        "epoch_s": epoch_s,
        "steps_per_epoch": steps_per_epoch,
        "steps_per_s": steps_per_epoch / epoch_s,
        "train_images": len(data.train),
        "validation_images": len(data.validation),
        "warmup_s": warmup_s,
        "compile_s": compiles.summary()["seconds"],  # within the warm-up: steps, evaluation
        "validation_accuracy": val["accuracy"],
        "config": {
            "batch": batch,
            "augment": bool(recipe.augment),
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "python": platform.python_version(),
        },
    }


def main(argv):
    del argv
    compilation.enable_cache()
    with precision.scope_for("float32"):
        results = time_epoch(_STAGE.value, _DATA_DIR.value, _DATASET.value, _WARMUP.value)
    report(results, _JSON.value)


if __name__ == "__main__":
    cli.run(main, tool="tool")
