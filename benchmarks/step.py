r"""Times GAttANet's steps against the backbone's own, on the default device.

  python -m benchmarks.step --backbone toy --batch 128 [--dtype float32|bfloat16] \
      [--precision float32|tensorfloat32] [--peer torch] [--json]
  python -m benchmarks.step --backbone resnet50 --batch 256 --dtype bfloat16 [--image_size 224]
  python -m benchmarks.step --backbone toy --batch 128 --nnx   # the NNX twin beside it

Every time is a median over ``--repeats`` runs after ``--warmup`` runs of the same compiled
functions the training loop uses, each compiled once ahead of time (its ``compile_s`` apart).
float32 runs at ``--precision`` (train/precision.py). Keys: benchmarks/README.md.
"""

from __future__ import annotations

import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import gattanet_jax as gj
from benchmarks.common import aot, build, median_seconds, report
from train import cli, compilation, precision, steps
from train.tasks import attention_loss_fn, backbone_loss_fn

if __name__ == "__main__":  # flags only when run as a program (the suite imports this)
    _BACKBONE = flags.DEFINE_enum(
        "backbone", "toy", ["toy", "resnet18", "resnet50"], "Backbone to time."
    )
    _IMAGE_SIZE = flags.DEFINE_integer(
        "image_size", 0, "Image side in pixels; 0 = the backbone's own (toy 32, ResNets 224)."
    )
    _BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
    _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
    _PRECISION = flags.DEFINE_enum(
        "precision",
        "float32",
        [*precision.PRECISIONS, "default"],
        "float32 dots and convolutions: a policy of train/precision.py, or 'default' (XLA's).",
    )
    _D = flags.DEFINE_integer("d", 16, "Attention dimension.")
    _KQ_DROPOUT = flags.DEFINE_float(
        "kq_dropout", None, "Key/query dropout rate of the attention step (default: the paper's)."
    )
    _PEER = flags.DEFINE_enum("peer", None, ["torch"], "Also time a peer implementation.")
    _NNX = flags.DEFINE_bool(
        "nnx", False, "Also time the attention step on the backbone's NNX twin (same weights)."
    )
    _REPEATS = flags.DEFINE_integer(
        "repeats", 20, "Timed runs per measurement (0: compile only, times are NaN)."
    )
    _WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed runs before timing.")
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def time_step(step_fn, state, data, repeats, warmup):
    """Times a donated-state train step, threading the state through the calls (NaN for no
    repeats: compile only)."""
    if not repeats:
        return float("nan")
    holder = {"state": state}

    def call(i):
        holder["state"], metrics = step_fn(holder["state"], *data, jnp.int32(i % 1))
        return metrics["loss"]

    for i in range(warmup):
        jax.block_until_ready(call(i))
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(call(i))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def train_steps(
    batch: int,
    dtype: str,
    d: int,
    repeats: int,
    warmup: int,
    backbone_name: str = "toy",
    image_size: int = 0,
    kq_dropout: float | None = None,
    **arch,
) -> tuple[dict, tuple]:
    """Times the backbone's own training step and GAttANet's attention step; returns the
    results and the built model (backbone, its variables, attention, its variables, images)."""
    backbone, bv, attention, av, images, labels = build(
        batch, dtype, d, backbone_name, image_size, **arch
    )
    if kq_dropout is not None:
        attention = attention.clone(dropout_rate=kq_dropout)
    perm = jnp.arange(batch)
    data = (images, labels, perm)
    seed = jax.random.key(0)
    tx = optax.adam(1e-3, eps=1e-7)
    results = {}

    def step_and_state(loss_fn, variables):
        fn = jax.jit(
            functools.partial(steps.train_step, loss_fn, tx, False, batch, seed),
            donate_argnums=(0,),
        )
        extra = {k: v for k, v in variables.items() if k != "params"}
        state = steps.init_state(variables["params"], tx, extra)
        return fn, state

    # The backbone's own step trains (and donates) a copy of its variables (ResNets: BatchNorm
    # in training mode, its statistics updated).
    bb_step, bb_state = step_and_state(backbone_loss_fn(backbone, 0.0), jax.tree.map(jnp.copy, bv))
    bb_data = ({}, *data)
    bb_step, results["backbone_train_step"] = aot(bb_step, bb_state, *bb_data, jnp.int32(0))
    results["backbone_train_step_s"] = time_step(bb_step, bb_state, bb_data, repeats, warmup)

    at_step, at_state = step_and_state(
        attention_loss_fn(backbone, attention, 1e-5), jax.tree.map(jnp.copy, av)
    )
    at_data = ({"backbone": bv}, *data)
    at_step, results["attention_step"] = aot(at_step, at_state, *at_data, jnp.int32(0))
    results["attention_step_s"] = time_step(at_step, at_state, at_data, repeats, warmup)
    results["compile_s"] = (
        results["backbone_train_step"]["compile_s"] + results["attention_step"]["compile_s"]
    )
    return results, (backbone, bv, attention, av, images)


