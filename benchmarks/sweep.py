r"""Throughput of the toy attention step for N vmap members at a fixed per-member batch.

  python -m benchmarks.sweep [--members 1,4,16] [--batch 128] [--dtype float32] [--json]

Times the compiled step that ``train.sweep`` runs (``sweep.members_step``: ``jax.vmap`` of
``steps.train_step`` over the members' states, seeds, learning rates and lesion masks; every
site modulated; each member its own batch of ``--batch`` images), as the median of
``--repeats`` calls after ``--warmup``. Keys: benchmarks/README.md.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks.common import aot, build, median_seconds, report
from train import compilation, precision, steps, sweep

if __name__ == "__main__":  # flags only when run as a program (the suite imports this)
    _MEMBERS = flags.DEFINE_list("members", ["1", "4", "16"], "Member counts to time.")
    _BATCH = flags.DEFINE_integer("batch", 128, "Batch size per member.")
    _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
    _REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per measurement.")
    _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs before timing.")
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def time_members(n: int, batch: int, dtype: str, repeats: int, warmup: int) -> tuple:
    """(median seconds of one step of N members, the step's compile seconds)."""
    backbone, bv, attention, av, _, _ = build(batch, dtype, 16)
    rng = np.random.default_rng(0)
    pool = n * batch  # each member gets its own images
    images = jnp.asarray(rng.integers(0, 256, (pool, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (pool,)), jnp.int32)
    perms = jnp.stack([jnp.arange(m * batch, (m + 1) * batch) for m in range(n)])

    step = sweep.members_step(backbone, attention, 1e-5, False, batch)
    masks = jnp.ones((n, len(attention.sites)), jnp.float32)  # every site modulated
    tx = optax.adam(1e-3, eps=1e-7)
    state = jax.tree.map(lambda x: jnp.stack([x] * n), steps.init_state(av["params"], tx))
    seeds = jnp.stack([jax.random.key_data(jax.random.key(m)) for m in range(n)])
    lrs = jnp.full((n,), 1e-3, jnp.float32)
    args = (seeds, lrs, masks, {"backbone": bv}, images, labels, perms, jnp.int32(0))
    step, stats = aot(step, state, *args)
    holder = {"state": state}

    def call():
        holder["state"], metrics = step(holder["state"], *args)
        return metrics["loss"]

    return median_seconds(call, repeats=repeats, warmup=warmup), stats["compile_s"]


def main(argv):
    del argv
    results = {"config": {"batch_per_member": _BATCH.value, "dtype": _DTYPE.value}}
    compilation.enable_cache()
    for n in map(int, _MEMBERS.value):
        with precision.scope_for(_DTYPE.value):
            seconds, compile_s = time_members(
                n, _BATCH.value, _DTYPE.value, _REPEATS.value, _WARMUP.value
            )
        results[f"members_{n}_step_s"] = seconds
        results[f"members_{n}_compile_s"] = compile_s
        results[f"members_{n}_images_per_s"] = n * _BATCH.value / seconds
    device = jax.devices()[0]
    results["config"].update(
        device=str(device), device_kind=device.device_kind, cpu_count=os.cpu_count(),
        jax=jax.__version__,
    )  # fmt: skip
    report(results, _JSON.value)


if __name__ == "__main__":
    app.run(main)
