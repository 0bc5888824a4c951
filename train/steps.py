"""Compiled steps: module-level pure functions, static choices bound with functools.partial.

The dataset lives on the device; a step receives the epoch's permutation and its index in the
epoch, picks its batch, augments it and updates the state, so per step the host sends a scalar.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from train.data import input_pipeline
from train.data.augment import augment, to_float
from train.parallel import constrain

# (trainable params, other trained collections, frozen variables, images, labels, rngs)
#  -> (loss, (logits, new values of the other collections))
# The other collections ('extra', e.g. BatchNorm statistics) are updated by the forward pass, not
# by the optimizer; they are empty for most models. ``rngs``: {'step': one key for the call,
# 'examples': one key per image (``example_keys``), the same however the batch is split}.
LossFn = Callable[
    [dict, dict, dict, jax.Array, jax.Array, dict], tuple[jax.Array, tuple[jax.Array, dict]]
]


def example_keys(key: jax.Array, batch_size: int, start=0, count: int | None = None):
    """One key per image of a global batch of ``batch_size`` (image i's: a function of ``key``
    and i), or of its images [start, start + count) (a data-parallel shard's)."""
    keys = jax.random.split(jax.random.fold_in(key, 0xE4A), batch_size)
    if count is None or count == batch_size:
        return keys
    return jax.lax.dynamic_slice_in_dim(keys, start, count)


def loss_rngs(key: jax.Array, batch_size: int, start=0, count: int | None = None) -> dict:
    """A loss function's ``rngs`` for a (global) batch of ``batch_size``, or for its images
    [start, start + count)."""
    return {"step": key, "examples": example_keys(key, batch_size, start, count)}


# (variables = params and the other collections, frozen variables, images) -> logits
LogitsFn = Callable[[dict, dict, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def l2_penalty(params, names: tuple[str, ...]) -> jax.Array:
    """sum of w^2 over leaves whose name is in ``names`` (Keras' l2 regularizer without the
    coefficient)."""
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if str(getattr(path[-1], "key", "")) in names:
            total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return total


def epoch_permutation(seed_key: jax.Array, epoch: jax.Array, n: int) -> jax.Array:
    """The data order of an epoch: a function of the seed and the epoch only, so resuming from
    an epoch boundary replays exactly the same batches."""
    return jax.random.permutation(jax.random.fold_in(seed_key, epoch), n)


def init_state(params: dict, tx: optax.GradientTransformation, extra: dict | None = None) -> dict:
    """The training state: parameters, optimizer state, the step, the count of skipped
    (non-finite) updates and, for models that have them, the other trained collections
    ('extra': e.g. BatchNorm statistics, updated by the forward pass)."""
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.int32(0),
        "skipped": jnp.int32(0),
    }
    if extra:
        state["extra"] = extra
    return state


def variables(state: dict) -> dict:
    """The model variables of a training state: {'params': ..., **extra}."""
    return {"params": state["params"], **state.get("extra", {})}


def train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    do_augment: bool,
    batch_size: int,
    seed_key: jax.Array,
    state: dict,
    frozen: dict,
    images: jax.Array,
    labels: jax.Array,
    perm: jax.Array,
    index: jax.Array,
    *,
    skip_nonfinite: bool = False,
    batch_sharding=None,
    shard: jax.Array | None = None,
    num_shards: int = 1,
    axis_name: str | None = None,
):
    """One optimisation step on batch ``index`` of the epoch ordered by ``perm``.

    ``frozen`` ({'backbone': the frozen backbone's variables}, or {}) is an argument rather than a
    constant, so large backbones are not baked into the compiled program. With
    ``skip_nonfinite`` an update whose loss or gradient is not finite is dropped (parameters and
    optimizer state stay as they were) and counted in ``state['skipped']``; the step counter
    advances either way, so the data order and RNG streams do not depend on skips.
    ``batch_sharding`` lays the batch out over a device mesh (data parallel; see parallel.py).

    Under pmap (``axis_name`` set), device ``shard`` of ``num_shards`` takes its slice of the
    global batch, draws the global batch's augmentation and dropout for it, and gradients,
    metrics and BatchNorm statistics are averaged over the devices (equal slices: the global
    batch's means).
    """
    local = batch_size // num_shards
    offset = 0 if shard is None else shard * local
    idx = jax.lax.dynamic_slice_in_dim(perm, index * batch_size + offset, local)
    x = constrain(images[idx], batch_sharding)
    y = constrain(labels[idx], batch_sharding)
    key = jax.random.fold_in(jax.random.fold_in(seed_key, 1), state["step"])
    k_aug, k_drop = jax.random.split(key)
    if do_augment:
        x = augment(k_aug, x, batch_size, offset) if axis_name else augment(k_aug, x)
    else:
        x = to_float(x)
    extra = state.get("extra", {})
    rngs = loss_rngs(k_drop, batch_size, offset, local)
    (loss, (logits, new_extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], extra, frozen, x, y, rngs
    )
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    if axis_name:
        loss, accuracy, grads, new_extra = jax.lax.pmean(
            (loss, accuracy, grads, new_extra), axis_name
        )
    return _apply(tx, state, grads, new_extra, loss, accuracy, skip_nonfinite)


def _apply(tx, state, grads, new_extra, loss, accuracy, skip_nonfinite: bool):
    """The optimizer's update of ``state`` (dropped, and counted, if not finite and
    ``skip_nonfinite``); returns (new state, metrics)."""
    extra = state.get("extra", {})
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {"loss": loss, "accuracy": accuracy, "finite": finite}
    if skip_nonfinite:
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        params = keep(params, state["params"])
        opt_state = keep(opt_state, state["opt_state"])
        new_extra = keep(new_extra, extra)
        metrics["loss"] = jnp.where(finite, loss, 0.0)
        metrics["accuracy"] = jnp.where(finite, metrics["accuracy"], 0.0)
    new_state = {
        "params": params,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    if "extra" in state:
        new_state["extra"] = new_extra
    return new_state, metrics


def eval_batch(
    logits_fn: LogitsFn,
    batch_size: int,
    variables: dict,
    frozen: dict,
    images: jax.Array,
    labels: jax.Array,
    start: jax.Array,
    *,
    batch_sharding=None,
    shard: jax.Array | None = None,
    num_shards: int = 1,
    axis_name: str | None = None,
):
    """Summed loss and correct count of batch [start, start + batch_size), padded at the end
    (examples past the end, and examples labelled -1, count for nothing). Under pmap each
    device takes its slice and the sums are summed over the devices."""
    n = labels.shape[0]
    local = batch_size // num_shards
    idx = start + (0 if shard is None else shard * local) + jnp.arange(local)
    idx_in = jnp.minimum(idx, n - 1)
    y = constrain(labels[idx_in], batch_sharding)
    valid = constrain(idx < n, batch_sharding) & (y >= 0)  # label -1: a padding example
    logits = logits_fn(variables, frozen, to_float(constrain(images[idx_in], batch_sharding)))
    loss = jnp.sum(jnp.where(valid, cross_entropy(logits, y), 0.0))
    correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == y, False))
    if axis_name:
        loss, correct = jax.lax.psum((loss, correct), axis_name)
    return loss, correct