def nnx_twin(backbone, backbone_vars, image_size: int):
    """The backbone's NNX twin with the same weights: (graph definition, state)."""
    from flax import nnx

    from gattanet_jax.backbones import resnet_nnx, toy_nnx
    from gattanet_jax.backbones.nnx_weights import load_linen_variables

    if isinstance(backbone, gj.ToyCNN):
        model = toy_nnx.ToyCNN(
            backbone.num_classes, tuple(backbone.features), backbone.hidden,
            dtype=backbone.dtype, image_size=image_size, rngs=nnx.Rngs(0),
        )  # fmt: skip
    else:
        model = resnet_nnx.ResNet(
            backbone.stage_sizes, backbone.block, backbone.num_classes, backbone.width,
            backbone.mean, backbone.std, backbone.dtype, rngs=nnx.Rngs(0),
        )  # fmt: skip
    load_linen_variables(model, backbone_vars)
    return nnx.split(model)


def nnx_steps(results, built, batch, repeats, warmup) -> None:
    """The attention step and the two-pass forward on the NNX twin, compiled and timed as the
    Linen ones (the same batch and attention variables), and their ratios to Linen's."""
    backbone, bv, attention, av, images = built
    graphdef, state = nnx_twin(backbone, bv, int(images.shape[1]))
    labels = jnp.zeros((batch,), jnp.int32)
    data = ({"backbone": state}, images, labels, jnp.arange(batch))
    tx = optax.adam(1e-3, eps=1e-7)
    fn = jax.jit(
        functools.partial(
            steps.train_step, attention_loss_fn(graphdef, attention, 1e-5), tx, False, batch,
            jax.random.key(0),
        ),
        donate_argnums=(0,),
    )  # fmt: skip
    extra = {k: v for k, v in av.items() if k != "params"}
    t = time.perf_counter()
    state0 = steps.init_state(jax.tree.map(jnp.copy, av["params"]), tx, extra)
    fn, results["nnx_attention_step"] = aot(fn, state0, *data, jnp.int32(0))
    jax.block_until_ready(fn(state0, *data, jnp.int32(0)))
    results["nnx_attention_time_to_first_step_s"] = time.perf_counter() - t
    state0 = steps.init_state(jax.tree.map(jnp.copy, av["params"]), tx, extra)
    results["nnx_attention_step_s"] = time_step(fn, state0, data, repeats, warmup)
    x = images.astype(jnp.float32) / 255.0
    eval_fn = jax.jit(lambda av, s, x: gj.two_pass(graphdef, attention, av, s, x).logits)
    eval_fn, results["nnx_eval_forward"] = aot(eval_fn, av, state, x)
    results["nnx_eval_forward_s"] = median_seconds(
        eval_fn, av, state, x, repeats=repeats, warmup=warmup
    )
    results["nnx_over_linen_attention_step"] = (
        results["nnx_attention_step_s"] / results["attention_step_s"]
    )
    results["nnx_over_linen_eval_forward"] = (
        results["nnx_eval_forward_s"] / results["eval_forward_s"]
    )
    results["nnx_over_linen_attention_compile"] = (
        results["nnx_attention_step"]["compile_s"] / results["attention_step"]["compile_s"]
    )


