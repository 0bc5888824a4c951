"""The compiled parts of a sweep (``train.sweep``): N members' training step in one program,
their data orders, and their evaluation.

Every per-member argument has a leading member axis: the state, the seed's key data, the
learning rate, the lesion mask and its epoch's permutation;
the frozen backbone is either shared (no axis) or one per member (``frozen_axis=0``).

Two layouts of the members inside the one program (``config.sweep.layout``):

  'vmap'  ``jax.vmap`` over the members: one batched program (a convolution whose weights differ
          per member becomes a grouped convolution);
  'loop'  the members' steps one after the other in the compiled step (unrolled: each with the
          plain run's own kernels; compile time grows with N). A ``lax.map`` loop, or a
          ``lax.cond`` around a member's step, was measured 35 times slower on a CPU: XLA's
          CPU backend does not give a loop or branch body its fast convolutions.

Both give each member the run of the plain stage with its values (tests/test_sweep.py,
tests/test_seeds.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import parallel, steps


def members_step(
    loss_for, augment: bool, batch_size: int, skip_nonfinite: bool = False,
    frozen_axis: int | None = None, layout: str = "vmap",
):  # fmt: skip
    """``(states, seed key data, learning rates, masks, frozen, images, labels, perms, index,
    *, members=None) -> (states, metrics)``: ``steps.train_step`` for every member, with the
    loss ``loss_for(mask)``. ``members`` (static): the members that still train, the others
    (stopped) keep their state and cost nothing but their copy; one compilation per set of
    members that train (at most N + 1 over a run). Metrics of a stopped member: 0, finite."""

    def member_step(state, seed_data, lr, mask, frozen, images, labels, perm, index):
        return steps.train_step(
            loss_for(mask), optax.adam(lr, eps=1e-7), augment, batch_size,
            jax.random.wrap_key_data(seed_data), state, frozen, images, labels, perm, index,
            skip_nonfinite=skip_nonfinite,
        )  # fmt: skip

    axes = (0, 0, 0, 0, frozen_axis, None, None, 0, None)
    if layout == "vmap":
        inner = jax.vmap(member_step, in_axes=axes)
    else:

        def inner(*args):
            outs = []
            for m in range(args[1].shape[0]):  # unrolled: the plain run's kernels per member
                outs.append(member_step(*_take(args, axes, m)))
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    def member_step_all(*args, members=None):
        n = args[1].shape[0]
        if members is None or len(members) == n:
            return inner(*args)
        idx = np.asarray(members, np.int32)
        new, metrics = inner(*_take(args, axes, idx))
        state = jax.tree.map(lambda full, part: full.at[idx].set(part), args[0], new)
        stopped = {"loss": 0.0, "accuracy": 0.0, "finite": True}
        return state, {
            k: jnp.full((n,), stopped[k], v.dtype).at[idx].set(v) for k, v in metrics.items()
        }

    member_step_all.__name__ = "member_step"  # the name the compile log shows
    return jax.jit(member_step_all, donate_argnums=(0,), static_argnames=("members",))


def _take(args, axes, index):
    """The arguments of the members at ``index`` (an int: one member's, no member axis)."""
    return [a if axis is None else jax.tree.map(lambda x: x[index], a)
            for a, axis in zip(args, axes, strict=True)]  # fmt: skip


class MemberBatches:
    """The sweep's step arguments (images, labels, one permutation per member, index): each
    member its own data order, that of the plain run with its seed."""

    def __init__(self, split, seed_keys, batch: int):
        self.n, self.batch = len(split), batch
        self.arrays = jax.device_put((split.images, split.labels), parallel.one_device())
        self.seed_keys = seed_keys

        def member_perm(seed_data, epoch):
            key = jax.random.fold_in(jax.random.wrap_key_data(seed_data), 2)
            return steps.epoch_permutation(key, epoch, self.n)

        self.perm_fn = jax.jit(jax.vmap(member_perm, in_axes=(0, None)))

    def epoch(self, epoch: int, start: int = 0):
        perms = self.perm_fn(self.seed_keys, jnp.int32(epoch))
        for i in range(start, self.n // self.batch):
            yield (*self.arrays, perms, jnp.int32(i))


class MemberEval:
    """Accuracy of every member (vmapped), of one member, and of the frozen backbone(s):
    ``logits_for(mask)`` is a member's ``(variables, frozen, x) -> logits``; ``baseline`` the
    frozen backbone's (None: the stage has none)."""

    def __init__(self, logits_for, baseline=None, frozen_axis: int | None = None):
        self.logits_for, self.baseline, self.frozen_axis = logits_for, baseline, frozen_axis

    def _batch_fn(self, batch_size, variables, mask, frozen, images, labels, start):
        logits = self.logits_for(mask)
        return steps.eval_batch(logits, batch_size, variables, frozen, images, labels, start)

    @functools.lru_cache(maxsize=8)  # noqa: B019  (one per batch size; lives with the sweep)
    def _compiled(self, batch_size: int, vmapped: bool):
        fn = functools.partial(self._batch_fn, batch_size)
        if vmapped:
            fn = jax.vmap(fn, in_axes=(0, 0, self.frozen_axis, None, None, None))
        return jax.jit(fn)

    def _metrics(self, fn, variables, mask, frozen, split, batch_size) -> dict:
        loss = correct = 0
        for images, labels in split.eval_batches(batch_size):  # on the device, padded
            batch_loss, c = fn(variables, mask, frozen, images, labels, jnp.int32(0))
            loss, correct = loss + batch_loss, correct + c
        n = len(split)
        return {"accuracy": np.asarray(correct) / n, "loss": np.asarray(loss, np.float64) / n}

    def all(self, variables, masks, frozen, split, batch_size) -> dict:
        """Every member's accuracy and mean loss (arrays of one value per member)."""
        fn = self._compiled(batch_size, True)
        return self._metrics(fn, variables, masks, frozen, split, batch_size)

    def one(self, variables, mask, frozen, split, batch_size) -> float:
        """Member accuracy; ``frozen`` is that member's own."""
        fn = self._compiled(batch_size, False)
        return float(self._metrics(fn, variables, mask, frozen, split, batch_size)["accuracy"])

    def backbones(self, frozen, split, batch_size, n: int) -> np.ndarray:
        """The frozen backbone's test accuracy, per member (one per backbone, or one shared)."""
        fn = jax.jit(functools.partial(steps.eval_batch, self.baseline, batch_size))
        if self.frozen_axis == 0:
            fn = jax.jit(jax.vmap(fn, in_axes=(None, 0, None, None, None)))
        correct = 0
        for images, labels in split.eval_batches(batch_size):
            correct = correct + fn({}, frozen, images, labels, jnp.int32(0))[1]
        return np.broadcast_to(np.asarray(correct) / len(split), (n,)).astype(float)


def results_table(results: dict) -> str:
    """sweep.md: one row per member (with its frozen backbone's accuracy and the gain over it,
    where the stage has a frozen backbone; alpha init and lesion for attention members)."""
    rows = results["members"]
    base = [r.get("backbone_test_accuracy") for r in rows]
    with_base = None not in base
    attention = all("alpha_init" in r for r in rows)
    shared = with_base and len(set(base)) == 1
    lines = [f"frozen backbone test accuracy: {100 * base[0]:.2f} %", ""] if shared else []
    if "selected_on" in results:  # the split that chose each member's epoch
        lines = [f"best epochs selected on: {results['selected_on']}", "", *lines]
    heads = ["member", "seed", "learning rate"]
    heads += ["alpha init", "lesion"] if attention else []
    heads += ["best epoch", "val acc.", "test acc."] + (["backbone", "gain"] if with_base else [])
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r, b in zip(rows, base, strict=True):
        cells = [str(r["member"]), str(r["seed"]), f"{r['learning_rate']:g}"]
        if attention:
            cells += [f"{r['alpha_init']:g}", r["lesion"] or "full"]
        cells += [
            str(r["best_epoch"]),
            f"{100 * r['best_validation_accuracy']:.2f}",
            f"{100 * r['test_accuracy']:.2f}",
        ]
        if with_base:
            cells += [f"{100 * b:.2f}", f"{100 * (r['test_accuracy'] - b):+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