class Batches:
    """The train step's data arguments (images, labels, perm, index), step after step.

    In memory: the whole split stays on the device and each step gets the epoch's permutation
    and its index (a scalar from the host). Streamed: each step gets its batch, read and
    augmented on the host ahead of time, with an identity permutation and index 0.
    """

    def __init__(self, split, place, seed_key, seed: int, batch: int, augment: bool):
        self.split, self.place, self.seed = split, place, seed
        self.batch, self.augment = batch, augment
        self.perm_key = jax.random.fold_in(seed_key, 2)
        if isinstance(split, input_pipeline.Split):
            self.arrays = place.replicate((split.images, split.labels))
            self.perm_fn = jax.jit(epoch_permutation, static_argnums=2)
        else:
            self.identity = place.replicate(jnp.arange(batch))

    def epoch(self, epoch: int, start: int = 0):
        """The epoch's steps from step ``start`` of the epoch on."""
        if isinstance(self.split, input_pipeline.Split):
            perm = self.perm_fn(self.perm_key, jnp.int32(epoch), len(self.split))
            for i in range(start, len(self.split) // self.batch):
                yield (*self.arrays, perm, jnp.int32(i))
        else:
            stream = self.split.train_batches(
                self.batch, self.seed, epoch, self.augment, self.place.process_shard, start
            )
            for x, y in stream:
                yield (*self.place.put_batch((x, y)), self.identity, jnp.int32(0))
