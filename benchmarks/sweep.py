r"""What N sweep members cost against N single runs: the toy model's training step of a stage
for N members in one program, against the plain run's step.

  python -m benchmarks.sweep [--stage attention|backbone] [--members 1,2,4,8,16]
      [--layout vmap|loop] [--backbones own|shared] [--batch 128] [--dtype float32] [--json]

Times the compiled step that ``train.sweep`` runs (``train.members.members_step``: every
member's state, seed, learning rate and data order; each member its own batch of ``--batch``
images) and the plain run's ``steps.train_step`` at the same batch, each the median of
``--repeats`` calls after ``--warmup``. ``--stage backbone``: the backbone stage (N seeds of the
toy CNN, all parameters training, dropout on). ``--stage attention``: GAttANet on a frozen
backbone, each member its own (``--backbones own``, as the seeds protocol trains) or one shared.
An epoch of the toy recipe is 351 such steps (45,000 images at batch 128), so the ratios are the
epoch's. Keys per N: ``members_N_step_s``, ``members_N_per_member_s`` (step / N),
``members_N_cost_ratio`` (step / (N x single step): 1 = members cost what single runs cost),
``members_N_compile_s``; ``single_step_s``; benchmarks/README.md.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from benchmarks.common import aot, build, median_seconds, report
from train import cli, compilation, members, precision, steps
from train.tasks import attention_loss_fn, backbone_loss_fn

if __name__ == "__main__":  # flags only when run as a program (the suite imports this)
    _STAGE = flags.DEFINE_enum("stage", "attention", ["attention", "backbone"], "Stage to time.")
    _MEMBERS = flags.DEFINE_list("members", ["1", "2", "4", "8", "16"], "Member counts to time.")
    _LAYOUT = flags.DEFINE_enum("layout", "vmap", ["vmap", "loop"], "sweep.layout.")
    _BACKBONES = flags.DEFINE_enum(
        "backbones", "own", ["own", "shared"], "attention: a frozen backbone per member or one."
    )
    _BATCH = flags.DEFINE_integer("batch", 128, "Batch size per member.")
    _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
    _REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per measurement.")
    _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs before timing.")
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def _stage(stage: str, batch: int, dtype: str):
    """(loss for a lesion mask, initial params, extra collections, frozen variables)."""
    backbone, bv, attention, av, _, _ = build(batch, dtype, 16)
    if stage == "backbone":
        variables = dict(bv)
        params = variables.pop("params")
        return (lambda mask: backbone_loss_fn(backbone, 1e-5)), params, variables, {}
    variables = dict(av)
    params = variables.pop("params")

    def loss_for(mask):
        return attention_loss_fn(backbone, attention, 1e-5, lesion=mask)

    return loss_for, params, variables, {"backbone": bv}


def _data(n: int, batch: int):
    rng = np.random.default_rng(0)
    pool = n * batch  # each member gets its own images
    images = jnp.asarray(rng.integers(0, 256, (pool, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (pool,)), jnp.int32)
    return images, labels


def time_single(batch: int, dtype: str, repeats: int, warmup: int, stage="attention") -> tuple:
    """(median seconds of the plain run's step, its compile seconds)."""
    loss_for, params, extra, frozen = _stage(stage, batch, dtype)
    tx = optax.adam(1e-3, eps=1e-7)
    step = jax.jit(
        functools.partial(steps.train_step, loss_for(None), tx, False, batch, jax.random.key(0)),
        donate_argnums=(0,),
    )
    images, labels = _data(1, batch)
    args = (frozen, images, labels, jnp.arange(batch), jnp.int32(0))
    holder = {"state": steps.init_state(params, tx, extra)}
    step, stats = aot(step, holder["state"], *args)

    def call():
        holder["state"], metrics = step(holder["state"], *args)
        return metrics["loss"]

    return median_seconds(call, repeats=repeats, warmup=warmup), stats["compile_s"]


def time_members(
    n: int, batch: int, dtype: str, repeats: int, warmup: int, stage: str = "attention",
    layout: str = "vmap", own_backbones: bool = False,
) -> tuple:  # fmt: skip
    """(median seconds of one step of N members, the step's compile seconds)."""
    loss_for, params, extra, frozen = _stage(stage, batch, dtype)
    images, labels = _data(n, batch)
    perms = jnp.stack([jnp.arange(m * batch, (m + 1) * batch) for m in range(n)])
    own = own_backbones and stage == "attention"
    step = members.members_step(loss_for, False, batch, frozen_axis=0 if own else None,
                                layout=layout)  # fmt: skip
    if own:  # N copies: each member reads its own backbone's weights
        frozen = jax.tree.map(lambda x: jnp.stack([x] * n), frozen)
    tx = optax.adam(1e-3, eps=1e-7)
    state = jax.tree.map(lambda x: jnp.stack([x] * n), steps.init_state(params, tx, extra))
    seeds = jnp.stack([jax.random.key_data(jax.random.key(m)) for m in range(n)])
    lrs = jnp.full((n,), 1e-3, jnp.float32)
    masks = jnp.ones((n, 5), jnp.float32)  # every site modulated (unused by the backbone)
    args = (seeds, lrs, masks, frozen, images, labels, perms, jnp.int32(0))
    step, stats = aot(step, state, *args)
    holder = {"state": state}

    def call():
        holder["state"], metrics = step(holder["state"], *args)
        return metrics["loss"]

    return median_seconds(call, repeats=repeats, warmup=warmup), stats["compile_s"]


def main(argv):
    del argv
    stage, batch, dtype = _STAGE.value, _BATCH.value, _DTYPE.value
    own = _BACKBONES.value == "own"
    results = {
        "config": {
            "stage": stage, "layout": _LAYOUT.value, "batch_per_member": batch, "dtype": dtype,
            "backbones": _BACKBONES.value if stage == "attention" else "-",
        }
    }  # fmt: skip
    compilation.enable_cache()
    with precision.scope_for(dtype):
        single, _ = time_single(batch, dtype, _REPEATS.value, _WARMUP.value, stage)
        results["single_step_s"] = single
        for n in map(int, _MEMBERS.value):
            seconds, compile_s = time_members(
                n, batch, dtype, _REPEATS.value, _WARMUP.value, stage, _LAYOUT.value, own
            )
            results[f"members_{n}_step_s"] = seconds
            results[f"members_{n}_per_member_s"] = seconds / n
            results[f"members_{n}_cost_ratio"] = seconds / (n * single)
            results[f"members_{n}_compile_s"] = compile_s
            results[f"members_{n}_images_per_s"] = n * batch / seconds
    device = jax.devices()[0]
    results["config"].update(
        device=str(device), device_kind=device.device_kind, cpu_count=os.cpu_count(),
        jax=jax.__version__,
    )  # fmt: skip
    report(results, _JSON.value)


if __name__ == "__main__":
    cli.run(main, tool="tool")