def run(
    batch: int,
    dtype: str,
    d: int,
    repeats: int,
    warmup: int,
    peer: str | None,
    backbone_name: str = "toy",
    image_size: int = 0,
    kq_dropout: float | None = None,
    nnx: bool = False,
) -> dict:
    if peer and backbone_name != "toy":
        raise app.UsageError("--peer torch times the toy model only")
    results, (backbone, bv, attention, av, images) = train_steps(
        batch, dtype, d, repeats, warmup, backbone_name, image_size, kq_dropout
    )
    x = images.astype(jnp.float32) / 255.0
    eval_fn = jax.jit(lambda av, bv, x: gj.two_pass(backbone, attention, av, bv, x).logits)
    eval_fn, results["eval_forward"] = aot(eval_fn, av, bv, x)
    results["eval_forward_s"] = median_seconds(eval_fn, av, bv, x, repeats=repeats, warmup=warmup)
    fwd, results["backbone_forward"] = aot(jax.jit(lambda bv, x: backbone.apply(bv, x)), bv, x)
    results["backbone_forward_s"] = median_seconds(fwd, bv, x, repeats=repeats, warmup=warmup)
    results["compile_s"] += (
        results["eval_forward"]["compile_s"] + results["backbone_forward"]["compile_s"]
    )

    if nnx:
        nnx_steps(results, (backbone, bv, attention, av, images), batch, repeats, warmup)
    results["attention_images_per_s"] = batch / results["attention_step_s"]
    results["eval_images_per_s"] = batch / results["eval_forward_s"]
    results["attention_over_backbone_train"] = (
        results["attention_step_s"] / results["backbone_train_step_s"]
    )
    results["eval_over_backbone_forward"] = (
        results["eval_forward_s"] / results["backbone_forward_s"]
    )
    bb_mem, at_mem = (
        results["backbone_train_step"]["temp_bytes"],
        results["attention_step"]["temp_bytes"],
    )
    if bb_mem:
        results["attention_over_backbone_temp_memory"] = at_mem / bb_mem
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        results["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    if peer == "torch":
        from benchmarks import torch_peer

        threads = os.cpu_count() or 1
        results["peer_torch_attention_step_s"] = torch_peer.attention_step_seconds(
            batch, d, repeats, warmup, threads
        )
        results["peer_torch_backbone_train_step_s"] = torch_peer.backbone_train_step_seconds(
            batch, repeats, warmup, threads
        )
        results["attention_over_peer"] = (
            results["attention_step_s"] / results["peer_torch_attention_step_s"]
        )
        results["backbone_train_over_peer"] = (
            results["backbone_train_step_s"] / results["peer_torch_backbone_train_step_s"]
        )
    results["config"] = {
        "backbone": backbone_name,
        "image_size": int(images.shape[1]),
        "batch": batch,
        "dtype": dtype,
        "d": d,
        "kq_dropout": attention.dropout_rate,
        "repeats": repeats,
        "device": str(device),
        "device_kind": device.device_kind,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    return results


def main(argv):
    del argv
    compilation.enable_cache()
    with precision.scope_for(_DTYPE.value, _PRECISION.value):
        results = run(
            _BATCH.value,
            _DTYPE.value,
            _D.value,
            _REPEATS.value,
            _WARMUP.value,
            _PEER.value,
            _BACKBONE.value,
            _IMAGE_SIZE.value,
            _KQ_DROPOUT.value,
            _NNX.value,
        )
    results["config"]["precision"] = precision.policy(_DTYPE.value, _PRECISION.value) or "default"
    report(results, _JSON.value)


if __name__ == "__main__":
    cli.run(main, tool="tool")
